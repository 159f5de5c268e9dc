"""Layers built on the mechanisms, and small backbones whose attention is any registered mechanism."""

from .attention import Attention
from .causal_lm import CausalLM
from .encoder import Encoder, EncoderClassifier
from .encoder_decoder import EncoderDecoder
from .vit import HierarchicalViT, ViT

__all__ = ["Attention", "CausalLM", "Encoder", "EncoderClassifier", "EncoderDecoder", "HierarchicalViT", "ViT"]
