"""Probe heads: a small linear/MLP head on a frozen 2D encoder's features -> finding probabilities."""
