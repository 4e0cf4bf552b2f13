"""Registry entry for RadFM (torch-free).

The weights are published on Hugging Face (``chaoyi-wu/RadFM``) as a split zip
(``RadFM.z01``..``RadFM.z04`` + ``RadFM.zip``, about 50 GB) that unpacks to one fp32
``pytorch_model.bin``. ``medfm weights fetch radfm`` downloads the parts (resumable, each
verified against the hub's LFS sha256), checks the free disk space first and unpacks them;
``pytorch_model.bin`` is the one required file of the model folder. Part sizes and hashes are
not pinned here (they could not be verified offline); the weights manager records the sha256
of the unpacked file, reported as ``weights_sha256``.

Model folder contract (one loader for the release, tests, fine-tuned variants and trainers):
``pytorch_model.bin`` or ``*.safetensors`` (e.g. from ``medfm weights convert radfm``),
optional ``tokenizer.model`` (the LLaMA SentencePiece model), optional ``radfm_config.json``
(missing keys take the released values, see :mod:`napari_medfm.models.radfm.network`).
"""

from __future__ import annotations

from ...runtime.registry import ModelSpec, WeightFile

CHECKPOINT = "pytorch_model.bin"
TOKENIZER = "tokenizer.model"
CONFIG_FILE = "radfm_config.json"
ARCHIVE_PARTS = ("RadFM.z01", "RadFM.z02", "RadFM.z03", "RadFM.z04", "RadFM.zip")

SPECS = [
    ModelSpec(
        id="radfm",
        family="radfm",
        tasks=("report", "findings"),
        modalities=("CT", "MR", "CXR", "fundus", "pathology", "US", "OT"),
        dims=(2, 3),
        builder="napari_medfm.models.radfm.model:build",
        description=(
            "RadFM generalist radiology foundation model: 3D ViT (32x32x4 patches) + Perceiver "
            "(32 latents per image) + MedLLaMA-13B. Draft reports, visual question answering "
            "and yes/no finding probabilities for 2D (CXR, fundus, pathology) and 3D (CT, MR) "
            "images. 13B parameters: ~26 GB GPU memory in bf16 (8-/4-bit and CPU offload "
            "available)."
        ),
        input_spec=(
            "2D: RGB resized to 512x512, [0, 1], replicated to depth 4; 3D: 3 channels, 512x512 "
            "in-plane, depth <= 64 snapped to a multiple of 4, global min-max (optional window)"
        ),
        repo_id="chaoyi-wu/RadFM",
        files=(
            WeightFile(CHECKPOINT, required=True,
                       description="fp32 state dict unpacked from the split zip (~54 GB)"),
            *(WeightFile(p, required=False,
                         description=f"split-zip part {i + 1}/{len(ARCHIVE_PARTS)} of the release")
              for i, p in enumerate(ARCHIVE_PARTS)),
            WeightFile(TOKENIZER, required=False,
                       description="LLaMA SentencePiece tokenizer (RadFM Quick_demo Language_files)"),
            WeightFile(CONFIG_FILE, required=False,
                       description="optional network sizes (missing keys = released values)"),
        ),
        licence="Apache-2.0 (code); weights: see hf.co/chaoyi-wu/RadFM",
        citation=(
            "Wu C, Zhang X, Zhang Y, Wang Y, Xie W. Towards Generalist Foundation Model for "
            "Radiology by Leveraging Web-scale 2D&3D Medical Data. arXiv:2308.02463 (2023)."
        ),
        extras={
            "exclusive": True,
            # the release as published: parts in disk order (the .zip is the last disk)
            "archive": {
                "parts": ARCHIVE_PARTS,
                "members": (CHECKPOINT,),
                "download_size_estimate": 50_000_000_000,
                "unpacked_size_estimate": 54_000_000_000,
            },
            "converter": "napari_medfm.models.radfm.convert:convert_cli",
            "tokenizer_file": TOKENIZER,
            "config_file": CONFIG_FILE,
        },
    ),
]
