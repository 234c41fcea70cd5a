"""What six stems cost: SW's 6-stem BS-RoFormer next to 1297 on the CPU. Not a test.

Both networks at their published shapes (the yamls: SW's as tests/data/configs/ keeps it,
1297's as tests/data/ keeps it), random weights, fp32, on the same 1-s chunk (44,100
samples, stereo):

- FLOPs per second of audio per pass: torch's FlopCounterMode over one forward pass, with
  the math attention backend so attention's products count; next to it flops.py's count
  (matrix products read off the network) for the same chunk and for the model's own
  published chunk, where attention's share is larger (it grows with the frames in a chunk);
- CPU seconds per chunk: one forward pass, median of `--reps` after one untimed pass (the
  counted one), the two networks timed in turns.

    .venv/bin/python benchmarks/stems_cost.py   # about two minutes on 2 cores: benchmarks/results/stems_cost_cpu.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from flops import flops_per_second
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stemsep.checkpoint import Config, build_model, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> the published yaml
    "1297": REPO / "tests" / "data" / "model_bs_roformer_ep_317_sdr_12.9755.yaml",
    "sw": REPO / "tests" / "data" / "configs" / "BS-Rofo-SW-Fixed.yaml",
}
SAMPLE_RATE = 44100  # both models'
CHUNK = SAMPLE_RATE  # samples: 1 s
RESULTS = REPO / "benchmarks" / "results"


def with_chunk(config: Config, chunk: int) -> Config:
    """`config` run on chunks of `chunk` samples."""
    return replace(config, audio=replace(config.audio, chunk_size=chunk))


def measure(configs: dict[str, Config], reps: int) -> dict[str, dict]:
    """Each network's arithmetic and CPU time on one CHUNK, `configs` at their published chunks."""
    torch.manual_seed(0)
    networks = {name: build_model(config).eval() for name, config in configs.items()}
    audio = torch.randn(1, 2, CHUNK, generator=torch.Generator().manual_seed(1)) * 0.1  # (batch, channels, samples)
    seconds = CHUNK / SAMPLE_RATE
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for name, network in networks.items():
            config = configs[name]
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                network(audio)  # the untimed pass
            results[name] = {
                "stems": list(config.network_stems), "dim": config.model.dim, "depth": config.model.depth,
                "stft_hop_length": config.model.stft_hop_length, "published_chunk_samples": config.audio.chunk_size,
                "parameters": sum(p.numel() for p in network.parameters()),
                "gflop_per_second_of_audio": counter.get_total_flops() / seconds / 1e9,
                "gflop_per_second_of_audio_flops_py": flops_per_second(with_chunk(config, CHUNK)) / 1e9,
                "gflop_per_second_of_audio_published_chunk_flops_py": flops_per_second(config) / 1e9,
                "runs_s": [],
            }
        for _ in range(reps):
            for name, network in networks.items():  # in turns: the machine's load falls on both
                start = time.perf_counter()
                network(audio)
                results[name]["runs_s"].append(time.perf_counter() - start)
    for result in results.values():
        result["seconds_per_chunk"] = statistics.median(result["runs_s"])
    return results


ROWS = (  # label, key, format
    ("parameters (millions)", "parameters", lambda v: f"{v / 1e6:.1f}"),
    ("GFLOP per second of audio, 1-s chunk (FlopCounterMode)", "gflop_per_second_of_audio", lambda v: f"{v:.1f}"),
    ("GFLOP per second of audio, 1-s chunk (flops.py)", "gflop_per_second_of_audio_flops_py", lambda v: f"{v:.1f}"),
    ("GFLOP per second of audio, published chunk (flops.py)", "gflop_per_second_of_audio_published_chunk_flops_py",
     lambda v: f"{v:.1f}"),
    ("CPU seconds per 1-s chunk, median", "seconds_per_chunk", lambda v: f"{v:.2f}"),
)


def table(models: dict[str, dict]) -> str:
    """The results as a markdown table, SW's figure over 1297's in the last column."""
    names = list(models)
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " | sw / 1297 |", "|---|" + "---|" * (len(names) + 1),
             "| stems | " + " | ".join(str(len(models[n]["stems"])) for n in names) + " | |",
             "| dim, depth, STFT hop | " + " | ".join(f"{models[n]['dim']}, {models[n]['depth']}, {models[n]['stft_hop_length']}"
                                                     for n in names) + " | |",
             "| published chunk (samples) | " + " | ".join(f"{models[n]['published_chunk_samples']:,}" for n in names) + " | |"]
    for label, key, fmt in ROWS:
        ratio = models["sw"][key] / models["1297"][key]
        lines.append(f"| {label} | " + " | ".join(fmt(models[n][key]) for n in names) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "stems_cost_cpu.json", help="the JSON; the table goes beside it as .md")
    args = parser.parse_args()
    started = time.perf_counter()
    models = measure({name: load_config(path) for name, path in CONFIGS.items()}, args.reps)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_average": list(os.getloadavg())},
              "chunk_samples": CHUNK, "reps": args.reps, "models": models, "wall_seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(models))


if __name__ == "__main__":
    main()
