"""``medfm train RECIPE ...``: the trainers of ``trainers/`` (same flags as
``torchrun trainers/<recipe>.py``). Recipes are the modules ``trainers.<name>`` of
:data:`TRAIN_RECIPES` that exist, each exposing ``add_arguments(parser)`` and ``main(args)``.

Run under ``torchrun`` for several processes: ``torchrun --nproc_per_node 2 -m napari_medfm.cli
train merlin ...`` or ``torchrun --nproc_per_node 2 trainers/merlin.py ...``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

#: Recipe modules (``trainers.<name>``); missing ones are skipped.
TRAIN_RECIPES = ("merlin", "mermed", "radfm", "probe")


def _recipes() -> dict[str, Any]:
    found = {}
    for name in TRAIN_RECIPES:
        try:
            mod = importlib.import_module(f"trainers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name in (f"trainers.{name}", "trainers"):
                continue
            raise
        if hasattr(mod, "add_arguments") and hasattr(mod, "main"):
            found[name] = mod
    return found


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a model (trainers/: Merlin, MerMED-FM, RadFM, probes)",
        description="Run a training recipe. Same flags as `torchrun trainers/<recipe>.py`.")
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, mod in _recipes().items():
        doc = (mod.__doc__ or "").strip().splitlines()
        rp = sub.add_parser(name, help=doc[0] if doc else name,
                            description=(mod.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(rp)
        rp.set_defaults(func=_runner(mod))
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _runner(mod: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        return int(mod.main(args) or 0)

    return handler
