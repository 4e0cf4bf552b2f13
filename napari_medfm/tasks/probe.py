"""Probe training and inference tasks (generators yielding :class:`Progress`).

* :func:`read_probe_manifest` - CSV with ``image``, ``modality`` and one column per label
  (``1`` positive, ``0`` negative, empty = unknown; ``split`` (train/test) optional).
* :func:`features_task` - frozen encoder features of every row, cached on disk per
  (encoder id, encoder weights sha256, image file sha256, modality): a second run, or a probe with
  another head on the same images, does not run the encoder again.
* :func:`fit_probe` - a linear or small MLP head on standardised features, masked BCE (unknown
  labels ignored), optional few-shot subsampling of the training split.
* :func:`train_probe_task` - the whole of ``medfm train probe``: features, held-out split,
  training, AUROC per label on the held-out rows, probe folder (safetensors + JSON) and
  ``model_card.json``.
* :func:`findings_files_task` - ``medfm findings --probe``: read each input and run a
  FindingsModel on it.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedfmError
from ..progress import Progress

log = logging.getLogger(__name__)

__all__ = ["read_probe_manifest", "features_task", "split_rows", "fit_probe", "auroc_per_label",
           "train_probe_task", "findings_files_task"]

_RESERVED = {"image", "modality", "split", "patient", "patient_id", "id", "note", "notes"}


def read_probe_manifest(path: str | Path) -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """(rows with absolute ``image`` paths, label names, ``float32 [N, L]`` targets, NaN = unknown)."""
    p = Path(path)
    if not p.is_file():
        raise MedfmError(f"{p}: manifest not found")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    for c in ("image", "modality"):
        if c not in cols:
            raise MedfmError(f"{p.name}: manifest lacks column {c!r} (has {', '.join(cols)})")
    labels = [c for c in cols if c not in _RESERVED]
    if not labels:
        raise MedfmError(f"{p.name}: no label columns (one column per label, values 0/1/empty)")
    if not rows:
        raise MedfmError(f"{p.name}: manifest has no rows")
    y = np.full((len(rows), len(labels)), np.nan, np.float32)
    for i, r in enumerate(rows):
        img = (r.get("image") or "").strip()
        if not img:
            raise MedfmError(f"{p.name}: row {i + 2}: empty image path")
        r["image"] = str(Path(img) if Path(img).is_absolute() else p.parent / img)
        for j, lab in enumerate(labels):
            v = (r.get(lab) or "").strip()
            if v == "":
                continue
            if v not in ("0", "1", "0.0", "1.0"):
                raise MedfmError(f"{p.name}: row {i + 2}, column {lab!r}: {v!r} is not 0, 1 or "
                                 "empty")
            y[i, j] = float(v)
    return rows, labels, y


def _file_sha(path: str) -> str:
    from ..runtime.weights import sha256_file

    return sha256_file(path)


def _read_image(path: str, modality: str | None) -> Any:
    from .. import io

    try:
        return io.read(path, modality=modality)[0]
    except TypeError:
        return io.read(path)[0]


def features_task(encoder: Any, rows: Sequence[dict[str, str]], cache: str | Path | None = None,
                  batch: int = 8) -> Generator[Progress, None, np.ndarray]:
    """``float32 [N, D]`` encoder features of ``rows`` (``image``, ``modality``), cached.

    The cache is one ``.npz`` per encoder (id + weights hash) in ``cache``; its keys are
    sha256(image file sha256 + modality), so renamed or moved images still hit and changed
    files never do.
    """
    from ..io.writers import atomic_write
    from ..models import encoder2d

    n = len(rows)
    cached: dict[str, np.ndarray] = {}
    cache_file = None
    if cache is not None:
        tag = f"{encoder.model_id}-{str(encoder.weights_sha256 or 'none')[:16]}"
        cache_file = Path(cache) / f"features-{tag}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as z:
                cached = {k: z[k] for k in z.files}
    keys = []
    for r in rows:
        mod = encoder2d.canonical_modality(r.get("modality")) or r.get("modality") or ""
        keys.append(hashlib.sha256(f"{_file_sha(r['image'])}|{mod}".encode()).hexdigest()[:32])
    out: list[np.ndarray | None] = [cached.get(k) for k in keys]
    todo = [i for i in range(n) if out[i] is None]
    done = n - len(todo)
    yield Progress(done, n, f"{done} cached")
    for s in range(0, len(todo), batch):
        idx = todo[s:s + batch]
        images = [_read_image(rows[i]["image"], rows[i].get("modality")) for i in idx]
        mods = [encoder2d.canonical_modality(rows[i].get("modality")) for i in idx]
        if hasattr(encoder, "embed_batch"):
            f = np.asarray(encoder.embed_batch(images, modality=mods), np.float32)
        else:
            f = np.stack([encoder.embed(im, modality=m)["image_embedding"]
                          for im, m in zip(images, mods, strict=True)])
        for i, v in zip(idx, f, strict=True):
            out[i] = v
            cached[keys[i]] = v
        done += len(idx)
        yield Progress(done, n, f"features {done}/{n}")
    if cache_file is not None and todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda tmp: np.savez(tmp, **cached))
    return np.stack(out).astype(np.float32)


def split_rows(y: np.ndarray, *, test_fraction: float = 0.3, seed: int = 0,
               given: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices. ``given`` (the manifest's ``split`` column) wins when present.

    Otherwise a seeded random split that puts, for every label with at least 2 positives and 2
    negatives, one of each into the test rows (so its AUROC is defined), then fills up to
    ``test_fraction``.
    """
    n = y.shape[0]
    if given is not None and any(g for g in given):
        test = np.array([i for i, g in enumerate(given) if str(g).strip().lower()
                         in ("test", "val", "valid", "validation", "heldout", "held-out")])
        train = np.array([i for i in range(n) if i not in set(test.tolist())])
        return train, test
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    want = max(1, int(round(test_fraction * n))) if n > 1 else 0
    test: list[int] = []
    for j in range(y.shape[1]):
        for val in (1.0, 0.0):
            cand = [i for i in order if y[i, j] == val]
            if len(cand) >= 2 and not any(y[i, j] == val for i in test):
                test.append(int(cand[0]))
    for i in order:
        if len(test) >= want:
            break
        if int(i) not in test:
            test.append(int(i))
    tset = set(test)
    train = np.array([i for i in range(n) if i not in tset], dtype=int)
    return train, np.array(sorted(tset), dtype=int)


