"""The report task (streaming, stop/close, provenance, findings) and its exports (.txt, .md,
.json, DICOM Comprehensive SR read back with highdicom), with merlin-report tiny and a
scripted generator."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm.errors import EmptyPromptError, MedfmError, WrongModalityError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.io.writers import WriteError
from napari_medfm.models.merlin_report.spec import CHECKPOINTS, ORGAN_PROMPT
from napari_medfm.progress import drain
from napari_medfm.tasks.report import (
    BANNER,
    prompt_for,
    report_task,
    save_report,
    templates_for,
)
from tests._report_helpers import EchoGenerator, register_echo, tiny_report_folder
from tests.conftest import real_path

CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"
CT_DICOM = "ct/dcmqi_ct3slice"


@pytest.fixture(scope="module")
def folder():
    return tiny_report_folder()


@pytest.fixture(scope="module")
def ct():
    return MedicalImage.from_sitk(sitk.ReadImage(str(real_path(CT_SMALL))), modality="CT",
                                  name="example_ct_sm")


@pytest.fixture(scope="module")
def dicom_ct():
    from napari_medfm.io import read

    vols = [im for im in read(real_path(CT_DICOM)) if im.kind == "volume"]
    assert vols and vols[0].metadata.get("source_files")
    return vols[0]


@pytest.fixture(autouse=True)
def _echo():
    register_echo()


def _run(gen):
    pieces = []
    res = drain(gen, lambda p: pieces.append(p.data) if p.data is not None else None)
    return res, pieces


def test_templates_and_prompts():
    assert templates_for("merlin-report") == ["full report", "findings", "organs", "question"]
    assert "impression" in templates_for("test-echo")
    assert prompt_for("merlin-report", "full report") == ORGAN_PROMPT
    assert prompt_for("merlin-report", "organs") == ORGAN_PROMPT
    with pytest.raises(MedfmError, match="impression"):
        prompt_for("merlin-report", "impression")
    with pytest.raises(MedfmError, match="Merlin"):
        prompt_for("test-echo", "organs")
    assert prompt_for("test-echo", "question", question="Is there a fracture") == \
        "Is there a fracture?"
    assert prompt_for("test-echo", "impression").endswith(".")
    for bad in (dict(template="question", question="  "), dict(prompt="")):
        with pytest.raises(EmptyPromptError):
            prompt_for("test-echo", **bad)


def test_merlin_report_task_streams_with_provenance(folder, ct):
    res, pieces = _run(report_task("merlin-report", ct, weights=folder, device="cpu",
                                   max_new_tokens=4))
    assert pieces and "".join(pieces) == res.text
    assert res.model_id == "merlin-report" and res.prompt == ORGAN_PROMPT
    sha = hashlib.sha256((folder / CHECKPOINTS[0]).read_bytes()).hexdigest()
    assert res.weights_sha256 == sha
    assert res.settings["max_new_tokens"] == 4 and res.settings["template"] == "full report"
    assert res.settings["model"]["lora"] == "unmerged"
    datetime.fromisoformat(res.time)
    assert res.sources[0]["name"] == "example_ct_sm" and not res.stopped
    prov = res.provenance()
    assert prov["banner"] == BANNER and prov["study_instance_uids"] == []


def test_2d_image_refused_before_loading(tmp_path):
    cxr = MedicalImage(np.zeros((32, 32), np.float32), Geometry.identity(2), modality="DX",
                       kind="image2d", name="cxr")
    # the weights folder does not exist: the dims check must come first
    with pytest.raises(WrongModalityError, match="3D"):
        next(report_task("merlin-report", cxr, weights=tmp_path / "none"))
    with pytest.raises(EmptyPromptError):
        next(report_task("merlin-report", cxr, template="question", question=""))


def test_close_stops_at_next_yield(ct):
    model = EchoGenerator()
    gen = report_task("test-echo", ct, model=model)
    seen = []
    for p in gen:
        if p.data is not None:
            seen.append(p.data)
            if len(seen) == 2:
                break
    gen.close()
    assert model.produced == 2  # nothing generated after the close


def test_stop_event_returns_partial_result(ct):
    model = EchoGenerator()
    stop = threading.Event()
    gen = report_task("test-echo", [ct], model=model, stop=stop, template="impression")

    def cb(p):
        if p.data is not None:
            stop.set()

    res = drain(gen, cb)
    assert res.stopped and res.text == "No" and model.produced == 1
    assert res.template == "impression" and model.calls[0]["prompt"].startswith("Please give")


def test_findings_inserted(ct):
    findings = [{"finding": "pleural effusion", "probability": 0.8234},
                {"finding": "splenomegaly", "probability": 0.05, "similarity_positive": 0.1}]
    res, pieces = _run(report_task("test-echo", ct, model=EchoGenerator("Normal."),
                                   findings=findings, max_new_tokens=5))
    assert res.text.startswith("Normal.\n\nFinding probabilities")
    assert "- pleural effusion: 0.82" in res.text and "- splenomegaly: 0.05" in res.text
    assert "".join(pieces) == res.text
    assert res.provenance()["findings_inserted"] and res.to_dict()["findings"][0]["probability"]


def test_exports_text_md_json(ct, tmp_path):
    res, _ = _run(report_task("test-echo", ct, model=EchoGenerator()))
    res = res.with_text(res.text + " Edited.")
    assert res.edited
    txt = save_report(res, tmp_path / "r.txt").read_text()
    assert txt.startswith(BANNER) and "Edited." in txt and "e" * 64 in txt
    md = save_report(res, tmp_path / "r.md").read_text()
    assert BANNER in md and "## Provenance" in md
    doc = json.loads(save_report(res, tmp_path / "r.json").read_text())
    assert doc["text"].endswith("Edited.") and doc["weights_sha256"] == "e" * 64
    assert doc["edited"] is True and doc["prompt"] == res.prompt
    with pytest.raises(WriteError, match="unknown report format"):
        save_report(res, tmp_path / "r.pdf")
    with pytest.raises(WriteError, match="does not exist"):
        save_report(res, tmp_path / "missing" / "r.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.txt"]


def test_sr_references_the_dicom_study(dicom_ct, tmp_path):
    import highdicom as hd
    import pydicom

    from napari_medfm.io.sr import read_report_sr

    res, _ = _run(report_task("test-echo", dicom_ct, model=EchoGenerator(),
                              template="question", question="Is the liver normal"))
    out = save_report(res.with_text("Liver: normal. Café ü."), tmp_path / "draft.dcm")
    sr = hd.sr.srread(out)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_ct.metadata["source_files"]]
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID  # joins the source study
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"
    assert "not for diagnostic use" in sr.SeriesDescription
    back = read_report_sr(out)
    assert back["banner"] == BANNER and back["text"] == "Liver: normal. Café ü."
    assert back["model_id"] == "test-echo" and back["weights"].endswith("e" * 64)
    prov = back["provenance"]
    assert prov["prompt"] == "Is the liver normal?" and prov["time"] == res.time
    assert prov["settings"]["template"] == "question" and prov["edited"] is True
    assert prov["study_instance_uids"] == [str(src[0].StudyInstanceUID)]
    assert sorted(back["referenced_sop_instance_uids"]) == sorted(str(d.SOPInstanceUID)
                                                                   for d in src)


def test_sr_without_dicom_and_nothing_half_written(ct, tmp_path, monkeypatch):
    import highdicom as hd

    from napari_medfm.io.sr import read_report_sr

    res, _ = _run(report_task("test-echo", ct, model=EchoGenerator()))
    out = save_report(res, tmp_path / "a.dcm")
    back = read_report_sr(out)
    assert back["text"] == res.text and back["referenced_sop_instance_uids"] == []
    assert hd.sr.srread(out).CompletionFlag == "PARTIAL"

    def boom(*a, **k):
        raise ValueError("simulated failure")

    monkeypatch.setattr(hd.sr, "ComprehensiveSR", boom)
    with pytest.raises(WriteError, match="simulated failure"):
        save_report(res, tmp_path / "b.dcm")
    with pytest.raises(WriteError, match="empty"):
        save_report(res.with_text("  "), tmp_path / "c.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]  # no partial file, no debris
