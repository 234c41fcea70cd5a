"""Where `stemsep ui` separates a song: on this computer, or on the Replicate model.

:class:`LocalEngine` keeps one :class:`stemsep.Separator` per model loaded (on the device
stemsep picks unless told) and calls its `separate()`. :class:`ReplicateEngine` sends the
song through stemsep's own client (:mod:`stemsep.remote`) and downloads the stems. Either
way the stems land in the separation's folder as ``<song>_<stem>.<ext>``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stemsep import catalogue
from stemsep.errors import RemoteError, StemsepError
from stemsep.files import first_line
from stemsep.ui.jobs import Job
from stemsep.weights import DownloadProgress

CUSTOM = "custom"  # the model key of --checkpoint/--config files


@dataclass(frozen=True)
class ModelOptions:
    """How local models are loaded and run (the command line's model options)."""

    checkpoint: Path | None = None
    config: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    overlap: int | None = None
    compile: bool = False
    offline: bool | None = None  # never download a catalogue model (None: $STEMSEP_OFFLINE)


class LocalEngine:
    """Separations on this computer, one Separator per model, each loaded on first use and kept."""

    def __init__(self, options: ModelOptions):
        self.options = options
        self._separators: dict[str, Any] = {}
        self._loading = threading.Lock()

    def separator(self, model: str, download_progress: DownloadProgress | None = None):
        """The Separator of a catalogue model (downloaded first if missing, unless offline,
        reporting to `download_progress`), or of the custom files for :data:`CUSTOM`."""
        from stemsep import Separator

        with self._loading:
            if model not in self._separators:
                o = self.options
                common = dict(device=o.device, precision=o.precision, batch_size=o.batch_size, compile=o.compile)
                if model == CUSTOM:
                    if o.checkpoint is None or o.config is None:
                        raise StemsepError("no model files were given to this page")
                    self._separators[model] = Separator(o.checkpoint, o.config, **common)
                else:
                    catalogue.get(model)  # an unknown name: one sentence
                    self._separators[model] = Separator(model=model, offline=o.offline,
                                                        download_progress=download_progress, **common)
            return self._separators[model]

    def model_name(self, model: str) -> str:
        return self.options.checkpoint.name if model == CUSTOM and self.options.checkpoint else model

    def run(self, job: Job, folder: Path, on_progress: Callable[[int, int], None]) -> dict[str, Path]:
        job.begin("loading the model")

        def downloading(done: int, total: int | None, name: str) -> None:
            job.progress(done, total or 0, f"downloading {name}")

        separator = self.separator(job.options.model, downloading)
        job.begin("separating")
        return separator.separate(
            job.upload, folder, output_format=job.options.output_format, overlap=self.options.overlap,
            on_progress=on_progress, stems=job.options.stems, tta=job.options.tta,
        )


class ReplicateEngine:
    """Separations on the Replicate model named by `model` (owner/name[:version]) with `token`;
    both default to $REPLICATE_MODEL and $REPLICATE_API_TOKEN and can be set from the page."""

    def __init__(self) -> None:
        self.model: str | None = os.environ.get("REPLICATE_MODEL") or None
        self.token: str | None = os.environ.get("REPLICATE_API_TOKEN") or None
        self._choices: dict[str, list[str]] = {}  # model -> its `model` input's choices

    @property
    def configured(self) -> bool:
        return bool(self.model and self.token)

    def configure(self, model: str | None, token: str | None) -> None:
        from stemsep import remote

        model = remote.resolve_model(model or self.model)  # one sentence when malformed
        self.model, self.token = model, remote.resolve_token(token or self.token)

    def model_choices(self) -> list[str]:
        """The hosted model's own `model` input choices, read from its OpenAPI schema (empty
        when it has no such input)."""
        if not self.configured:
            return []
        if self.model not in self._choices:
            self._choices[self.model] = input_choices(self._schema(), "model")
        return self._choices[self.model]

    def _schema(self) -> dict[str, Any]:
        from stemsep import remote

        client = remote.make_client(self.token)
        ref, _, version = self.model.partition(":")
        try:
            found = client.models.get(ref)
            found = found.versions.get(version) if version else found.latest_version
        except Exception as exc:  # the SDK's and httpx's errors alike
            raise RemoteError(f"could not read the inputs of the Replicate model {self.model} ({first_line(exc)})") from None
        return (found.openapi_schema if found is not None else None) or {}

    def model_name(self, model: str) -> str:
        return f"{self.model} ({model})" if model else str(self.model)

    def run(self, job: Job, folder: Path, on_progress: Callable[[int, int], None]) -> dict[str, Path]:
        from stemsep import remote

        if not self.configured:
            raise StemsepError("no Replicate model and API token are set for this page")
        inputs: dict[str, Any] = {"output_format": job.options.output_format, "tta": job.options.tta}
        if job.options.model:
            inputs["model"] = job.options.model
        if job.options.stems:
            inputs["stems"] = ",".join(job.options.stems)
        job.begin("running on Replicate")
        urls = remote.separate(job.upload, replicate_model=self.model, api_token=self.token, input=inputs)
        if job.cancel_requested.is_set():
            return {}
        job.begin("downloading the stems")
        return remote.download_stems(urls, folder, remote.input_name(job.upload))


def input_choices(schema: dict[str, Any], name: str) -> list[str]:
    """The allowed values of a Cog model's input `name` in its OpenAPI schema: an `enum`
    on the property itself or on the schema it refers to (Cog writes both)."""
    components = schema.get("components", {}).get("schemas", {})
    prop = components.get("Input", {}).get("properties", {}).get(name, {})
    for candidate in (prop, *prop.get("allOf", ())):
        ref = candidate.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            candidate = components.get(ref.rsplit("/", 1)[-1], {})
        if isinstance(candidate.get("enum"), list):
            return [str(v) for v in candidate["enum"]]
    return []
