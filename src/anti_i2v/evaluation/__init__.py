"""Evaluation of protected photos: purification counter-attacks and protection metrics."""
