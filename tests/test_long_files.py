"""An hour-long file separates in memory that does not grow with its length (issue: audio-separator
keeps ~32 bytes per sample, so an 8-hour file needed over 100 GB)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from stemsep.testing import config_dict, make_model_files

pytestmark = pytest.mark.slow  # an hour-long file through a real process: minutes

# The cheapest network that still runs the whole pipeline: coarse STFT, five bands.
CHEAP = config_dict(
    model={"dim": 8, "depth": 1, "dim_head": 4, "heads": 2, "stft_n_fft": 256, "stft_win_length": 256,
           "stft_hop_length": 128, "freqs_per_bands": [32, 32, 32, 32, 1]},
    audio={"chunk_size": 44100},
)

RUN = """
import json, sys, time
from stemsep.separator import Separator
checkpoint, config, source, out = sys.argv[1:5]
started = time.perf_counter()
Separator(checkpoint, config, device="cpu", batch_size=16).separate(source, out, overlap=1)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) peak.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_kb / 1024}))
"""


def write_long_file(path, minutes: int) -> None:
    """Stereo 44.1 kHz 16-bit noise + tones, written 10 s at a time (never whole in memory)."""
    rng = np.random.default_rng(0)
    t = np.arange(441000) / 44100
    with sf.SoundFile(path, "w", 44100, 2, "PCM_16") as f:
        for i in range(minutes * 6):
            f.write((0.1 * rng.standard_normal((t.size, 2)) + 0.3 * np.sin(2 * np.pi * (220 + i) * t)[:, None]).astype(np.float32))


def separate_in_subprocess(model, source, out) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, *map(str, model), str(source), str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_peak_memory_of_an_hour_is_that_of_ten_minutes(tmp_path):
    model = make_model_files(tmp_path / "model", CHEAP, mask=1.0)
    peaks = {}
    for minutes in (10, 60):
        source = tmp_path / f"{minutes}min.wav"
        write_long_file(source, minutes)
        out = tmp_path / f"out{minutes}"
        out.mkdir()
        measured = separate_in_subprocess(model, source, out)
        peaks[minutes] = measured["peak_rss_mb"]
        vocals = sf.info(out / f"{minutes}min_vocals.wav")
        assert vocals.frames == minutes * 60 * 44100 and vocals.channels == 2
        print(f"{minutes} min: {measured['seconds']:.0f} s, peak RSS {measured['peak_rss_mb']:.0f} MB")
        source.unlink()
        for path in out.iterdir():
            path.unlink()
    assert peaks[60] <= 1.10 * peaks[10]  # does not grow with duration
    assert peaks[60] < 1024  # and is a few hundred MB: model, a few chunks, encoder buffers
