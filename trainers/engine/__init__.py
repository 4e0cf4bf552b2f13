"""The trainer engine shared by every recipe (torchrun, DDP/FSDP2, DCP checkpoints, exact resume).

A recipe subclasses :class:`Recipe`; :func:`main` runs it from the command line. See
``docs/training.md`` and ``trainers/README.md``.
"""

from .config import ConfigError, deep_merge, get
from .distributed import (
    Dist,
    GlobalBatchNorm,
    all_gather_with_grad,
    all_reduce_mean,
    convert_batchnorm,
)
from .loop import (
    NonFiniteLossError,
    TrainError,
    add_engine_arguments,
    lr_factor,
    main,
    run,
    run_cli,
)
from .manifest import ManifestError, Row, image_readable
from .recipe import Recipe, RunContext

__all__ = [
    "Recipe", "RunContext", "main", "run", "run_cli", "add_engine_arguments", "lr_factor",
    "Dist", "GlobalBatchNorm", "convert_batchnorm", "all_gather_with_grad", "all_reduce_mean",
    "ManifestError", "Row", "image_readable", "TrainError", "NonFiniteLossError",
    "ConfigError", "deep_merge", "get",
]
