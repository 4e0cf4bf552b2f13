"""Draft reports: the one orchestration behind the Report dock and ``medfm report``.

:func:`report_task` is a generator: it yields :class:`~napari_medfm.progress.Progress` events,
the text pieces of the draft in ``Progress.data`` as the model writes them, and returns a
:class:`ReportResult` (text + provenance: model id, weights sha256, prompt, settings, time,
source study/series UIDs). Closing it stops generation at the next token (nothing returned);
``stop`` (a ``threading.Event`` or a callable) ends it early *with* a result holding the text
so far (``stopped=True``) - the dock's Stop button.

Prompt templates (:func:`prompt_for`): ``full report``, ``findings``, ``impression``,
``organs`` (Merlin: the release's 13 organ prompts) and ``question`` (free text). Merlin's
generator was trained on the organ prompts only, so its full report and findings are the organ
report and it has no impression prompt.

Exports (:func:`save_report`): ``.txt`` / ``.md`` / ``.json`` and ``.dcm`` (DICOM
Comprehensive SR, :mod:`napari_medfm.io.sr`), all written atomically and all carrying the
banner and the provenance.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import EmptyPromptError, MedfmError, WrongModalityError
from ..io.sr import BANNER
from ..progress import Progress

__all__ = [
    "BANNER", "TEMPLATES", "ReportResult", "report_task", "prompt_for", "templates_for",
    "report_models", "format_findings", "save_report", "EXPORT_SUFFIXES",
]

#: Template ids in the order the dock shows them.
TEMPLATES = ("full report", "findings", "impression", "organs", "question")
EXPORT_SUFFIXES = (".txt", ".md", ".json", ".dcm")

#: Generic prompts (RadFM and other instruction-following generators); they end with
#: punctuation (RadFM answers empty otherwise).
_GENERIC = {
    "full report": "Please write a radiology report for this image.",
    "findings": "Please describe the findings in this image.",
    "impression": "Please give the impression of this image.",
}
_QUESTION = "question"


def _is_merlin(model_id: str) -> bool:
    from ..runtime.registry import get_spec

    return model_id == "merlin-report" or get_spec(model_id).builder.startswith(
        "napari_medfm.models.merlin_report.")


def report_models() -> list[str]:
    """Ids of the registered report generators."""
    from ..runtime.registry import list_specs

    return [s.id for s in list_specs(task="report")]


def templates_for(model_id: str) -> list[str]:
    """Templates ``model_id`` offers (Merlin: no impression; only Merlin: organs)."""
    if _is_merlin(model_id):
        return ["full report", "findings", "organs", _QUESTION]
    return ["full report", "findings", "impression", _QUESTION]


def prompt_for(model_id: str, template: str = "full report", question: str | None = None,
               prompt: str | None = None) -> str:
    """The prompt sent to the model. ``prompt`` (raw text) wins over the template."""
    if prompt is not None:
        if not prompt.strip():
            raise EmptyPromptError("the prompt is empty: write a prompt or pick a template")
        return prompt
    if template == _QUESTION:
        if not question or not question.strip():
            raise EmptyPromptError("the question is empty: type a question about the image")
        q = question.strip()
        return q if q[-1] in ".?!:" else q + "?"
    if template not in TEMPLATES:
        raise MedfmError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if _is_merlin(model_id):
        from ..models.merlin_report.spec import ORGAN_PROMPT

        if template == "impression":
            raise MedfmError("merlin-report writes findings organ by organ; it has no "
                             "impression prompt (use 'full report' or a free question)")
        return ORGAN_PROMPT
    if template == "organs":
        raise MedfmError(f"{model_id}: the organ-by-organ template is Merlin's "
                         "(merlin-report); use 'full report' or 'findings'")
    return _GENERIC[template]


def format_findings(findings: Sequence[Mapping[str, Any]]) -> str:
    """The Findings dock's probabilities as a text section appended to the draft."""
    rows = [f"- {f['finding']}: {float(f['probability']):.2f}" for f in findings
            if "finding" in f and "probability" in f]
    if not rows:
        return ""
    return "Finding probabilities (model output, not diagnoses):\n" + "\n".join(rows)


