"""``medfm demo`` docks every MedFM widget of the manifest as tabs of one dock area."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def test_all_medfm_docks_share_one_tabbed_area(make_napari_viewer):
    from napari_medfm.cli.demo import dock_all_widgets, plugin_dock_widgets

    viewer = make_napari_viewer()
    docked, skipped = dock_all_widgets(viewer)
    assert len(docked) >= 2 and set(docked) | set(skipped) == {n for n, _ in plugin_dock_widgets()}
    docks = [w.parentWidget() for name, w in viewer.window.dock_widgets.items()
             if any(name.startswith(n) for n in docked)]  # the QDockWidgets around them
    assert len(docks) == len(docked)
    main = docks[0].parentWidget()
    tabbed = set(main.tabifiedDockWidgets(docks[0]))
    assert set(docks[1:]) <= tabbed  # generic: every MedFM dock (a Report or Review one too)
    # room for the scan: no MedFM dock asks for more than the tab area's 360 px, and the tabs
    # carry the docks' own names (napari's " (napari-medfm)" suffix made Review and Report
    # both elide to "R...")
    for dock in docks:
        assert dock.widget().minimumSizeHint().width() <= 360, dock.windowTitle()
        assert "napari-medfm" not in dock.windowTitle()
    assert {d.windowTitle() for d in docks} >= {"Review", "Report", "Segmentation"} & set(docked)
