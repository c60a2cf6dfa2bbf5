"""wbc-batch: batch white-blood-cell classification with Grad-CAM on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
