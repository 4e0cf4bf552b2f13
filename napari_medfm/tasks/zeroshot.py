"""Zero-shot / finding-probability tasks for every FindingsModel (Merlin, BiomedCLIP, RadFM
yes/no questions, probe heads): generators yielding :class:`Progress`, used by the Findings
dock and ``medfm zero-shot``.

* :func:`zero_shot` - one image -> :class:`FindingsResult` (findings, and for Merlin the top
  phenotypes and 5-year risks, embeddings and layer4 tokens for instant "why" maps). Merlin
  runs step by step (preprocess -> image tower -> text batches -> heads); other models through
  their ``findings(image, prompts=...)`` contract, with ``modality`` passed to models that take
  it. The prompt set, the model and the modality are recorded in ``provenance``.
* :func:`explain_task` - the "why" map of one finding for a finished result (models with an
  ``explain`` method), on the image's own grid.

Nothing here imports Qt or napari; cancelling (closing the generator) stops at the next step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..io.types import MedicalImage
from ..progress import Progress
from .embed import accepts

__all__ = ["FindingsResult", "zero_shot", "explain_task", "can_explain"]

_TEXT_BATCH = 8


@dataclass
class FindingsResult:
    """Everything one findings run produced for one image (any FindingsModel)."""

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


def _merlin_steps(model: Any, image: MedicalImage, prompts: Any = None, top_k: int = 20,
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
    prov["modality"] = image.modality
    if ps is not None:
        prov["prompts"] = ps.source
        prov["temperature"] = ps.temperature
    return FindingsResult(image.name, findings, phenos, risks, out, prov, ps, pre, notes)


def _is_merlin_like(model: Any) -> bool:
    """Models with Merlin's step-by-step API (image tower, text batches, phenotype heads)."""
    return all(hasattr(model, a) for a in ("prepare", "forward_image", "pending_phrases",
                                           "zero_shot_from", "load_text"))


def _prompt_source(ps: Any) -> Any:
    if ps is None:
        return None
    src = getattr(ps, "source", None)
    return src if src is not None else str(ps)


def zero_shot(model: Any, image: MedicalImage, prompts: Any = None, top_k: int = 20, *,
              five_year: bool = True, modality: str | None = None,
              slice_index: int | str | None = None,
              ) -> Generator[Progress, None, FindingsResult]:
    """Finding probabilities of ``image`` with any FindingsModel.

    ``prompts``: the model's own prompt/question set (a file path, a parsed set, a list of
    labels for probes, or None for the model's default - for BiomedCLIP the shipped set of
    ``modality``). ``modality`` (2D images without a header, e.g. a CXR PNG) and
    ``slice_index`` go to models that take them. ``top_k``/``five_year``: Merlin's phenotype
    and 5-year outputs.
    """
    if _is_merlin_like(model):
        return (yield from _merlin_steps(model, image, prompts, top_k=top_k,
                                         five_year=five_year))
    t0 = time.perf_counter()
    name = getattr(model, "model_id", "model")
    yield Progress(0, 3, "reading the prompt set")
    ps = prompts
    if hasattr(model, "prompt_set"):
        ps = model.prompt_set(prompts, modality or image.modality)
    kw: dict[str, Any] = {}
    if modality is not None and accepts(model.findings, "modality"):
        kw["modality"] = modality
    if slice_index is not None and accepts(model.findings, "slice_index"):
        kw["slice_index"] = slice_index
    yield Progress(1, 3, f"{name}: image and prompts")
    rows = list(model.findings(image, prompts=ps, **kw))
    yield Progress(2, 3, "probabilities")
    rows = [dict(r) for r in rows]
    for r in rows:
        r["probability"] = float(r["probability"])
    prov = dict(model.describe()) if hasattr(model, "describe") else {"model": name}
    prov.setdefault("model", name)
    prov.setdefault("weights_sha256", getattr(model, "weights_sha256", None))
    prov["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov["elapsed_s"] = round(time.perf_counter() - t0, 2)
    own = getattr(model, "modality", None)  # e.g. a probe trained on one modality
    if "modality" in kw:
        prov["modality"] = kw["modality"]
    elif isinstance(own, str) and own:
        prov["modality"] = own
    else:
        prov["modality"] = image.modality
    if slice_index is not None:
        prov["slice_index"] = slice_index
    if ps is not None:
        prov["prompts"] = _prompt_source(ps)
        meta = getattr(ps, "meta", None) or {}
        if "temperature_set" in meta:
            prov["temperature"] = ps.temperature if meta["temperature_set"] else None
            if rows and "scale" in rows[0]:
                prov["scale"] = rows[0]["scale"]
    notes = []
    yield Progress(3, 3, f"{len(rows)} findings")
    return FindingsResult(image.name, rows, [], None, {}, prov, ps, None, notes)


def can_explain(model: Any) -> bool:
    """Whether ``model`` draws "why" maps (Merlin: Grad-CAM; BiomedCLIP: patch similarity)."""
    return callable(getattr(model, "explain", None))


def explain_task(model: Any, image: MedicalImage, result: FindingsResult, finding: str
                 ) -> Generator[Progress, None, MedicalImage]:
    """The "why" map of ``finding`` for a finished run, on ``image``'s grid."""
    from ..errors import MedfmError

    if not can_explain(model):
        raise MedfmError(f"{getattr(model, 'model_id', 'this model')} draws no why-maps")
    yield Progress(0, 2, f"why: {finding}")
    if result.preprocessed is not None or "visual_tokens" in result.outputs:  # Merlin
        why = model.explain(image, finding, prompts=result.prompts, pre=result.preprocessed,
                            tokens=result.outputs.get("visual_tokens"))
    else:
        kw: dict[str, Any] = {}
        mod = result.provenance.get("modality")
        if mod and accepts(model.explain, "modality"):
            kw["modality"] = mod
        if result.provenance.get("slice_index") is not None and \
                accepts(model.explain, "slice_index"):
            kw["slice_index"] = result.provenance["slice_index"]
        why = model.explain(image, finding, prompts=result.prompts, **kw)
    yield Progress(1, 2, "on the image grid")
    return why
