"""``medfm embed``: image or text embeddings with any registered encoder (twin of the docks).

    medfm embed --model merlin --weights CKPT --output OUT.npz INPUT
    medfm embed --model mermed --modality CXR --output DIR INPUT [INPUT...]
    medfm embed --model biomedclip --weights DIR --output OUT.npz INPUT
    medfm embed --model biomedclip --weights DIR --text "right pleural effusion" -o T.npz

INPUT is an image file (NIfTI/NRRD/MHA/PNG/JPEG/TIFF/slide) or a DICOM series folder. Each
``.npz`` holds float32 arrays (Merlin: ``image_embedding`` (2048,), ``contrastive_embedding``
(512,), ``phenotype_logits`` (1692,); 2D encoders: ``image_embedding``; ``--text``:
``text_embedding``, (D,) for one text, (N, D) for several) and a ``.json`` beside it records
the model, the weights sha256 and the modality used. Files are written atomically.
``--modality`` says what a plain image file is (CXR, fundus, pathology, CT, OCT, ultrasound,
dermatology): headerless PNG/JPEG files carry none.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import MedfmError


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model/--weights/--device/--precision (+ hidden --config) shared with zero-shot."""
    p.add_argument("--model", default="merlin", help="model id (see `medfm weights list`)")
    p.add_argument("--weights", default=None,
                   help="checkpoint file or hub-layout folder (default: $MEDFM_HOME/weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default: best)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="compute precision (auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # "tiny": tests only


def add_modality_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modality", default=None,
                   help="modality of the input when the file does not say (CXR, fundus, "
                   "pathology, CT, OCT, ultrasound, dermatology); recorded in the output")


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


def slice_arg(text: str | None) -> int | str | None:
    if text is None:
        return None
    if text == "middle":
        return "middle"
    try:
        return int(text)
    except ValueError:
        raise MedfmError(f"--slice {text!r}: expected an integer or 'middle'") from None


def run(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..runtime.cache import get_model
    from ..runtime.registry import get_spec
    from ..tasks.embed import embed_files_task, embed_text_task, output_paths

    spec = get_spec(args.model)
    if args.text and args.inputs:
        raise MedfmError("give images or --text, not both (one .npz holds one kind)")
    if not args.text and not args.inputs:
        raise MedfmError("nothing to embed: give INPUT files or --text")
    if args.text:
        if "text-embed" not in spec.tasks and "zero-shot" not in spec.tasks:
            raise MedfmError(f"model {spec.id!r} has no text tower (tasks: "
                             f"{', '.join(spec.tasks)}); text embeddings need a vision-language "
                             "model such as biomedclip")
        model = get_model(spec.id, weights=args.weights, device=args.device,
                          **model_kwargs(args, spec.family, text=None))
        res = drain_with_tqdm(embed_text_task(model, args.text, args.output), desc="embed",
                              disable=True)
        if args.json:
            print(json.dumps({"model": spec.id, "outputs": [res["output"]],
                              "texts": res["texts"]}))
        else:
            print(f"{len(args.text)} text(s) -> {res['output']}")
        return 0
    if "embed" not in spec.tasks:
        raise MedfmError(f"model {spec.id!r} does not compute embeddings (tasks: "
                         f"{', '.join(spec.tasks)})")
    outs = output_paths(args.inputs, args.output)
    model = get_model(spec.id, weights=args.weights, device=args.device,
                      **model_kwargs(args, spec.family, text=False))
    records = drain_with_tqdm(
        embed_files_task(model, args.inputs, outs, modality=args.modality,
                         slice_index=slice_arg(args.slice_index)),
        desc="embed", disable=args.no_progress or len(args.inputs) == 1)
    if args.json:
        print(json.dumps({"model": spec.id, "outputs": [r["output"] for r in records],
                          "records": records}))
    else:
        for r in records:
            print(f"{r['input']} -> {r['output']}  (modality {r['modality']})", file=sys.stdout)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("embed", help="image or text embeddings (.npz) with a registered "
                              "encoder", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image file or DICOM series folder")
    p.add_argument("--output", "-o", required=True,
                   help="OUT.npz for one input, or a folder (one <name>.npz per input)")
    add_model_options(p)
    add_modality_option(p)
    p.add_argument("--text", action="append", default=None, metavar="TEXT",
                   help="embed this sentence instead of images (repeatable; vision-language "
                   "models: biomedclip)")
    p.add_argument("--slice", dest="slice_index", default=None,
                   help="2D encoders on a CT volume: slice index along the first axis or 'middle'")
    p.add_argument("--json", action="store_true", help="print written paths as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