@dataclass
class ReportResult:
    """A generated draft with its provenance (``text`` may be edited before export)."""

    text: str
    model_id: str
    weights_sha256: str | None
    prompt: str
    template: str
    settings: dict[str, Any]
    time: str  # ISO 8601 UTC, when generation started
    elapsed_s: float = 0.0
    sources: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] | None = None
    stopped: bool = False
    edited: bool = False
    banner: str = BANNER
    #: DICOM files of the first DICOM input (for the SR's references); not in the provenance
    source_files: list[str] = field(default_factory=list, repr=False)

    def provenance(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "prompt": self.prompt,
            "template": self.template,
            "settings": dict(self.settings),
            "time": self.time,
            "elapsed_s": round(self.elapsed_s, 3),
            "stopped": self.stopped,
            "edited": self.edited,
            "sources": [dict(s) for s in self.sources],
            "study_instance_uids": sorted({s["study_instance_uid"] for s in self.sources
                                           if s.get("study_instance_uid")}),
            "findings_inserted": self.findings is not None,
            "banner": self.banner,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.provenance()
        d["text"] = self.text
        if self.findings is not None:
            d["findings"] = [dict(f) for f in self.findings]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=str)

    def _header_lines(self) -> list[str]:
        p = self.provenance()
        return [f"model: {p['model_id']}", f"weights sha256: {p['weights_sha256']}",
                f"prompt: {p['prompt']!r}", f"settings: {json.dumps(p['settings'])}",
                f"time: {p['time']}",
                "studies: " + (", ".join(p["study_instance_uids"]) or "(not DICOM)")
                + ("; stopped early" if self.stopped else "")
                + ("; edited by the user" if self.edited else "")]

    def to_text(self) -> str:
        return (f"{self.banner}\n\n{self.text.rstrip()}\n\n---\n"
                + "\n".join(self._header_lines()) + "\n")

    def to_markdown(self) -> str:
        meta = "\n".join(f"- {line}" for line in self._header_lines())
        return (f"> **{self.banner}**\n\n# Draft report\n\n{self.text.rstrip()}\n\n"
                f"## Provenance\n\n{meta}\n")

    def with_text(self, text: str) -> ReportResult:
        """A copy carrying the user's edited text (flagged ``edited`` when it differs)."""
        return replace(self, text=text, edited=self.edited or text != self.text)


def _source_info(image: Any) -> dict[str, Any]:
    md = getattr(image, "metadata", {}) or {}
    return {
        "name": str(getattr(image, "name", "")),
        "modality": str(getattr(image, "modality", "")),
        "shape": list(getattr(image, "shape", ())),
        "study_instance_uid": md.get("study_instance_uid"),
        "series_instance_uid": md.get("series_instance_uid"),
    }


def _stopper(stop: Any) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    if callable(stop):
        return stop
    raise TypeError("stop must be a threading.Event or a callable")


def _check_dims(model_id: str, images: Sequence[Any]) -> None:
    from ..runtime.registry import get_spec

    dims = get_spec(model_id).dims
    for im in images:
        nd = len(getattr(im, "spatial_shape", ()) or ())
        kind = getattr(im, "kind", "")
        if kind == "wsi" and 2 in dims:
            continue
        if nd not in dims or (kind == "image2d" and 2 not in dims):
            need = " or ".join(f"{d}D" for d in dims)
            raise WrongModalityError(f"{getattr(im, 'name', 'image')}: {model_id} reads {need} "
                                     f"images; this one is {kind or f'{nd}D'} {im.shape}"
                                     + (" (use RadFM for 2D images)" if dims == (3,) else ""))


