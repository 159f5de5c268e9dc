"""Layers built on the mechanisms, and small backbones whose attention is any registered mechanism."""

from .attention import Attention
from .causal_lm import CausalLM

__all__ = ["Attention", "CausalLM"]
