"""``medfm index``: build, query and maintain a similar-case index (twin of the Similar cases dock).

    medfm index build --model MODEL --weights PATH --index DIR INPUTS... [--shard I/N]
    medfm index add --index DIR INPUTS...            # same model/weights as the index
    medfm index query --index DIR INPUT [-k 10] [--json] [--crop Y0,X0,Y1,X1] [--slice N|middle]
                      [--modality M]
    medfm index query --index DIR --text "right pleural effusion" [-k 10] [--json]
    medfm index info --index DIR [--json]
    medfm index delete --index DIR CASE_ID... [--rebuild]
    medfm index rebuild --index DIR
    medfm index merge --index DIR [SHARD_DIR...]

INPUTS are image files, folders (recursive) or CSV files with a ``path`` column and optional
``labels``, ``report``, ``modality``, ``case_id``. An interrupted build resumes when run again.
Text queries embed the sentence with the index's own vision-language model (BiomedCLIP for a
``--model biomedclip`` index, Merlin's text tower for a Merlin CT index); indexes of image-only
models (mermed, dinov2, rad-dino) say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import MedfmError


def _slice_arg(text: str | None) -> int | str | None:
    from .embed import slice_arg

    return slice_arg(text)


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) or CSV files (path, labels, report)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="inputs per committed chunk (the unit of resume)")
    p.add_argument("--slice", dest="slice_index", default=None,
                   help="for 3D CT volumes: slice index along the first axis, or 'middle'")
    p.add_argument("--modality", default=None,
                   help="modality of every input (CXR, fundus, pathology, CT, OCT, ultrasound, "
                   "dermatology) when files do not say")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("index", help="similar-case retrieval index (build/query/...)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")

    b = sub.add_parser("build", help="embed images into an index (resumable)")
    b.add_argument("--model", required=True,
                   help="model id (mermed, rad-dino, dinov2-base, biomedclip for image + text "
                   "queries, merlin for CT)")
    b.add_argument("--weights", default=None, help="weights file/folder (default: $MEDFM_HOME)")
    b.add_argument("--index", required=True, help="index folder")
    b.add_argument("--shard", default=None,
                   help="I/N: embed every N-th input starting at I into DIR/shards/ "
                   "(default from torchrun RANK/WORLD_SIZE); combine with `medfm index merge`")
    _add_build_options(b)
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("add", help="add images to an existing index (its model and weights)")
    a.add_argument("--index", required=True)
    a.add_argument("--weights", default=None, help="weights (default: as recorded in the index)")
    _add_build_options(a)
    a.set_defaults(func=cmd_add)

    q = sub.add_parser("query", help="the k most similar cases to an image")
    q.add_argument("--index", required=True)
    q.add_argument("input", metavar="INPUT", nargs="?", default=None,
                   help="query image file or DICOM folder (or --text)")
    q.add_argument("--text", default=None,
                   help="query with a sentence (indexes of vision-language models)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--weights", default=None, help="weights (default: as recorded in the index)")
    q.add_argument("--slice", dest="slice_index", default=None, help="CT volume slice or 'middle'")
    q.add_argument("--crop", default=None,
                   help="region in pixel indices Y0,X0,Y1,X1 (2D) or Z0,Y0,X0,Z1,Y1,X1")
    q.add_argument("--image-index", type=int, default=0,
                   help="which image when INPUT holds several (default 0)")
    q.add_argument("--modality", default=None,
                   help="modality of the query image when the file does not say (CXR, fundus, "
                   "pathology, CT, ...); recorded in the output")
    q.add_argument("--filter-modality", default=None, help="only return cases of this modality")
    q.add_argument("--label", default=None, help="only cases whose labels/report contain this")
    q.add_argument("--device", default=None)
    q.set_defaults(func=cmd_query)

    i = sub.add_parser("info", help="what an index holds")
    i.add_argument("--index", required=True)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("delete", help="remove cases (tombstones; --rebuild compacts)")
    d.add_argument("--index", required=True)
    d.add_argument("case_ids", nargs="+", metavar="CASE_ID")
    d.add_argument("--rebuild", action="store_true", help="rebuild the faiss file afterwards")
    d.set_defaults(func=cmd_delete)

    r = sub.add_parser("rebuild", help="rebuild the faiss file from the stored vectors")
    r.add_argument("--index", required=True)
    r.set_defaults(func=cmd_rebuild)

    m = sub.add_parser("merge", help="merge shard indexes into one")
    m.add_argument("--index", required=True)
    m.add_argument("shards", nargs="*", metavar="SHARD_DIR",
                   help="shard folders (default: INDEX/shards/*)")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_merge)

    def _no_action(args: argparse.Namespace) -> int:
        p.print_help()
        return 1

    p.set_defaults(func=_no_action)


def _run(gen: Any, args: argparse.Namespace, desc: str) -> Any:
    from ..progress import drain, drain_with_tqdm

    if getattr(args, "no_progress", False):
        return drain(gen)
    return drain_with_tqdm(gen, desc=desc)


def _report_build(res: Any) -> None:
    man = res.manifest or {}
    print(f"index {res.index_dir}: +{res.added} cases, {res.skipped} already indexed, "
          f"{len(res.failed)} failed; {man.get('count', '?')} cases total "
          f"({man.get('index_type', '?')} faiss index)")
    for key, err in res.failed[:20]:
        print(f"  skipped {key}: {err}", file=sys.stderr)


def _do_build(args: argparse.Namespace, model_id: str, weights: Any, shard: Any) -> int:
    from ..runtime.cache import get_model
    from ..tasks.retrieval.build import build_index, collect_inputs

    items = collect_inputs(args.inputs)
    if args.modality:
        for it in items:
            it.modality = it.modality or args.modality
    if not items:
        raise MedfmError("no readable images found in the inputs")
    model = get_model(model_id, weights=weights, device=args.device)
    gen = build_index(args.index, model, items, chunk_size=args.chunk_size,
                      batch_size=args.batch_size, slice_index=_slice_arg(args.slice_index),
                      shard=shard)
    res = _run(gen, args, f"index {model_id}")
    _report_build(res)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.build import parse_shard

    return _do_build(args, args.model, args.weights, parse_shard(args.shard))


def cmd_add(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.index import CaseIndex

    with CaseIndex.open(args.index) as idx:
        model_id, weights = idx.model_id, args.weights or idx.weights_path
    return _do_build(args, model_id, weights, None)


def cmd_query(args: argparse.Namespace) -> int:
    from .. import io as mio
    from ..progress import drain
    from ..tasks.retrieval.query import crop_image, query_task

    if (args.input is None) == (args.text is None):
        raise MedfmError("give a query image (INPUT) or --text, not both")
    image = None
    if args.input is not None:
        images = [im for im in mio.read(args.input) if not im.is_label]
        if not images:
            raise MedfmError(f"{args.input}: no image inside")
        if not 0 <= args.image_index < len(images):
            raise MedfmError(f"--image-index {args.image_index}: {args.input} holds "
                             f"{len(images)}")
        image = images[args.image_index]
        if args.crop:
            try:
                box = [float(v) for v in args.crop.split(",")]
            except ValueError:
                raise MedfmError(f"--crop {args.crop!r}: expected comma-separated numbers"
                                 ) from None
            image = crop_image(image, box)
    hits = drain(query_task(args.index, image, args.k, text=args.text, weights=args.weights,
                            device=args.device, slice_index=_slice_arg(args.slice_index),
                            modality=args.modality, filter_modality=args.filter_modality,
                            label=args.label))
    used = None if image is None else (args.modality or image.modality)
    if args.json:
        doc: dict[str, Any] = {"index": str(args.index), "hits": [h.to_json() for h in hits]}
        if image is not None:
            doc.update(query=str(args.input), modality=used)
        else:
            doc.update(text=args.text)
        print(json.dumps(doc, indent=2))
        return 0
    if used is not None:
        print(f"query {args.input} (modality {used})", file=sys.stderr)
    if not hits:
        print("no matching cases")
    for h in hits:
        lab = f"  [{h.labels}]" if h.labels else ""
        print(f"{h.rank:3d}  {h.score:7.4f}  {h.case_id}  {h.source_path}{lab}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.index import CaseIndex

    with CaseIndex.open(args.index) as idx:
        info = idx.info()
        fails = idx.failures()
    if args.json:
        info["failed_items"] = [{"item": k, "error": e} for k, e in fails]
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        print(f"{k:18s} {v}")
    for key, err in fails[:20]:
        print(f"  failed: {key}: {err}")
    return 0 if info["state"] == "ok" else 1


def cmd_delete(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.index import CaseIndex

    with CaseIndex.open(args.index) as idx:
        missing = idx.delete(args.case_ids)
        if args.rebuild:
            idx.rebuild()
        n = idx.count()
    for cid in missing:
        print(f"not in the index: {cid}", file=sys.stderr)
    print(f"deleted {len(args.case_ids) - len(missing)} case(s); {n} remain")
    return 1 if missing else 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.index import CaseIndex

    with CaseIndex.open(args.index) as idx:
        man = idx.rebuild()
    print(f"rebuilt {args.index}: {man['count']} cases ({man['index_type']})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..tasks.retrieval.build import merge_shards

    man = _run(merge_shards(args.index, args.shards or None), args, "merge")
    print(f"merged into {args.index}: {man['count']} cases ({man['index_type']})")
    return 0
