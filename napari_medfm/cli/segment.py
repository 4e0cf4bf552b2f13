"""``medfm segment``: label a CT on its own geometry (twin of the Segmentation dock widget).

    medfm segment --model hu-basic ct.nii.gz --output seg.nii.gz
    medfm segment --model bundle:/models/spleen_ct_segmentation ct/ --output seg.dcm
    medfm segment --model totalsegmentator ct.nii.gz --output seg.nii.gz --device cuda

Writes OUT (NIfTI/NRRD/MHA on INPUT's exact grid, or DICOM-SEG for ``.dcm`` when INPUT is
DICOM) and always ``OUT.json``: labels {value: name}, per-label volume (mL) and mean/std HU,
model id, weights sha256, settings, input geometry and elapsed time. ``--stats-csv`` adds the
statistics table as CSV.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import MedfmError, MixedSeriesError


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


def _pick_volume(images: list[Any], path: Path, series: int | None) -> Any:
    vols = [im for im in images if im.kind == "volume" and not im.is_label]
    if not vols:
        kinds = ", ".join(sorted({im.kind for im in images})) or "nothing"
        raise MedfmError(f"{path.name}: no 3D volume to segment (found {kinds})")
    if series is not None:
        if not 0 <= series < len(vols):
            raise MedfmError(f"--series {series}: {path.name} holds {len(vols)} volume(s)")
        return vols[series]
    if len(vols) > 1:
        listing = "; ".join(f"{i}: {im.name} {im.shape}" for i, im in enumerate(vols))
        raise MixedSeriesError(f"{path.name} holds {len(vols)} volumes ({listing}); choose one "
                               "with --series N")
    return vols[0]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import read
    from ..progress import drain_with_tqdm
    from ..tasks.segment import (
        SegmentSettings,
        label_statistics,
        load_segmenter,
        save_labels,
        segment,
        sidecar_dict,
        sidecar_path,
        write_sidecar,
        write_statistics_csv,
    )

    t0 = time.perf_counter()
    src = Path(args.input)
    out = Path(args.output)
    if out.suffix.lower() == ".json":
        raise MedfmError(f"{out.name}: give the label file (e.g. seg.nii.gz); the JSON report is "
                         "written beside it")
    image = _pick_volume(read(src), src, args.series)
    if out.suffix.lower() == ".dcm" and not image.metadata.get("source_files"):
        raise MedfmError(f"{out.name}: DICOM-SEG output needs a DICOM input; {src.name} is not "
                         "DICOM. Use --output OUT.nii.gz (or .nrrd/.mha) instead.")
    settings = SegmentSettings(roi_size=_roi(args.roi_size), overlap=args.overlap,
                               sw_batch_size=args.sw_batch_size, device=args.device,
                               precision=args.precision)
    model = load_segmenter(args.model, weights=args.weights, device=args.device)
    result = drain_with_tqdm(segment(image, model, settings), desc=f"segment {args.model}",
                             disable=args.quiet)
    result.elapsed_s = time.perf_counter() - t0
    written = save_labels(result, out)
    stats = label_statistics(result.labels, np.asarray(image.data), result.geometry,
                             result.present_names())
    doc = sidecar_dict(result, stats, input_path=src, output_path=written,
                       image_shape=image.shape)
    side = write_sidecar(sidecar_path(written), doc)
    if args.stats_csv:
        write_statistics_csv(stats, args.stats_csv)
    if not args.quiet:
        print(f"{written}  ({result.model_id}, {result.elapsed_s:.1f} s; report {side.name})")
        print(f"  {'value':>5}  {'name':<28} {'volume mL':>11} {'mean HU':>9}")
        for r in stats:
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
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["segment", *sys.argv[1:]]))
