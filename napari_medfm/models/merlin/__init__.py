"""Merlin: 3D CT vision-language foundation model (Blankemeier et al. 2024).

Torch-free at import: the network, text tower and loaded-model object live in
``network``, ``text`` and ``model`` and are imported on use.
"""
