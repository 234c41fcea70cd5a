"""Encoding cost of compressed stems: seconds of CPU per minute of stereo 44.1 kHz audio,
per format, at the default bitrates (stemsep.compressed), with 16-bit WAV and FLAC
(stemsep.pcm.AudioWriter) for comparison. Not a test.

The input is a minute of broadband stand-in music (a few sines with vibrato over pink-ish
noise), written in 1.5-s blocks as the separator writes stems. CPU time (process time) is
what the encoders cost; wall time also shows what else the machine was doing. Opus
includes the soxr resampling to 48 kHz.

    .venv/bin/python benchmarks/encode.py [--seconds 60] [--reps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from stemsep.choices import COMPRESSED_FORMATS, OUTPUT_FORMATS, PCM_FORMATS
from stemsep.compressed import CompressedWriter, encode_settings
from stemsep.pcm import AudioWriter

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "encode"
RATE = 44100
BLOCK = 1 << 16


def stand_in_music(seconds: float) -> np.ndarray:
    """(2, n) float32: sines with vibrato over noise shaped to fall 3 dB per octave, ~-12 dBFS."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(0)
    t = np.arange(n) / RATE
    tones = sum(0.08 * np.sin(2 * np.pi * f * t + 3 * np.sin(2 * np.pi * 5 * t)) for f in (110, 220, 440, 880, 1760))
    spectrum = np.fft.rfft(rng.standard_normal((2, n)), axis=1)
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / np.sqrt(freqs / 1000), n, axis=1)
    noise *= 0.05 / noise.std()
    return (tones + noise).astype(np.float32)


def encode_once(x: np.ndarray, fmt: str, path: Path) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    if fmt in PCM_FORMATS:
        writer = AudioWriter(path, RATE, x.shape[0], "PCM_16", fmt)
    else:
        writer = CompressedWriter(path, RATE, x.shape[0], fmt)
    with writer:
        for start in range(0, x.shape[1], BLOCK):
            writer.write(x[:, start : start + BLOCK])
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    x = stand_in_music(args.seconds)
    minutes = args.seconds / 60
    rows = {}
    for fmt in OUTPUT_FORMATS:
        path = WORK / f"stem.{fmt}"
        runs = [encode_once(x, fmt, path) for _ in range(args.reps)]
        cpu = statistics.median(r[0] for r in runs) / minutes
        wall = statistics.median(r[1] for r in runs) / minutes
        kbps = encode_settings(fmt, RATE, 2).bitrate_kbps if fmt in COMPRESSED_FORMATS else None
        rows[fmt] = {
            "bitrate_kbps": kbps,
            "cpu_s_per_min": round(cpu, 3),
            "wall_s_per_min": round(wall, 3),
            "x_real_time_cpu": round(60 / cpu, 1),
            "mb_per_min": round(path.stat().st_size / 1e6 / minutes, 2),
        }
        print(f"{fmt:5} {kbps or ''!s:>4} kbit/s  {cpu:6.3f} s CPU/min ({60 / cpu:6.1f}x real time)  "
              f"{wall:6.3f} s wall/min  {rows[fmt]['mb_per_min']:5.2f} MB/min", flush=True)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "seconds": args.seconds,
        "reps": args.reps,
        "rate": RATE,
        "channels": 2,
        "formats": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
