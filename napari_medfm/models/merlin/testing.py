"""Offline stand-ins for Merlin's released files, for tests and benchmarks.

* :func:`random_state_dict` / :func:`save_random_checkpoint` - a checkpoint with exactly the
  released key layout (``logit_scale``, ``encode_image.i3_resnet.*``, ``encode_text.*``) and
  random weights (batch-norm statistics randomised too, so folding them is really exercised).
* :func:`save_random_five_year` - the 5-year layout (unprefixed trunk + 6-output classifier).
* :func:`train_tokenizer` - a byte-level BPE tokenizer trained offline with ``tokenizers`` and
  saved in RoBERTa format (``vocab.json`` + ``merges.txt``), loadable by transformers.

Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .model import CONFIGS, MerlinCLIP, five_year_net
from .network import I3DResNet
from .text import MerlinTextEncoder

__all__ = ["random_state_dict", "save_random_checkpoint", "save_random_five_year",
           "train_tokenizer", "randomize_batchnorm"]

_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return module


def random_state_dict(config: str = "tiny", seed: int = 0, with_text: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Released CLIP-checkpoint layout with random weights (``config``: "tiny" or "full")."""
    torch.manual_seed(seed)
    image_cfg, text_cfg = CONFIGS[config]
    image = randomize_batchnorm(I3DResNet(image_cfg), seed)
    if not with_text:
        return {f"encode_image.i3_resnet.{k}": v for k, v in image.state_dict().items()}
    clip = MerlinCLIP(image, MerlinTextEncoder(text_cfg, with_pooler=True))
    with torch.no_grad():
        clip.logit_scale.fill_(4.6052)
    return dict(clip.state_dict())


def save_random_checkpoint(path: str | Path, config: str = "tiny", seed: int = 0,
                           with_text: bool = True) -> Path:
    """``torch.save`` a random released-layout checkpoint to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(config, seed, with_text), path)
    return path


def save_random_five_year(path: str | Path, config: str = "tiny", seed: int = 1) -> Path:
    """``torch.save`` a random 5-year checkpoint (unprefixed trunk + 6-output classifier)."""
    torch.manual_seed(seed)
    net = randomize_batchnorm(five_year_net(CONFIGS[config][0]), seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(net.state_dict()), path)
    return path


_CORPUS = (
    "liver : normal . gallbladder : normal . spleen : normal . pancreas : normal .",
    "there is a small right pleural effusion with adjacent atelectasis .",
    "kidneys and ureters : no hydronephrosis . no renal calculi . simple renal cyst .",
    "moderate ascites . the spleen is enlarged . hepatic steatosis .",
    "no bowel obstruction . the appendix is normal . no free air .",
    "atherosclerotic calcification of the abdominal aorta without aneurysm .",
)


def train_tokenizer(folder: str | Path, vocab_size: int = 400,
                    corpus: Iterable[str] = _CORPUS) -> Path:
    """Train a RoBERTa-style byte-level BPE tokenizer offline and save it in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(list(corpus) * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=_SPECIALS, show_progress=False)
    tok.save_model(str(folder))
    return folder
