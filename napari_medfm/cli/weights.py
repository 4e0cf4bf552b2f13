"""``medfm weights``: list, fetch (explicit download), import, verify, locate and convert weights.

    medfm weights list [--json]
    medfm weights fetch ID [--file F ...]        # the only command that uses the network
    medfm weights import ID PATH [--link] [--file F]
    medfm weights verify [ID] [--json] [--rehash]
    medfm weights path ID [--file F]
    medfm weights convert SRC DST [--prefix P] [--allow CLASS ...] [--dtype bf16]
    medfm weights convert MODEL [--weights DIR] [--out DIR] [--dtype bf16] [--shard-size 5GB]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import WeightsError


def _human(n: int | None) -> str:
    from ..runtime.weights import human_size

    return human_size(n, unknown="-")


def _manager() -> Any:
    from ..runtime.weights import WeightsManager

    return WeightsManager()


def _file_state(f: dict[str, Any]) -> str:
    if not f["present"]:
        if f.get("partial_download"):
            return f"interrupted download ({_human(f['partial_download'])})"
        return "missing"
    if f["expected_size"] is not None and f["size"] != f["expected_size"]:
        return "partial"
    if not f["pinned"]:
        return "present (unpinned)"
    return {True: "verified", False: "HASH MISMATCH", None: "present (not verified yet)"}[
        f["verified"]]


def cmd_list(args: argparse.Namespace) -> int:
    rows = _manager().list()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models registered")
        return 0
    for r in rows:
        if not r["files"]:
            state = "no weights needed" if not r["needs_weights"] else "files not declared"
        else:
            state = "complete" if r["complete"] else "not installed"
        src = f"hf.co/{r['repo_id']}" if r["repo_id"] else "local only"
        print(f"{r['model']:<28} {state:<14} {_human(r['total_size']):>9}  {src}")
        for f in r["files"]:
            opt = "" if f["required"] else " (optional)"
            print(f"    {f['file']}{opt}: {_file_state(f)}"
                  + (f", {_human(f['size'])}" if f["size"] is not None else ""))
    print(f"weights dir: {_manager().root}  (set $MEDFM_HOME to move it)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..progress import drain_with_tqdm
    from ..runtime.registry import get_spec

    spec = get_spec(args.model)
    mgr = _manager()
    files = args.file or None
    if spec.extras.get("archive") and not files:
        return _fetch_archive(spec, mgr, args)
    chosen = mgr.plan_fetch(spec, files)
    sizes = [wf.size for wf in chosen]
    total = _human(sum(s for s in sizes if s)) if all(sizes) else "unknown size"
    licence = f" (licence: {spec.licence})" if spec.licence else ""
    print(f"fetching {len(chosen)} file(s), {total}, for {spec.id} from "
          f"hf.co/{spec.repo_id}{licence} into {mgr.model_dir(spec)}", file=sys.stderr)
    paths = drain_with_tqdm(mgr.fetch_iter(spec, files, retries=args.retries),
                            desc=spec.id, disable=args.quiet)
    for p in paths:
        print(p)
    return 0


def _fetch_archive(spec: Any, mgr: Any, args: argparse.Namespace) -> int:
    """A release published as a split zip: fetch the parts (resumable), then unpack them."""
    from ..progress import drain_with_tqdm
    from ..runtime.weights import fetch_archive_iter

    arch = spec.extras["archive"]
    print(f"fetching {spec.id} from hf.co/{spec.repo_id} as published: a split zip "
          f"({', '.join(arch['parts'])}, about {_human(arch.get('download_size_estimate'))}) "
          f"unpacked into {mgr.model_dir(spec)}", file=sys.stderr)
    paths = drain_with_tqdm(fetch_archive_iter(spec, mgr, keep_parts=not args.delete_parts,
                                               retries=args.retries),
                            desc=spec.id, disable=args.quiet)
    for p in paths:
        print(p)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    paths = _manager().import_(args.model, args.path, copy="link" if args.link else True,
                               filename=args.file)
    for p in paths:
        print(p)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..runtime.weights import MISMATCH, MISSING, PARTIAL

    rows = _manager().verify(args.model, rehash=args.rehash)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            line = f"{r['model']:<28} {r['file']}: {r['status']}"
            if r["status"] in (PARTIAL, MISMATCH) or "interrupted" in r["message"]:
                line += f"  - {r['message']}"
            print(line)
        if not rows:
            print("no declared weight files to verify")
        missing = sorted({r["model"] for r in rows if r["status"] == MISSING and r["required"]})
        if missing:
            print(f"not installed: {', '.join(missing)} (`medfm weights fetch ID` or "
                  "`medfm weights import ID PATH`)")
    bad = [r for r in rows if r["status"] in (PARTIAL, MISMATCH)]
    # for one named model, a missing required file is also a failure
    if args.model:
        bad += [r for r in rows if r["status"] == MISSING and r["required"]]
    return 1 if bad else 0


def cmd_path(args: argparse.Namespace) -> int:
    mgr = _manager()
    p = mgr.expected_path(args.model, args.file)
    print(p)
    if not p.exists():
        print(f"(not there yet: `medfm weights fetch {args.model}` or "
              f"`medfm weights import {args.model} PATH`)", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..runtime.safe_load import convert_to_safetensors

    if args.dst is None:  # `convert MODEL`: the model's own one-time converter
        import importlib

        from ..runtime.registry import get_spec

        target = get_spec(args.src).extras.get("converter")
        if not target:
            raise WeightsError(f"convert: {args.src} has no converter; give SRC and DST files")
        modname, _, fn = target.partition(":")
        return int(getattr(importlib.import_module(modname), fn)(args))
    dtype = None
    if args.dtype:
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.src == args.dst:
        raise WeightsError("convert: SRC and DST must differ")
    out = convert_to_safetensors(args.src, args.dst, prefix=args.prefix,
                                 allow=tuple(args.allow) if args.allow is not None else None,
                                 dtype=dtype)
    print(out)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("weights", help="list, fetch, import, verify and locate model weights",
                       description="Manage model weights in $MEDFM_HOME/weights/<model>/. Only "
                                   "`fetch` downloads (from Hugging Face, resumable).")
    ws = p.add_subparsers(dest="weights_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])

    q = ws.add_parser("list", help="registered models and the state of their weight files")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = ws.add_parser("fetch", help="download a model's weights (explicit, resumable, verified)")
    q.add_argument("model", help="model id (see `medfm weights list`)")
    q.add_argument("--file", action="append", metavar="F",
                   help="only this file of the repository (repeatable)")
    q.add_argument("--retries", type=int, default=3, help="automatic resumes after a cut")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.add_argument("--delete-parts", action="store_true",
                   help="split-zip releases (radfm): delete the parts after unpacking")
    q.set_defaults(func=cmd_fetch)

    q = ws.add_parser("import", help="bring local weights (file or hub-layout folder) in")
    q.add_argument("model")
    q.add_argument("path", help="a weight file, or a folder laid out like the hub repository")
    q.add_argument("--link", action="store_true", help="hard-link (or symlink) instead of copying")
    q.add_argument("--file", metavar="F", help="repository file name to import PATH as")
    q.set_defaults(func=cmd_import)

    q = ws.add_parser("verify", help="check sizes and sha256 of installed weights")
    q.add_argument("model", nargs="?", help="one model (default: all)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--rehash", action="store_true",
                   help="hash every file again instead of trusting the (size, mtime) cache")
    q.set_defaults(func=cmd_verify)

    q = ws.add_parser("path", help="print where a model's weights are expected")
    q.add_argument("model")
    q.add_argument("--file", metavar="F")
    q.set_defaults(func=cmd_path)

    q = ws.add_parser("convert", help="convert a checkpoint to safetensors (one time, atomic)")
    q.add_argument("src", help="a checkpoint file, or a model id with a converter (radfm)")
    q.add_argument("dst", nargs="?", help="output .safetensors (not with a model id)")
    q.add_argument("--weights", metavar="DIR", help="model id form: the model folder "
                   "(default: the weights folder)")
    q.add_argument("--out", metavar="DIR", help="model id form: where the shards go "
                   "(default: the model folder)")
    q.add_argument("--shard-size", metavar="SIZE", help="model id form: shard size, e.g. 5GB")
    q.add_argument("--prefix", help="keep only this sub-tree, e.g. teacher.module.backbone.")
    q.add_argument("--allow", action="append", metavar="CLASS",
                   help="training checkpoint: plain-data class to allow when unpickling, "
                        "e.g. argparse.Namespace (repeatable)")
    q.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating tensors")
    q.set_defaults(func=cmd_convert)
