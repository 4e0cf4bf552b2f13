"""Registry entry for BiomedCLIP (torch-free).

Hub layout the weights manager expects in ``$MEDFM_HOME/weights/biomedclip/`` (or ``--weights
DIR``): ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` (or open_clip's own
``open_clip_model.safetensors``) as in the BiomedCLIP repository, and the text tower's
transformers files in ``text/``: ``config.json`` (from the BiomedBERT repository, which holds
the BERT config the BiomedCLIP repository lacks) and the tokenizer files of the BiomedCLIP
repository (``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``).
``medfm weights fetch biomedclip`` assembles ``text/`` from the two repositories
(:data:`FILE_SOURCES`); :func:`napari_medfm.runtime.weights.assemble_text_folder` does the
same from local copies.
"""

from __future__ import annotations

from ...runtime.registry import ModelSpec, WeightFile

REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
TEXT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CONFIG = "open_clip_config.json"
CHECKPOINT = "open_clip_pytorch_model.bin"
SAFETENSORS = "open_clip_model.safetensors"
TEXT_DIR = "text"
#: tokenizer files at the root of the BiomedCLIP repository, copied into ``text/``
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")

#: ``text/<name>`` -> (hub repository, file name there): where ``fetch`` takes each file.
FILE_SOURCES = {
    f"{TEXT_DIR}/config.json": (TEXT_REPO, "config.json"),
    **{f"{TEXT_DIR}/{n}": (REPO, n) for n in TOKENIZER_FILES},
}

#: Modalities with a shipped prompt set (``prompts/<file>``).
PROMPT_FILES = {"CXR": "cxr.yaml", "pathology": "pathology.yaml", "fundus": "fundus.yaml"}

SPECS = [
    ModelSpec(
        id="biomedclip",
        family="biomedclip",
        tasks=("embed", "text-embed", "zero-shot", "retrieval"),
        modalities=("CXR", "pathology", "fundus", "CT", "MR", "ultrasound", "dermatology",
                    "OCT"),
        dims=(2,),
        builder="napari_medfm.models.biomedclip.model:build",
        description=(
            "BiomedCLIP: ViT-B/16 image tower and PubMedBERT text tower trained on 15M "
            "PubMed figure-caption pairs; 512-d L2-normalised image and text embeddings in one "
            "space (zero-shot findings, text-to-image search). 2D images; CT/MR one slice."
        ),
        input_spec=("2D image as RGB: bicubic resize of the short side to 224 (antialiased), "
                    "centre crop 224, OpenAI CLIP mean/std (no per-modality statistics)"),
        repo_id=REPO,
        files=(
            WeightFile(CONFIG, description="open_clip model and preprocessing config"),
            WeightFile(CHECKPOINT, required=False,
                       description="state dict: ViT + BERT text tower (784 MB); or "
                       f"{SAFETENSORS}"),
            WeightFile(f"{TEXT_DIR}/config.json",
                       description=f"BERT config of the text tower (from {TEXT_REPO})"),
            WeightFile(f"{TEXT_DIR}/vocab.txt", description="WordPiece vocabulary"),
            WeightFile(f"{TEXT_DIR}/tokenizer_config.json", required=False,
                       description="tokenizer settings"),
            WeightFile(f"{TEXT_DIR}/special_tokens_map.json", required=False,
                       description="special tokens"),
        ),
        licence="MIT",
        citation=("Zhang S, Xu Y, Usuyama N, et al. BiomedCLIP: a multimodal biomedical "
                  "foundation model pretrained from fifteen million scientific image-text "
                  "pairs. NEJM AI (2024); arXiv:2303.00915."),
        embedding_dim=512,
        extras={"file_sources": FILE_SOURCES, "text_model": TEXT_REPO,
                "prompt_files": PROMPT_FILES, "context_length": 256},
    ),
]
