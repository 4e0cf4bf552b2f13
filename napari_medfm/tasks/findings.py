"""Findings tasks (Merlin): generators yielding :class:`Progress`, used by the widget and CLI.

* :func:`findings_task` - preprocess -> image tower -> text tower (one step per prompt batch)
  -> heads; returns a :class:`FindingsResult` (zero-shot findings, top phenotypes, optional
  5-year risks, embeddings and the layer4 tokens for instant "why" maps).
* :func:`explain_task` - the "why" map of one finding for a finished result.
* :func:`embed_files_task` - ``medfm embed``: read each input, embed it, write one ``.npz``
  per input atomically.

Nothing here imports Qt or napari; cancelling (closing the generator) stops at the next
step and leaves no partial output file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedfmError, MixedSeriesError
from ..io.types import MedicalImage
from ..progress import Progress

__all__ = [
    "FindingsResult",
    "findings_task",
    "explain_task",
    "embed_files_task",
    "pick_volume",
    "save_npz",
    "EMBED_KEYS",
]

#: Arrays written by ``medfm embed`` (the generic embed contract).
EMBED_KEYS = ("image_embedding", "contrastive_embedding", "phenotype_logits")
_TEXT_BATCH = 8


@dataclass
class FindingsResult:
    """Everything one Merlin run produced for one CT."""

    image_name: str
    findings: list[dict[str, Any]]
    phenotypes: list[dict[str, Any]]
    five_year: list[dict[str, Any]] | None
    outputs: dict[str, np.ndarray]
    provenance: dict[str, Any]
    prompts: Any = None  # the PromptSet used (None without zero-shot)
    preprocessed: Any = None  # Preprocessed (grid of the tokens), for "why" maps
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays, no patient identifiers)."""
        return {
            "image": self.image_name,
            "provenance": self.provenance,
            "findings": self.findings,
            "phenotypes": self.phenotypes,
            "five_year": self.five_year,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """One row per finding / phenotype / 5-year output, provenance in a header comment."""
        buf = io.StringIO()
        p = self.provenance
        buf.write(f"# model={p.get('model')} weights={p.get('weights')} "
                  f"sha256={p.get('weights_sha256')} time={p.get('time')}\n")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["kind", "name", "code", "probability"])
        for f in self.findings:
            w.writerow(["finding", f["finding"], "", f"{f['probability']:.6f}"])
        for ph in self.phenotypes:
            w.writerow(["phenotype", ph["name"], ph["phecode"], f"{ph['probability']:.6f}"])
        for r in self.five_year or ():
            w.writerow(["five_year", f"output {r['output']}", "", f"{r['probability']:.6f}"])
        return buf.getvalue()


def findings_task(model: Any, image: MedicalImage, prompts: Any = None, top_k: int = 20,
                  zero_shot: bool = True, five_year: bool = True
                  ) -> Generator[Progress, None, FindingsResult]:
    """Run Merlin on ``image``: findings (zero-shot), top-``top_k`` phenotypes, 5-year risks.

    ``prompts``: a PromptSet, a prompt file path or None (packaged prompts). Yields one
    :class:`Progress` per step (preprocess, image tower, each text batch, heads).
    """
    from ..models.merlin.phenotypes import PromptSet, load_prompts, top_phenotypes

    t0 = time.perf_counter()
    ps = None
    if zero_shot and model.has_text:
        ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    pending = model.pending_phrases(ps) if ps is not None else []
    n_text = math.ceil(len(pending) / _TEXT_BATCH)
    do_five = five_year and model.five_year_path is not None
    total = 3 + n_text + (1 if do_five else 0) + (1 if ps is not None else 0)
    step = 0
    yield Progress(step, total, "preprocessing (RAS, 1.5x1.5x3 mm, 224x224x160)")
    pre = model.prepare(image)
    step += 1
    yield Progress(step, total, "image tower")
    out = model.forward_image(pre, keep_tokens=True)
    step += 1
    findings: list[dict[str, Any]] = []
    if ps is not None:
        yield Progress(step, total, "loading text tower")
        model.load_text()
        step += 1
        for i in range(n_text):
            yield Progress(step, total, f"encoding prompts {i + 1}/{n_text}")
            model.text_features(pending[i * _TEXT_BATCH:(i + 1) * _TEXT_BATCH])
            step += 1
        findings = model.zero_shot_from(out["contrastive_embedding"], ps)
    risks = None
    if do_five:
        yield Progress(step, total, "5-year head")
        risks = model.five_year_from(pre)
        step += 1
    yield Progress(step, total, "phenotypes")
    phenos = top_phenotypes(out["phenotype_logits"], top_k)
    notes = []
    if not model.has_text and zero_shot:
        notes.append("zero-shot findings skipped: model loaded image-only")
    if risks is not None:
        from ..models.merlin.phenotypes import FIVE_YEAR_NOTE

        notes.append(FIVE_YEAR_NOTE)
    prov = dict(model.describe())
    prov["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if ps is not None:
        prov["prompts"] = ps.source
        prov["temperature"] = ps.temperature
    return FindingsResult(image.name, findings, phenos, risks, out, prov, ps, pre, notes)


def explain_task(model: Any, image: MedicalImage, result: FindingsResult, finding: str
                 ) -> Generator[Progress, None, MedicalImage]:
    """The "why" map of ``finding`` for a finished run, on ``image``'s grid."""
    yield Progress(0, 2, f"why: {finding}")
    why = model.explain(image, finding, prompts=result.prompts, pre=result.preprocessed,
                        tokens=result.outputs.get("visual_tokens"))
    yield Progress(1, 2, "resampled onto the CT")
    return why


# ------------------------------------------------------------------------------- embed files
def pick_volume(images: Sequence[MedicalImage], source: str | Path) -> MedicalImage:
    """The one image volume read from ``source`` (labels ignored)."""
    vols = [im for im in images if im.kind == "volume" and not im.is_label]
    if len(vols) == 1:
        return vols[0]
    if not vols:
        if images:
            return images[0]  # the model refuses it with a clear modality message
        raise MedfmError(f"{Path(source).name}: no image found")
    names = ", ".join(im.name for im in vols[:6])
    raise MixedSeriesError(f"{Path(source).name} holds {len(vols)} volumes ({names}); point to "
                           "one series (its folder or file)")


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as float32 ``.npz`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def output_paths(inputs: Sequence[str | Path], output: str | Path) -> list[Path]:
    """One ``.npz`` per input: ``output`` itself for one input, ``output/<stem>.npz`` for more."""
    out = Path(output)
    if len(inputs) == 1 and out.suffix.lower() == ".npz":
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


def embed_files_task(model: Any, inputs: Sequence[str | Path], outputs: Sequence[Path]
                     ) -> Generator[Progress, None, list[Path]]:
    """Read, embed and save each input (one ``.npz`` each); yields per input."""
    from ..io import read

    written: list[Path] = []
    n = len(inputs)
    for i, (inp, outp) in enumerate(zip(inputs, outputs, strict=True)):
        yield Progress(i, n, f"{Path(inp).name}")
        image = pick_volume(read(inp), inp)
        res = model.embed(image)
        save_npz(outp, {k: res[k] for k in EMBED_KEYS if k in res} or res)
        written.append(outp)
    yield Progress(n, n, "done")
    return written
