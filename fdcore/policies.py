"""Helpers for selection-policy authors (kept for imports written against fdcore 0.1)."""

from fdcore.bases import BasePolicy

__all__ = ["BasePolicy"]
