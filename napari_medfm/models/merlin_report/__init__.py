"""Merlin's report generator (``merlin-report``): image trunk + adapter + RadLLaMA-7b with LoRA."""
