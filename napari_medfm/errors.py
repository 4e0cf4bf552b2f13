"""Exceptions with messages meant for users (they name the file and the cause)."""

from __future__ import annotations

from pathlib import Path


class MedfmError(Exception):
    """Base class for every error napari-medfm raises on purpose."""


class UnsupportedFormatError(MedfmError):
    """The path is not something any of our readers handles."""


class ReadError(MedfmError):
    """A file we do handle could not be read; the message names the file and the cause."""

    def __init__(self, path: str | Path | None, cause: str):
        self.path = None if path is None else Path(path)
        self.cause = cause
        where = f"{Path(path).name}: " if path is not None else ""
        super().__init__(f"{where}{cause}")


class MissingDecoderError(ReadError):
    """Compressed pixel data needs a decoder package that is not installed."""


class MixedSeriesError(MedfmError):
    """A folder holds several series/modalities and the caller asked for exactly one."""


class GeometryError(MedfmError):
    """Geometry is inconsistent (e.g. labels not on the image grid)."""


class WrongModalityError(MedfmError):
    """A model was given an image it is not made for (e.g. a 2D CXR to a 3D CT model)."""


class WeightsError(MedfmError):
    """Weights are missing, corrupt (hash mismatch) or do not match the model."""


class CancelledError(MedfmError):
    """A long-running task was cancelled by the user; nothing was written."""


class MissingTokenizerError(WeightsError):
    """A model's tokenizer files are not where the model folder contract says."""


class VolumeTooLargeError(MedfmError):
    """The input volume cannot be preprocessed within the free memory."""


class EmptyPromptError(MedfmError):
    """A text-generation task was given an empty prompt or question."""
