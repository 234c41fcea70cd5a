"""What the GPU suite and the concurrency benchmark both set up: model files of random
weights laid out as the Cog image's /weights, a generated song, and input files served over
HTTP as Replicate passes them. Not a test.

Files go under benchmarks/work/gpu_suite/ unless a folder is given.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work" / "gpu_suite"


def model_files(network: dict, chunk_size: int | None) -> tuple[Path, Path]:
    """Random weights (seed 0) of the 1297 config with `network`'s overrides (and chunk size),
    under the 1297 names (which predict.py and audio-separator look for) in a folder laid out
    as the image's /weights."""
    from stemsep.reference import CHECKPOINT_NAME, CONFIG_NAME
    from stemsep.testing import CONFIG_1297, config_dict, make_model_files

    chunk, hop = chunk_size or CONFIG_1297["audio"]["chunk_size"], CONFIG_1297["model"]["stft_hop_length"]
    config = config_dict(model=network, audio={"chunk_size": chunk},
                         inference={"dim_t": chunk // hop + 1})  # audio-separator's segment = our chunk
    folder = WORK / ("weights_" + "_".join(f"{k}{v}" for k, v in sorted({**network, "chunk": chunk}.items())))
    checkpoint, config_path = make_model_files(folder, config, seed=0, name=CHECKPOINT_NAME.removesuffix(".ckpt"))
    assert (checkpoint.name, config_path.name) == (CHECKPOINT_NAME, CONFIG_NAME), (checkpoint, config_path)
    return checkpoint, config_path


def song(seconds: float, folder: Path = WORK) -> Path:
    """`folder`/inputs/song_<seconds>s.wav: separate.py's generated music (seed 0), written once."""
    from separate import write_music

    path = folder / "inputs" / f"song_{seconds:g}s.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_music(path, seconds, seed=0)
    return path


def serve_folder(folder: Path) -> tuple[str, ThreadingHTTPServer]:
    """Input files over HTTP, as Replicate passes a file: (base URL, server)."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
