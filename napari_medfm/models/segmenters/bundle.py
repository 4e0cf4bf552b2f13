"""MONAI bundles (model-zoo folder layout) as segmenters, addressed as ``bundle:PATH``.

A bundle folder holds ``configs/inference.json`` (or ``.yaml``), ``configs/metadata.json`` and
``models/model.pt`` (a plain state dict, loaded with ``weights_only=True`` and strictly) or
``models/model.ts`` (TorchScript). The bundle's **own** ``preprocessing``, ``inferer`` and
``postprocessing`` are parsed with :class:`monai.bundle.ConfigParser` and used as they are,
with three substitutions so it runs on an in-memory image with progress and cancel:

1. **LoadImaged is replaced by the in-memory image.** The image becomes what ``LoadImage`` would
   return for the same data read from a NIfTI file: a float32 ``MetaTensor`` in (i, j, k) index
   order with its index -> RAS affine (:func:`napari_medfm.runtime.inference.to_metatensor`), plus
   a channel axis when the bundle's LoadImaged sets ``ensure_channel_first``. Every other
   pre-transform (EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged, ...) runs
   unchanged, so ``Invertd`` in the post-processing finds the usual trace.
2. **The inferer's window loop runs as our generator**
   (:func:`napari_medfm.runtime.sliding_window.sliding_window_gen`) with the bundle inferer's
   ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ``sigma_scale``, ``padding_mode`` and
   ``cval`` (the CLI/widget may override roi, overlap and batch size): same numbers, one progress
   event per window batch, cancellable between batches.
3. **Writers (SaveImage/SaveImaged) are dropped** from the post-processing: the plugin writes
   outputs itself (NIfTI/NRRD/DICOM-SEG on the source geometry).

The result goes back onto the input grid through the bundle's own ``Invertd``; a bundle without
it gets its labels resampled nearest-neighbour (SimpleITK) from the prediction's affine grid.

Label names come from ``metadata.json`` -> ``network_data_format.outputs.pred.channel_def``
(``{"0": "background", "1": "spleen"}``); channel ``k`` after argmax is label value ``k``.

.. warning:: A bundle config is code: ``$``-expressions are evaluated by MONAI's parser. A
   bundle folder is parsed only once the user trusted it (:mod:`napari_medfm.runtime.trust`:
   its content hash is remembered; the CLI needs ``--trust-bundle``, the dock asks). The weights
   themselves are loaded safely.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import GeometryError, MedfmError, WeightsError
from ...io.types import MedicalImage
from ...runtime.checks import check_ct
from ...runtime.inference import WindowPlan, resample_labels_to, to_metatensor
from .base import BUNDLE_PREFIX, SegmentSettings, WindowedSegmenter

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_WRITERS = ("SaveImaged", "SaveImage")


class BundleError(MedfmError):
    """A bundle folder is incomplete or its config cannot be used."""


def _find_config(folder: Path) -> Path:
    for name in _CONFIG_NAMES:
        p = folder / "configs" / name
        if p.is_file():
            return p
    raise BundleError(f"{folder}: not a MONAI bundle folder (no configs/inference.json|yaml)")


def _find_weights(folder: Path, explicit: str | Path | None) -> Path:
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = _find_weights(p, None)
        if not p.is_file():
            raise WeightsError(f"{p}: weights file not found")
        return p
    for name in ("model.pt", "model.safetensors", "model.ts"):
        p = folder / "models" / name
        if p.is_file():
            return p
    raise WeightsError(f"{folder.name}: no models/model.pt, model.safetensors or model.ts in the "
                       "bundle (download the bundle's weights or pass --weights FILE)")


def label_names_from_metadata(meta: dict[str, Any]) -> dict[int, str]:
    """``{value: name}`` from ``network_data_format.outputs.pred.channel_def`` (0 dropped)."""
    try:
        chdef = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        return {}
    out = {}
    for k, v in dict(chdef).items():
        try:
            val = int(k)
        except (TypeError, ValueError):
            continue
        if val and str(v).lower() not in ("background", "bg"):
            out[val] = str(v)
    return out


class BundleSegmenter(WindowedSegmenter):
    """Run a local MONAI bundle on a :class:`MedicalImage` (see the module docstring).

    The steps of the shared pre -> inferer -> post -> invert template
    (:class:`~napari_medfm.models.segmenters.base.WindowedSegmenter`) are the bundle's own.
    """

    def __init__(self, folder: str | Path, weights: str | Path | None = None,
                 device: str | None = None):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise BundleError(f"{folder}: bundle folder not found")
        self.config_file = _find_config(self.folder)
        meta_file = self.folder / "configs" / "metadata.json"
        self.metadata: dict[str, Any] = {}
        if meta_file.is_file():
            try:
                self.metadata = json.loads(meta_file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise BundleError(f"{meta_file}: invalid JSON ({exc})") from None
        self.model_id = f"{BUNDLE_PREFIX}{self.metadata.get('name') or self.folder.name}"
        self.label_names = label_names_from_metadata(self.metadata)
        self.label_colors: dict[int, list[int]] = {}
        self.weights_file = _find_weights(self.folder, weights)
        from ...runtime.weights import sha256_file

        self.weights_sha256 = sha256_file(self.weights_file)
        self._device_pref = device
        self._parsed: dict[str, Any] | None = None
        try:
            self.modality = str(self.metadata["network_data_format"]["inputs"]["image"]
                                ["modality"]).upper()
        except (KeyError, TypeError):
            self.modality = ""

    # ------------------------------------------------------------------ parsing
    def _parse(self, device: Any) -> dict[str, Any]:
        if self._parsed is not None and self._parsed["device"] == device:
            return self._parsed
        import torch
        from monai.bundle import ConfigParser

        from ...runtime.trust import require_trusted

        require_trusted(self.folder)  # the config is code: never parse an untrusted one
        parser = ConfigParser()
        try:
            parser.read_config(str(self.config_file))
            if (self.folder / "configs" / "metadata.json").is_file():
                parser.read_meta(str(self.folder / "configs" / "metadata.json"))
        except Exception as exc:  # noqa: BLE001 - malformed JSON/YAML
            raise BundleError(f"{self.config_file}: cannot read config ({exc})") from None
        parser["bundle_root"] = str(self.folder)
        parser["device"] = f"$torch.device('{device}')"
        for key in ("preprocessing", "inferer", "postprocessing"):
            if key not in parser:
                raise BundleError(f"{self.config_file.name}: no '{key}' section (needed to run "
                                  "the bundle the way its authors do)")
        try:
            pre = parser.get_parsed_content("preprocessing")
            inferer = parser.get_parsed_content("inferer")
            post = parser.get_parsed_content("postprocessing")
        except Exception as exc:  # noqa: BLE001 - any config error
            raise BundleError(f"{self.config_file.name}: cannot build transforms ({exc})") from exc
        net = self._network(parser, device)
        self._parsed = {"device": device, "pre": pre, "inferer": inferer, "post": post,
                        "network": net, "torch": torch}
        return self._parsed

    def _network(self, parser: Any, device: Any) -> Any:
        import torch

        from ...runtime.safe_load import load_state_dict, load_strict

        if self.weights_file.suffix == ".ts":
            try:
                net = torch.jit.load(str(self.weights_file), map_location=device)
            except Exception as exc:  # noqa: BLE001
                raise WeightsError(f"{self.weights_file.name}: not a TorchScript model ({exc})") \
                    from None
            return net.eval()
        key = "network_def" if "network_def" in parser else "network"
        if key not in parser:
            raise BundleError(f"{self.config_file.name}: no 'network_def' or 'network' section")
        try:
            net = parser.get_parsed_content(key)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"{self.config_file.name}: cannot build the network ({exc})") \
                from exc
        sd = load_state_dict(self.weights_file)
        load_strict(net, sd, what=self.weights_file.name)
        return net.to(device).eval()

    # ------------------------------------------------------------------ running
    def check_input(self, image: MedicalImage) -> None:
        super().check_input(image)
        if self.modality == "CT":
            check_ct(image, self.model_id)

    @staticmethod
    def _flat(compose: Any) -> list[Any]:
        return list(compose.flatten().transforms) if hasattr(compose, "flatten") else [compose]

    def _loaded(self, image: MedicalImage, pre: Any) -> tuple[dict[str, Any], list[Any]]:
        """The dict LoadImaged would produce, and the remaining pre-transforms."""
        from monai.transforms import EnsureChannelFirst, LoadImage, LoadImaged

        rest, key, loader = [], "image", None
        for t in self._flat(pre):
            if isinstance(t, LoadImaged | LoadImage):
                loader = t
                if isinstance(t, LoadImaged):
                    key = list(t.keys)[0]
                continue
            rest.append(t)
        inner = getattr(loader, "_loader", loader)
        dtype = getattr(inner, "dtype", np.float32) or np.float32
        x = to_metatensor(image, dtype=dtype)
        if getattr(inner, "ensure_channel_first", False):
            x = EnsureChannelFirst()(x)
        return {key: x}, rest

    def preprocess(self, image: MedicalImage, device: Any) -> tuple[Any, Any]:
        import torch
        from monai.transforms import apply_transform

        parts = self._parse(device)
        data, rest = self._loaded(image, parts["pre"])
        key = next(iter(data))
        for t in rest:
            data = apply_transform(t, data)
        x = data[key]
        if not isinstance(x, torch.Tensor):
            raise BundleError(f"{self.model_id}: pre-processing did not give a tensor for '{key}'")
        return x, {"parts": parts, "data": data}

    def window_plan(self, settings: SegmentSettings, state: Any) -> WindowPlan:
        inf = state["parts"]["inferer"]
        roi = tuple(settings.roi_size or getattr(inf, "roi_size", None) or ())
        if not roi:
            raise BundleError(f"{self.model_id}: the bundle's inferer has no roi_size (only "
                              "sliding-window inferers are supported); pass --roi-size")
        overlap = settings.overlap if settings.overlap is not None else getattr(inf, "overlap",
                                                                               0.25)
        bs = settings.sw_batch_size or int(getattr(inf, "sw_batch_size", 1) or 1)
        self.default_roi = tuple(getattr(inf, "roi_size", roi))
        return WindowPlan(roi_size=roi, overlap=overlap, sw_batch_size=bs,
                          mode=getattr(inf, "mode", "constant"),
                          sigma_scale=getattr(inf, "sigma_scale", 0.125),
                          padding_mode=getattr(inf, "padding_mode", "constant"),
                          cval=getattr(inf, "cval", 0.0))

    def predictor(self, state: Any) -> Any:
        return state["parts"]["network"]

    def postprocess(self, out: Any, x: Any, state: Any) -> tuple[np.ndarray, Any]:
        """The bundle's post-transforms (writers dropped); labels (x, y, z) + the result tensor
        (whose affine places them)."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import apply_transform

        pred = out[0]
        if not isinstance(pred, MetaTensor):
            pred = MetaTensor(pred)
        if isinstance(x, MetaTensor):
            pred.copy_meta_from(x, copy_attr=False)
        data = state["data"]
        data["pred"] = pred
        for t in self._flat(state["parts"]["post"]):
            if type(t).__name__ in _WRITERS:
                continue
            data = apply_transform(t, data)
        res = data["pred"]
        arr = res.detach().cpu().numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        if arr.ndim == 4:
            arr = arr[0] if arr.shape[0] == 1 else np.argmax(arr, axis=0)
        return np.rint(arr).astype(np.int32), res

    def invert(self, labels_xyz: np.ndarray, grid: Any, image: MedicalImage) -> np.ndarray:
        return self._to_source_grid(grid, labels_xyz, image)

    def _to_source_grid(self, res: Any, arr_xyz: np.ndarray, image: MedicalImage) -> np.ndarray:
        """Labels in numpy order on the image grid.

        With ``Invertd`` in the bundle's post-processing the prediction is already there; without
        it, the labels are resampled nearest-neighbour from the prediction's own grid (its
        affine) onto the source grid with SimpleITK.
        """
        from ...geometry import Geometry

        aff = getattr(res, "affine", None)
        same_shape = tuple(arr_xyz.shape) == tuple(image.shape[::-1])
        if aff is None:
            if not same_shape:
                raise GeometryError(
                    f"{self.model_id}: the bundle returned shape {arr_xyz.shape} (x, y, z) without "
                    f"an affine for an image of {image.shape[::-1]}; cannot place it on the input")
            return np.transpose(arr_xyz, (2, 1, 0))
        got = np.asarray(aff, dtype=float)
        if same_shape and np.allclose(got, image.geometry.affine_ras(), atol=1e-3):
            return np.transpose(arr_xyz, (2, 1, 0))
        if np.abs(arr_xyz).max(initial=0) > 65535 or arr_xyz.min(initial=0) < 0:
            raise GeometryError(f"{self.model_id}: label values out of range for resampling")
        self.resampled = True
        return resample_labels_to(arr_xyz.astype(np.uint16), Geometry.from_affine_ras(got),
                                  image.geometry, image.shape).astype(np.int32)


