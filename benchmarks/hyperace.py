"""unwa's HyperACE v2 network on the CPU: its arithmetic, and stemsep's HyperACE mask
estimator against splifft 0.0.9's on the same weights. Not a test.

- FLOPs per second of audio of the published network (dim 256, depth 12, 62 bands, one
  stem, 960,000-sample chunks), counted by torch's FlopCounterMode on the meta device (no
  time, no memory) with the math attention backend so attention's products count, split
  into band split, transformers, the band MLPs and the HyperACE network; stemsep's and
  splifft's networks counted alike (they must agree).
- CPU seconds of one stem's mask estimator (band MLPs + HyperACE network) on `--seconds` of
  tokens, stemsep's and splifft's timed in turns, median of `--reps` after a warm-up each;
  and the largest difference between their outputs.

    .venv/bin/python benchmarks/hyperace.py --out benchmarks/results/hyperace_cpu.json   # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from splifft.models import bs_roformer as splifft
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stemsep.model import BSRoformerConfig, build_network
from stemsep.testing import BANDS_1297

SAMPLE_RATE, HOP, CHUNK = 44100, 512, 960_000
CONFIG = BSRoformerConfig(dim=256, depth=12, stereo=True, time_transformer_depth=1, freq_transformer_depth=1,
                          stft_hop_length=HOP, freqs_per_bands=BANDS_1297, use_mask_estimator_hyper_ace=True, hyperace_version=2)


def frames(samples: int) -> int:
    return samples // HOP + 1


def splifft_network(chunk: int) -> torch.nn.Module:
    params = splifft.BSRoformerParams(chunk_size=chunk, output_stem_names=("vocals",), dim=CONFIG.dim, depth=CONFIG.depth,
                                      band_config=splifft.FixedBandsConfig(kind="fixed"),
                                      mask_estimator=splifft.HyperAceResidualV2MaskEstimatorConfig(kind="hyperace_residual_v2"))
    return splifft.BSRoformer(params).eval()


def count(run, *args):
    """`run(*args)` and the FLOPs it took."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = run(*args)
    return out, counter.get_total_flops()


def stemsep_flops(network, values: torch.Tensor) -> dict[str, int]:
    """stemsep's network part by part, from the band values to the mask (its forward without
    the STFTs, which cannot run on the meta device)."""
    b = values.shape[0]
    x, band_split = count(network.band_split, values)

    def transformers(x):
        for time_transformer, freq_transformer in network.layers:
            x = time_transformer(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, -1)).transpose(1, 2)
            x = freq_transformer(x.flatten(0, 1)).unflatten(0, (b, -1))
        return network.final_norm(x)

    x, transformer = count(transformers, x)
    estimator = network.mask_estimators[0]
    _, mask_estimator = count(estimator, x)
    _, hyperace = count(estimator.segm, x.permute(0, 3, 1, 2))  # (b, dim, frames, bands)
    return {"total": band_split + transformer + mask_estimator, "band split": band_split, "transformers": transformer,
            "band MLPs": mask_estimator - hyperace, "HyperACE network": hyperace}


def flops_per_second() -> dict:
    seconds = CHUNK / SAMPLE_RATE
    values = sum(2 * 2 * b for b in BANDS_1297)  # stereo x re/im per bin
    with torch.device("meta"):
        ours = build_network(CONFIG).eval()
    ours_flops = stemsep_flops(ours, torch.zeros(1, frames(CHUNK), values, device="meta"))
    theirs = splifft_network(CHUNK).to("meta")
    _, theirs_flops = count(theirs, torch.zeros(1, values // 2, frames(CHUNK), 2, device="meta"))  # (b, (f s), t, re/im)
    return {"chunk_seconds": seconds,
            "stemsep_gflop_per_second_of_audio": {k: v / seconds / 1e9 for k, v in ours_flops.items()},
            "splifft_gflop_per_second_of_audio": {"total": theirs_flops / seconds / 1e9}}


def head_times(seconds: float, reps: int) -> dict:
    torch.manual_seed(0)
    reference = splifft_network(CHUNK).mask_estimators[0]
    with torch.device("meta"):
        ours = build_network(CONFIG).mask_estimators[0]
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    n = frames(int(seconds * SAMPLE_RATE))
    tokens = torch.randn(1, n, len(BANDS_1297), CONFIG.dim, generator=torch.Generator().manual_seed(1))
    runs: dict[str, list[float]] = {"stemsep": [], "splifft": []}
    outputs = {}
    with torch.inference_mode():
        for name, head in (("stemsep", ours), ("splifft", reference)):
            outputs[name] = head(tokens)  # warm-up
        for _ in range(reps):
            for name, head in (("splifft", reference), ("stemsep", ours)):
                start = time.perf_counter()
                head(tokens)
                runs[name].append(time.perf_counter() - start)
    error = (outputs["stemsep"] - outputs["splifft"]).abs().max().item()
    return {"tokens": [n, len(BANDS_1297), CONFIG.dim], "audio_seconds": seconds,
            "seconds_per_pass": {k: statistics.median(v) for k, v in runs.items()},
            "fastest_pass": {k: min(v) for k, v in runs.items()}, "runs": runs,
            "max_abs_difference": error, "peak": outputs["splifft"].abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.25, help="audio behind the timed tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "flops": flops_per_second(), "mask_estimator_cpu": head_times(args.seconds, args.reps)}
    result["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
