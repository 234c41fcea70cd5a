"""The public API: :class:`Separator` turns a song into its stems.

It loads a model once and runs the pipeline of the other modules: decode (decode.py) ->
resample to the model's rate, channel groups, chunks (resample.py, chunking.py) -> the
network on its device, averaged over test-time augmentations or an ensemble's models
(runner.py, apply.py) -> overlap-add, back to the song's rate (chunking.py) -> named stems
(stems.py) -> encode (encode.py). A single-target model gives its target and
the complement (mix - target, bit-exact for PCM output); a multi-stem model gives each stem
it predicts; any of them can be left out, and ``no_<stem>`` asked for (the mix without that
stem, bit-exact the same way). Nothing is normalized. The CLI and the Cog predictor are thin layers over this.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from stemsep import weights
from stemsep.apply import ensemble
from stemsep.checkpoint import Config, load_config, load_model
from stemsep.chunking import ProgressCallback, separate_song
from stemsep.compilation import BackgroundCompile, use_compile_cache
from stemsep.choices import DEFAULT_BIT_DEPTH, DEFAULT_FORMAT, MAX_OVERLAP
from stemsep.decode import AudioReader
from stemsep.encode import StemWriter, stem_encoding
from stemsep.errors import (
    AudioDecodeError,
    AudioEncodeError,
    ClippingWarning,
    StemsepError,
)
from stemsep.files import first_line
from stemsep.runner import (
    BatchRunner,
    autocast_dtype,
    default_batch_size,
    resolve_device,
    resolve_precision,
)
from stemsep.stems import PRACTICE_PREFIX, StemLayout, stem_layout, stem_samples

DEFAULT_INPUT_LIMIT_S = 3 * 3600  # longer inputs are refused before any work ($STEMSEP_MAX_DURATION_S moves it)


class _Separation:
    """What :class:`Separator` and :class:`Ensemble` share: from a song to named stems, given
    the subclass's `layout` (the stems) and `_song` (the song's estimates, block by block)."""

    layout: StemLayout

    def _song(self, blocks, sample_rate: int, channels: int, overlap: int | None, on_progress, expected_length: int | None,
              tta: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    @property
    def stems(self) -> tuple[str, ...]:
        return self.layout.names

    def chosen_stems(self, stems: Sequence[str] | None) -> tuple[str, ...]:
        """`stems` checked against what the model can give (its stems, and ``no_<stem>`` for
        each: the mix without it), in the order they come: the model's stems in its order,
        then the practice tracks in the same order (None: the model's stems)."""
        if stems is None:
            return self.stems
        choices = self.layout.choices
        unknown = [s for s in stems if s not in choices]
        if unknown or not stems:
            what = f"unknown stem {unknown[0]!r}" if unknown else "no stems chosen"
            raise StemsepError(
                f"this model gives {', '.join(self.stems)}, and {PRACTICE_PREFIX}<stem> for the mix without one of them",
                file=str(what),
            )
        return tuple(s for s in choices if s in stems)

    def separate_array(
        self,
        mix: np.ndarray,
        sample_rate: int,
        overlap: int | None = None,
        on_progress: ProgressCallback | None = None,
        tta: bool = False,
        stems: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Separate `mix` (channels, samples) at `sample_rate`; float32 stems of the same shape,
        by name: `stems` (see :meth:`chosen_stems`; default: all of :attr:`stems`), in the
        order they come. `tta` averages the network over test-time augmentations (see
        :func:`stemsep.apply.estimate`): 3x the network time."""
        wanted = self.chosen_stems(stems)
        mix = np.asarray(mix, dtype=np.float32)
        if mix.ndim != 2 or mix.shape[0] < 1:
            raise StemsepError(f"audio must be shaped (channels, samples), got shape {mix.shape}")
        if not np.isfinite(mix).all():
            raise AudioDecodeError("audio contains NaN or infinite samples")
        blocks = list(self._song([mix], sample_rate, mix.shape[0], _check_overlap(overlap), on_progress, mix.shape[1], tta))
        estimates = np.concatenate([e for _, e in blocks], axis=-1)  # (stems, channels, samples)
        return stem_samples(self.layout, mix, estimates, wanted=wanted)[0]

    def separate(
        self,
        input_path: str | Path,
        output_dir: str | Path,
        output_format: str = DEFAULT_FORMAT,
        bit_depth: str | int = DEFAULT_BIT_DEPTH,
        overlap: int | None = None,
        on_progress: ProgressCallback | None = None,
        name: str | None = None,
        max_duration_s: float | None = None,
        stems: Sequence[str] | None = None,
        tta: bool = False,
        bitrate_kbps: int | None = None,
    ) -> dict[str, Path]:
        """Separate a file; write `<name>_<stem>.<ext>` for each of `stems` (default: all of
        :attr:`stems`; ``no_<stem>`` for the mix without a stem, see :meth:`chosen_stems`)
        into `output_dir` (created with its parents if missing; name defaults to the input's
        name without extension). Returns the paths by stem, in the order of
        :meth:`chosen_stems`. A complement or practice track is computed from the network's
        estimate whether or not that stem is written, so any choice of stems costs one
        network pass (three with `tta`, see :meth:`separate_array`).

        The file is decoded, separated and written block by block, so memory does not grow
        with its length. The stems appear together or not at all. Inputs longer than
        `max_duration_s` (default $STEMSEP_MAX_DURATION_S, else 3 hours) are refused first.

        `output_format` is wav or flac (`bit_depth`: auto keeps the input's precision, 16, 24
        or 32 = float WAV), or mp3, m4a or opus (`bitrate_kbps`, default per format; see
        :mod:`stemsep.compressed`). Lossy stems no longer add up to the mix exactly, and Opus
        is always written at 48 kHz.
        """
        input_path, output_dir = Path(os.fsdecode(input_path)), Path(os.fsdecode(output_dir))  # bytes too
        overlap = _check_overlap(overlap)
        wanted = self.chosen_stems(stems)
        _make_output_dir(output_dir)
        limit = max_duration_s or float(os.environ.get("STEMSEP_MAX_DURATION_S", DEFAULT_INPUT_LIMIT_S))
        reader = AudioReader(input_path, max_duration_s=limit)
        sample_rate, channels = reader.header.sample_rate, reader.header.channels
        encoding = stem_encoding(reader.header, output_format, bit_depth, bitrate_kbps)
        ext, frames = encoding.format, reader.estimated_frames
        if frames and frames / reader.header.sample_rate > limit:
            raise AudioDecodeError(
                f"{_clock(frames / reader.header.sample_rate)} long, over the {_clock(limit)} limit (STEMSEP_MAX_DURATION_S)",
                file=reader.name,
            )
        name = name or _fit_name(input_path.stem, ext, wanted)
        paths = {stem: output_dir / f"{name}_{stem}.{ext}" for stem in wanted}
        _check_free_space(output_dir, len(paths) * encoding.estimated_bytes(frames or 0, channels))

        heard = False
        with StemWriter(paths, sample_rate, channels, encoding, expected_frames=frames) as writer:
            try:
                for mix, estimates in self._song(reader.blocks(), sample_rate, channels, overlap, on_progress, frames, tta):
                    heard = heard or bool(np.any(mix))
                    writer.write(*stem_samples(self.layout, mix, estimates, encoding.subtype, wanted))
            except AudioDecodeError as exc:
                if exc.file is not None:
                    raise
                raise AudioDecodeError(str(exc), file=reader.name) from None
            if not heard:
                raise AudioDecodeError("the audio is silent (every sample is zero), nothing to separate", file=reader.name)
        for stem, report in writer.clip.items():
            if report.samples:
                warnings.warn(
                    ClippingWarning(
                        f"{report.samples} samples clipped (peak {report.peak:.3f} = {20 * np.log10(report.peak):+.2f} "
                        "dBFS); choose WAV with bit depth 32 (float) to keep them", file=paths[stem].name,
                    ),
                    stacklevel=2,
                )
        return paths


class Separator(_Separation):
    """Load a model once; separate arrays or files into its stems.

    `model` names a model of the catalogue (`stemsep.catalogue`; default 1297), whose files
    are looked for in the weights folder (`$STEMSEP_WEIGHTS_DIR`, else `weights/`) and
    downloaded there on first use (sha256-checked; `download_progress` is called with bytes
    done, bytes in all and the file's name) unless `offline` (default: `$STEMSEP_OFFLINE`);
    `checkpoint`/`config` take any other model's files instead. `batch_size` chunks go through the network per
    forward pass (default: the config's on CPU, chosen from free memory on a GPU).
    `precision` is "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" or "fp16": autocast for
    the transformers; STFT, iSTFT and the mask multiply stay fp32. `compile=True` compiles
    the network with `torch.compile` in the background (:mod:`stemsep.compilation`):
    separations start at once, eagerly, and the compiled network takes over between two
    batches once it is built and checked against eager (:attr:`compiled` says when;
    :meth:`wait_for_compile` waits); a failure gives one warning and eager stays. `stems`
    names what a separation gives, in order.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        config: str | Path | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,
        *,
        model: str | None = None,
        offline: bool | None = None,
        download_progress: weights.DownloadProgress | None = None,
    ):
        if compile:
            use_compile_cache()  # before torch sets its own default (loading the checkpoint does)
        if checkpoint is None or config is None:
            default_checkpoint, default_config = weights.model_files(model, offline=offline, on_progress=download_progress)
            checkpoint, config = checkpoint or default_checkpoint, config or default_config
        self.model_files = (Path(checkpoint), Path(config))
        self.config: Config = load_config(config, checkpoint)
        self.layout: StemLayout = stem_layout(self.config)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = load_model(checkpoint, self.config, self.device)
        cfg = self.config
        tokens = (cfg.audio.chunk_size // cfg.model.stft_hop_length + 1) * len(self.model.band_split.to_features)
        self.batch_size = batch_size or default_batch_size(tokens, cfg.model.dim, self.device, self.precision) or cfg.inference.batch_size
        if self.batch_size < 1:
            raise StemsepError(f"batch size must be at least 1, got {self.batch_size}")
        self.runner = BatchRunner(self.model, self.device, autocast_dtype(self.precision))
        shape = (self.batch_size, self.network_channels, cfg.audio.chunk_size)
        self.compilation = BackgroundCompile(self.runner, shape, self.precision) if compile else None

    @property
    def compiled(self) -> bool:
        """Whether separations now run the compiled network (see `compile`)."""
        return self.runner.compiled is not None

    def wait_for_compile(self, timeout: float | None = None) -> bool:
        """Wait until the background compilation has ended, at most `timeout` seconds (None:
        no limit); True if the compiled network is in use. False at once without `compile`."""
        return self.compilation is not None and self.compilation.wait(timeout)

    @property
    def sample_rate(self) -> int:
        return self.config.audio.sample_rate

    @property
    def network_channels(self) -> int:
        """Channels the network takes: 2 for a stereo model, 1 for a mono one (a song of any
        channel count goes through it in groups of this many)."""
        return 2 if self.config.model.stereo else 1

    @property
    def channels(self) -> int:
        """Deprecated: :attr:`network_channels`, the network's width, not the song's."""
        warnings.warn("Separator.channels is deprecated; use Separator.network_channels", DeprecationWarning, stacklevel=2)
        return self.network_channels

    @property
    def min_samples(self) -> int:
        """Shortest input we separate: one STFT window at the model's rate (46 ms for 1297)."""
        return self.config.model.stft_n_fft


    def _song(self, blocks, sample_rate: int, channels: int, overlap: int, on_progress, expected_length: int | None,
              tta: bool = False):
        """(mix, estimates) blocks of a song: see :func:`stemsep.chunking.separate_song`."""
        return separate_song(
            self.runner.with_tta(tta), blocks, sample_rate=sample_rate, model_rate=self.sample_rate, channels=channels,
            width=self.network_channels, stems=len(self.layout.predicted), chunk=self.config.audio.chunk_size,
            overlap=overlap or self.config.inference.num_overlap, batch_size=self.batch_size, min_samples=self.min_samples, on_progress=on_progress,
            expected_length=expected_length,
        )

class Ensemble(_Separation):
    """Several models as one: the mean of their estimates of the same stems (MSST's
    `avg_wave`), then the complement from that mean, so PCM stems still add up to the mix.

    Every member must give the same stems (the same target); each is loaded once, by the
    caller, as a :class:`Separator`. The song is decoded once and shared; each member runs its
    own chunk schedule at its own rate, one after the other per block, and the estimates are
    averaged at the song's rate (resampling is linear: the same mean as at a shared model
    rate, to round-off). Memory stays a few chunks per member.
    """

    def __init__(self, members: Sequence[Separator]):
        if len(members) < 2:
            raise StemsepError("an ensemble needs at least two models")
        self.members = tuple(members)
        self.layout = members[0].layout
        for member in self.members[1:]:
            if member.layout != self.layout:
                raise StemsepError(
                    f"models of an ensemble must give the same stems: {members[0].model_files[0].name} gives "
                    f"{', '.join(self.layout.names)}, {member.model_files[0].name} gives {', '.join(member.layout.names)}"
                )

    def _song(self, blocks, sample_rate: int, channels: int, overlap: int | None, on_progress, expected_length: int | None,
              tta: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        members = [
            lambda copy, progress, member=member: member._song(copy, sample_rate, channels, overlap, progress, expected_length, tta)
            for member in self.members
        ]
        return ensemble(members, blocks, on_progress)


def _check_overlap(overlap: int | None) -> int | None:
    """`overlap` if it is valid; None stands for each model's own setting."""
    if overlap is not None and (not isinstance(overlap, int) or isinstance(overlap, bool) or not 1 <= overlap <= MAX_OVERLAP):
        raise StemsepError(f"overlap must be an integer from 1 to {MAX_OVERLAP}, got {overlap!r}")
    return overlap


def _make_output_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AudioEncodeError(f"output folder {folder} exists but is not a folder") from None
    except OSError as exc:
        raise AudioEncodeError(f"output folder {folder} cannot be created ({exc.strerror or first_line(exc)})") from None
    if not os.access(folder, os.W_OK):
        raise AudioEncodeError(f"output folder {folder} is not writable")


def _fit_name(stem: str, ext: str, stems: tuple[str, ...]) -> str:
    """`stem` shortened until the longest file written for it fits in a file name (255 bytes):
    the writer's temporary `.<stem>_<longest stem>.<ext>.<8 hex digits>.part`."""
    longest = max(stems, key=len)
    room = 255 - len(f"._{longest}.{ext}.01234567.part")
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
