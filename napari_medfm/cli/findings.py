"""``medfm findings``: finding probabilities of a probe head for 2D images (twin of the Findings dock).

    medfm findings --probe PROBE_DIR INPUT [INPUT...] [--json] [--finding NAME ...]
                   [--modality CXR] [--encoder-weights W] [--device cpu]

PROBE_DIR is a folder written by ``medfm train probe`` (probe.safetensors + probe.json). The
probe's encoder is loaded with the weights it was trained on (recorded path and sha256; pass
--encoder-weights if the file moved); other weights are refused. Whole-slide images use their
thumbnail level; 3D volumes are refused (2D encoders take one slice at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def run(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..runtime.cache import get_model
    from ..tasks.probe import findings_files_task

    opts: dict[str, Any] = {}
    if args.encoder_weights:
        opts["encoder_weights"] = args.encoder_weights
    if args.precision and args.precision != "auto":
        opts["precision"] = args.precision
    model = get_model("probe", weights=args.probe, device=args.device, **opts)
    results = drain_with_tqdm(
        findings_files_task(model, args.inputs, modality=args.modality,
                            prompts=args.finding or None),
        desc="findings", disable=args.no_progress or len(args.inputs) == 1)
    if args.json:
        doc = {"probe": str(args.probe), "encoder": model.describe()["encoder"],
               "results": results}
        print(json.dumps(doc if len(results) != 1 else {**doc, **results[0]}, indent=1))
        return 0
    for res in results:
        print(res["input"])
        width = max((len(r["finding"]) for r in res["findings"]), default=7)
        print(f"  {'finding':<{width}}  probability  held-out AUROC")
        for r in res["findings"]:
            au = "n/a" if r.get("auroc") is None else f"{r['auroc']:.3f}"
            print(f"  {r['finding']:<{width}}  {r['probability']:11.3f}  {au}", file=sys.stdout)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("findings", help="finding probabilities of a probe head (2D images)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="2D image file or DICOM file")
    p.add_argument("--probe", required=True, help="probe folder from `medfm train probe`")
    p.add_argument("--finding", action="append", default=None,
                   help="only this label (repeatable)")
    p.add_argument("--modality", default=None,
                   help="modality of the inputs (CXR, fundus, pathology, ...) when the file "
                        "does not say (plain PNG/JPEG); default: the probe's training modality")
    p.add_argument("--encoder-weights", default=None,
                   help="encoder weights, if moved since training (sha256 must match)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
