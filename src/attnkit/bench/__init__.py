"""Benchmarks: timing, memory, the speed table of ``make demo``; quality tasks as data in ``tasks/``."""
