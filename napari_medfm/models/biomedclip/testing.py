"""Offline stand-in for BiomedCLIP's released files, for tests and benchmarks.

:func:`save_random_hub_folder` writes a BiomedCLIP-shaped model with random weights in the hub
layout: ``open_clip_config.json`` (old-style ``proj``/``pooler_type`` keys and hub ids in
``hf_model_name``/``hf_tokenizer_name``, as in older copies of the release),
``open_clip_pytorch_model.bin`` (a plain state dict that still carries
``text.transformer.embeddings.position_ids``) and ``text/`` (BERT ``config.json``, a
WordPiece ``vocab.txt`` and tokenizer files). ``tiny=True`` uses a ViT-Ti/16 and a 2-layer
BERT (seconds on a CPU); ``tiny=False`` the released architecture (ViT-B/16, BERT-base).
Nothing here touches the network.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .spec import CHECKPOINT, CONFIG, REPO, TEXT_DIR, TEXT_REPO

__all__ = ["save_random_hub_folder", "tiny_config", "write_text_folder"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WORDS = """a an the of with without no normal abnormal photo this is x-ray chest lung lungs heart
effusion pleural pneumothorax cardiomegaly edema opacity nodule mass fracture tissue image tumour
tumor stroma mucus muscle fat adipose lymphocytes debris background retina fundus glaucoma
macular degeneration diabetic retinopathy optic disc right left small large bilateral""".split()  # noqa: SIM905


def tiny_config(tiny: bool = True) -> dict:
    """An ``open_clip_config.json`` document shaped like BiomedCLIP's."""
    return {
        "model_cfg": {
            "embed_dim": 64 if tiny else 512,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224" if tiny
                           else "vit_base_patch16_224",
                           "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": TEXT_REPO, "hf_tokenizer_name": TEXT_REPO,
                         "proj": "mlp", "pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 256},
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return specials + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + \
        sorted(set(_WORDS))


def write_text_folder(dest: str | Path, tiny: bool = True, *, with_config: bool = True) -> Path:
    """``dest`` gets a BERT ``config.json`` (unless ``with_config`` is False) and tokenizer files."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab = _vocab() if tiny else _vocab() + [f"[unused{i}]" for i in range(30522 - len(_vocab()))]
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}),
        "utf-8")
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}), "utf-8")
    if with_config:
        (dest / "config.json").write_text(json.dumps({
            "architectures": ["BertForMaskedLM"], "model_type": "bert",
            "vocab_size": len(vocab), "hidden_size": 64 if tiny else 768,
            "num_hidden_layers": 2 if tiny else 12, "num_attention_heads": 2 if tiny else 12,
            "intermediate_size": 128 if tiny else 3072, "max_position_embeddings": 512,
            "type_vocab_size": 2, "pad_token_id": 0, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "layer_norm_eps": 1e-12, "initializer_range": 0.02}, indent=1), "utf-8")
    return dest


def save_random_hub_folder(dest: str | Path, *, tiny: bool = True, seed: int = 0,
                           text_folder: bool = True, logit_scale: float = 100.0) -> Path:
    """Write a random-weight BiomedCLIP-shaped model in the hub layout into ``dest``.

    ``text_folder=False`` leaves the tokenizer files at the root (as in the BiomedCLIP repo)
    and puts the BERT config in ``dest/../biomedbert`` (as in the BiomedBERT repo), for tests
    of :func:`napari_medfm.runtime.weights.assemble_text_folder`.
    """
    from .model import build_network, read_config

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CONFIG).write_text(json.dumps(tiny_config(tiny), indent=2), "utf-8")
    write_text_folder(dest / TEXT_DIR, tiny)
    torch.manual_seed(seed)
    net = build_network(read_config(dest)["model_cfg"])
    with torch.no_grad():
        net.logit_scale.fill_(float(torch.log(torch.tensor(logit_scale))))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # as in the released .bin: BERT's position_ids buffer is still there
    sd["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(sd, dest / CHECKPOINT)
    (dest / "README.md").write_text(f"Random-weight stand-in shaped like {REPO} (tests only).\n",
                                    "utf-8")
    if not text_folder:
        text = dest / TEXT_DIR
        bert = dest.parent / "biomedbert"
        bert.mkdir(exist_ok=True)
        (text / "config.json").replace(bert / "config.json")
        for f in text.iterdir():
            f.replace(dest / f.name)
        text.rmdir()
    return dest
