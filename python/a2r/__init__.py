"""a2r: the A2R parallel-reasoning loop (explorer -> thinker -> synthesizer) over a2r_kernels.

Public names (``shared/API.md`` section 4) are loaded lazily so ``import a2r`` stays cheap and the
CLI starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "sample_parallel": "a2r.explore",
    "diffusion_generate": "a2r.diffusion",
    "A2RPipeline": "a2r.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'a2r' has no attribute {name!r}")
