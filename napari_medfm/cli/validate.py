"""``medfm validate``: agreement of model outputs with a reference (twin of the Review dock).

    medfm validate seg --pred PRED --ref REF [--map FILE] [--json] [--out metrics.csv]
    medfm validate findings --pred PREDS.csv --labels LABELS.csv [--threshold 0.5] [--json]
                            [--out metrics.csv]

``seg``: PRED and REF are label files (NIfTI/NRRD/MHA/DICOM-SEG) or folders of them matched
by file name. Per case and structure: Dice, HD95 and mean surface distance (mm, on the
reference spacing; MONAI's metrics) and the volumes. ``--map`` scores by name:
``pred_name: [ref_name, ...]`` (YAML). ``--json`` prints a list of
``{"case", "label", "dice", "hd95_mm", "asd_mm", "volume_pred_ml", "volume_ref_ml"}``; a label
missing on one side has dice 0 and null distances. Problems (missing cases, resampled grids,
unknown names) go to stderr; the other results are kept. Exit status 0, 1 when some case or
name could not be scored, 2 when nothing could.

``findings``: per finding AUROC with a bootstrap 95% CI, sensitivity/specificity at
``--threshold``; with ``--out`` the ROC and calibration plots are written next to the CSV.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _print_table(rows: list[dict[str, Any]], cols: list[str], widths: list[int]) -> None:
    pairs = list(enumerate(zip(cols, widths, strict=True)))
    print("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in pairs))
    for r in rows:
        cells = []
        for i, (c, w) in enumerate(zip(cols, widths, strict=True)):
            v = r.get(c)
            s = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
            cells.append(f"{s[:w]:<{w}}" if i == 0 else f"{s[:w]:>{w}}")
        print("  ".join(cells))


def run_seg(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..tasks.validate import SEG_COLUMNS, validate_segmentations, write_seg_csv

    res = drain_with_tqdm(validate_segmentations(args.pred, args.ref, mapping=args.map),
                          desc="validate seg", disable=args.quiet or args.json)
    for m in res.messages:
        print(f"medfm validate seg: {m}", file=sys.stderr)
    if args.out:
        write_seg_csv(res.rows, args.out)
    if args.json:
        print(json.dumps([{k: r.get(k) for k in SEG_COLUMNS} for r in res.rows], indent=1))
    elif not args.quiet:
        _print_table(res.rows, ["case", "label", "dice", "hd95_mm", "asd_mm", "volume_pred_ml",
                                "volume_ref_ml"], [16, 24, 7, 8, 8, 14, 13])
        if args.out:
            print(f"wrote {args.out}")
    if not res.rows:
        return 2
    problems = res.failed or any("no label named" in m or "no prediction" in m
                                 or "no reference" in m for m in res.messages)
    return 1 if problems else 0


def run_findings(args: argparse.Namespace) -> int:
    from ..tasks.validate import (
        FINDINGS_COLUMNS,
        findings_metrics,
        save_findings_plots,
        write_findings_csv,
    )

    res = findings_metrics(args.pred, args.labels, threshold=args.threshold,
                           n_boot=args.bootstrap, seed=args.seed)
    for m in res.messages:
        print(f"medfm validate findings: {m}", file=sys.stderr)
    plots = {}
    if args.out:
        write_findings_csv(res, args.out)
        plots = save_findings_plots(res, args.out)
    if args.json:
        print(json.dumps([{k: r.get(k) for k in FINDINGS_COLUMNS} for r in res.rows], indent=1))
    elif not args.quiet:
        _print_table(res.rows, ["finding", "n", "n_pos", "auroc", "auroc_ci_low",
                                "auroc_ci_high", "sensitivity", "specificity"],
                     [24, 5, 5, 6, 12, 13, 11, 11])
        for p in [args.out, *plots.values()] if args.out else []:
            print(f"wrote {p}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="agreement metrics: segmentations or findings vs reference",
                       description="Agreement of model outputs with a reference (MONAI metrics).")
    vs = p.add_subparsers(dest="validate_command", metavar="WHAT", required=True)
    s = vs.add_parser("seg", help="Dice / HD95 / surface distance / volumes per structure",
                      description=__doc__.split("``findings``")[0].split("\n\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--pred", required=True, help="predicted label file or folder")
    s.add_argument("--ref", required=True, help="reference label file or folder")
    s.add_argument("--map", help="YAML 'pred_name: [ref_name, ...]' to match labels by name")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.add_argument("--out", help="write the rows as CSV")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar or table")
    s.set_defaults(func=run_seg)
    f = vs.add_parser("findings", help="AUROC (CI), sensitivity, specificity, calibration",
                      description="Per finding over a cohort: AUROC with a seeded bootstrap CI, "
                      "sensitivity/specificity at a threshold, calibration. PREDS: 'case, "
                      "finding, probability' rows or one column per finding. LABELS: 'case, "
                      "finding, label' (0/1), one 0/1 column per finding, or 'case/file, label' "
                      "class names.")
    f.add_argument("--pred", required=True, help="predictions CSV")
    f.add_argument("--labels", required=True, help="labels CSV")
    f.add_argument("--threshold", type=float, default=0.5, help="decision threshold (0.5)")
    f.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    f.add_argument("--json", action="store_true", help="print the rows as JSON")
    f.add_argument("--out", help="write the rows as CSV (+ .roc.png and .calibration.png)")
    f.add_argument("--quiet", "-q", action="store_true", help="no table")
    f.set_defaults(func=run_findings)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["validate", *sys.argv[1:]]))
