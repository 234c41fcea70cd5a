"""One song through the hosted model, with the official `replicate` client.

- :func:`separate` is `replicate.run(...)`: create a prediction, wait for it, and return its
  output URLs by stem (:func:`~stemsep.remote.outputs.stem_urls`). For short songs.
- :func:`submit` is `predictions.create(...)` with a ``webhook`` and
  ``webhook_events_filter=["completed"]``: return the prediction id at once and let
  Replicate POST the finished prediction to the webhook (:mod:`stemsep.webhooks`).

The Replicate model and the API token come from the arguments, else ``REPLICATE_MODEL``
and ``REPLICATE_API_TOKEN``. Model inputs pass through under whatever names the model
gives them (``model``, ``stems``, ``output_format``...).
"""

from __future__ import annotations

import io
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from stemsep.errors import RemoteError
from stemsep.remote.outputs import TERMINAL_STATUSES, is_url, stem_urls

MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Replicate's cap on files the SDK uploads
DEFAULT_POLL_INTERVAL = 1.0  # seconds between status polls, unless REPLICATE_POLL_INTERVAL says
_MODEL_REF = re.compile(r"[^/:\s]+/[^/:\s]+(:[0-9a-zA-Z]+)?")  # owner/name or owner/name:version

Audio = str | os.PathLike | IO[bytes]


# settings --------------------------------------------------------------------------------


def resolve_model(model: str | None = None) -> str:
    """`owner/name` or `owner/name:version`, from the argument or ``REPLICATE_MODEL``."""
    model = model or os.environ.get("REPLICATE_MODEL")
    if not model:
        raise RemoteError(
            "no Replicate model given: pass one as owner/name (e.g. ryansmith/bs-roformer) or set REPLICATE_MODEL"
        )
    if not _MODEL_REF.fullmatch(model):
        raise RemoteError(f"Replicate model {model!r} is not of the form owner/name or owner/name:version")
    return model


def resolve_token(api_token: str | None = None) -> str:
    """The API token, from the argument or ``REPLICATE_API_TOKEN``."""
    token = api_token or os.environ.get("REPLICATE_API_TOKEN")
    if not token:
        raise RemoteError(
            "no Replicate API token: pass one or set REPLICATE_API_TOKEN (https://replicate.com/account/api-tokens)"
        )
    return token


def poll_interval() -> float:
    """Seconds between status polls: ``REPLICATE_POLL_INTERVAL``, else :data:`DEFAULT_POLL_INTERVAL`."""
    return float(os.environ.get("REPLICATE_POLL_INTERVAL") or DEFAULT_POLL_INTERVAL)


def make_client(api_token: str | None = None, base_url: str | None = None, **httpx_options: Any):
    """A `replicate.Client`; `base_url` (else ``REPLICATE_BASE_URL``) points it at another
    server; other keyword arguments go to its `httpx.Client`."""
    import replicate

    return replicate.Client(api_token=resolve_token(api_token), base_url=base_url, **httpx_options)


