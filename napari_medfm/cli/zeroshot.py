"""``medfm zero-shot``: Merlin findings probabilities for a CT (twin of the Findings dock).

    medfm zero-shot --model merlin --weights CKPT [--tokenizer DIR] [--prompts FILE] INPUT
                    [--phenotypes K] [--five-year CKPT] [--json]

Each finding's probability compares the CT with several positive and negative report-style
phrasings (see ``prompts.yaml``; pass your own with --prompts). ``--phenotypes K`` adds the K
most probable of Merlin's 1692 phecode phenotypes.
"""

from __future__ import annotations

import argparse
from typing import Any

from .embed import add_model_options, model_kwargs


def run(args: argparse.Namespace) -> int:
    from ..io import read
    from ..models.merlin.phenotypes import load_prompts
    from ..progress import drain_with_tqdm
    from ..runtime.registry import get_spec, load_model
    from ..tasks.findings import findings_task, pick_volume

    spec = get_spec(args.model)
    if "zero-shot" not in spec.tasks:
        from ..errors import MedfmError

        raise MedfmError(f"model {spec.id!r} does not do zero-shot findings")
    prompts = load_prompts(args.prompts)  # fail on a bad prompt file before loading weights
    if args.finding:
        prompts = prompts.subset(args.finding)
    image = pick_volume(read(args.input), args.input)
    model = load_model(spec.id, weights=args.weights, device=args.device,
                       **model_kwargs(args, spec.family, text=True))
    result = drain_with_tqdm(
        findings_task(model, image, prompts, top_k=args.phenotypes or 0, zero_shot=True),
        desc="zero-shot", disable=args.no_progress)
    if not args.phenotypes:
        result.phenotypes = []
    if args.json:
        print(result.to_json())
        return 0
    print(f"{result.image_name}  ({spec.id}, {result.provenance['weights']}, "
          f"{result.provenance['device']})")
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
    p = subparsers.add_parser("zero-shot", help="Merlin zero-shot findings (+ phenotypes) for a CT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="CT file (NIfTI/NRRD/MHA) or DICOM folder")
    add_model_options(p)
    p.add_argument("--tokenizer", default=None,
                   help="folder with the Clinical-Longformer tokenizer (vocab.json, merges.txt); "
                   "default: next to the weights")
    p.add_argument("--prompts", default=None, help="YAML/JSON prompt file (default: packaged)")
    p.add_argument("--finding", action="append", default=None,
                   help="only this finding (repeatable)")
    p.add_argument("--phenotypes", type=int, default=0, metavar="K",
                   help="also print the K most probable phenotypes")
    p.add_argument("--five-year", default=None, metavar="CKPT",
                   help="the 5-year disease checkpoint (adds 5-year risks)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
