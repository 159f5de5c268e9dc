"""Attention analytics: capture per-head attention maps (attnkit layers, Hugging Face models), measure every
head (entropy, distance, locality, sinks, roles, no-op heads, importance, clusters) and show it (PNG plots, one
self-contained HTML page). ``attnkit analyze`` is the command; DESIGN §5 and research/D_analytics.md the formulas.
"""

from __future__ import annotations

from . import metrics
from .capture import capture
from .importance import importance
from .maps import AttentionMaps, HeadMetrics
from .metrics import measure
from .page import write_page
from .roles import probe

__all__ = ["AttentionMaps", "HeadMetrics", "capture", "importance", "measure", "metrics", "probe", "write_page"]
