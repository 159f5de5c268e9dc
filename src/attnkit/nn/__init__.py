"""Layers built on the mechanisms."""

from .attention import Attention

__all__ = ["Attention"]
