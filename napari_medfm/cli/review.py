"""``medfm review``: the review store from the command line (the Review dock does the reviewing).

    medfm review start COHORT --store review.db      # COHORT: a CSV or a folder of images
    medfm review status STORE
    medfm review export STORE --out review.csv
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run_start(args: argparse.Namespace) -> int:
    from ..tasks.review import ReviewStore

    with ReviewStore(args.store, args.cohort) as store:
        if args.reviewer:
            store.set_reviewer(args.reviewer)
        s = store.summary()
    print(f"{args.store}: {s['cases']} case(s); open it in the Review dock")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from ..tasks.review import ReviewStore

    with ReviewStore(args.store) as store:
        s = store.summary()
        pos = store.position
        cur = store.cases[pos].case_id if store.cases else "-"
        print(f"{s['cases']} case(s), {s['reviewed']} reviewed, {s['verdicts']} verdict(s), "
              f"{s['edits']} edit(s); at case {pos + 1} ({cur}); reviewer "
              f"{store.reviewer or '-'}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..tasks.review import ReviewStore

    with ReviewStore(args.store) as store:
        out = store.export_csv(args.out)
        n = len(store.export_rows())
    print(f"wrote {out} ({n} row(s))")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("review", help="review store: start, status, export CSV",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs = p.add_subparsers(dest="review_command", metavar="WHAT", required=True)
    s = rs.add_parser("start", help="create a review store for a cohort")
    s.add_argument("cohort", help="cohort CSV (image[, id, labels, findings, report]) or folder")
    s.add_argument("--store", required=True, help="review store file to create (SQLite)")
    s.add_argument("--reviewer", help="reviewer name")
    s.set_defaults(func=run_start)
    st = rs.add_parser("status", help="progress of a review")
    st.add_argument("store")
    st.set_defaults(func=run_status)
    e = rs.add_parser("export", help="verdicts, notes and edits as CSV")
    e.add_argument("store")
    e.add_argument("--out", required=True, help="CSV to write")
    e.set_defaults(func=run_export)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["review", *sys.argv[1:]]))
