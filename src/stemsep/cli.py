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


def _load_separator(args: argparse.Namespace):
    from stemsep.separator import Separator

    return Separator(args.checkpoint, args.config, device=args.device, batch_size=args.batch_size)


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


# entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_separate(sub)
    _add_weights(sub)
    _add_remote(sub)
    _add_serve_webhooks(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
