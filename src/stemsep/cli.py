"""The `stemsep` command line: a thin layer over the library.

Each subcommand parses its arguments, calls the public API and prints results. Errors the
user can act on (:class:`stemsep.errors.StemsepError`) are printed once, as one line on
stderr, and turn into a non-zero exit code; the library never exits the process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stemsep.errors import StemsepError


def _error(message: str) -> None:
    print(f"stemsep: error: {message}", file=sys.stderr)


# separate ------------------------------------------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the model."""
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: the 1297 checkpoint in the weights folder)")
    p.add_argument("--config", type=Path, help="model yaml (default: the 1297 yaml in the weights folder)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default: auto)")
    p.add_argument("--batch-size", type=int, help="chunks per forward pass (default: chosen for the device)")
    p.add_argument("--overlap", type=int, help="windows covering each sample, 1-16 (default: the model config's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="transformer precision: auto = bf16 on GPU (fp16 where bf16 is missing), fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="run the network through torch.compile (slow start, faster chunks)")


def _load_separator(args: argparse.Namespace):
    from stemsep.separator import Separator

    return Separator(args.checkpoint, args.config, device=args.device, batch_size=args.batch_size,
                     precision=args.precision, compile=args.compile)


def _add_separate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("separate", help="split audio files into vocals and instrumental")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="audio files (any common format)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("separated"), help="where to write the stems (default: separated/)")
    p.add_argument("--format", default="wav", choices=["wav", "flac"], help="output format (default: wav)")
    p.add_argument("--bit-depth", default="auto", choices=["auto", "16", "24", "32"],
                   help="auto keeps the input's precision; 32 = float WAV (default: auto)")
    _add_model_options(p)
    p.set_defaults(func=_run_separate)


