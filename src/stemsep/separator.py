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
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from stemsep import audio
from stemsep.checkpoint import Config, load_config, load_model
from stemsep.errors import AudioDecodeError, AudioEncodeError, StemsepError
from stemsep.inference import BatchRunner, ProgressCallback, StreamingSeparation
from stemsep.weights import default_dir

STEMS = ("vocals", "instrumental")
CHECKPOINT_NAME = "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
CONFIG_NAME = "model_bs_roformer_ep_317_sdr_12.9755.yaml"
MAX_OVERLAP = 16
DEFAULT_MAX_DURATION_S = 3 * 3600  # refuse longer inputs unless told otherwise
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
    return mix.reshape(mix.shape[0] // 2, 2, mix.shape[-1])


def from_stereo_pairs(pairs: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`to_stereo_pairs`; a dual-mono pair gives back the mean of its two outputs."""
    flat = pairs.reshape(pairs.shape[0] * 2, pairs.shape[-1])
    if channels % 2:
        flat = np.concatenate([flat[: channels - 1], flat[channels - 1 :].mean(axis=0, keepdims=True)])
    return flat


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that has it (fp16 on older ones, e.g. a T4), fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise StemsepError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def default_batch_size(config: Config, device: torch.device, precision: str) -> int:
    """Chunks per forward pass: the config's on the CPU (batching gains little there); on a GPU
    as many as half the free memory holds, estimating a chunk's activations at 16 values of
    `dim` per token (band x frame), capped at 16. Too many is caught by the OOM fallback."""
    if device.type != "cuda":
        return config.inference.batch_size
    free, _ = torch.cuda.mem_get_info(device)
    tokens = (config.audio.chunk_size // config.model.stft_hop_length + 1) * len(config.model.freqs_per_bands)
    per_chunk = 16 * tokens * config.model.dim * (4 if precision == "fp32" else 2)
    return max(1, min(16, int(0.5 * free // per_chunk)))


class Separator:
    """Load the model once; separate arrays or files.

    `checkpoint`/`config` default to the 1297 files in the weights folder
    (`$STEMSEP_WEIGHTS_DIR`, else `weights/`). `batch_size` chunks go through the network per
    forward pass (default: the config's on CPU, chosen from free memory on a GPU).
    `precision` is "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" or "fp16": autocast for
    the transformers; STFT, iSTFT and the mask multiply stay fp32. `compile=True` runs the
    network through `torch.compile` (compiled and warmed up here, falling back to eager with a
    warning if compilation fails).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        config: str | Path | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,
    ):
        if checkpoint is None or config is None:
            folder = default_dir()
            checkpoint = checkpoint or folder / CHECKPOINT_NAME
            config = config or folder / CONFIG_NAME
            if not Path(checkpoint).exists():
                raise StemsepError(f"weights not downloaded: {checkpoint} is missing; run `stemsep weights download`")
        self.model_files = (Path(checkpoint), Path(config))
        self.config: Config = load_config(config)
        if not self.config.model.stereo:
            raise StemsepError(f"{self.config.path.name}: a mono model (stereo: false); stemsep separates with stereo models")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = load_model(checkpoint, self.config, self.device)
        self.batch_size = batch_size or default_batch_size(self.config, self.device, self.precision)
        if self.batch_size < 1:
            raise StemsepError(f"batch size must be at least 1, got {self.batch_size}")
        self.runner = BatchRunner(self.model, self.device, PRECISIONS[self.precision])
        self.compiled = compile and self._compile()

    def _compile(self) -> bool:
        """torch.compile for one fixed batch shape, warmed up now so the first song pays nothing.
        True if it compiled; False, with a warning, if it fell back to eager."""
        shape = (self.batch_size, 2, self.config.audio.chunk_size)
        compiled = BatchRunner(self.model, self.device, PRECISIONS[self.precision],
                               compiled=torch.compile(self.model, dynamic=False), compiled_shape=shape)
        try:
            compiled(np.zeros(shape, np.float32))
        except Exception as exc:  # any compiler failure: eager is always correct
            warnings.warn(f"torch.compile failed, running eagerly: {str(exc).splitlines()[0][:200]}", stacklevel=3)
            return False
        self.runner = compiled
        return True

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
        if not np.isfinite(mix).all():
            raise AudioDecodeError("audio contains NaN or infinite samples")
        pairs = list(self._stream([mix], sample_rate, mix.shape[0], self._overlap(overlap), on_progress, mix.shape[1]))
        vocals = np.concatenate([v for _, v in pairs], axis=-1)
        return {"vocals": vocals, "instrumental": mix - vocals}

    def _check_length(self, length: int, sample_rate: int) -> None:
        if audio.resampled_length(length, sample_rate, self.sample_rate) < self.min_samples:
            raise AudioDecodeError(
                f"audio is too short to separate ({length} samples at {sample_rate} Hz; "
                f"need at least {self.min_samples / self.sample_rate * 1000:.0f} ms)"
            )

    def _stream(
        self,
        blocks: Iterable[np.ndarray],
        sample_rate: int,
        channels: int,
        overlap: int,
        on_progress: ProgressCallback | None,
        expected_length: int | None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Separate a signal arriving as (channels, n) blocks at `sample_rate`; yield aligned
        (mix, vocals) blocks at that rate which together cover the input exactly.

        Resampling treats the world outside the file as silence, so a file that starts or ends
        mid-waveform would ring for a few ms at its borders: the signal is extended by
        reflection (RESAMPLE_PAD_S each side) before resampling and trimmed afterwards. Memory
        stays a few chunks whatever the length; one block gives the same samples as many.
        """
        pad_wanted = 0 if sample_rate == self.sample_rate else round(RESAMPLE_PAD_S * sample_rate)
        to_model = audio.StreamResampler(sample_rate, self.sample_rate, channels)
        to_input = audio.StreamResampler(self.sample_rate, sample_rate, channels)
        expected = expected_length and audio.resampled_length(expected_length + 2 * pad_wanted, sample_rate, self.sample_rate)
        chunks = StreamingSeparation(
            self.runner, groups=(channels + 1) // 2, channels=2, chunk=self.config.audio.chunk_size, overlap=overlap,
            batch_size=self.batch_size, on_progress=on_progress, expected_length=expected,
        )
        mix_waiting: list[np.ndarray] = []  # input blocks whose vocals have not come out yet
        pending: list[np.ndarray] = []  # input held until the leading reflection can be made
        tail = np.zeros((channels, 0), np.float32)  # the last pad + 1 input samples
        pad: int | None = None
        received = delivered = skipped = 0

        def network(x: np.ndarray, last: bool = False) -> np.ndarray:
            """Input-rate samples -> vocals at the input rate (not yet trimmed); `last` flushes."""
            x = to_model.process(x)
            if last:
                x = np.concatenate([x, to_model.flush()], axis=-1)
            pairs = chunks.push(to_stereo_pairs(x))  # (pairs, 2, n)
            if last:
                pairs = np.concatenate([pairs, chunks.finish()], axis=-1)
            y = to_input.process(from_stereo_pairs(pairs, channels))
            return np.concatenate([y, to_input.flush()], axis=-1) if last else y

        def deliver(vocals: np.ndarray, upto: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            """Drop the leading padding, pair with the mix, never beyond input sample `upto`."""
            nonlocal delivered, skipped
            cut = min(vocals.shape[-1], pad - skipped)
            skipped += cut
            vocals = vocals[:, cut : cut + upto - delivered]
            if vocals.shape[-1]:
                mix = _take(mix_waiting, vocals.shape[-1])
                delivered += vocals.shape[-1]
                yield mix, vocals

        for block in blocks:
            block = np.asarray(block, np.float32)
            received += block.shape[-1]
            mix_waiting.append(block)
            if pad is None:
                pending.append(block)
                if received <= pad_wanted:
                    continue
                pad, block = pad_wanted, np.concatenate(pending, axis=-1)
                pending = []
                block = np.concatenate([block[:, pad:0:-1], block], axis=-1)  # mirror of samples 1..pad
            tail = np.concatenate([tail, block], axis=-1)[:, -(pad + 1) :]
            yield from deliver(network(block), received)

        self._check_length(received, sample_rate)
        if pad is None:  # shorter than the padding: reflect the whole (short) signal at once
            pad = min(pad_wanted, received - 1)
            whole = np.concatenate(pending, axis=-1)
            tail = whole
            yield from deliver(network(np.pad(whole, [(0, 0), (pad, 0)], mode="reflect")), received)
        end = tail[:, -2 : -pad - 2 : -1] if pad else tail[:, :0]  # mirror of the last samples
        yield from deliver(network(end, last=True), received)
        if delivered < received:  # resampling rounded a sample off the end
            yield _take(mix_waiting, received - delivered), np.zeros((channels, received - delivered), np.float32)

    def separate(
        self,
        input_path: str | Path,
        output_dir: str | Path,
        output_format: str = "wav",
        bit_depth: str | int = "auto",
        overlap: int | None = None,
        on_progress: ProgressCallback | None = None,
        name: str | None = None,
        max_duration_s: float | None = None,
    ) -> dict[str, Path]:
        """Separate a file; write `<name>_vocals.<ext>` and `<name>_instrumental.<ext>` into
        `output_dir` (name defaults to the input's name without extension). Returns the paths.

        The file is decoded, separated and written block by block, so memory does not grow
        with its length. Both outputs appear together or not at all. Inputs longer than
        `max_duration_s` (default $STEMSEP_MAX_DURATION_S, else 3 hours) are refused first.
        """
        input_path, output_dir = Path(os.fsdecode(input_path)), Path(os.fsdecode(output_dir))  # bytes too
        overlap = self._overlap(overlap)
        if not output_dir.is_dir():
            raise AudioEncodeError(f"output folder {output_dir} does not exist")
        if not os.access(output_dir, os.W_OK):
            raise AudioEncodeError(f"output folder {output_dir} is not writable")
        limit = max_duration_s or float(os.environ.get("STEMSEP_MAX_DURATION_S", DEFAULT_MAX_DURATION_S))
        reader = audio.AudioReader(input_path, max_duration_s=limit)
        subtype = audio.output_subtype(reader, output_format, bit_depth)
        frames = reader.estimated_frames
        if frames and frames / reader.sample_rate > limit:
            raise AudioDecodeError(
                f"{reader.name}: {_clock(frames / reader.sample_rate)} long, over the {_clock(limit)} limit "
                "(STEMSEP_MAX_DURATION_S)"
            )
        ext = output_format.lower()
        name = name or _fit_name(input_path.stem, ext)
        paths = {stem: output_dir / f"{name}_{stem}.{ext}" for stem in STEMS}
        _check_free_space(output_dir, 2 * (frames or 0) * reader.channels * audio.bytes_per_sample(subtype))

        clipping = {stem: audio.ClipReport() for stem in STEMS}
        writers: dict[str, audio.AudioWriter] = {}
        heard = False
        try:
            for stem in STEMS:
                writers[stem] = audio.AudioWriter(
                    paths[stem], reader.sample_rate, reader.channels, subtype, ext, expected_frames=frames
                )
            try:
                for mix, vocals in self._stream(reader.blocks(), reader.sample_rate, reader.channels, overlap, on_progress, frames):
                    heard = heard or bool(np.any(mix))
                    stems, clipped = stem_samples(mix, vocals, subtype)
                    for stem in STEMS:
                        writers[stem].write(stems[stem])
                        clipping[stem] += clipped.get(stem, audio.ClipReport())
            except AudioDecodeError as exc:
                if str(exc).startswith(f"{reader.name}: "):
                    raise
                raise AudioDecodeError(f"{reader.name}: {exc}") from None
            if not heard:
                raise AudioDecodeError(f"{reader.name}: the audio is silent (every sample is zero), nothing to separate")
            writers["vocals"].close()
            try:
                writers["instrumental"].close()
            except BaseException:
                paths["vocals"].unlink(missing_ok=True)
                raise
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for stem in STEMS:
            report = clipping[stem]
            if report.samples:
                warnings.warn(
                    ClippingWarning(
                        f"{paths[stem].name}: {report.samples} samples clipped (peak {report.peak:.3f} "
                        f"= {20 * np.log10(report.peak):+.2f} dBFS); choose --bit-depth 32 to keep them"
                    ),
                    stacklevel=2,
                )
        return paths


def _take(blocks: list[np.ndarray], n: int) -> np.ndarray:
    """Remove and return the first `n` samples of a queue of (channels, m) blocks."""
    out, have = [], 0
    while have < n:
        block = blocks[0]
        need = n - have
        if block.shape[-1] <= need:
            out.append(blocks.pop(0))
            have += block.shape[-1]
        else:
            out.append(block[:, :need])
            blocks[0] = block[:, need:]
            have = n
    return np.concatenate(out, axis=-1)


def _fit_name(stem: str, ext: str) -> str:
    """`stem` shortened until the longest file written for it fits in a file name (255 bytes):
    the writer's temporary `.<stem>_instrumental.<ext>.<8 hex digits>.part`."""
    room = 255 - len(f"._instrumental.{ext}.01234567.part")
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed * 1.05 > free:
        raise AudioEncodeError(
            f"not enough free disk space in {folder} for the stems: about {needed / 2**20:.0f} MB needed, "
            f"{free / 2**20:.0f} MB free"
        )


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
