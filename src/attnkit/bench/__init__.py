"""Benchmarks: timing, memory, the speed table of ``make demo``."""
