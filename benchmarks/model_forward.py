"""The network alone: stemsep's vs audio-separator's `BSRoformer`. Not a test.

Same process, same random weights, same 8-s chunks of noise-like audio; full 1297 shapes,
or with `--config-preset cpu` the reduced network of `separate.py`'s CPU runs. Reports:

- parity: the largest difference between the two networks' fp32 outputs;
- precision: SNR of stemsep's bf16 and fp16 autocast outputs against its fp32 output;
- speed: the reference in fp32 at batch 1 (what audio-separator runs) and stemsep in fp32 at
  batch 1, timed in turns (reference, stemsep, reference, ...) so that a machine whose speed
  drifts slows both alike; on a GPU also stemsep in bf16 over `--batches` (and compiled,
  with `--compile`); median of `--reps` timed runs after a warm-up, in seconds per chunk;
- on a GPU, model FLOP utilization: the FLOP count of `flops.py` (checked against
  torch's FlopCounterMode in the tests) over the time, against the GPU's datasheet dense
  peak and against a bf16 matrix product measured here;
- peak RSS (and peak GPU memory).

    .venv/bin/python benchmarks/model_forward.py --config-preset cpu --reps 8 --out benchmarks/results/model_forward_cpu.json
    .venv/bin/python benchmarks/model_forward.py --reps 1 --out benchmarks/results/model_forward_cpu_full.json   # ~15 min
    python benchmarks/model_forward.py --device cuda --batches 1,4,8,16 --compile --out benchmarks/results/model_forward_cuda.json
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
from flops import datasheet_peak_tflops, flops_per_chunk
from separate import (
    MEL_BAND,
    PRESETS,  # this folder's end-to-end benchmark: the same network sizes
)

from stemsep.checkpoint import _ConfigLoader, load_config, load_model
from stemsep.compilation import snr_db
from stemsep.testing import CONFIG_1297, config_dict, write_checkpoint, write_config


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(models, audio, reps, device, autocast_dtype=None) -> list[tuple[float, list[float]]]:
    """(median, runs) per model, the models timed in turns, after one warm-up run each."""
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), amp:
        for i in range(reps + 1):
            for model, runs in zip(models, times):
                sync(device)
                t = time.perf_counter()
                model(audio)
                sync(device)
                if i:  # the first round is a warm-up
                    runs.append(time.perf_counter() - t)
    return [(statistics.median(runs), runs) for runs in times]


def output(model, audio, device, autocast_dtype=None) -> torch.Tensor:
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.inference_mode(), amp:
        return model(audio).float()


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """A large bf16 matrix product's rate on this GPU (random data): the practical ceiling."""
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1000) / 1e12


