"""Call the model hosted on Replicate from Python: one song, or a whole batch of them.

- :func:`separate` waits for one song's prediction and returns its output URLs by stem;
  :func:`submit` starts one with a webhook and returns its id (:mod:`.client`).
- :func:`stem_urls` tells which output is which stem, for any model and any choice of
  stems, by the one naming rule (:mod:`.outputs`); :data:`TERMINAL_STATUSES` are the
  statuses after which a prediction never changes.
- :func:`download` and :func:`download_stems` fetch the outputs atomically, retried by
  :class:`RetryPolicy` (:mod:`.download`, :mod:`.retry`): Replicate deletes them an hour
  after the prediction ends.
- :func:`separate_many` runs many songs with bounded concurrency and a resumable SQLite
  manifest (:mod:`.batch`, :mod:`.manifest`).

The webhook receiver (:mod:`stemsep.webhooks`) builds on this package.
"""

from stemsep.remote.batch import DEFAULT_CONCURRENCY, BatchReport, expand_inputs, separate_many
from stemsep.remote.client import (
    MAX_UPLOAD_BYTES,
    audio_input,
    input_name,
    make_client,
    resolve_model,
    resolve_token,
    separate,
    submit,
)
from stemsep.remote.download import DownloadInterrupted, download, download_stems
from stemsep.remote.manifest import MANIFEST_NAME, Manifest, Song
from stemsep.remote.outputs import (
    TERMINAL_STATUSES,
    expected_stems,
    file_stem,
    is_url,
    known_stems,
    stem_urls,
    url_extension,
    url_stem,
)
from stemsep.remote.retry import RetryPolicy, parse_retry_after

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MANIFEST_NAME",
    "MAX_UPLOAD_BYTES",
    "TERMINAL_STATUSES",
    "BatchReport",
    "DownloadInterrupted",
    "Manifest",
    "RetryPolicy",
    "Song",
    "audio_input",
    "download",
    "download_stems",
    "expand_inputs",
    "expected_stems",
    "file_stem",
    "input_name",
    "is_url",
    "known_stems",
    "make_client",
    "parse_retry_after",
    "resolve_model",
    "resolve_token",
    "separate",
    "separate_many",
    "stem_urls",
    "submit",
    "url_extension",
    "url_stem",
]
