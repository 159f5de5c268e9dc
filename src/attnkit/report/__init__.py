"""The HTML report: charts and tables from the results store."""

from .build import build_report

__all__ = ["build_report"]
