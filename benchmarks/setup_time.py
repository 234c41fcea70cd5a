"""Cold-start cost of the Cog runner: `Runner.setup()` on a full-size (1297-shaped) random
checkpoint, broken down. Not a test.

Each measurement runs in fresh Python processes, as a container's worker does: importing
predict.py (torch, cog, stemsep), then setup(), timed stage by stage with the same calls
Separator makes (read the yaml; torch.load the state dict; build the network on the meta
device and assign the tensors; move it to the device), then the runner's warm-up. The
file cache is warm (the checkpoint was just written or read), as on a Replicate node that
has pulled the image; a first read from a cold disk adds 639 MB / disk speed.

    .venv/bin/python benchmarks/setup_time.py [--device cpu|cuda] [--repeat 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "setup_time"

# Each probe runs in a fresh process and prints one JSON line of timings. "runner" is the
# real cold start (what the container's worker does); "stages" breaks the load down.
_RUNNER_PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, os.environ["REPO"])
import predict
t1 = time.perf_counter()
runner = predict.Runner()
runner.setup()
t2 = time.perf_counter()
print(json.dumps({
    "import_predict_s": t1 - t0,
    "setup_s": t2 - t1,
    "setup_load_s": runner.timings["load_s"],
    "setup_warm_up_s": runner.timings["warm_up_s"],
    "device": str(runner.separator.device),
}))
"""

_STAGES_PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from stemsep.checkpoint import build_model, load_config, load_state_dict
device = torch.device(os.environ["DEVICE"])
if device.type == "cuda":
    torch.zeros(1, device=device)  # CUDA context, timed on its own
t2 = time.perf_counter()
config = load_config(os.environ["STEMSEP_CONFIG"])
t3 = time.perf_counter()
state = load_state_dict(os.environ["STEMSEP_CHECKPOINT"])
t4 = time.perf_counter()
model = build_model(config, device="meta")
model.load_state_dict(state, strict=True, assign=True)
t5 = time.perf_counter()
model = model.to(device=device, dtype=torch.float32).eval()
if device.type == "cuda":
    torch.cuda.synchronize()
t6 = time.perf_counter()
print(json.dumps({
    "import_torch_s": t1 - t0,
    "cuda_context_s": t2 - t1,
    "read_config_s": t3 - t2,
    "torch_load_s": t4 - t3,
    "build_and_assign_s": t5 - t4,
    "to_device_s": t6 - t5,
}))
"""


def full_size_checkpoint() -> tuple[Path, Path]:
    """A random 1297-shaped checkpoint under the 1297 names (written once, then reused)."""
    from stemsep.catalogue import DEFAULT, get
    from stemsep.testing import CONFIG_1297, make_model_files

    CHECKPOINT_NAME, CONFIG_NAME = (f.name for f in get(DEFAULT).files)

    checkpoint, config = WORK / CHECKPOINT_NAME, WORK / CONFIG_NAME
    if not (checkpoint.exists() and config.exists()):
        make_model_files(WORK, CONFIG_1297, name=CHECKPOINT_NAME.removesuffix(".ckpt"))
    return checkpoint, config


def measure(checkpoint: Path, config: Path, device: str) -> dict:
    env = {
        **os.environ,
        "REPO": str(ROOT),
        "DEVICE": device,
        "STEMSEP_DEVICE": device,
        "STEMSEP_CHECKPOINT": str(checkpoint),
        "STEMSEP_CONFIG": str(config),
        "STEMSEP_WORK_DIR": str(WORK / "runner"),
    }
    timings = {}
    for probe in (_RUNNER_PROBE, _STAGES_PROBE):
        out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        timings.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checkpoint, config = full_size_checkpoint()
    runs = [measure(checkpoint, config, args.device) for _ in range(args.repeat)]
    keys = [k for k in runs[0] if k.endswith("_s")]
    median = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    result = {
        "checkpoint_mb": round(checkpoint.stat().st_size / 1e6, 1),
        "device": runs[0]["device"],
        "cpu": platform.processor() or platform.machine(),
        "threads": os.cpu_count(),
        "repeat": args.repeat,
        "median": median,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
