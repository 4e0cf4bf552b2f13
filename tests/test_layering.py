"""The dependency rule, checked on the source: lower layers never import higher ones.

    io / geometry / errors / progress / windowing  (0: bottom)
      -> runtime (+ sample_data)                     (1: devices, weights, safe loading, inferers)
      -> models                                      (2: one folder per family)
      -> tasks                                       (3: the one orchestration layer)
      -> cli / widgets / _napari                     (4: thin shells)

Every ``import`` (also the lazy ones inside functions) of every module of the package is parsed
with :mod:`ast`; a module's layer comes from its directory, so modules added later
(``models/radfm``, ``tasks/report.py``, ``widgets/report.py``, ...) are covered without being
listed here. A new top-level module must be given a layer in :data:`LAYERS` (the test says so).
``trainers/`` may use anything except the shells' ``cli`` and ``widgets``. Qt and napari stay in
the shells.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "napari_medfm"

#: First component under ``napari_medfm`` -> layer.
LAYERS = {
    "errors": 0, "progress": 0, "arrays": 0, "geometry": 0, "io": 0, "windowing": 0,
    "runtime": 1, "sample_data": 1,
    "models": 2,
    "tasks": 3,
    "cli": 4, "widgets": 4, "_napari": 4, "__main__": 4,
}
NAMES = {0: "io/geometry/errors/progress", 1: "runtime", 2: "models", 3: "tasks",
         4: "cli/widgets/_napari"}
#: Third-party GUI packages only the shells (layer 4) may import.
GUI_PACKAGES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "superqt", "magicgui",
                "vispy")
#: What trainers/ must not import.
TRAINER_FORBIDDEN = ("cli", "widgets", "_napari")


def _modules(folder: Path, package: str) -> list[tuple[str, Path]]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything ``module`` imports (``from a import b`` gives ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.append((mod, node.lineno))
            names.extend((f"{mod}.{a.name}", node.lineno) for a in node.names if a.name != "*")
    return names


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != PKG or len(parts) == 1:
        return None  # the package root (facade) and third-party names
    return LAYERS.get(parts[1])


PACKAGE_MODULES = _modules(ROOT / PKG, PKG)
TRAINER_MODULES = _modules(ROOT / "trainers", "trainers") if (ROOT / "trainers").is_dir() else []


def test_every_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m, _ in PACKAGE_MODULES
                      if m != PKG and _layer_of(m) is None})
    assert not unknown, (f"top-level module(s) {unknown} of {PKG} have no layer: add them to "
                         "LAYERS in tests/test_layering.py (or move them into a layer's folder)")


@pytest.mark.parametrize("module,path", PACKAGE_MODULES, ids=[m for m, _ in PACKAGE_MODULES])
def test_lower_layers_never_import_higher_ones(module, path):
    mine = _layer_of(module)
    if mine is None:
        return
    bad = []
    for name, line in _imports(module, path):
        theirs = _layer_of(name)
        top = name.split(".")[0]
        if theirs is not None and theirs > mine:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} "
                       f"({NAMES[mine]} must not import {NAMES[theirs]})")
        elif mine < 4 and top in GUI_PACKAGES:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (Qt/napari only in "
                       "cli/widgets/_napari)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module,path", TRAINER_MODULES, ids=[m for m, _ in TRAINER_MODULES])
def test_trainers_do_not_import_the_shells(module, path):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for name, line in _imports(module, path)
           if name.split(".")[:2] in ([PKG, f] for f in TRAINER_FORBIDDEN)
           or name.split(".")[0] in GUI_PACKAGES]
    assert not bad, "trainers reuse the library, never the CLI/GUI shells:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative and lazy imports (a check that cannot fail proves nothing)."""
    f = tmp_path / "segment.py"
    f.write_text("def f():\n    from ...widgets.segment import SegmentWidget\n"
                 "from ..tasks import segment\nimport napari_medfm.cli\n")
    names = [n for n, _ in _imports(f"{PKG}.models.segmenters.segment", f)]
    assert f"{PKG}.widgets.segment.SegmentWidget" in names
    assert f"{PKG}.models.tasks" in names  # `..` from models/segmenters is models/
    assert f"{PKG}.cli" in names
    assert _layer_of(f"{PKG}.widgets.segment") == 4 > _layer_of(f"{PKG}.models.x") == 2
    pkg_init = tmp_path / "__init__.py"
    pkg_init.write_text("from ..tasks import segment\n")
    assert f"{PKG}.tasks" in [n for n, _ in _imports(f"{PKG}.models", pkg_init)]
