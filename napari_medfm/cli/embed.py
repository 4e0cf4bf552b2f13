"""``medfm embed``: embeddings of images with any registered encoder (twin of the Findings dock).

    medfm embed --model merlin --weights CKPT --output OUT.npz INPUT
    medfm embed --model merlin --weights CKPT --output DIR INPUT [INPUT...]

INPUT is a NIfTI/NRRD/MHA file or a DICOM series folder (read with ``napari_medfm.io.read``).
Each ``.npz`` holds float32 arrays; for Merlin ``image_embedding`` (2048,),
``contrastive_embedding`` (512,) and ``phenotype_logits`` (1692,). Files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model/--weights/--device/--precision (+ hidden --config) shared with zero-shot."""
    p.add_argument("--model", default="merlin", help="model id (see `medfm weights list`)")
    p.add_argument("--weights", default=None,
                   help="checkpoint file or hub-layout folder (default: $MEDFM_HOME/weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default: best)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="compute precision (auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # "tiny": tests only


def model_kwargs(args: argparse.Namespace, family: str, text: bool | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.precision and args.precision != "auto":
        kw["precision"] = args.precision
    if family == "merlin":
        kw["text"] = text
        if getattr(args, "config", None):
            kw["config"] = args.config
        if getattr(args, "tokenizer", None):
            kw["tokenizer"] = args.tokenizer
        if getattr(args, "five_year", None):
            kw["five_year"] = args.five_year
    return kw


def run(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..runtime.registry import get_spec, load_model
    from ..tasks.findings import embed_files_task, output_paths

    spec = get_spec(args.model)
    if "embed" not in spec.tasks:
        from ..errors import MedfmError

        raise MedfmError(f"model {spec.id!r} does not compute embeddings (tasks: "
                         f"{', '.join(spec.tasks)})")
    outs = output_paths(args.inputs, args.output)
    model = load_model(spec.id, weights=args.weights, device=args.device,
                       **model_kwargs(args, spec.family, text=False))
    written = drain_with_tqdm(embed_files_task(model, args.inputs, outs), desc="embed",
                              disable=args.no_progress or len(args.inputs) == 1)
    if args.json:
        print(json.dumps({"model": spec.id, "outputs": [str(p) for p in written]}))
    else:
        for inp, p in zip(args.inputs, written, strict=True):
            print(f"{inp} -> {p}", file=sys.stdout)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("embed", help="image embeddings (.npz) with a registered encoder",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file or DICOM series folder")
    p.add_argument("--output", "-o", required=True,
                   help="OUT.npz for one input, or a folder (one <name>.npz per input)")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print written paths as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
