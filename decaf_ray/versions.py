"""The versions a result was made with, recorded beside it (a run's ``summary.json``, a
stand-in's ``pretrain.json``), read from the installed packages' metadata without importing them.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("decaf-ray", "torch", "ray", "peft", "transformers", "open_clip_torch", "numpy")


def versions() -> dict[str, str]:
    """Python and each of ``PACKAGES``: its version, or ``not installed``."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
