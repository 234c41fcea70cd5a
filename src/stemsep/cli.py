"""The `stemsep` command line: a thin layer over the library.

Each subcommand parses its arguments, calls the public API and prints results. Errors the
user can act on (:class:`stemsep.errors.StemsepError`) are printed once, as one line on
stderr, and turn into a non-zero exit code; the library never exits the process.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from stemsep import catalogue
from stemsep.choices import (
    BIT_DEPTHS,
    COMPRESSED_FORMATS,
    DEFAULT_BIT_DEPTH,
    DEFAULT_FORMAT,
    DEVICES,
    MAX_OVERLAP,
    OUTPUT_FORMATS,
    PRECISIONS,
)
from stemsep.errors import StemsepError


def _error(message: str) -> None:
    print(f"stemsep: error: {message}", file=sys.stderr)


# separate ------------------------------------------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the model."""
    p.add_argument("--model", action="append", metavar="NAME",
                   help=f"a model from `stemsep models` (default: {catalogue.DEFAULT}); repeat it for an ensemble, which averages "
                        "the models' estimates (they must give the same stems)")
    p.add_argument("--checkpoint", type=Path, action="append",
                   help="a checkpoint file of any other model (with --config; repeat both for an ensemble)")
    p.add_argument("--config", type=Path, action="append", help="that model's yaml")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where the network runs (default: auto)")
    p.add_argument("--batch-size", type=int, help="chunks per forward pass (default: chosen for the device)")
    p.add_argument("--overlap", type=int, help=f"windows covering each sample, 1-{MAX_OVERLAP} (default: the model config's)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="transformer precision: auto = bf16 on GPU (fp16 where bf16 is missing), fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="compile the network with torch.compile in the background: the first chunks run eagerly, the "
                        "compiled network takes over once built (its code is kept in $STEMSEP_CACHE_DIR for later runs)")
    p.add_argument("--tta", action="store_true",
                   help="quality mode: average the network over the song, its swapped channels and its inverted "
                        "polarity (3x the network time)")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never download: a model not in the weights folder is an error (also $STEMSEP_OFFLINE=1); "
                        "by default a missing model is downloaded and checksummed on first use")


def _load_separator(args: argparse.Namespace):
    """A Separator for the chosen model, or an Ensemble of several."""
    from stemsep.separator import Ensemble, Separator
    from stemsep.weights import ProgressBar

    names, checkpoints, configs = args.model or [], args.checkpoint or [], args.config or []
    bar = ProgressBar() if sys.stderr.isatty() else None  # a model downloaded on first use
    options = dict(device=args.device, batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                   offline=args.offline, download_progress=bar)
    if len(checkpoints) <= 1 and len(configs) <= 1:
        if (checkpoints or configs) and len(names) > 1:
            raise StemsepError("--checkpoint/--config replace the files of one --model; for an ensemble, repeat them in pairs")
        file_pair = (checkpoints[0] if checkpoints else None, configs[0] if configs else None)
        members = [Separator(*file_pair, model=name, **options) for name in names or [None]]
    elif len(checkpoints) != len(configs):
        raise StemsepError(f"an ensemble needs a --config for each --checkpoint: got {len(checkpoints)} and {len(configs)}")
    else:
        members = [Separator(c, f, **options) for c, f in zip(checkpoints, configs)]
        members += [Separator(model=name, **options) for name in names]
    if bar is not None:
        bar.close()
    return members[0] if len(members) == 1 else Ensemble(members)


def _add_separate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("separate", help="split audio files, or every audio file in folders, into stems")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="audio files (any common format) or folders (every audio file under them, in name order)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("separated"),
                   help="where to write the stems; a folder's structure is mirrored under it (default: separated/)")
    p.add_argument("--format", default=DEFAULT_FORMAT, choices=OUTPUT_FORMATS,
                   help=f"output format (default: {DEFAULT_FORMAT}). Lossy formats ({', '.join(COMPRESSED_FORMATS)}) cannot keep the stems "
                        "adding up to the mix exactly; opus is always 48 kHz")
    p.add_argument("--bitrate", type=int, metavar="KBPS", help="bitrate of mp3/m4a/opus output (default: per format)")
    p.add_argument("--bit-depth", default=DEFAULT_BIT_DEPTH, choices=[str(depth) for depth in BIT_DEPTHS],
                   help=f"wav/flac sample format: auto keeps the input's precision; 32 = float WAV (default: {DEFAULT_BIT_DEPTH})")
    p.add_argument("--stems", type=lambda v: [s.strip() for s in v.split(",") if s.strip()], metavar="NAMES",
                   help="comma-separated stems to write, e.g. vocals, or no_STEM for the mix without that stem, e.g. "
                        "guitar,no_guitar (default: all of the model's)")
    _add_model_options(p)
    p.set_defaults(func=_run_separate)


