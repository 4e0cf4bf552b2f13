"""Model families. Each sub-package declares its specs in a torch-free ``spec`` module."""
