"""Pieces of the Merlin pretraining recipe (``trainers/merlin.py``): phecode expansion, I3D
inflation, losses, report sections. The networks and preprocessing are the plugin's own
(:mod:`napari_medfm.models.merlin`)."""
