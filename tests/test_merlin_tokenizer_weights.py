"""The Clinical-Longformer tokenizer goes through the one weights manager (import/verify/resolve)."""

from __future__ import annotations

import json

import pytest

from napari_medfm.cli import main


def _train_roberta_tokenizer(folder):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    corpus = ["no acute abnormality of the liver", "splenomegaly is present", "pleural effusion",
              "the gallbladder is surgically absent", "hydronephrosis of the left kidney"] * 20
    tok.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(folder))  # vocab.json + merges.txt, RoBERTa layout
    return folder


def test_import_then_found_by_merlin_and_registry(tmp_path, capsys):
    from napari_medfm.models.merlin.text import TOKENIZER_SPEC_ID, find_tokenizer_dir
    from napari_medfm.runtime.paths import weights_dir
    from napari_medfm.runtime.registry import get_spec, list_specs, load_model

    spec = get_spec(TOKENIZER_SPEC_ID)
    assert spec.repo_id == "yikuan8/Clinical-Longformer"
    assert TOKENIZER_SPEC_ID not in [s.id for s in list_specs(task="zero-shot")]  # not a model pick

    from napari_medfm.errors import WeightsError

    with pytest.raises(WeightsError, match=f"medfm weights fetch {TOKENIZER_SPEC_ID}"):
        find_tokenizer_dir()

    src = _train_roberta_tokenizer(tmp_path / "hub_layout")
    assert main(["weights", "import", TOKENIZER_SPEC_ID, str(src)]) == 0
    assert find_tokenizer_dir() == weights_dir() / TOKENIZER_SPEC_ID
    tok = load_model(TOKENIZER_SPEC_ID)
    ids = tok("Splenomegaly is present.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 3
    capsys.readouterr()
    assert main(["weights", "verify", TOKENIZER_SPEC_ID]) == 0
    out = capsys.readouterr().out
    assert "vocab.json" in out and "merges.txt" in out


def test_fetch_is_refused_offline_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["weights", "fetch", "clinical-longformer"])
    err = capsys.readouterr().err
    assert rc == 2 and "HF_HUB_OFFLINE" in err
    assert json.dumps(err)  # a plain one-line message, no traceback
    assert "Traceback" not in err
