"""The public API: :class:`Separator` turns a song into vocals and instrumental.

Data flows one way: decode -> to the model's rate -> channels to stereo pairs -> chunked
network (inference.py) -> back to the input's rate, length and channels -> stems -> encode.
The network predicts vocals; the instrumental is the mix minus the vocals, computed at the
input's rate (in the integer domain for PCM output, so the two stems add up to the mix
bit-exactly). Nothing is normalized. The CLI and the Cog predictor are thin layers over this.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stemsep import audio
from stemsep.checkpoint import Config, load_config, load_model
from stemsep.errors import AudioDecodeError, AudioEncodeError, StemsepError
from stemsep.inference import ProgressCallback, separate_chunks
from stemsep.weights import default_dir

STEMS = ("vocals", "instrumental")
CHECKPOINT_NAME = "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
CONFIG_NAME = "model_bs_roformer_ep_317_sdr_12.9755.yaml"
MAX_OVERLAP = 16
RESAMPLE_PAD_S = 0.05  # reflected context added around a file before resampling (soxr HQ rings ~ms)


class ClippingWarning(UserWarning):
    """A stem exceeded the integer range of the chosen bit depth and was clipped."""


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StemsepError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def to_stereo_pairs(mix: np.ndarray) -> np.ndarray:
    """(channels, n) -> (pairs, 2, n): channels 1+2, 3+4, ...; a lone channel becomes dual-mono."""
    if mix.shape[0] % 2:
        mix = np.concatenate([mix, mix[-1:]])
    return mix.reshape(-1, 2, mix.shape[-1])


def from_stereo_pairs(pairs: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`to_stereo_pairs`; a dual-mono pair gives back the mean of its two outputs."""
    flat = pairs.reshape(-1, pairs.shape[-1])
    if channels % 2:
        flat = np.concatenate([flat[: channels - 1], flat[channels - 1 :].mean(axis=0, keepdims=True)])
    return flat


