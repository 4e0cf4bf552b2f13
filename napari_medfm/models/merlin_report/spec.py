"""Registry entry for Merlin's report generator (torch-free).

The released checkpoint is one flat fp32 state dict (~26.6 GiB) holding the image trunk, the
adapter and the whole LoRA-wrapped RadLLaMA-7b; besides it only RadLLaMA-7b's SentencePiece
``tokenizer.model`` is needed (see :mod:`napari_medfm.models.merlin_report.model` for the
model-folder contract). sha256 digests are not pinned (they could not be verified offline):
the digest of the file actually loaded is recorded in every report's provenance.
"""

from __future__ import annotations

from ...runtime.registry import ModelSpec, WeightFile

#: Released file names on ``stanfordmimi/Merlin`` (same key layout); the first is the default.
CHECKPOINTS = (
    "resnet_gpt2_best_stanford_report_generation_average_mtl.pt",
    "resnet_gpt2_best_stanford_report_generation_average.pt",
)
CONFIG_FILE = "merlin_report_config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_REPO = "StanfordAIMI/RadLLaMA-7b"

#: The organ prompts of the release, in report order.
ORGANS = (
    "lower thorax", "liver", "gallbladder", "spleen", "pancreas", "adrenal glands", "kidneys",
    "bowel", "peritoneum", "pelvic", "circulatory", "lymph nodes", "musculoskeletal",
)
#: ``{organ}`` is replaced by each organ in turn; each answer is cut at the first ``###``.
ORGAN_PROMPT = "Generate a radiology report for {organ}###\n"
SECTION_END = "###"

SPECS = [
    ModelSpec(
        id="merlin-report",
        family="merlin",
        tasks=("report",),
        modalities=("CT",),
        dims=(3,),
        builder="napari_medfm.models.merlin_report.model:build",
        description=(
            "Merlin's abdominal-CT report generator: I3D ResNet-152 trunk (490 image tokens) -> "
            "linear adapter -> RadLLaMA-7b with LoRA (r 512, q/v); writes the findings organ by "
            "organ (13 prompts), greedy with repetition penalty 1.2."
        ),
        input_spec=(
            "CT volume in HU; Merlin's preprocessing (RAS 1.5x1.5x3 mm, [-1000, 1000] HU -> "
            "[0, 1], 224x224x160)"
        ),
        repo_id="stanfordmimi/Merlin",
        files=(
            WeightFile(CHECKPOINTS[0], sha256=None, required=True,
                       description="report generator (merlin-vlm 0.0.7 default), fp32 ~26.6 GiB"),
            WeightFile(CHECKPOINTS[1], sha256=None, required=False,
                       description="earlier 'Stage 1 + Stage 2' report generator, same layout"),
        ),
        licence="MIT (Merlin); RadLLaMA-7b: see its model card",
        citation=(
            "Blankemeier L, Cohen JP, Kumar A, et al. Merlin: A Vision Language Foundation Model "
            "for 3D Computed Tomography. arXiv:2406.06512 (2024)."
        ),
        extras={
            "exclusive": True,
            "tokenizer_repo": TOKENIZER_REPO,
            "tokenizer_files": (TOKENIZER_FILE,),
            "organs": ORGANS,
        },
    ),
]
