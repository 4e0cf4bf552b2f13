"""Thin Qt dock widgets. All work happens in the library core (``napari_medfm.tasks``)."""
