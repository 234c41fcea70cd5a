"""audio-separator on the same weights: an engine option, and the reference stemsep is
measured against.

audio-separator 0.47.1 loads the 1297 model from a `model_file_dir` that holds the checkpoint
and yaml under the 1297 file names plus a `download_checks.json` it would otherwise fetch;
:func:`audio_separator_model_dir` lays such a folder out around any checkpoint (symlinks, so
both engines read the same bytes). :class:`ReferenceEngine` runs its `Separator` and returns
`{"vocals": path, "instrumental": path}` like ours. Its documented differences: output at
44.1 kHz, the mix and each stem peak-normalized to 0.9, 16-bit precision.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stemsep.catalogue import get
from stemsep.checkpoint import Config
from stemsep.errors import StemsepError

# audio-separator knows the model by the 1297 file names.
CHECKPOINT_NAME, CONFIG_NAME = get("1297").checkpoint.name, get("1297").config.name

_OTHER_DOWNLOAD_LISTS = (
    "vr_download_list",
    "mdx_download_list",
    "mdx_download_vip_list",
    "demucs_download_list",
    "mdx23c_download_list",
    "mdx23c_download_vip_list",
)


def audio_separator_model_dir(checkpoint: Path, config: Path, directory: Path) -> Path:
    """Lay out `directory` the way audio-separator's `model_file_dir` must look to load the
    1297 model offline: the checkpoint and yaml under the 1297 file names (symlinks to the
    files we serve, so both engines use the same bytes) and the `download_checks.json` it
    would otherwise fetch, listing only this model."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in ((CHECKPOINT_NAME, checkpoint), (CONFIG_NAME, config)):
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(target.resolve())
    checks: dict[str, dict] = {key: {} for key in _OTHER_DOWNLOAD_LISTS}
    checks["roformer_download_list"] = {"BS-Roformer-Viperx-1297": {CHECKPOINT_NAME: CONFIG_NAME}}
    (directory / "download_checks.json").write_text(json.dumps(checks, indent=1))
    return directory


class ReferenceEngine:
    """audio-separator 0.47.1's `Separator` on the same weights, as an engine option and as the
    reference. It resamples to 44.1 kHz, peak-normalizes
    the mix and each stem to 0.9 and writes 16-bit precision (bit_depth does not apply)."""

    def __init__(self, checkpoint: Path, config: Config, root: Path):
        from audio_separator.separator import Separator as AudioSeparator

        model_dir = audio_separator_model_dir(checkpoint, config.path, root / "audio-separator-models")
        self.separator = AudioSeparator(
            log_level=logging.WARNING, model_file_dir=str(model_dir), output_dir=str(root), output_format="WAV"
        )
        self.separator.load_model(CHECKPOINT_NAME)
        instruments = list(config.training.instruments)
        target = config.training.target_instrument or instruments[0]
        others = [name for name in instruments if name.lower() != target.lower()]
        self.stem_names = {"vocals": target, "instrumental": others[0] if others else "Instrumental"}
        self.default_overlap = config.inference.num_overlap

    def separate(self, audio: Path, output_dir: Path, output_format: str, overlap: int | None, name: str) -> dict[str, Path]:
        # audio-separator fixes these at load time; reloading the model per prediction would
        # cost seconds, so set them on the loaded 0.47.1 MDXC instance (pinned version).
        model = self.separator.model_instance
        model.output_dir = str(output_dir)
        model.output_format = output_format.upper()
        model.overlap = overlap or self.default_overlap
        wanted = {stem: f"{name}_{stem}" for stem in self.stem_names}
        try:
            self.separator.separate(str(audio), {self.stem_names[s]: wanted[s] for s in wanted})
        except (StemsepError, KeyboardInterrupt):
            raise
        except Exception as exc:  # its errors are of every kind; ours is one sentence
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StemsepError(f"audio-separator could not separate it: {first_line}", file=str(audio.name)) from None
        paths = {stem: output_dir / f"{wanted[stem]}.{output_format}" for stem in wanted}
        missing = [p.name for p in paths.values() if not p.is_file()]
        if missing:
            raise StemsepError(f"audio-separator did not write {', '.join(missing)}", file=str(audio.name))
        return paths