def profile_forward(model, audio: torch.Tensor, out: Path) -> None:
    """GPU time by kernel (torch.profiler) over two bf16 forward passes, top 25 to `out`."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(audio)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                model(audio)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--config-preset", choices=sorted(set(PRESETS) - MEL_BAND), default="full")  # BS-RoFormer only
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes for stemsep's bf16 timings (GPU)")
    parser.add_argument("--compile", action="store_true", help="also time stemsep compiled (bf16, largest batch)")
    parser.add_argument("--profile", type=Path, help="write torch.profiler's table of the fastest bf16 run's GPU kernels here")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    from audio_separator.separator.uvr_lib_v5.roformer.bs_roformer import (
        BSRoformer as Reference,
    )

    with tempfile.TemporaryDirectory() as tmp:
        config_path = write_config(Path(tmp) / "model.yaml", config_dict(model=PRESETS[args.config_preset]))
        torch.manual_seed(0)
        reference = Reference(**yaml.load(config_path.read_text(), Loader=_ConfigLoader)["model"]).eval()
        ours = load_model(write_checkpoint(Path(tmp) / "model.ckpt", reference.state_dict()), config_path, device)
        flops = flops_per_chunk(load_config(config_path))
    reference = reference.to(device)
    chunk = CONFIG_1297["audio"]["chunk_size"]
    audio = 0.1 * torch.randn(1, 2, chunk, device=device)

    results: dict = {
        "config_preset": args.config_preset,
        "network": {k: v for k, v in {**CONFIG_1297["model"], **PRESETS[args.config_preset]}.items()
                    if k in ("dim", "depth", "heads", "dim_head")},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "chunk_seconds": chunk / CONFIG_1297["audio"]["sample_rate"],
        "flops_per_chunk": flops,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }
    fp32 = output(ours, audio, device)
    theirs = output(reference, audio, device)  # (b, c, n) for one stem; ours is (b, stems, c, n)
    results["parity_max_abs_diff_fp32"] = float((fp32 - theirs.reshape(fp32.shape)).abs().max())
    results["parity_reference_peak"] = float(fp32.abs().max())
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        results[f"snr_{name}_vs_fp32_db"] = snr_db(fp32, output(ours, audio, device, dtype))

    timings: list[dict] = []

    def record(runs: dict[str, object], batch: int, dtype=None) -> None:
        """Time the models of `runs` (label -> model) in turns; one row each."""
        measured = timed(list(runs.values()), audio.expand(batch, -1, -1).contiguous(), args.reps, device, dtype)
        for label, (seconds, times) in zip(runs, measured):
            row = {"run": label, "batch": batch, "seconds_per_forward": seconds, "seconds_per_chunk": seconds / batch,
                   "tflops": flops * batch / seconds / 1e12, "runs": times}
            timings.append(row)
            print(f"{label:<32} batch {batch:>2}: {seconds / batch:.4f} s per chunk, {row['tflops']:.1f} TFLOP/s", flush=True)

    record({"audio-separator fp32": reference, "stemsep fp32": ours}, 1)
    if device.type == "cuda":
        del reference
        torch.cuda.empty_cache()
        batches = [int(b) for b in args.batches.split(",")]
        for batch in batches:
            record({"stemsep bf16": ours}, batch, torch.bfloat16)
        if args.compile:
            compiled = torch.compile(ours, dynamic=False)
            record({"stemsep bf16 compiled": compiled}, max(batches), torch.bfloat16)
            results["snr_bf16_compiled_vs_fp32_db"] = snr_db(fp32, output(compiled, audio.expand(max(batches), -1, -1).contiguous(), device, torch.bfloat16)[:1])
        if args.profile:
            best = compiled if args.compile else ours
            profile_forward(best, audio.expand(max(batches), -1, -1).contiguous(), args.profile)
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        results["matmul_bf16_tflops_measured"] = matmul_tflops(device)
        for row in timings:
            dense = datasheet_peak_tflops(results["device"], "fp32" if "fp32" in row["run"] else "bf16")
            row["datasheet_peak_tflops"] = dense
            row["mfu_datasheet"] = row["tflops"] / dense if dense else None
            if "fp32" not in row["run"]:
                row["fraction_of_measured_matmul"] = row["tflops"] / results["matmul_bf16_tflops_measured"]
    results["timings"] = timings
    results["speedup_best_over_reference"] = timings[0]["seconds_per_chunk"] / min(r["seconds_per_chunk"] for r in timings)
    results["peak_rss_mb"] = peak_rss_mb()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "timings"}, indent=1))
    print(f"\n{'run':<32} {'batch':>5} {'s/chunk':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for row in timings:
        mfu = f"{100 * row['mfu_datasheet']:.0f}%" if row.get("mfu_datasheet") else "-"
        print(f"{row['run']:<32} {row['batch']:>5} {row['seconds_per_chunk']:>8.4f} {row['tflops']:>8.1f} {mfu:>6}")
    print(f"audio-separator fp32 batch 1 / stemsep best: {results['speedup_best_over_reference']:.2f}x per chunk")


if __name__ == "__main__":
    main()