def few_shot(y: np.ndarray, train: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """At most ``shots`` positives and ``shots`` negatives per label from ``train`` (union)."""
    rng = np.random.default_rng(seed + 1)
    keep: set[int] = set()
    for j in range(y.shape[1]):
        for val in (1.0, 0.0):
            cand = [int(i) for i in train if y[i, j] == val]
            rng.shuffle(cand)
            keep.update(cand[:shots])
    return np.array(sorted(keep), dtype=int)


def fit_probe(x: np.ndarray, y: np.ndarray, *, head: str = "linear", hidden: int = 256,
              epochs: int = 300, lr: float = 1e-3, weight_decay: float = 1e-4,
              seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray, list[float]]:
    """(head module, feature mean, feature std, loss curve): full-batch AdamW, masked BCE.

    Positives are re-weighted per label (``pos_weight = negatives / positives``) so rare labels
    are not ignored; unknown (NaN) targets contribute nothing.
    """
    import torch

    from ..models.probe.model import make_head

    torch.manual_seed(seed)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1], np.float32)
    std = x.std(0) + 1e-6 if len(x) > 1 else np.ones(x.shape[1], np.float32)
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(np.nan_to_num(y, nan=0.0).astype(np.float32))
    known = torch.from_numpy(~np.isnan(y))
    pos = (yt * known).sum(0)
    neg = ((1 - yt) * known).sum(0)
    pos_weight = torch.where(pos > 0, neg.clamp_min(1) / pos.clamp_min(1), torch.ones_like(pos))
    net = make_head(x.shape[1], y.shape[1], head, hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    denom = known.sum().clamp_min(1)
    for _ in range(epochs):
        net.train()
        logits = net(xt)
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, yt, pos_weight=pos_weight, reduction="none")
        loss = (per * known).sum() / denom
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return net.eval(), mean.astype(np.float32), std.astype(np.float32), losses


