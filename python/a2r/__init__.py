"""a2r: the A2R parallel-reasoning loop (explorer -> thinker -> synthesizer) over a2r_kernels.

Public names (``docs/API.md`` section 4) and the submodules (``a2r.explore``, ``a2r.thinker``,
...) are loaded lazily, on first attribute access after a plain ``import a2r``, so that the import
stays cheap and the CLI starts fast.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_LAZY = {
    "sample_parallel": "a2r.explore",
    "diffusion_generate": "a2r.thinker",
    "A2RPipeline": "a2r.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # A submodule: importing it also binds it here, so this runs once per submodule.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'a2r' has no attribute {name!r}")