def _run_separate(args: argparse.Namespace) -> int:
    import warnings

    from tqdm import tqdm

    separator = _load_separator(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.inputs:
        with tqdm(total=0, desc=path.name, unit="chunk", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    paths = separator.separate(
                        path, args.output_dir, output_format=args.format, bit_depth=args.bit_depth,
                        overlap=args.overlap, on_progress=progress,
                    )
            except StemsepError as exc:
                bar.close()
                _error(str(exc))
                failures += 1
                continue
        for warning in caught:
            print(f"stemsep: warning: {warning.message}", file=sys.stderr)
        for stem_path in paths.values():
            print(stem_path)
    return 1 if failures else 0


# weights ---------------------------------------------------------------------------------


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="download or verify the 1297 checkpoint and config")
    actions = p.add_subparsers(dest="weights_action", required=True)
    for name, text in (
        ("download", "fetch the checkpoint and yaml (mirrors in order), verify sha256"),
        ("verify", "check that the files are present and match their sha256"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("--dir", type=Path, default=None, help="weights folder (default: weights/ or $STEMSEP_WEIGHTS_DIR)")
    p.set_defaults(func=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    from stemsep import weights

    directory = args.dir or weights.default_dir()
    if args.weights_action == "download":
        paths = weights.download(directory)
    else:
        paths = weights.verify(directory)
    for path in paths:
        print(path)
    return 0


# remote ----------------------------------------------------------------------------------


def _add_remote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remote", help="separate on Replicate and download the stems, or submit with a webhook")
    p.add_argument("audio", metavar="AUDIO", help="audio file (up to 100 MB) or http(s) URL")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("separated"), help="where to write the stems (default: separated/)")
    p.add_argument("--webhook", metavar="URL",
                   help="do not wait: Replicate POSTs the finished prediction to URL; prints the prediction id")
    p.add_argument("--model", help="owner/name or owner/name:version (default: $REPLICATE_MODEL)")
    p.add_argument("--token", help="Replicate API token (default: $REPLICATE_API_TOKEN)")
    p.add_argument("-i", "--input", action="append", default=[], metavar="KEY=VALUE",
                   help="another model input, repeatable; VALUE is read as JSON when it parses")
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
    if args.webhook:
        print(remote.submit(args.audio, args.webhook, model=args.model, api_token=args.token, **inputs))
        return 0
    stems = remote.separate(args.audio, model=args.model, api_token=args.token, **inputs)
    paths = remote.download_stems(stems, args.output_dir, remote.input_name(args.audio))
    for path in paths.values():
        print(path)
    return 0


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
                   help="wait before the first retry, doubling each time (default: 1)")
    p.set_defaults(func=_run_serve_webhooks)


def _run_serve_webhooks(args: argparse.Namespace) -> int:
    import os

    from stemsep import webhooks

    webhooks.serve(
        args.store, host=args.host, port=args.port,
        secret=args.secret or os.environ.get("REPLICATE_WEBHOOK_SECRET"), verify=not args.insecure_no_verify,
        attempts=args.retries, backoff=args.retry_delay,
    )
    return 0


# eval ------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score vocals/instrumental SDR on MUSDB18-HQ or MUSDB18: the model's, or existing stems'")
    p.add_argument("dataset", type=Path, metavar="DATASET",
                   help="MUSDB18-HQ (folders with mixture.wav, vocals.wav) or MUSDB18 (.stem.mp4 files), with or without train/ test/")
    p.add_argument("--split", default="test", help="subfolder of DATASET to score, when it has one (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N tracks (sorted by name)")
    p.add_argument("--estimates", type=Path, metavar="DIR",
                   help="score the stem files in DIR instead of running the model (layouts: see the README's Measuring quality section)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write the results to FILE after each track; tracks already in it are not scored again")
    p.add_argument("--no-bsseval", action="store_true",
                   help="skip museval's BSSEval v4 SDR (the slow part: ~0.3 s per second of audio on a CPU)")
    _add_model_options(p)
    p.set_defaults(func=_run_eval)


def _eval_cell(value: float | None) -> str:
    text = "-" if value is None else f"{value:.3f}"
    return f"{'0.000' if text == '-0.000' else text:>9}"


def _eval_row(label: str, width: int, duration: str, sdr: dict, bss: dict | None) -> str:
    cells = [sdr.get(s) for s in ("vocals", "instrumental")] + [(bss or {}).get(s) for s in ("vocals", "instrumental")]
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
            f"--{k.replace('_', '-')}" for k in ("checkpoint", "config", "batch_size", "overlap") if getattr(args, k) is not None
        ]
        if model_options:
            raise StemsepError(f"{', '.join(model_options)} cannot be used with --estimates, which scores existing files")
        settings["estimates"] = str(args.estimates.resolve())
        estimator = evaluate.file_estimates(args.estimates)
    else:
        from stemsep.separator import CHECKPOINT_NAME, CONFIG_NAME

        separator = _load_separator(args)
        overlap = separator.config.inference.num_overlap if args.overlap is None else args.overlap
        settings.update(
            checkpoint=args.checkpoint.name if args.checkpoint else CHECKPOINT_NAME,
            config=args.config.name if args.config else CONFIG_NAME,
            overlap=overlap, precision=separator.precision, device=str(separator.device), batch_size=separator.batch_size,
        )
        estimator = evaluate.separator_estimates(separator, overlap)

    width = max(len("track"), *(len(t.name) for t in tracks))
    print(f"{'':<{width}}  {'':>7}  {'SDR (MSST), dB':>20}  {'BSSEval v4 SDR, dB':>20}")
    print(f"{'track':<{width}}  {'seconds':>7}  {'vocals':>9}  {'instr.':>9}  {'vocals':>9}  {'instr.':>9}")
    with tqdm(total=len(tracks), desc="tracks", unit="track", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:

        def on_track(result, resumed: bool, index: int, total: int) -> None:
            tqdm.write(_eval_row(result.name, width, f"{result.duration:.1f}", result.sdr, result.bsseval_sdr), file=sys.stdout)
            bar.update(1)

        report = evaluate.evaluate(tracks, estimator, settings, args.json, bsseval=not args.no_bsseval, on_track=on_track)
    summary = report.summary
    for agg in ("median", "mean"):
        bss = None if args.no_bsseval else summary["bsseval_sdr"][agg]
        print(_eval_row(agg, width, "", summary["sdr"][agg], bss))
    scored = len(report.scores) - report.resumed
    where = f", {report.resumed} read from {args.json}" if args.json else ""
    print(f"{len(report.scores)} track{'s' * (len(report.scores) != 1)}: {scored} scored{where}")
    return 0


# entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_separate(sub)
    _add_weights(sub)
    _add_remote(sub)
    _add_serve_webhooks(sub)
    _add_eval(sub)
    return parser


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
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
