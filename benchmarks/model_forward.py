"""Forward time of one full-size 8-s chunk: stemsep's network vs audio-separator's BSRoformer.

Same process, same random weights (1297 shapes), same threads, fp32 eager, batch 1. Each
model runs `--reps` times after one warm-up; the median is reported, with peak RSS. On a GPU
(`--device cuda`) the same plus bf16 autocast for ours.

    .venv/bin/python benchmarks/model_forward.py --reps 3 --out benchmarks/results/model_forward_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from stemsep.checkpoint import _ConfigLoader, load_model
from stemsep.synthetic import CONFIG_1297, write_checkpoint, write_config


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(model, audio, reps, device, autocast_dtype=None):
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    times = []
    with torch.inference_mode(), amp:
        for i in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(audio)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run is a warm-up
                times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    from audio_separator.separator.uvr_lib_v5.roformer.bs_roformer import BSRoformer as Reference

    with tempfile.TemporaryDirectory() as tmp:
        config_path = write_config(Path(tmp) / "model.yaml", CONFIG_1297)
        torch.manual_seed(0)
        reference = Reference(**yaml.load(config_path.read_text(), Loader=_ConfigLoader)["model"]).eval()
        ours = load_model(write_checkpoint(Path(tmp) / "model.ckpt", reference.state_dict()), config_path, device)
    reference = reference.to(device)
    audio = 0.1 * torch.randn(1, 2, CONFIG_1297["audio"]["chunk_size"], device=device)

    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "device": str(device), "chunk_seconds": 8.0}
    results["ours_fp32_s"], results["ours_fp32_runs"] = timed(ours, audio, args.reps, device)
    results["reference_fp32_s"], results["reference_fp32_runs"] = timed(reference, audio, args.reps, device)
    results["ratio_reference_over_ours"] = results["reference_fp32_s"] / results["ours_fp32_s"]
    if device.type == "cuda":
        results["ours_bf16_s"], results["ours_bf16_runs"] = timed(ours, audio, args.reps, device, torch.bfloat16)
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    results["peak_rss_mb_both_models"] = peak_rss_mb()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"reference / stemsep forward time: {results['ratio_reference_over_ours']:.2f}x")


if __name__ == "__main__":
    main()
