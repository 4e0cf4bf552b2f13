"""RadFM through the report task, ``medfm report`` and the Report dock: a tiny random RadFM
folder (SentencePiece tokenizer trained here on the IU X-ray reports) drafts for a real chest
X-ray (2D) and answers a question about a real CT (3D); the text is the model's own greedy
decode of the same prompt, and the dock streams it into the editor and exports it."""

from __future__ import annotations

import json

import pytest
from conftest import real_path

from napari_medfm.cli import main

CXR = "cxr/tbx11k/h0001.png"
CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import sentencepiece as spm

    from napari_medfm.models.merlin_report.testing import report_corpus
    from napari_medfm.models.radfm.testing import tiny_config, train_tokenizer, write_model_folder

    texts = report_corpus(real_path("cxr/reports_iu_xray"))
    d = tmp_path_factory.mktemp("radfm-report")
    tok = train_tokenizer(texts, d / "tok.model", vocab_size=400)
    vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    return write_model_folder(d / "radfm", tiny_config(vocab_size=vocab), tokenizer=tok)


def _reference_text(folder, path, prompt, tokens):
    """The model's own non-streamed greedy decode (ids decoded once) of the same prompt."""
    from napari_medfm import load_model
    from napari_medfm.io import read

    model = load_model("radfm", weights=folder, device="cpu")
    img = next(im for im in read(path) if im.kind in ("volume", "image2d"))
    return model.generate([img], prompt, max_new_tokens=tokens)


def test_cli_drafts_for_a_chest_xray_as_the_model_decodes(folder, capsys):
    from napari_medfm.tasks.report import prompt_for

    rc = main(["report", "--model", "radfm", "--weights", str(folder), "--device", "cpu",
               "--max-new-tokens", "6", "--json", str(real_path(CXR))])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out)
    assert doc["model_id"] == "radfm" and len(doc["weights_sha256"]) == 64
    assert doc["prompt"] == prompt_for("radfm") and doc["settings"]["max_new_tokens"] == 6
    assert doc["sources"][0]["shape"] == [512, 512]
    want = _reference_text(folder, real_path(CXR), doc["prompt"], 6)
    assert doc["text"].strip() == want.strip()


def test_cli_answers_a_question_about_a_ct(folder, capsys, tmp_path):
    out = tmp_path / "answer.txt"
    rc = main(["report", "--model", "radfm", "--weights", str(folder), "--device", "cpu",
               "--question", "Is there a pleural effusion", "--max-new-tokens", "4",
               "--json", "--output", str(out), str(real_path(CT_SMALL))])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out)
    assert doc["prompt"] == "Is there a pleural effusion?"
    assert len(doc["sources"][0]["shape"]) == 3
    want = _reference_text(folder, real_path(CT_SMALL), doc["prompt"], 4)
    assert doc["text"].strip() == want.strip()
    assert doc["written"] == [str(out)] and doc["text"].strip() in out.read_text()


@pytest.mark.gui
def test_dock_streams_radfm_on_a_chest_xray(make_napari_viewer, qtbot, folder, tmp_path):
    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import read
    from napari_medfm.widgets import block_triton_in_gui
    from napari_medfm.widgets.report import ReportWidget

    block_triton_in_gui()
    viewer = make_napari_viewer()
    img = read(real_path(CXR))[0]
    data, kwargs, _ = layer_tuple(img)
    layer = viewer.add_image(data, **kwargs)
    w = ReportWidget(viewer)
    w.set_model("radfm")
    w.weights_edit.setText(str(folder))
    w.device_combo.setCurrentText("cpu")
    w.tokens_spin.setValue(6)
    w.stream_interval_s = 0.0
    assert [i.text() for i in w.layer_list.selectedItems()] == [layer.name]
    pieces = []
    worker = w.run()
    assert worker is not None
    worker.yielded.connect(lambda p: pieces.append(p.data) if p.data is not None else None)
    qtbot.waitUntil(lambda: w.result is not None, timeout=120_000)
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)
    res = w.result
    assert res.model_id == "radfm" and pieces
    assert w.editor.toPlainText() == res.text
    assert res.text.strip() == _reference_text(folder, real_path(CXR), res.prompt, 6).strip()
    out = tmp_path / "draft.md"
    w.export(out)
    qtbot.waitUntil(lambda: w.last_export == out, timeout=30_000)
    assert res.text.strip() in out.read_text()