class Separator:
    """Load the model once; separate arrays or files.

    `checkpoint`/`config` default to the 1297 files in the weights folder
    (`$STEMSEP_WEIGHTS_DIR`, else `weights/`). `batch_size`
    chunks go through the network per forward pass (default: the config's
    `inference.batch_size` on CPU, 4 on GPU).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        config: str | Path | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ):
        if checkpoint is None or config is None:
            folder = default_dir()
            checkpoint = checkpoint or folder / CHECKPOINT_NAME
            config = config or folder / CONFIG_NAME
            if not Path(checkpoint).exists():
                raise StemsepError(f"weights not downloaded: {checkpoint} is missing; run `stemsep weights download`")
        self.model_files = (Path(checkpoint), Path(config))
        self.config: Config = load_config(config)
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, self.config, self.device)
        default_batch = 4 if self.device.type == "cuda" else self.config.inference.batch_size
        self.batch_size = batch_size or default_batch
        if self.batch_size < 1:
            raise StemsepError(f"batch size must be at least 1, got {self.batch_size}")

    @property
    def sample_rate(self) -> int:
        return self.config.audio.sample_rate

    @property
    def min_samples(self) -> int:
        """Shortest input we separate: one STFT window at the model's rate (46 ms for 1297)."""
        return self.config.model.stft_n_fft

    def _overlap(self, overlap: int | None) -> int:
        overlap = self.config.inference.num_overlap if overlap is None else overlap
        if not isinstance(overlap, int) or not 1 <= overlap <= MAX_OVERLAP:
            raise StemsepError(f"overlap must be an integer from 1 to {MAX_OVERLAP}, got {overlap!r}")
        return overlap

    def separate_array(
        self,
        mix: np.ndarray,
        sample_rate: int,
        overlap: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Separate `mix` (channels, samples) at `sample_rate`; float32 stems of the same shape."""
        mix = np.asarray(mix, dtype=np.float32)
        if mix.ndim != 2 or mix.shape[0] < 1:
            raise StemsepError(f"audio must be shaped (channels, samples), got shape {mix.shape}")
        vocals = self._vocals(mix, sample_rate, self._overlap(overlap), on_progress)
        return {"vocals": vocals, "instrumental": mix - vocals}

    def _vocals(self, mix: np.ndarray, sample_rate: int, overlap: int, on_progress) -> np.ndarray:
        channels, length = mix.shape
        if round(length * self.sample_rate / sample_rate) < self.min_samples:
            raise AudioDecodeError(
                f"audio is too short to separate ({length} samples at {sample_rate} Hz; "
                f"need at least {self.min_samples / self.sample_rate * 1000:.0f} ms)"
            )
        if not np.isfinite(mix).all():
            raise AudioDecodeError("audio contains NaN or infinite samples")
        # Resampling treats the world outside the file as silence, so a file that starts or ends
        # mid-waveform would ring for a few ms at its borders; extending it by reflection first
        # (and trimming afterwards) keeps the borders clean.
        pad = 0 if sample_rate == self.sample_rate else min(round(RESAMPLE_PAD_S * sample_rate), length - 1)
        padded = np.pad(mix, [(0, 0), (pad, pad)], mode="reflect") if pad else mix
        at_model_rate = audio.resample(padded, sample_rate, self.sample_rate)  # (channels, n')
        pairs = separate_chunks(
            self.model,
            to_stereo_pairs(at_model_rate),  # (pairs, 2, n')
            chunk=self.config.audio.chunk_size,
            overlap=overlap,
            batch_size=self.batch_size,
            device=self.device,
            on_progress=on_progress,
        )
        vocals = audio.resample(from_stereo_pairs(pairs, channels), self.sample_rate, sample_rate)
        return fit_length(vocals, length + 2 * pad)[:, pad : pad + length]

    def separate(
        self,
        input_path: str | Path,
        output_dir: str | Path,
        output_format: str = "wav",
        bit_depth: str | int = "auto",
        overlap: int | None = None,
        on_progress: ProgressCallback | None = None,
        name: str | None = None,
    ) -> dict[str, Path]:
        """Separate a file; write `<name>_vocals.<ext>` and `<name>_instrumental.<ext>` into
        `output_dir` (name defaults to the input's name without extension). Returns the paths.
        Both files appear together or not at all."""
        input_path, output_dir = Path(input_path), Path(output_dir)
        overlap = self._overlap(overlap)
        if not output_dir.is_dir():
            raise AudioEncodeError(f"output folder {output_dir} does not exist")
        if not os.access(output_dir, os.W_OK):
            raise AudioEncodeError(f"output folder {output_dir} is not writable")
        mix, info = audio.decode(input_path)
        subtype = audio.output_subtype(info, output_format, bit_depth)
        if not np.any(mix):
            raise AudioDecodeError(f"{input_path.name}: the audio is silent (every sample is zero), nothing to separate")
        try:
            vocals = self._vocals(mix, info.sample_rate, overlap, on_progress)
        except AudioDecodeError as exc:
            raise AudioDecodeError(f"{input_path.name}: {exc}") from None

        stems, clipping = stem_samples(mix, vocals, subtype)
        name = name or input_path.stem
        ext = output_format.lower()
        paths = {stem: output_dir / f"{name}_{stem}.{ext}" for stem in STEMS}
        written: list[Path] = []
        try:
            for stem in STEMS:
                audio.write(paths[stem], stems[stem], info.sample_rate, subtype, ext)
                written.append(paths[stem])
                report = clipping.get(stem)
                if report and report.samples:
                    warnings.warn(
                        ClippingWarning(
                            f"{paths[stem].name}: {report.samples} samples clipped (peak {report.peak:.3f} "
                            f"= {20 * np.log10(report.peak):+.2f} dBFS); choose --bit-depth 32 to keep them"
                        ),
                        stacklevel=2,
                    )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return paths


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad the last axis to exactly `length` (resampling may be off by a sample)."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])


def stem_samples(mix: np.ndarray, vocals: np.ndarray, subtype: str) -> tuple[dict[str, np.ndarray], dict[str, audio.ClipReport]]:
    """The two stems as they will be written, and what clipping each needed.

    Float output: float32, instrumental = mix - vocals. PCM output: integers, with
    instrumental = quantized mix - quantized (clipped) vocals, so the written stems sum to
    the mix bit-exactly; only an instrumental sample outside the integer range breaks that,
    and it is clipped and counted."""
    bits = audio.PCM_BITS.get(subtype)
    if bits is None:
        return {"vocals": vocals, "instrumental": mix - vocals}, {}
    mix_q, _ = audio.quantize(mix, bits)  # exact for input of this or lower bit depth
    vocals_q, vocals_clip = audio.quantize(vocals, bits)
    instrumental = mix_q.astype(np.int64) - vocals_q
    limit = 1 << (bits - 1)
    out_of_range = (instrumental < -limit) | (instrumental >= limit)
    instrumental_clip = audio.ClipReport(int(out_of_range.sum()), float(np.abs(instrumental).max(initial=0)) / limit)
    instrumental = np.clip(instrumental, -limit, limit - 1).astype(vocals_q.dtype)
    return {"vocals": vocals_q, "instrumental": instrumental}, {"vocals": vocals_clip, "instrumental": instrumental_clip}
