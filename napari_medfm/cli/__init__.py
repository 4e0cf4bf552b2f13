"""``medfm`` command line: the twin of every dock widget.

Each sub-command lives in its own module exposing ``register(subparsers)``; the modules
import heavy libraries (torch, napari) only inside their handlers so ``medfm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import MedfmError

#: Sub-command modules, in the order shown by ``medfm --help``.
SUBCOMMAND_MODULES = (
    "info",
    "demo",
    "open",
    "weights",
    "embed",
    "zeroshot",
    "segment",
    "index",
    "findings",
    "report",
    "validate",
    "review",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="medfm",
        description="Medical-imaging foundation models: the napari-medfm command line.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medfm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:  # a sub-command still being developed
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        rc = args.func(args)
    except MedfmError as exc:
        print(f"medfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medfm {args.command}: cancelled", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
