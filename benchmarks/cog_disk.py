"""Disk use of the Cog server over many predictions: the claim is that it stays flat. Not a test.

Starts the real Cog server (tests/cogserver.py, coglet as the image runs it) with a tiny
pass-through checkpoint laid out like weights/, its own STEMSEP_WORK_DIR (the runner's
per-prediction folders) and its own TMPDIR (where Cog saves each input before `run()`, and
anything else a library puts in the system temp dir), so that nothing else on the machine
counts. Then it runs sync predictions, one at a time as Replicate sends them: most separate
a small WAV, one in 10 is a non-audio input that fails, one in 25 is a long input canceled a
few chunks in. After every 20th (a success) it records the bytes, files and folders under the
work dir and under the temp dir, and the server's open file descriptors by kind (a leaked
file would show there before it shows on disk).

Flat means: the work dir never holds more than the latest prediction's folder (the runner
removes the previous one when the next starts, and a failed or canceled one at once), and
the temp dir does not grow with the count.

    .venv/bin/python benchmarks/cog_disk.py [--predictions 200] [--every 20] [--out benchmarks/results/cog_disk.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from cogserver import CogServer, cog_server, http  # noqa: E402

from stemsep.catalogue import DEFAULT, get  # noqa: E402
from stemsep.testing import TINY_MODEL, config_dict, make_model_files  # noqa: E402

CHECKPOINT_NAME, CONFIG_NAME = (f.name for f in get(DEFAULT).files)  # the names predict.py looks for

WORK = ROOT / "benchmarks" / "work" / "cog_disk"
RATE = 44100
WAIT = 120.0


def wav_data_url(seconds: float, rate: int = RATE, channels: int = 2, seed: int = 0) -> str:
    x = np.random.default_rng(seed).normal(0, 0.1, (int(seconds * rate), channels)).clip(-1, 1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


NOT_AUDIO = "data:application/octet-stream;base64," + base64.b64encode(b"this is not audio " * 100).decode()


def usage(folder: Path) -> dict[str, int]:
    """Bytes (apparent sizes), files and folders under `folder`, links not followed."""
    total = files = folders = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        folders += len(dirnames)
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:  # removed while we walked
                pass
    return {"bytes": total, "files": files, "folders": folders}


def open_fds(server: CogServer) -> dict[str, int]:
    """File descriptors open in the server's process group (the server and its worker), by kind:
    files, sockets, pipes, other (the fewest of a few looks: HTTP connections come and go)."""
    looks = []
    for _ in range(5):
        kinds = {"files": 0, "sockets": 0, "pipes": 0, "other": 0}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) != server.process.pid:
                    continue
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    kind = "sockets" if target.startswith("socket:") else "pipes" if target.startswith("pipe:") else \
                        "files" if target.startswith("/") and not target.startswith("/dev/") else "other"
                    kinds[kind] += 1
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
        looks.append(kinds)
        time.sleep(0.05)
    return min(looks, key=lambda kinds: sum(kinds.values()))


def predict(server: CogServer, audio: str, prediction_id: str) -> str:
    r = http("PUT", f"{server.url}/predictions/{prediction_id}", {"input": {"audio": audio}}, timeout=WAIT)
    return r.json()["status"]


def predict_and_cancel(server: CogServer, prediction_id: str, long_audio: str) -> str:
    """A long prediction, canceled once its first chunks have run."""
    outcome: dict[str, str] = {}
    thread = threading.Thread(target=lambda: outcome.update(status=predict(server, long_audio, prediction_id)))
    thread.start()
    pattern = re.compile(rf'"separating: \d+/\d+ chunks","prediction_id":"{prediction_id}"')
    deadline = time.monotonic() + WAIT
    while not pattern.search(server.logs()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{prediction_id} did not start separating")
        time.sleep(0.05)
    assert server.cancel(prediction_id).status == 200
    thread.join(WAIT)
    return outcome["status"]


def run(predictions: int, every: int) -> dict:
    shutil.rmtree(WORK, ignore_errors=True)
    weights, work, tmp, logs = (WORK / name for name in ("weights", "work", "tmp", "logs"))
    for folder in (weights, work, tmp, logs):
        folder.mkdir(parents=True)
    config = config_dict(model=TINY_MODEL, audio={"chunk_size": RATE // 4})
    make_model_files(weights, config, mask=1.0, name=CHECKPOINT_NAME.removesuffix(".ckpt"))
    env = {
        "STEMSEP_CHECKPOINT": str(weights / CHECKPOINT_NAME),
        "STEMSEP_CONFIG": str(weights / CONFIG_NAME),
        "STEMSEP_WORK_DIR": str(work),
        "TMPDIR": str(tmp),
    }
    small = wav_data_url(1.0)
    long_audio = wav_data_url(60.0, rate=8000, channels=1, seed=1)  # thousands of 0.25-s chunks at 44.1 kHz
    rows = []
    counts = {"succeeded": 0, "failed": 0, "canceled": 0}
    with cog_server(env, log_dir=logs) as server:
        assert server.health()["status"] == "READY", server.logs()[-2000:]

        def record(done: int) -> None:
            row = {
                "predictions": done, **counts, "work": usage(work), "prediction_folders": len(list(work.glob("prediction-*"))),
                "tmp": usage(tmp), "open_fds": open_fds(server),
            }
            rows.append(row)
            print(
                f"{done:>11}  {counts['succeeded']:>9}  {counts['failed']:>6}  {counts['canceled']:>8}  "
                f"{row['work']['bytes']:>10}  {row['work']['files']:>10}  {row['tmp']['bytes']:>9}  "
                f"{row['tmp']['files']:>9}  {sum(row['open_fds'].values()):>8}  {row['open_fds']['files']:>10}",
                flush=True,
            )

        print("predictions  succeeded  failed  canceled  work bytes  work files  tmp bytes  tmp files  open fds  open files")
        record(0)
        started = time.perf_counter()
        for i in range(1, predictions + 1):
            # coglet 0.23.1 answers a prediction a moment before it frees the slot (a request sent
            # in that moment gets 409): wait for READY, as the platform does
            server.wait_for_health({"READY"}, WAIT)
            if i % 25 == 13:
                status, wanted = predict_and_cancel(server, f"cancel-{i}", long_audio), "canceled"
            elif i % 10 == 7:
                status, wanted = predict(server, NOT_AUDIO, f"junk-{i}"), "failed"
            else:
                status, wanted = predict(server, small, f"ok-{i}"), "succeeded"
            if status != wanted:
                raise RuntimeError(f"prediction {i}: {status}, expected {wanted}:\n{server.logs()[-3000:]}")
            counts[status] += 1
            if i % every == 0:
                record(i)
        elapsed = time.perf_counter() - started
    first, last = rows[1], rows[-1]
    return {
        "claim": "disk use of the Cog server stays flat over many predictions",
        "flat": {
            # prediction-*/ and its input/ at most: the latest successful prediction's outputs
            "work_dir_never_holds_more_than_one_prediction": all(r["prediction_folders"] <= 1 for r in rows),
            "work_dir_max_bytes": max(r["work"]["bytes"] for r in rows),
            "tmp_dir_does_not_grow": last["tmp"]["bytes"] <= first["tmp"]["bytes"] and last["tmp"]["files"] <= first["tmp"]["files"],
            "open_files_do_not_grow": last["open_fds"]["files"] <= first["open_fds"]["files"],
            "open_fds_first_last": [sum(first["open_fds"].values()), sum(last["open_fds"].values())],
        },
        "predictions": predictions,
        "every": every,
        "mix": "sync predictions, one at a time: a 1-s 44.1 kHz stereo 16-bit WAV (data URL); the 7th of every 10 a "
        "non-audio input (fails); the 13th of every 25 a 60-s 8 kHz mono WAV canceled after its first chunks; "
        "disk use recorded after every 20th, which succeeded, so the work dir then holds its stems",
        "model": "tiny pass-through checkpoint (dim 16, depth 1), 1297 STFT, 0.25-s chunks, CPU",
        "elapsed_s": round(elapsed, 1),
        "rows": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="record disk use after every N predictions")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cog_disk.json")
    args = parser.parse_args()
    result = run(args.predictions, args.every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["flat"]), f"\n{args.out}")


if __name__ == "__main__":
    main()
