"""Registry entry for Merlin (torch-free).

sha256 digests of the released files are not pinned here (they could not be verified
offline); ``WeightFile.sha256`` is ``None`` and the weights manager records the digest of
the file actually used, which the Findings widget and CLI report alongside results.
"""

from __future__ import annotations

from ...runtime.registry import ModelSpec, WeightFile

CLIP_CHECKPOINT = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
FIVE_YEAR_CHECKPOINT = "resnet_clinical_longformer_five_year_disease_prediction.pt"

SPECS = [
    ModelSpec(
        id="merlin",
        family="merlin",
        tasks=("embed", "zero-shot", "phenotype", "explain"),
        modalities=("CT",),
        dims=(3,),
        builder="napari_medfm.models.merlin.model:build",
        description=(
            "Merlin 3D CT vision-language model: I3D ResNet-152 image tower (2048-d embedding, "
            "1692 phecode phenotype logits, 512-d contrastive feature) and Clinical-Longformer "
            "text tower for zero-shot findings; optional 5-year disease-risk head."
        ),
        input_spec=(
            "CT volume in HU; resampled to RAS 1.5x1.5x3 mm, window [-1000, 1000] HU -> [0, 1], "
            "padded/cropped to 224x224x160"
        ),
        repo_id="stanfordmimi/Merlin",
        files=(
            WeightFile(
                CLIP_CHECKPOINT,
                sha256=None,
                required=True,
                description="CLIP checkpoint: image tower + Clinical-Longformer text tower (~1.1 GB fp32)",
            ),
            WeightFile(
                FIVE_YEAR_CHECKPOINT,
                sha256=None,
                required=False,
                description="5-year disease prediction: image trunk + 6-output classifier",
            ),
        ),
        licence="MIT",
        citation=(
            "Blankemeier L, Cohen JP, Kumar A, et al. Merlin: A Vision Language Foundation Model "
            "for 3D Computed Tomography. arXiv:2406.06512 (2024)."
        ),
        embedding_dim=2048,
        extras={
            "text_model": "yikuan8/Clinical-Longformer",
            "tokenizer_files": ("vocab.json", "merges.txt"),
            "n_phenotypes": 1692,
            "contrastive_dim": 512,
        },
    ),
    ModelSpec(
        id="clinical-longformer",
        family="merlin",
        tasks=("tokenizer",),
        modalities=("text",),
        dims=(),
        builder="napari_medfm.models.merlin.text:build_tokenizer",
        description=(
            "Clinical-Longformer RoBERTa BPE tokenizer used by Merlin's text tower (zero-shot "
            "findings); files only, no network weights (those are inside Merlin's checkpoint)."
        ),
        input_spec="report text, lower-cased and punctuation-split, max 1024 tokens",
        repo_id="yikuan8/Clinical-Longformer",
        files=(
            WeightFile("vocab.json", description="BPE vocabulary (50265 tokens)"),
            WeightFile("merges.txt", description="BPE merges"),
        ),
        licence="MIT",
        citation=(
            "Li Y, Wehbe RM, Ahmad FS, Wang H, Luo Y. A comparative study of pretrained language "
            "models for long clinical text. JAMIA 30(2):340-347 (2023)."
        ),
    ),
]
