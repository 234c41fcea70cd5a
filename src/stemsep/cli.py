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


# entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_weights(sub)
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