def _songs(inputs: list[Path], output_dir: Path):
    """(input file, output folder, found in a folder) for each file named or found under a
    folder, in order; a folder that cannot be read gives a StemsepError in place of a file."""
    for path in inputs:
        if not path.is_dir():
            yield path, output_dir, False
            continue
        problems: list[OSError] = []
        for folder, subfolders, files in os.walk(path, onerror=problems.append):
            subfolders.sort()
            out = output_dir / Path(folder).relative_to(path)
            for name in sorted(files):
                if not name.startswith("."):
                    yield Path(folder) / name, out, True
        for problem in problems:
            yield StemsepError(f"cannot read folder {problem.filename} ({problem.strerror or problem})"), None, True


def _run_separate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stemsep.errors import NotAudioError, report_warnings

    report_warnings(lambda line: print(f"stemsep: {line}", file=sys.stderr))
    separator = _load_separator(args)
    separator.chosen_stems(args.stems)  # an unknown stem name fails before any work
    done = skipped = failures = 0
    for path, out, in_folder in _songs(args.inputs, args.output_dir):
        if isinstance(path, StemsepError):
            _error(str(path))
            failures += 1
            continue
        with tqdm(total=0, desc=path.name, unit="chunk", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                paths = separator.separate(
                    path, out, output_format=args.format, bit_depth=args.bit_depth, bitrate_kbps=args.bitrate,
                    overlap=args.overlap, on_progress=progress, stems=args.stems, tta=args.tta,
                )
            except NotAudioError as exc:
                bar.close()
                if in_folder:
                    print(f"stemsep: skipping {exc.file}: not audio", file=sys.stderr)
                    skipped += 1
                else:
                    _error(str(exc))
                    failures += 1
                continue
            except StemsepError as exc:
                bar.close()
                _error(str(exc))
                failures += 1
                continue
        done += 1
        for stem_path in paths.values():
            print(stem_path)
    if any(p.is_dir() for p in args.inputs):
        print(f"stemsep: {done} separated, {skipped} skipped (not audio), {failures} failed", file=sys.stderr)
    return 1 if failures else 0


# weights ---------------------------------------------------------------------------------


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="download or verify the default model's files (stemsep models handles every model)")
    actions = p.add_subparsers(dest="weights_action", required=True)
    for name, text in (
        ("download", "same as `stemsep models download` for the default model"),
        ("verify", "same as `stemsep models verify` for the default model"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("--dir", type=Path, default=None, help="weights folder (default: weights/ or $STEMSEP_WEIGHTS_DIR)")
    p.set_defaults(func=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    from stemsep import weights

    if args.weights_action == "download":
        paths = weights.download(directory=args.dir)
    else:
        paths = weights.verify(directory=args.dir)
    for path in paths:
        print(path)
    return 0


# models ----------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    dir_help = "weights folder (default: weights/ or $STEMSEP_WEIGHTS_DIR)"
    p = sub.add_parser("models", help="list the known models (stems, published figures, licence, size, whether "
                                      "downloaded, the best per stem); download or verify them by name")
    p.add_argument("--dir", type=Path, default=None, help=dir_help)
    p.add_argument("--stem", metavar="STEM", help="list only the models that give STEM (e.g. guitar)")
    actions = p.add_subparsers(dest="models_action", metavar="{download,verify}")
    a = actions.add_parser("download", help="fetch models' checkpoints and configs (mirrors in order), checking size and sha256")
    a.add_argument("names", nargs="+", metavar="NAME", help="model names, as `stemsep models` lists them")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    a = actions.add_parser("verify", help="check downloaded files against their size and sha256")
    a.add_argument("names", nargs="*", metavar="NAME", help="model names (default: every model with a file in the folder)")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    p.set_defaults(func=_run_models)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _short_licence(licence: str | None) -> str:
    """A licence note's first clause ("CC BY-NC 4.0 (non-commercial...), per..." -> "CC BY-NC 4.0")."""
    return re.split(r",| \(", licence)[0] if licence else "none stated"


def _list_models(folder: Path, stem: str | None) -> int:
    models = list(catalogue.MODELS.values()) if stem is None else catalogue.with_stem(stem)
    if not models:
        raise StemsepError(f"no model in the catalogue gives a stem named {stem!r}")
    notes: list[tuple[str, str | None, str | None]] = []  # (source, entry, link) of each figure shown, in order

    def cite(score) -> str:
        key = (score.source, score.entry, score.link)
        if key not in notes:
            notes.append(key)
        tracks = f" ({score.tracks} tracks)" if score.tracks else ""
        return f"{score.stem} {score.sdr:.2f}{tracks} [{notes.index(key) + 1}]"

    rows = []
    for m in models:
        shown = [s for s in m.best_scores().values() if stem in (None, s.stem)] or [s for s in m.scores[:1] if stem in (None, s.stem)]
        stems = ", ".join(m.stems) if len(m.stems) <= 6 else f"{len(m.stems)} stems" + (f" incl. {stem}" if stem else "")
        rows.append((m.name, catalogue.ARCHITECTURES[m.architecture], stems, " ".join(filter(None, (_size(m.size), m.checkpoint.dtype))),
                     ", ".join(cite(s) for s in shown) or "-", _short_licence(m.licence),
                     "yes" if catalogue.is_downloaded(m, folder) else "no"))
    header = ("NAME", "ARCHITECTURE", "STEMS", "SIZE", "SDR (dB)", "LICENCE", "DOWNLOADED")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    best = catalogue.best_per_stem(models)
    if stem is not None:
        best = {stem: best[stem]} if stem in best else {}
    print()
    if best:
        print("Best per stem, by SDR on MVSEP's Multisong dataset: "
              + "; ".join(f"{s}: {m.name} {cite(score).partition(' ')[2]}" for s, (m, score) in best.items()))
    else:
        print(f"No published Multisong figure for {stem or 'any stem'}.")
    print()
    for i, (source, entry, link) in enumerate(notes, 1):
        where = ", ".join(part for part in (f"entry {entry}" if entry else None, link) if part)
        print(f"[{i}] {catalogue.SOURCES[source].get('label', source)}" + (f": {where}" if where else ""))
    print("\n" * bool(notes) + "Licence and provenance:")
    for m in models:
        print(f"  {m.name}: {m.licence or 'no licence stated'}. {m.provenance or ''}".rstrip())
    print(f"Default model: {catalogue.DEFAULT}. Weights folder: {folder}")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from stemsep import weights

    folder = args.dir or catalogue.default_dir()
    if args.models_action is None:
        return _list_models(folder, args.stem)
    models = [catalogue.get(name) for name in dict.fromkeys(args.names)]  # every name checked before any work
    if args.models_action == "verify" and not models:
        models = [m for m in catalogue.MODELS.values() if any((folder / f.name).exists() for f in m.files)]
        if not models:
            raise StemsepError(f"no model is downloaded in {folder}: download one first (stemsep models download NAME)")
    failures = 0
    for model in models:
        try:
            if args.models_action == "download":
                paths = weights.download(model, folder)
            else:
                paths = weights.verify(model, folder)
        except StemsepError as exc:
            _error(str(exc))
            failures += 1
            continue
        for path in paths:
            print(path)
    return 1 if failures else 0


# remote ----------------------------------------------------------------------------------


def _add_remote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remote", help="separate on Replicate and download the stems (one song or a batch of songs), or submit with a webhook")
    p.add_argument("audio", nargs="*", metavar="INPUT",
                   help="audio file (up to 100 MB), http(s) URL, or folder; one file or URL: separate it and print the "
                        "path of each stem; more, a folder or --from: a resumable batch run (manifest in the output folder)")
    p.add_argument("--from", dest="from_files", action="append", default=[], metavar="FILE",
                   help="read more inputs from FILE, one per line (# comments; '-' = stdin); repeatable")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("separated"), help="where to write the stems (default: separated/)")
    p.add_argument("--webhook", metavar="URL",
                   help="do not wait: Replicate POSTs each finished prediction to URL; prints the prediction id(s)")
    p.add_argument("--model", help="the Replicate model, owner/name or owner/name:version (default: $REPLICATE_MODEL); "
                                   "the model's own inputs, its `model` input included, go with -i")
    p.add_argument("--token", help="Replicate API token (default: $REPLICATE_API_TOKEN)")
    p.add_argument("-i", "--input", action="append", default=[], metavar="KEY=VALUE",
                   help="a model input, repeatable, e.g. -i model=karaoke -i stems=instrumental; VALUE is read as "
                        "JSON when it parses")
    # Keep the default equal to stemsep.remote.DEFAULT_CONCURRENCY (not imported here: the parser stays light).
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="batch: predictions in flight at most (default: 8; match your deployment's max instances)")
    p.add_argument("--price-per-second", type=float, metavar="USD",
                   help="batch: your hardware's price per second, for the cost estimate in the summary")
    p.add_argument("--retry-failed", action="store_true", help="batch: submit the songs that failed in earlier runs again")
    p.add_argument("--poll-interval", type=float, metavar="SECONDS",
                   help="batch: seconds between status polls (default: $REPLICATE_POLL_INTERVAL or 1)")
    p.set_defaults(func=_run_remote)


def _run_remote(args: argparse.Namespace) -> int:
    import json

    from stemsep import remote

    inputs = {}
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StemsepError(f"--input {item!r} is not KEY=VALUE")
        try:
            inputs[key] = json.loads(value)
        except ValueError:
            inputs[key] = value
    single = len(args.audio) == 1 and not args.from_files and (remote.is_url(args.audio[0]) or not Path(args.audio[0]).is_dir())
    if not single:
        return _run_remote_batch(args, inputs)
    audio = args.audio[0]
    if args.webhook:
        print(remote.submit(audio, args.webhook, replicate_model=args.model, api_token=args.token, input=inputs))
        return 0
    stems = remote.separate(audio, replicate_model=args.model, api_token=args.token, input=inputs)
    paths = remote.download_stems(stems, args.output_dir, remote.input_name(audio))
    for path in paths.values():
        print(path)
    return 0


def _run_remote_batch(args: argparse.Namespace, inputs: dict) -> int:
    import os

    from stemsep import remote

    def shown(key: str) -> str:
        if remote.is_url(key):
            return key
        relative = os.path.relpath(key)
        return key if relative.startswith("..") else relative

    def on_song(song) -> None:
        if song.state == "succeeded":
            files = ", ".join(str(args.output_dir / name) for name in (song.files or {}).values())
            took = f", {song.predict_time:.1f} s" if song.predict_time is not None else ""
            print(f"ok    {shown(song.key)} -> {files}  ({song.prediction_id}{took})", flush=True)
        elif song.state == "submitted":
            print(f"sent  {shown(song.key)}  {song.prediction_id}", flush=True)
        else:
            print(f"FAIL  {shown(song.key)}: {song.error}", flush=True)

    report = remote.separate_many(
        args.audio, args.output_dir, from_files=args.from_files, replicate_model=args.model, api_token=args.token,
        concurrency=args.concurrency, webhook=args.webhook, retry_failed=args.retry_failed,
        poll_interval=args.poll_interval, on_song=on_song, input=inputs,
    )
    earlier = report.succeeded - sum(s.state == "succeeded" for s in report.finished)
    parts = [f"{len(report.songs)} song{'s' * (len(report.songs) != 1)}: {report.succeeded} succeeded"
             + (f" ({earlier} in earlier runs)" if earlier else ""), f"{report.failed} failed"]
    if args.webhook:
        parts.append(f"{report.count('submitted')} submitted, their results go to the webhook")
    elif report.pending:
        parts.append(f"{report.pending} not finished")
    summary = "; ".join([", ".join(parts), f"predict_time {report.predict_time:.1f} s"])
    cost = report.cost(args.price_per_second)
    if cost is not None:
        summary += f"; estimated cost ${cost:.2f} at ${args.price_per_second:g}/s"
    print(summary)
    if report.interrupted:
        _error(f"interrupted: run the same command again to resume (manifest: {report.manifest})")
        return 130
    return 1 if report.failed else 0


# serve-webhooks --------------------------------------------------------------------------


def _add_serve_webhooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-webhooks", help="receive Replicate webhooks and keep the stems (POST /webhooks/replicate)")
    p.add_argument("--store", type=Path, required=True, metavar="DIR", help="where stems and the webhooks.sqlite3 record go")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--secret", help="signing secret whsec_... (default: $REPLICATE_WEBHOOK_SECRET)")
    p.add_argument("--insecure-no-verify", action="store_true",
                   help="accept unsigned deliveries (a local Cog server does not sign); never on a public port")
    p.add_argument("--retries", type=int, default=6, metavar="N", help="download attempts per stem (default: 6)")
    p.add_argument("--retry-delay", type=float, default=1.0, metavar="SECONDS",
                   help="wait before the first retry, about doubling each time (default: 1)")
    p.set_defaults(func=_run_serve_webhooks)


def _run_serve_webhooks(args: argparse.Namespace) -> int:
    import os

    from stemsep import webhooks
    from stemsep.remote import RetryPolicy

    webhooks.serve(
        args.store, host=args.host, port=args.port,
        secret=args.secret or os.environ.get("REPLICATE_WEBHOOK_SECRET"), verify=not args.insecure_no_verify,
        retry=RetryPolicy(attempts=args.retries, backoff=args.retry_delay),
    )
    return 0


# eval ------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score stems' SDR on MUSDB18-HQ or MUSDB18: the model's (vocals/instrumental, "
                                    "MUSDB's four, or more stems mapped onto them: see docs/evaluation.md), or "
                                    "existing stem files'")
    p.add_argument("dataset", type=Path, metavar="DATASET",
                   help="MUSDB18-HQ (folders with mixture.wav and the stems' vocals.wav, drums.wav, bass.wav, other.wav) "
                        "or MUSDB18 (.stem.mp4 files), with or without train/ test/")
    p.add_argument("--split", default="test", help="subfolder of DATASET to score, when it has one (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N tracks (sorted by name)")
    p.add_argument("--estimates", type=Path, metavar="DIR",
                   help="score the stem files in DIR (vocals, instrumental, drums, bass, other) instead of running the "
                        "model (layouts: see docs/evaluation.md)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write the results to FILE after each track; tracks already in it are not scored again")
    p.add_argument("--no-bsseval", action="store_true",
                   help="skip museval's BSSEval v4 SDR (the slow part: ~0.3 s per second of audio on a CPU)")
    _add_model_options(p)
    p.set_defaults(func=_run_eval)