# ----------------------------------------------------------------------------- demo bundle


def demo_bundle_config(roi_size: Sequence[int] = (32, 32, 32),
                       pixdim: Sequence[float] = (4.0, 4.0, 4.0), out_channels: int = 3,
                       sw_batch_size: int = 2, overlap: float = 0.25) -> dict[str, Any]:
    """A complete model-zoo style ``inference.json`` for a small 3D UNet on CT."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz'))))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
            "out_channels": out_channels, "channels": [8, 16, 32], "strides": [2, 2],
            "num_res_units": 1,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim),
                 "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000,
                 "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size),
                    "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": "gaussian"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                 "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                 "output_postfix": "seg", "separate_folder": False, "resample": False,
                 "output_dtype": "$numpy.uint8"},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def write_demo_bundle(folder: str | Path, *, seed: int = 0,
                      roi_size: Sequence[int] = (32, 32, 32),
                      pixdim: Sequence[float] = (4.0, 4.0, 4.0),
                      label_names: Sequence[str] = ("soft tissue", "dense"),
                      sw_batch_size: int = 2, overlap: float = 0.25,
                      trust: bool = True) -> Path:
    """Write a runnable demo bundle (small UNet, **random weights** from ``seed``).

    For trying the bundle path end to end (``medfm segment --model bundle:FOLDER``) and for
    tests; its predictions are meaningless. napari-medfm wrote its config itself, so the folder
    is marked trusted (``trust=False`` leaves that to the user).
    """
    import torch
    from monai.bundle import ConfigParser

    folder = Path(folder)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    cfg = demo_bundle_config(roi_size, pixdim, len(label_names) + 1, sw_batch_size, overlap)
    channel_def = {"0": "background", **{str(i + 1): n for i, n in enumerate(label_names)}}
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0", "name": "medfm_demo_unet",
        "task": "Demo CT segmentation (random weights)",
        "description": "Tiny random-weight UNet written by napari-medfm for testing.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                 "num_channels": 1, "spatial_shape": list(roi_size),
                                 "dtype": "float32", "value_range": [-1000, 1000],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": len(label_names) + 1,
                                 "spatial_shape": list(roi_size), "dtype": "float32",
                                 "value_range": [0, len(label_names)], "is_patch_data": True,
                                 "channel_def": channel_def}},
        },
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    parser = ConfigParser(cfg)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    if trust:
        from ...runtime.trust import trust_bundle

        trust_bundle(folder)
    return folder
