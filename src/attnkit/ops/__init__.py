"""Pieces shared by mechanisms: masks, GQA, SDPA calls, banded attention, feature maps, scans, RoPE."""