def _eval_cell(value: float | None) -> str:
    text = "-" if value is None else f"{value:.3f}"
    return f"{'0.000' if text == '-0.000' else text:>9}"


def _eval_row(label: str, width: int, duration: str, stems: tuple[str, ...], sdr: dict, bss: dict | None) -> str:
    """A table row: `label`, `duration`, then one column per stem for each figure (MSST SDR,
    BSSEval SDR; "-" where a figure was not computed)."""
    cells = [sdr.get(s) for s in stems] + [(bss or {}).get(s) for s in stems]
    return f"{label:<{width}}  {duration:>7}  " + "  ".join(_eval_cell(v) for v in cells)


def _run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stemsep import evaluate

    if args.limit is not None and args.limit < 1:
        raise StemsepError(f"--limit must be at least 1, got {args.limit}")
    tracks = evaluate.find_tracks(args.dataset, args.split)[: args.limit]
    settings = {"dataset": str(args.dataset.resolve()), "split": args.split}
    if args.estimates:
        model_options = [
            f"--{k.replace('_', '-')}" for k in ("model", "checkpoint", "config", "batch_size", "overlap", "tta")
            if not any(getattr(args, k, None) is unset for unset in (None, False)) and getattr(args, k, None) != []
        ]
        if model_options:
            raise StemsepError(f"{', '.join(model_options)} cannot be used with --estimates, which scores existing files")
        settings["estimates"] = str(args.estimates.resolve())
        estimator = evaluate.file_estimates(args.estimates)
    else:
        separator = _load_separator(args)  # one model, or several as an ensemble
        tta = bool(getattr(args, "tta", False))
        estimator = evaluate.separator_estimates(separator, args.overlap, tta=tta)  # unscorable stems fail here
        members = getattr(separator, "members", None) or (separator,)

        def each(values, collapse: bool = True):
            """One value for one model (or several models that agree), else the list by model."""
            values = list(values)
            return values[0] if len(values) == 1 or (collapse and all(v == values[0] for v in values)) else values

        if getattr(args, "model", None):
            settings["model"] = args.model
        settings.update(
            checkpoint=each((m.model_files[0].name for m in members), collapse=False),
            config=each((m.model_files[1].name for m in members), collapse=False),
            overlap=args.overlap if args.overlap is not None else each(m.config.inference.num_overlap for m in members),
            tta=tta, precision=each(m.precision for m in members), device=each(str(m.device) for m in members),
            batch_size=each(m.batch_size for m in members),
        )

    width = max(len("track"), *(len(t.name) for t in tracks))
    columns: list[tuple[str, ...]] = []  # the stems, once known: the model's at once, stem files' with the first track

    def header(stems: tuple[str, ...]) -> None:
        columns.append(stems)
        group = 11 * len(stems) - 2
        titles = ("SDR (MSST), dB", "BSSEval v4 SDR, dB") if group >= 18 else ("MSST SDR", "BSSEval")
        print(f"{'':<{width}}  {'':>7}  {titles[0]:>{group}}  {titles[1]:>{group}}")
        names = ["instr." if s == "instrumental" else s for s in stems] * 2
        print(f"{'track':<{width}}  {'seconds':>7}  " + "  ".join(f"{n:>9}" for n in names))

    if getattr(estimator, "stem_map", None):
        header(tuple(estimator.stem_map.values()))
    with tqdm(total=len(tracks), desc="tracks", unit="track", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:

        def on_track(result, resumed: bool, index: int, total: int) -> None:
            if not columns:
                header(result.stems)
            row = _eval_row(result.name, width, f"{result.duration:.1f}", columns[0], result.sdr, result.bsseval_sdr)
            tqdm.write(row, file=sys.stdout)
            bar.update(1)

        report = evaluate.evaluate(tracks, estimator, settings, args.json, bsseval=not args.no_bsseval, on_track=on_track)
    summary = report.summary
    for agg in ("median", "mean"):
        bss = None if args.no_bsseval else summary["bsseval_sdr"][agg]
        print(_eval_row(agg, width, "", columns[0], summary["sdr"][agg], bss))
    scored = len(report.scores) - report.resumed
    where = f", {report.resumed} read from {args.json}" if args.json else ""
    print(f"{len(report.scores)} track{'s' * (len(report.scores) != 1)}: {scored} scored{where}")
    return 0


# ui --------------------------------------------------------------------------------------


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="a page in the browser to separate songs and practise with their stems (mixer, loop, speed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this computer only; any other needs the printed token)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free port)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in the default browser")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("separated"),
                   help="where separations are kept, one subfolder each (default: separated/)")
    p.add_argument("--max-upload-mb", type=int, default=1024, metavar="MB", help="largest song the page accepts (default: 1024)")
    p.add_argument("--mixer-minutes", type=float, default=20, metavar="MINUTES",
                   help="longest song the mixer plays; longer ones are offered as downloads (default: 20; the page can change it)")
    _add_model_options(p)
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from stemsep.ui.engines import ModelOptions
    from stemsep.ui.server import Settings, serve

    names, checkpoints, configs = args.model or [], args.checkpoint or [], args.config or []
    if max(len(names), len(checkpoints), len(configs)) > 1:
        raise StemsepError("the page runs one model at a time: give --model, or --checkpoint with --config, once")
    if len(checkpoints) != len(configs):
        raise StemsepError("--checkpoint and --config go together")
    model_options = ModelOptions(
        checkpoint=checkpoints[0] if checkpoints else None, config=configs[0] if configs else None, device=args.device,
        precision=args.precision, batch_size=args.batch_size, overlap=args.overlap, compile=args.compile,
        offline=args.offline,
    )
    settings = Settings(
        output_dir=args.output_dir, host=args.host, port=args.port, model=names[0] if names else None,
        model_options=model_options, tta=args.tta, max_upload_bytes=args.max_upload_mb << 20,
        mixer_minutes=args.mixer_minutes,
    )
    serve(settings, open_browser=not args.no_browser)
    return 0


# entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_separate(sub)
    _add_weights(sub)
    _add_models(sub)
    _add_remote(sub)
    _add_serve_webhooks(sub)
    _add_eval(sub)
    _add_ui(sub)
    return parser


# Optional packages, by the extra that installs them.
_EXTRAS = {name: "remote" for name in ("replicate", "httpx", "standardwebhooks", "starlette", "uvicorn")} | {"museval": "eval"}


def main(argv: list[str] | None = None) -> int:
    # File names need not be UTF-8: print output paths as their own bytes rather than fail after
    # the work (stderr already escapes them with backslashes, which keeps errors readable).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StemsepError as exc:
        _error(str(exc))
        return 1
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        _error(f"this command needs the {exc.name} package: pip install 'stemsep[{extra}]'")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
