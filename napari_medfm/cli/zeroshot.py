"""``medfm zero-shot``: finding probabilities for an image (twin of the Findings dock).

    medfm zero-shot --model merlin --weights CKPT [--tokenizer DIR] [--prompts FILE] INPUT
                    [--phenotypes K] [--five-year CKPT] [--json]
    medfm zero-shot --model biomedclip [--weights DIR] [--modality M] [--prompts FILE] INPUT
                    [--json]

Each finding's probability compares the image with several positive and negative phrasings
of it (Merlin: ``prompts.yaml``; BiomedCLIP: the shipped set of the modality, CXR (the 14
CheXpert labels), pathology (9 colorectal tissue classes) or fundus; pass your own with
--prompts). ``--phenotypes K`` adds the K most probable of Merlin's 1692 phecode phenotypes.
The model, its weights' sha256, the prompt set and the modality are recorded in the output.
"""

from __future__ import annotations

import argparse
from typing import Any

from .embed import add_modality_option, add_model_options, model_kwargs, slice_arg


def run(args: argparse.Namespace) -> int:
    from ..errors import MedfmError
    from ..io import read
    from ..progress import drain_with_tqdm
    from ..runtime.cache import get_model
    from ..runtime.registry import get_spec
    from ..tasks.embed import pick_image
    from ..tasks.zeroshot import zero_shot

    spec = get_spec(args.model)
    if not {"zero-shot", "findings", "probe"} & set(spec.tasks):
        raise MedfmError(f"model {spec.id!r} does not give finding probabilities (tasks: "
                         f"{', '.join(spec.tasks)})")
    prompts: Any = args.prompts
    if spec.family == "merlin":  # fail on a bad prompt file before loading weights
        from ..models.merlin.phenotypes import load_prompts

        prompts = load_prompts(args.prompts)
        if args.finding:
            prompts = prompts.subset(args.finding)
    image = pick_image(read(args.input), args.input)
    model = get_model(spec.id, weights=args.weights, device=args.device,
                      **model_kwargs(args, spec.family, text=True))
    if spec.family != "merlin" and hasattr(model, "prompt_set"):
        prompts = model.prompt_set(args.prompts, args.modality or image.modality)
        if args.finding:
            sub = prompts.subset(args.finding)
            sub.meta = prompts.meta
            prompts = sub
    result = drain_with_tqdm(
        zero_shot(model, image, prompts, top_k=args.phenotypes or 0, modality=args.modality,
                  slice_index=slice_arg(args.slice_index)),
        desc="zero-shot", disable=args.no_progress)
    if not args.phenotypes:
        result.phenotypes = []
    if args.finding and spec.family != "merlin" and not hasattr(model, "prompt_set"):
        result.findings = [f for f in result.findings if f["finding"] in set(args.finding)]
    if args.json:
        print(result.to_json())
        return 0
    p = result.provenance
    print(f"{result.image_name}  ({spec.id}, {p.get('weights')}, {p.get('device')}, "
          f"modality {p.get('modality')}, prompts {p.get('prompts')})")
    width = max((len(f["finding"]) for f in result.findings), default=10)
    for f in sorted(result.findings, key=lambda r: -r["probability"]):
        bar = "#" * round(20 * f["probability"])
        print(f"  {f['finding']:<{width}}  {f['probability']:6.3f}  {bar}")
    if result.phenotypes:
        print(f"top {len(result.phenotypes)} phenotypes:")
        for ph in result.phenotypes:
            print(f"  {ph['phecode']:>7}  {ph['probability']:6.3f}  {ph['name']}")
    if result.five_year:
        print("5-year risk (output order undocumented by the release):")
        for r in result.five_year:
            print(f"  output {r['output']}  {r['probability']:6.3f}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("zero-shot", help="zero-shot finding probabilities (Merlin for "
                              "CT, BiomedCLIP for 2D)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="image file or DICOM folder")
    add_model_options(p)
    add_modality_option(p)
    p.add_argument("--slice", dest="slice_index", default=None,
                   help="2D models on a CT volume: slice index along the first axis or 'middle'")
    p.add_argument("--tokenizer", default=None,
                   help="Merlin: folder with the Clinical-Longformer tokenizer (vocab.json, "
                   "merges.txt); default: next to the weights")
    p.add_argument("--prompts", default=None,
                   help="YAML/JSON prompt file (default: the model's shipped set)")
    p.add_argument("--finding", action="append", default=None,
                   help="only this finding (repeatable)")
    p.add_argument("--phenotypes", type=int, default=0, metavar="K",
                   help="Merlin: also print the K most probable phenotypes")
    p.add_argument("--five-year", default=None, metavar="CKPT",
                   help="Merlin: the 5-year disease checkpoint (adds 5-year risks)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