def auroc_per_label(y: np.ndarray, p: np.ndarray, labels: Sequence[str]) -> dict[str, float | None]:
    """AUROC per label over the rows where it is known (None when one class is missing)."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for j, name in enumerate(labels):
        m = ~np.isnan(y[:, j])
        t = y[m, j]
        if t.size == 0 or t.min() == t.max():
            out[name] = None
            continue
        out[name] = float(roc_auc_score(t, p[m, j]))
    return out


def _normalisation(encoder: Any, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    from ..models import encoder2d

    mods = sorted({encoder2d.canonical_modality(r.get("modality")) or str(r.get("modality"))
                   for r in rows})
    out: dict[str, Any] = {"modalities": mods}
    if encoder.model_id == "mermed":
        out["image"] = {m: {"mean": list(encoder2d.norm_for(m)[0]),
                            "std": list(encoder2d.norm_for(m)[1])} for m in mods}
        out["input_size"] = getattr(encoder, "input_size", None)
    else:
        proc = getattr(encoder, "processor", None)
        out["image"] = {"processor_mean": list(getattr(proc, "image_mean", []) or []),
                        "processor_std": list(getattr(proc, "image_std", []) or [])}
    out["features"] = "standardised with feature_mean / feature_std of the training rows"
    return out


def train_probe_task(encoder: Any, manifest: str | Path, out: str | Path, *,
                     head: str = "linear", shots: int | None = None, epochs: int = 300,
                     lr: float = 1e-3, seed: int = 0, test_fraction: float = 0.3,
                     cache: str | Path | None = None,
                     encoder_weights: str | None = None) -> Generator[Progress, None, dict]:
    """``medfm train probe``: returns the probe's metadata (also written to ``out``)."""
    from ..io.writers import atomic_write
    from ..models.probe.model import save_probe

    rows, labels, y = read_probe_manifest(manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats = yield from features_task(encoder, rows, cache=cache if cache is not None
                                     else out / "feature_cache")
    train, test = split_rows(y, test_fraction=test_fraction, seed=seed,
                             given=[r.get("split", "") for r in rows] if any(
                                 "split" in r for r in rows) else None)
    if shots:
        train = few_shot(y, train, shots, seed=seed)
    if train.size == 0:
        raise MedfmError("no training rows left after the held-out split / --shots")
    yield Progress(0, 1, "training head")
    t0 = time.perf_counter()
    net, mean, std, losses = fit_probe(feats[train], y[train], head=head, epochs=epochs, lr=lr,
                                       seed=seed)
    fit_s = time.perf_counter() - t0
    import torch

    def predict(ix: np.ndarray) -> np.ndarray:
        if ix.size == 0:
            return np.zeros((0, len(labels)))
        with torch.inference_mode():
            return torch.sigmoid(net(torch.from_numpy((feats[ix] - mean) / std))).numpy()

    au_test = auroc_per_label(y[test], predict(test), labels) if test.size else \
        dict.fromkeys(labels)
    au_train = auroc_per_label(y[train], predict(train), labels)
    counts = {lab: {"positive_train": int(np.sum(y[train, j] == 1)),
                    "negative_train": int(np.sum(y[train, j] == 0)),
                    "positive_test": int(np.sum(y[test, j] == 1)) if test.size else 0,
                    "negative_test": int(np.sum(y[test, j] == 0)) if test.size else 0}
              for j, lab in enumerate(labels)}
    from ..models import encoder2d

    mods = sorted({encoder2d.canonical_modality(r.get("modality")) or r.get("modality", "")
                   for r in rows})
    weights_path = encoder_weights or getattr(encoder, "weights_path", None)
    meta = {
        "labels": labels,
        "head": head, "hidden": 256,
        "encoder": {"id": encoder.model_id, "weights_sha256": encoder.weights_sha256,
                    "weights": str(Path(weights_path).resolve()) if weights_path else None,
                    "embedding_dim": int(feats.shape[1])},
        "modality": mods[0] if len(mods) == 1 else None,
        "normalisation": _normalisation(encoder, rows),
        "metrics": {"auroc": au_test, "auroc_train": au_train, "split": "held-out",
                    "n_train": int(train.size), "n_test": int(test.size), "counts": counts,
                    "final_train_loss": losses[-1] if losses else None},
        "training": {"manifest": Path(manifest).name, "rows": len(rows), "shots": shots,
                     "epochs": epochs, "lr": lr, "seed": seed, "test_fraction": test_fraction,
                     "fit_seconds": fit_s},
    }
    paths = save_probe(out, net, meta, mean, std)
    card = {"model": "probe", "load": f"medfm findings --probe {out} INPUT",
            "labels": labels, "encoder": meta["encoder"], "modality": meta["modality"],
            "metrics": meta["metrics"], "training": meta["training"],
            "note": "held-out AUROC on the rows listed as test; weak labels give weak probes"}
    atomic_write(out / "model_card.json",
                 lambda tmp: tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8"))
    yield Progress(1, 1, "probe written")
    meta["files"] = {k: str(v) for k, v in paths.items()}
    return meta


def findings_files_task(model: Any, inputs: Sequence[str | Path], *, modality: str | None = None,
                        prompts: Any = None) -> Generator[Progress, None, list[dict]]:
    """Run a FindingsModel on each input file; one ``{"input", "findings"}`` per input."""
    results = []
    for k, inp in enumerate(inputs):
        yield Progress(k, len(inputs), Path(inp).name)
        image = _read_image(str(inp), modality)
        kw = {"modality": modality} if modality else {}
        results.append({"input": str(inp), "findings": model.findings(image, prompts=prompts,
                                                                      **kw)})
    yield Progress(len(inputs), len(inputs), "done")
    return results
