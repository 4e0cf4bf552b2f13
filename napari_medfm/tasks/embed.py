"""Embedding tasks (``medfm embed`` and the docks): image and text embeddings with any encoder.

* :func:`embed` - one image -> ``{"image_embedding": ..., ...}`` with the modality passed to
  models that take one (2D encoders), recorded in :func:`provenance`.
* :func:`embed_text` - texts -> ``(N, D)`` L2-normalised, for vision-language models.
* :func:`embed_files_task` - read each input, embed it, write one ``.npz`` per input (and a
  ``.json`` provenance sidecar: model, weights sha256, modality used) atomically.

Nothing here imports Qt or napari; cancelling (closing the generator) stops at the next
input and leaves no partial output file.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Generator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedfmError, MixedSeriesError
from ..io.types import MedicalImage
from ..progress import Progress

__all__ = [
    "EMBED_KEYS",
    "embed",
    "embed_text",
    "embed_files_task",
    "embed_text_task",
    "output_paths",
    "pick_image",
    "provenance",
    "save_npz",
    "accepts",
]

#: Arrays written by ``medfm embed`` (the generic embed contract).
EMBED_KEYS = ("image_embedding", "contrastive_embedding", "phenotype_logits")


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def pick_image(images: Sequence[MedicalImage], source: str | Path) -> MedicalImage:
    """The one image read from ``source`` (labels ignored; a single volume preferred)."""
    images = [im for im in images if not im.is_label] or list(images)
    vols = [im for im in images if im.kind == "volume"]
    if len(vols) == 1:
        return vols[0]
    if not vols:
        if images:
            return images[0]  # the model refuses it with a clear modality message
        raise MedfmError(f"{Path(source).name}: no image found")
    names = ", ".join(im.name for im in vols[:6])
    raise MixedSeriesError(f"{Path(source).name} holds {len(vols)} volumes ({names}); point to "
                           "one series (its folder or file)")


#: Former name (3D inputs); same rule.
pick_volume = pick_image


def _model_kwargs(fn: Any, modality: str | None, slice_index: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if modality is not None and accepts(fn, "modality"):
        kw["modality"] = modality
    if slice_index is not None and accepts(fn, "slice_index"):
        kw["slice_index"] = slice_index
    return kw


def modality_used(model: Any, image: MedicalImage, modality: str | None) -> str:
    """The modality a model will treat ``image`` as: the model's own answer
    (``modality_for``, MerMED-FM), else the one given (models that take it), else the model's
    default, else the image's own."""
    ask = getattr(model, "modality_for", None)
    if callable(ask):
        return str(ask(image, modality=modality))
    if modality and accepts(getattr(model, "embed", None), "modality"):
        return modality
    default = getattr(model, "default_modality", None)
    return str(default or image.modality)


def embed(model: Any, image: MedicalImage, *, modality: str | None = None,
          slice_index: int | str | None = None) -> dict[str, np.ndarray]:
    """``model.embed(image)``, passing ``modality``/``slice_index`` to models that take them
    (2D encoders). Models without the option (Merlin: CT only, read from the image) check the
    image themselves; :func:`modality_used` says what was used."""
    fn = model.embed
    return fn(image, **_model_kwargs(fn, modality, slice_index))


def embed_text(model: Any, texts: Sequence[str]) -> np.ndarray:
    """``(N, D)`` L2-normalised text embeddings in the model's image space
    (vision-language models only: BiomedCLIP's text tower, Merlin's for its contrastive space)."""
    from .retrieval.query import text_vector

    return np.stack([text_vector(model, t) for t in texts]) if texts else \
        np.zeros((0, int(getattr(model, "embedding_dim", 0) or 0)), np.float32)


def provenance(model: Any, **extra: Any) -> dict[str, Any]:
    """``model.describe()`` plus time and the given facts (modality, prompts, ...)."""
    prov = dict(model.describe()) if hasattr(model, "describe") else {
        "model": getattr(model, "model_id", "?")}
    prov["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov.update({k: v for k, v in extra.items() if v is not None})
    return prov


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as float32 ``.npz`` atomically."""
    from ..io.writers import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})

    return atomic_write(path, _write)


def save_json(path: str | Path, doc: Any) -> Path:
    from ..io.writers import atomic_write

    path = Path(path)

    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    return atomic_write(path, _write)


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg",
                ".tif", ".tiff", ".svs"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def output_paths(inputs: Sequence[str | Path], output: str | Path) -> list[Path]:
    """One ``.npz`` per input: ``output`` itself for one input, ``output/<stem>.npz`` for more."""
    out = Path(output)
    if len(inputs) <= 1 and out.suffix.lower() == ".npz":
        return [out]
    if out.exists() and not out.is_dir():
        raise MedfmError(f"--output {out}: with several inputs (or no .npz suffix) it must be a "
                         "folder")
    paths, seen = [], set()
    for inp in inputs:
        stem = _stem(Path(inp)) or "input"
        cand, i = stem, 1
        while cand in seen:
            i += 1
            cand = f"{stem}_{i}"
        seen.add(cand)
        paths.append(out / f"{cand}.npz")
    return paths


def sidecar(npz: Path) -> Path:
    return npz.with_suffix(".json")


def embed_files_task(model: Any, inputs: Sequence[str | Path], outputs: Sequence[Path], *,
                     modality: str | None = None, slice_index: int | str | None = None,
                     ) -> Generator[Progress, None, list[dict[str, Any]]]:
    """Read, embed and save each input (one ``.npz`` + ``.json`` provenance each).

    Returns one record per input: ``{"input", "output", "modality"}``.
    """
    from ..io import read

    done: list[dict[str, Any]] = []
    n = len(inputs)
    for i, (inp, outp) in enumerate(zip(inputs, outputs, strict=True)):
        yield Progress(i, n, f"{Path(inp).name}")
        image = pick_image(read(inp), inp)
        res = embed(model, image, modality=modality, slice_index=slice_index)
        mod = str(res["modality"]) if isinstance(res.get("modality"), str) else \
            modality_used(model, image, modality)
        res = {k: v for k, v in res.items() if not isinstance(v, str)}
        save_npz(outp, {k: res[k] for k in EMBED_KEYS if k in res} or res)
        save_json(sidecar(outp), {"input": Path(inp).name, "outputs": sorted(res),
                                  "provenance": provenance(model, modality=mod,
                                                           slice_index=slice_index)})
        done.append({"input": str(inp), "output": str(outp), "modality": mod})
    yield Progress(n, n, "done")
    return done


def embed_text_task(model: Any, texts: Sequence[str], output: str | Path,
                    ) -> Generator[Progress, None, dict[str, Any]]:
    """Embed ``texts`` and write ``text_embedding`` ((D,) for one text, (N, D) for several)."""
    yield Progress(0, 2, "text tower")
    emb = embed_text(model, texts)
    out = Path(output)
    if out.suffix.lower() != ".npz":
        out = out / "text.npz"
    save_npz(out, {"text_embedding": emb[0] if len(texts) == 1 else emb})
    save_json(sidecar(out), {"texts": list(texts), "outputs": ["text_embedding"],
                             "provenance": provenance(model)})
    yield Progress(2, 2, "done")
    return {"texts": list(texts), "output": str(out)}