def model_inputs(
    replicate_model: str | None, input: Mapping[str, Any] | None, inputs: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    """The Replicate model and the model inputs of a call: `input` and the keyword `inputs`
    together. Until the next release, a keyword ``model`` that looks like ``owner/name`` or
    ``owner/name:version`` (or is None) while no `replicate_model` is given still names the
    Replicate model, with a DeprecationWarning; otherwise ``model`` is a model input."""
    inputs = dict(inputs)
    old = inputs.get("model", "")
    if replicate_model is None and "model" in inputs and (old is None or _MODEL_REF.fullmatch(str(old))):
        warnings.warn(
            "stemsep.remote: model= naming the Replicate model is deprecated and goes in the next release; "
            "pass replicate_model= (model= is the model's own input of that name)",
            DeprecationWarning,
            stacklevel=3,
        )
        replicate_model = inputs.pop("model")
    both = set(input or {}) & set(inputs)
    if both:
        raise RemoteError(f"model input {sorted(both)[0]!r} is given twice, in the input mapping and as a keyword")
    return replicate_model, {**(input or {}), **inputs}


# inputs ----------------------------------------------------------------------------------


def audio_input(audio: Audio) -> Any:
    """What goes into the prediction's ``audio`` field: a URL as is, a local file as a file
    object for the SDK to upload (refused over the upload cap, where a URL is the way)."""
    if is_url(audio):
        return audio
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise RemoteError("no such file", file=str(path))
        _check_size(path.stat().st_size, path.name)
        return path
    if hasattr(audio, "read"):
        name = Path(getattr(audio, "name", "audio")).name
        if hasattr(audio, "seek") and hasattr(audio, "tell"):  # the SDK uploads from offset 0
            start = audio.tell()
            size = audio.seek(0, io.SEEK_END)
            audio.seek(start)
            _check_size(size, name)
        if not isinstance(audio, io.IOBase):  # the SDK uploads only io.IOBase objects
            data = audio.read(MAX_UPLOAD_BYTES + 1)
            _check_size(len(data), name)
            audio = io.BytesIO(data)
            audio.name = name
        return audio
    raise RemoteError(f"audio must be a file path, an open file or a URL, not {type(audio).__name__}")


def _check_size(size: int, name: str) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise RemoteError(
            f"{name}: {size / 2**20:.0f} MB is over Replicate's 100 MB upload limit; "
            "put the file on a web server or bucket and pass its URL instead"
        )


def input_name(audio: Audio) -> str:
    """A name for output files: the input file's or URL's name without extension."""
    if isinstance(audio, str) and audio.startswith("data:"):
        return "audio"
    if is_url(audio):
        return Path(unquote(urlparse(audio).path)).stem or "audio"
    if isinstance(audio, (str, os.PathLike)):
        return Path(audio).stem
    return Path(getattr(audio, "name", "audio")).stem or "audio"


# calls -----------------------------------------------------------------------------------


def create_prediction(client, model: str, input: dict, **params):
    """`owner/name` runs the model's latest version; `owner/name:version` that version."""
    ref, _, version = model.partition(":")
    owner, name = ref.split("/", 1)
    if version:
        return client.predictions.create(version=version, input=input, **params)
    return client.models.predictions.create(model=(owner, name), input=input, **params)


def prediction_dict(prediction: Any) -> dict:
    """A prediction as a plain dict, whether the SDK parsed it or not."""
    if isinstance(prediction, dict):
        return prediction
    return {name: getattr(prediction, name, None) for name in ("id", "status", "output", "error", "metrics", "input")}


def get_prediction(client, prediction_id: str) -> dict:
    """The prediction, polled; the raw answer when the SDK cannot parse it (a status it does
    not list, such as ``aborted``)."""
    try:
        return prediction_dict(client.predictions.get(prediction_id))
    except ValueError:  # pydantic's ValidationError
        return client._request("GET", f"/v1/predictions/{prediction_id}").json()


def failure(prediction: Mapping[str, Any]) -> RemoteError:
    """The error of a prediction that ended other than succeeded, with its error's first line."""
    reason = str(prediction.get("error") or "").strip().partition("\n")[0] or "no error message"
    return RemoteError(f"prediction {prediction.get('id')} {prediction.get('status')}: {reason}")


def _call(what: str, fn, *args, **kwargs):
    """Run an SDK call, turning its exceptions into one-sentence :class:`RemoteError`s."""
    import httpx
    from replicate.exceptions import ReplicateError

    try:
        return fn(*args, **kwargs)
    except ReplicateError as exc:
        detail = exc.detail or exc.title or "no detail"
        raise RemoteError(f"Replicate API refused to {what} (HTTP {exc.status}): {detail}") from None
    except httpx.HTTPError as exc:
        raise RemoteError(f"could not reach the Replicate API to {what}: {exc}") from None


def separate(
    audio: Audio,
    *,
    replicate_model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    input: Mapping[str, Any] | None = None,
    **inputs: Any,
) -> dict[str, str]:
    """Run the model on `audio` (a path, an open file or a URL) and wait for it.

    `replicate_model` is ``owner/name`` or ``owner/name:version``. Model inputs are `input`
    (a mapping) and any other keyword arguments, e.g. ``input={"model": "karaoke"}`` or
    ``stems="instrumental"``. Returns the output URLs by stem, ``{"vocals": url,
    "instrumental": url}`` for the default model (see :func:`~stemsep.remote.outputs.stem_urls`).
    Replicate deletes these files an hour after the prediction ends: fetch them
    (:func:`~stemsep.remote.download.download_stems`).

    Deprecated, until the next release: ``model="owner/name"`` in place of `replicate_model`.
    """
    replicate_model, inputs = model_inputs(replicate_model, input, inputs)
    replicate_model = resolve_model(replicate_model)
    client = make_client(api_token, base_url)
    request = {**inputs, "audio": audio_input(audio)}
    created = _call("create a prediction", create_prediction, client, replicate_model, request, wait=True)
    prediction = prediction_dict(created)
    while prediction["status"] not in TERMINAL_STATUSES:
        time.sleep(poll_interval())
        prediction = _call("poll the prediction", get_prediction, client, prediction["id"])
    if prediction["status"] != "succeeded":
        raise failure(prediction)
    return stem_urls(prediction["output"], inputs)


def submit(
    audio: Audio,
    webhook_url: str,
    *,
    replicate_model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    input: Mapping[str, Any] | None = None,
    **inputs: Any,
) -> str:
    """Start a prediction on `audio` and return its id at once; Replicate POSTs the finished
    prediction (whatever its terminal status) to `webhook_url`. Model and inputs as for
    :func:`separate` (``model="owner/name"`` likewise deprecated)."""
    if not str(webhook_url).startswith(("http://", "https://")):
        raise RemoteError(f"webhook URL {webhook_url!r} is not an http(s) URL")
    replicate_model, inputs = model_inputs(replicate_model, input, inputs)
    replicate_model = resolve_model(replicate_model)
    client = make_client(api_token, base_url)
    request = {**inputs, "audio": audio_input(audio)}
    prediction = _call(
        "create a prediction", create_prediction, client, replicate_model, request,
        webhook=webhook_url, webhook_events_filter=["completed"],
    )
    return prediction.id
