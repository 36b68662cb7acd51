"""Losses: cross-entropy with hard or soft targets."""

from advtrain.losses._cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
