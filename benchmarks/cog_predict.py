"""The Cog model as Replicate runs it, full-size: setup time and prediction latency. Not a test.

Starts the real Cog server (coglet, tests/cogserver.py) on predict.py with a full 1297-shaped
random checkpoint laid out like the image's weights/, on whatever device the runner picks
(the GPU when there is one, compiled by default there). It records the time from start to
READY (import, load, compile and warm-up), then sends `--predictions` sync predictions of a
generated song passed by URL (served from a local HTTP server, as Replicate passes a file
URL), checks each answer (two stems named *_vocals / *_instrumental, the input's length and
rate, and vocals + instrumental == mix exactly for this 16-bit input), and reports each
prediction's wall time (request to answer, including reading the input and base64-encoding
the stems into the answer) and the runner's own log lines.

    .venv/bin/python benchmarks/cog_predict.py --tiny --seconds 20 --predictions 1   # a quick check on a CPU
    python benchmarks/cog_predict.py --seconds 300 --predictions 3 --out benchmarks/results/cog_predict_cuda.json
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import platform
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cogserver import start_server  # noqa: E402
from separate import write_music  # noqa: E402

from stemsep.catalogue import DEFAULT, get  # noqa: E402
from stemsep.testing import CONFIG_1297, TINY_MODEL, config_dict, make_model_files  # noqa: E402

CHECKPOINT_NAME, CONFIG_NAME = (f.name for f in get(DEFAULT).files)  # the names predict.py looks for

WORK = ROOT / "benchmarks" / "work" / "cog_predict"


def serve_folder(folder: Path) -> str:
    """A local HTTP server for the input files; returns its base URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # quiet
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def decode_data_url(url: str) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), dtype="int16", always_2d=True)
    return audio, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--predictions", type=int, default=3)
    parser.add_argument("--overlap", type=int, help="the prediction's overlap input (default: the model's, 4)")
    parser.add_argument("--tiny", action="store_true", help="a tiny network with the 1297 STFT and bands (a quick check on a CPU)")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    weights = WORK / "weights"
    config = config_dict(model=TINY_MODEL) if args.tiny else CONFIG_1297
    make_model_files(weights, config, seed=0, name=CHECKPOINT_NAME.removesuffix(".ckpt"))
    assert (weights / CONFIG_NAME).exists()
    song = WORK / "inputs" / f"song_{args.seconds:g}s.wav"
    if not song.exists():
        song.parent.mkdir(parents=True, exist_ok=True)
        write_music(song, args.seconds)
    mix, rate = sf.read(song, dtype="int16", always_2d=True)
    base_url = serve_folder(song.parent)

    started = time.perf_counter()
    server = start_server({"STEMSEP_WEIGHTS_DIR": str(weights), "STEMSEP_CHECKPOINT": str(weights / CHECKPOINT_NAME),
                           "STEMSEP_CONFIG": str(weights / CONFIG_NAME), "STEMSEP_WORK_DIR": str(WORK / "runner")},
                          log_dir=WORK, ready_timeout=args.ready_timeout)
    results: dict = {"machine": platform.node(), "audio_seconds": args.seconds, "predictions": []}
    try:
        health = server.health()
        results["setup_s"] = time.perf_counter() - started
        results["health"] = health.get("status")
        if health.get("status") != "READY":
            raise SystemExit(f"setup failed: {server.logs()[-3000:]}")
        payload = {"input": {"audio": f"{base_url}/{song.name}", **({"overlap": args.overlap} if args.overlap else {})}}
        for i in range(args.predictions):
            t = time.perf_counter()
            answer = server.predict(payload, timeout=1800).json()
            wall = time.perf_counter() - t
            if answer.get("status") != "succeeded":
                raise SystemExit(f"prediction {i} {answer.get('status')}: {answer.get('error')}\n{server.logs()[-3000:]}")
            vocals_url, instrumental_url = answer["output"]
            (vocals, vocals_rate), (instrumental, _) = decode_data_url(vocals_url), decode_data_url(instrumental_url)
            exact = vocals.shape == mix.shape and np.array_equal(vocals.astype(np.int32) + instrumental, mix)
            results["predictions"].append({"wall_s": wall, "predict_time_s": (answer.get("metrics") or {}).get("predict_time"),
                                           "stems_add_up_to_the_mix": bool(exact), "rate": vocals_rate,
                                           "frames": len(vocals)})
            print(f"prediction {i + 1}: {wall:.2f} s wall, predict_time {results['predictions'][-1]['predict_time_s']}, "
                  f"stems add up to the mix exactly: {exact}", flush=True)
            if not exact or vocals_rate != rate:
                raise SystemExit("the stems do not match the input")
    finally:
        results["runner_log"] = [line for line in server.logs().splitlines() if "stemsep" in line][-10:]
        server.stop()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"setup {results['setup_s']:.1f} s; predictions "
          + ", ".join(f"{p['wall_s']:.2f} s" for p in results["predictions"]) + f" for {args.seconds:g} s of audio")


if __name__ == "__main__":
    main()
