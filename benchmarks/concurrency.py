"""Songs per hour with one and with two predictions in flight on the real Cog server. Not a test.

The runner's run() is async, so the server runs as many predictions at once as
$COG_MAX_CONCURRENCY allows (cog.yaml's `concurrency.max` sets it in the image). Two in
flight can overlap one song's decoding, encoding and output transfer with the other's
network time on a GPU; on a CPU they share the same cores. This starts the server once per
setting, then keeps that many clients busy, each sending sync predictions of the same song
(by URL) one after another, `--songs` in all; it reports songs per hour and each song's
latency (request to answer), and checks every prediction succeeded.

    .venv/bin/python benchmarks/concurrency.py [--device cpu|cuda] [--songs 8] [--song-s 30]
        [--preset tiny|full] [--out benchmarks/results/concurrency_<device>.json]

benchmarks/gpu_suite.py runs the same measurement as one of its stages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
import fixtures  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "concurrency"


def throughput(weights: Path, song: Path, songs: int, concurrency: int, device: str, timeout: float = 600.0) -> dict:
    """`songs` sync predictions of `song` from `concurrency` clients at once, on a server
    allowing that many: songs per hour, latency per song, start -> READY."""
    from cogserver import http, start_server

    WORK.mkdir(parents=True, exist_ok=True)
    base_url, files = fixtures.serve_folder(song.parent)
    env = {"STEMSEP_WEIGHTS_DIR": str(weights), "STEMSEP_WORK_DIR": str(WORK / f"runner{concurrency}"),
           "STEMSEP_DEVICE": device, "STEMSEP_COMPILE": "0", "COG_MAX_CONCURRENCY": str(concurrency)}
    for name in ("STEMSEP_CHECKPOINT", "STEMSEP_CONFIG"):
        os.environ.pop(name, None)
    server = start_server(env, log_dir=WORK, ready_timeout=timeout)
    payload = {"input": {"audio": f"{base_url}/{song.name}"}}
    latencies: list[float] = []
    lock = threading.Lock()
    left = [songs]

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            started = time.perf_counter()
            answer = http("POST", f"{server.url}/predictions", payload, timeout=timeout)
            body = answer.json()
            if answer.status != 200 or body.get("status") != "succeeded":
                raise RuntimeError(f"prediction {answer.status} {body.get('status')}: {body.get('error')}")
            with lock:
                latencies.append(time.perf_counter() - started)

    try:
        if server.health().get("status") != "READY":
            raise RuntimeError(f"setup failed:\n{server.logs()[-3000:]}")
        http("POST", f"{server.url}/predictions", payload, timeout=timeout)  # warm: first use costs extra
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for done in [pool.submit(client) for _ in range(concurrency)]:
                done.result()
        wall = time.perf_counter() - started
    finally:
        server.stop()
        files.shutdown()
    return {"concurrency": concurrency, "songs": songs, "wall_s": wall, "songs_per_hour": songs * 3600 / wall,
            "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies)}


def compare(weights: Path, song: Path, songs: int, device: str) -> dict:
    """One and two in flight, and the ratios the adoption rule reads: songs per hour up by at
    least 20% with median latency no more than 10% worse."""
    one, two = (throughput(weights, song, songs, n, device) for n in (1, 2))
    gain = two["songs_per_hour"] / one["songs_per_hour"] - 1
    latency = two["latency_median_s"] / one["latency_median_s"] - 1
    return {"one": one, "two": two, "throughput_gain": gain, "latency_change": latency,
            "adopt": gain >= 0.20 and latency <= 0.10}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--songs", type=int, default=8)
    parser.add_argument("--song-s", type=float, default=30.0)
    parser.add_argument("--preset", choices=["tiny", "full"], default=None,
                        help="network: tiny (the tests' dim 16, depth 1; the CPU default) or full 1297 shapes (the GPU default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    preset = args.preset or ("full" if args.device == "cuda" else "tiny")
    network = {} if preset == "full" else {"dim": 16, "depth": 1, "dim_head": 8, "heads": 2}
    checkpoint, _ = fixtures.model_files(network, None if preset == "full" else 88200)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu: {os.cpu_count()} cores",
              "preset": preset, "song_s": args.song_s, **compare(checkpoint.parent, fixtures.song(args.song_s, WORK), args.songs, args.device)}
    out = args.out or ROOT / "benchmarks" / "results" / f"concurrency_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("one", "two"):
        r = result[key]
        print(f"{r['concurrency']} in flight: {r['songs_per_hour']:.0f} songs/hour, latency median {r['latency_median_s']:.2f} s, "
              f"max {r['latency_max_s']:.2f} s")
    print(f"throughput {100 * result['throughput_gain']:+.0f}%, median latency {100 * result['latency_change']:+.0f}%: "
          f"{'adopt' if result['adopt'] else 'keep one at a time'}; wrote {out}")


if __name__ == "__main__":
    main()
