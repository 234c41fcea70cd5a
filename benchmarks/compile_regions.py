"""Regional against whole-model compilation: compile time and compiled speed. Not a test.

For 1297's layer sizes (dim 384, 62 bands, 8 heads of 64) at several depths, each run in a
fresh process with random weights: eager seconds per forward pass, the first compiled pass
(compile + one pass: "compile_s" is that minus an eager pass), compiled seconds per pass,
and how many graphs the compiler built. Each (depth, mode) runs twice against the same
cache folder, first empty ("cold") and then filled by the first ("warm"), as a second CLI
run on the same machine does. The chunk is shortened (`--seconds`, default 1 s) so that
the full-width network runs in seconds on a CPU; the compile work does not depend on it.

    .venv/bin/python benchmarks/compile_regions.py [--depths 1 2 12] [--seconds 1] [--repeat 3]
        [--device cpu] [--out benchmarks/results/compile_regions_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "compile_regions"

_PROBE = r"""
import json, os, statistics, sys, time
import torch
from torch._dynamo.utils import counters
from stemsep.checkpoint import load_model
from stemsep.compilation import check_batch, compile_regions, compile_whole

device = torch.device(os.environ["DEVICE"])
model = load_model(os.environ["CHECKPOINT"], os.environ["CONFIG"], device)
x = check_batch((1, 2, int(os.environ["SAMPLES"]))).to(device)
repeat = int(os.environ["REPEAT"])

def timed(network):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    network(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started

with torch.inference_mode():
    eager = [timed(model) for _ in range(repeat)]
    network = (compile_regions if os.environ["MODE"] == "regional" else compile_whole)(model)
    first = timed(network)
    compiled = [timed(network) for _ in range(repeat)]
print(json.dumps({
    "eager_s": statistics.median(eager),
    "first_compiled_pass_s": first,
    "compile_s": first - statistics.median(eager),
    "compiled_s": statistics.median(compiled),
    "graphs": counters["stats"]["unique_graphs"],
}))
"""


def model_files(depth: int, seconds: float) -> tuple[Path, Path]:
    from stemsep.testing import config_dict, make_model_files

    config = config_dict(model={"depth": depth}, audio={"chunk_size": round(44100 * seconds)})
    return make_model_files(WORK / f"depth{depth}", config)


def probe(depth: int, mode: str, cache: Path, args) -> dict:
    checkpoint, config = model_files(depth, args.seconds)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "DEVICE": args.device,
        "CHECKPOINT": str(checkpoint),
        "CONFIG": str(config),
        "SAMPLES": str(round(44100 * args.seconds)),
        "REPEAT": str(args.repeat),
        "MODE": mode,
    }
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"depth {depth} {mode}: probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 12])
    parser.add_argument("--seconds", type=float, default=1.0, help="chunk length")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"compile_regions_{args.device}.json"

    rows = []
    for depth in args.depths:
        for mode in ("whole", "regional"):
            cache = WORK / f"cache-depth{depth}-{mode}"
            shutil.rmtree(cache, ignore_errors=True)
            cold = probe(depth, mode, cache, args)
            warm = probe(depth, mode, cache, args)
            rows.append({"depth": depth, "mode": mode, "cold": cold, "warm": warm})
            print(f"depth {depth:2d} {mode:8s}: compile {cold['compile_s']:6.1f} s cold, {warm['compile_s']:5.1f} s warm; "
                  f"eager {cold['eager_s']:.3f} s, compiled {cold['compiled_s']:.3f} s per pass; {cold['graphs']} graphs",
                  flush=True)

    result = {
        "what": "compile time and compiled speed, regional (per block) vs whole-model torch.compile, 1297's layer sizes",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu: {os.cpu_count()} cores ({platform.machine()})",
        "torch": torch.__version__,
        "chunk_seconds": args.seconds,
        "batch": 1,
        "repeat": args.repeat,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Regional vs whole-model compilation ({result['device']}, torch {result['torch']})",
        "",
        f"1297's layer sizes at each depth, random weights, one {args.seconds:g}-s stereo chunk per pass, fp32; "
        f"medians of {args.repeat}. Cold: empty compile cache; warm: a second process on the cache the first filled.",
        "",
        "| depth | mode | compile cold (s) | compile warm (s) | eager (s/pass) | compiled (s/pass) | speed-up | graphs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cold, warm = row["cold"], row["warm"]
        lines.append(
            f"| {row['depth']} | {row['mode']} | {cold['compile_s']:.1f} | {warm['compile_s']:.1f} | {cold['eager_s']:.3f} | "
            f"{cold['compiled_s']:.3f} | {cold['eager_s'] / cold['compiled_s']:.2f}x | {cold['graphs']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
