"""``medfm segment``: label a CT on its own geometry (twin of the Segmentation dock widget).

    medfm segment --model hu-basic ct.nii.gz --output seg.nii.gz
    medfm segment --model bundle:/models/spleen_ct_segmentation ct/ --output seg.dcm
    medfm segment --model totalsegmentator ct.nii.gz --output seg.nii.gz --device cuda

Writes OUT (NIfTI/NRRD/MHA on INPUT's exact grid, or DICOM-SEG for ``.dcm`` when INPUT is
DICOM) and always ``OUT.json``: labels {value: name}, per-label volume (mL) and mean/std HU,
model id, weights sha256, settings, input geometry and elapsed time. ``--stats-csv`` adds the
statistics table as CSV. The flow itself is :func:`napari_medfm.tasks.segment.segment_file`.

A MONAI bundle's config runs Python code: ``bundle:PATH`` is refused until the folder is trusted
(``--trust-bundle`` once, remembered until its configs change).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MedfmError


def _roi(values: list[int] | None) -> tuple[int, ...] | None:
    if not values:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise MedfmError(f"--roi-size takes 1 or 3 integers, got {len(values)}")
    if any(v < 1 for v in values):
        raise MedfmError(f"--roi-size must be positive, got {values}")
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..tasks.segment import SegmentSettings, bundle_folder, segment_file

    folder = bundle_folder(args.model)
    if folder is not None:
        from ..runtime.trust import is_trusted, require_trusted, trust_bundle

        if args.trust_bundle and folder.is_dir() and not is_trusted(folder):
            trust_bundle(folder)
            if not args.quiet:
                print(f"trusted MONAI bundle {folder} (remembered until its configs change)",
                      file=sys.stderr)
        elif folder.is_dir():
            require_trusted(folder)  # refuse before reading the input
    settings = SegmentSettings(roi_size=_roi(args.roi_size), overlap=args.overlap,
                               sw_batch_size=args.sw_batch_size, device=args.device,
                               precision=args.precision)
    done = drain_with_tqdm(
        segment_file(args.input, args.output, args.model, settings, weights=args.weights,
                     series=args.series, stats_csv=args.stats_csv),
        desc=f"segment {args.model}", disable=args.quiet)
    result = done.result
    if not args.quiet:
        print(f"{done.output}  ({result.model_id}, {result.elapsed_s:.1f} s; report "
              f"{done.report.name})")
        print(f"  {'value':>5}  {'name':<28} {'volume mL':>11} {'mean HU':>9}")
        for r in result.stats:
            mean = "" if r.get("mean") is None else f"{r['mean']:.1f}"
            print(f"  {r['value']:>5}  {r['name'][:28]:<28} {r['volume_ml']:>11.2f} {mean:>9}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "segment", help="segment a CT (hu-basic, totalsegmentator, bundle:PATH) on its geometry",
        description="Segment a 3D image and write labels on its exact geometry plus a JSON "
        "report (OUT.json). MODEL: hu-basic (weights-free), totalsegmentator (optional extra) or "
        "bundle:PATH (a local MONAI bundle folder).")
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("--model", "-m", required=True,
                   help="hu-basic | totalsegmentator | bundle:PATH_TO_BUNDLE_FOLDER")
    p.add_argument("--output", "-o", required=True,
                   help="OUT.nii.gz / .nii / .nrrd / .mha, or OUT.dcm (DICOM-SEG; DICOM input)")
    p.add_argument("--weights", help="explicit weights file or folder (bundle: model file)")
    p.add_argument("--roi-size", type=int, nargs="+", metavar="N",
                   help="sliding-window size (1 or 3 integers; default: the model's)")
    p.add_argument("--overlap", type=float, default=None,
                   help="window overlap in [0, 1) (default: the model's, usually 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per forward pass (default: the model's)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "auto"),
                   help="compute precision under autocast (default fp32)")
    p.add_argument("--series", type=int, default=None,
                   help="which volume when INPUT holds several (index, see the error)")
    p.add_argument("--stats-csv", help="also write per-label statistics as CSV")
    p.add_argument("--trust-bundle", action="store_true",
                   help="trust the bundle:PATH folder (its config runs Python code); remembered "
                        "until its configs change. Without it an untrusted bundle is refused")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["segment", *sys.argv[1:]]))
