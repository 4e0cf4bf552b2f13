"""``medfm report`` with merlin-report tiny: streamed text, --json provenance, --sr from a
DICOM series, and the bad-input errors (nothing written)."""

from __future__ import annotations

import json
import shutil

import pytest

from napari_medfm.cli import main
from napari_medfm.io.sr import BANNER, read_report_sr
from tests._report_helpers import tiny_report_folder
from tests.conftest import real_path

CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"
CT_DICOM = "ct/dcmqi_ct3slice"
CXR = "cxr/tbx11k/h0001.png"


@pytest.fixture(scope="module")
def folder():
    return tiny_report_folder()


def test_cli_streams_text_and_writes_txt(folder, tmp_path, capsys):
    out = tmp_path / "draft.md"
    rc = main(["report", "--model", "merlin-report", "--weights", str(folder), "--device", "cpu",
               str(real_path(CT_SMALL)), "--max-new-tokens", "3", "--output", str(out)])
    cap = capsys.readouterr()
    assert rc == 0
    assert BANNER in cap.err and "weights sha256" in cap.err
    assert cap.out.strip()  # the streamed text
    md = out.read_text()
    assert BANNER in md and cap.out.strip() in md


def test_cli_json_and_sr_from_dicom(folder, tmp_path, capsys):
    sr = tmp_path / "draft.dcm"
    rc = main(["report", "--model", "merlin-report", "--weights", str(folder), "--device", "cpu",
               str(real_path(CT_DICOM)), "--max-new-tokens", "2", "--json", "--sr", str(sr)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out)
    assert doc["model_id"] == "merlin-report" and len(doc["weights_sha256"]) == 64
    assert doc["settings"]["max_new_tokens"] == 2 and doc["banner"] == BANNER
    assert doc["prompt"].startswith("Generate a radiology report for {organ}")
    assert len(doc["study_instance_uids"]) == 1 and doc["written"] == [str(sr)]
    back = read_report_sr(sr)
    assert back["text"] == doc["text"] and back["study_instance_uid"] == \
        doc["study_instance_uids"][0]
    assert back["provenance"]["weights_sha256"] == doc["weights_sha256"]
    assert len(back["referenced_sop_instance_uids"]) == 3


def test_cli_bad_inputs_write_nothing(folder, tmp_path, capsys):
    sr = tmp_path / "x.dcm"
    base = ["report", "--model", "merlin-report", "--weights", str(folder), "--device", "cpu",
            "--sr", str(sr)]
    assert main([*base, str(real_path(CXR))]) == 2
    assert "3D" in capsys.readouterr().err
    assert main([*base, str(real_path(CT_SMALL)), "--prompt", " "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main([*base, str(real_path(CT_SMALL)), "--template", "impression"]) == 2
    assert "impression" in capsys.readouterr().err
    notok = tmp_path / "notok"
    shutil.copytree(folder, notok, ignore=shutil.ignore_patterns("tokenizer"))
    assert main(["report", "--model", "merlin-report", "--weights", str(notok), "--sr", str(sr),
                 str(real_path(CT_SMALL))]) == 2
    assert "tokenizer not found" in capsys.readouterr().err
    assert main(["report", "--model", "merlin-report", "--weights", str(folder),
                 "--sr", str(tmp_path / "no" / "x.dcm"), str(real_path(CT_SMALL))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not sr.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notok"]
