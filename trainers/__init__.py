"""Headless trainers (Merlin, MerMED-FM, RadFM pretraining recipes) - see trainers/README.md."""