def report_task(
    model_id: str,
    images: Any,
    *,
    template: str = "full report",
    prompt: str | None = None,
    question: str | None = None,
    max_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    weights: Any = None,
    device: Any = None,
    model_options: Mapping[str, Any] | None = None,
    findings: Sequence[Mapping[str, Any]] | None = None,
    stop: Any = None,
    model: Any = None,
) -> Generator[Progress, None, ReportResult]:
    """Generate a draft report (see the module docstring).

    ``images``: one :class:`~napari_medfm.io.types.MedicalImage` or several (one study).
    ``max_new_tokens`` / ``repetition_penalty``: None = the model's own default (Merlin: 128
    per organ, 1.2). ``findings``: ``[{"finding", "probability"}]`` appended to the draft as a
    section. ``model``: an already loaded model (else the shared cache loads ``model_id``).
    """
    from ..runtime.cache import get_model

    imgs = [images] if not isinstance(images, (list, tuple)) else list(images)
    if not imgs:
        raise MedfmError("no image given: open an image first")
    text_prompt = prompt_for(model_id, template, question=question, prompt=prompt)
    if max_new_tokens is not None and int(max_new_tokens) < 1:
        raise MedfmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_dims(model_id, imgs)  # before loading a 7B/13B model for a wrong input
    should_stop = _stopper(stop)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    gen_settings: dict[str, Any] = {}
    if max_new_tokens is not None:
        gen_settings["max_new_tokens"] = int(max_new_tokens)
    if repetition_penalty is not None:
        gen_settings["repetition_penalty"] = float(repetition_penalty)
    organ = "{organ}" in text_prompt
    n_parts = 13 if organ else 1
    total = n_parts * int(gen_settings.get("max_new_tokens", 128 if organ else 200))

    yield Progress(0, total, f"loading {model_id}")
    if model is None:
        model = get_model(model_id, weights=weights, device=device, **dict(model_options or {}))
    yield Progress(0, total, "checking the weights")
    sha = model.weights_sha256
    yield Progress(0, total, "encoding the image")

    pieces: list[str] = []
    stopped = False
    it = model.stream(imgs, text_prompt, **gen_settings)
    try:
        for piece in it:
            pieces.append(piece)
            yield Progress(min(len(pieces), total), total, "generating", data=piece)
            if should_stop():
                stopped = True
                break
    finally:
        it.close()
    text = "".join(pieces)
    fnd = [dict(f) for f in findings] if findings else None
    if fnd:
        section = format_findings(fnd)
        if section:
            extra = ("\n\n" if text else "") + section
            text += extra
            yield Progress(total, total, "findings inserted", data=extra)
    settings = {"template": template, **gen_settings}
    with contextlib.suppress(Exception):  # provenance, never a reason to lose the text
        settings["model"] = {k: v for k, v in model.describe().items()
                             if k in ("device", "precision", "lora", "weights")}
    files: list[str] = []
    for im in imgs:
        sf = (getattr(im, "metadata", {}) or {}).get("source_files") or []
        if sf:
            files = [str(f) for f in sf]
            break
    return ReportResult(
        text=text, model_id=model_id, weights_sha256=sha, prompt=text_prompt,
        template=template if prompt is None else "prompt", settings=settings, time=started,
        elapsed_s=time.perf_counter() - t0, sources=[_source_info(im) for im in imgs],
        findings=fnd, stopped=stopped, source_files=files,
    )


def save_report(result: ReportResult, path: str | Path) -> Path:
    """Write ``result`` as ``.txt`` / ``.md`` / ``.json`` or a DICOM SR ``.dcm`` (atomic)."""
    from ..io.sr import write_report_sr
    from ..io.writers import WriteError, atomic_write

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise WriteError(p, f"unknown report format {suffix or '(none)'}; use "
                         + ", ".join(EXPORT_SUFFIXES))
    if not result.text.strip():
        raise WriteError(p, "the report is empty: nothing to export")
    if suffix == ".dcm":
        return write_report_sr(p, result.text, result.provenance(),
                               source_files=result.source_files or None, banner=result.banner)
    body = {".txt": result.to_text, ".md": result.to_markdown, ".json": result.to_json}[suffix]()

    def _write(tmp: Path) -> None:
        tmp.write_text(body if body.endswith("\n") else body + "\n", encoding="utf-8")

    return atomic_write(p, _write)

