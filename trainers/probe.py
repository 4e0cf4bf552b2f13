"""Probe heads on frozen 2D encoders (the MerMED-FM paper's downstream protocol).

    medfm train probe --model mermed|rad-dino|dinov2-base [--weights W] --data MANIFEST.csv
                      --out PROBE_DIR [--head linear|mlp] [--shots N]

Manifest columns: ``image``, ``modality``, then one column per label (``1``, ``0``, empty =
unknown); an optional ``split`` column (``train`` / ``test``) fixes the held-out rows, otherwise
a seeded split keeps one positive and one negative of every label (when there are two) in the
held-out rows. Encoder features are computed once and cached (``PROBE_DIR/feature_cache``, keyed by
encoder weights hash and image file hash). Output: ``probe.safetensors`` + ``probe.json`` (labels,
encoder id and weights sha256, normalisation, held-out AUROC per label) and ``model_card.json``;
``medfm findings --probe PROBE_DIR IMAGE`` and the Findings dock run it.
"""

from __future__ import annotations

import argparse
import json
import sys

ENCODERS = ("mermed", "rad-dino", "dinov2-base")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=ENCODERS, help="frozen encoder")
    p.add_argument("--weights", default=None, help="encoder weights (file or hub-layout folder)")
    p.add_argument("--data", required=True, help="manifest CSV (image, modality, label columns)")
    p.add_argument("--out", required=True, help="probe folder to write")
    p.add_argument("--head", default="linear", choices=("linear", "mlp"))
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot: at most N positives and N negatives per label for training")
    p.add_argument("--epochs", type=int, default=300, help="full-batch epochs of the head")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="feature cache folder (default PROBE_DIR/feature_cache)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the probe metadata as JSON")


def main(args: argparse.Namespace) -> int:
    from napari_medfm.progress import drain_with_tqdm
    from napari_medfm.runtime.cache import get_model
    from napari_medfm.tasks.probe import train_probe_task

    encoder = get_model(args.model, weights=args.weights, device=args.device)
    meta = drain_with_tqdm(train_probe_task(
        encoder, args.data, args.out, head=args.head, shots=args.shots, epochs=args.epochs,
        lr=args.lr, seed=args.seed, test_fraction=args.test_fraction, cache=args.cache),
        desc="probe")
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        m = meta["metrics"]
        print(f"probe written to {args.out} ({m['n_train']} train / {m['n_test']} held-out rows)")
        for lab, au in m["auroc"].items():
            print(f"  {lab}: held-out AUROC {'n/a' if au is None else f'{au:.3f}'}")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainers.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli())
