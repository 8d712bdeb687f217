"""a2r-kernels: tree-shared KV cache + tree decode attention, the masked denoising step and
the entropy-bound (uniform-noise) diffusion step.

Public contract: ``docs/API.md``. Every op takes ``backend`` in
``"auto" | "cuda" | "triton" | "torch"``; see :mod:`a2r_kernels.backend`.

The public names and submodules load lazily (PEP 562): ``import a2r_kernels`` imports no torch,
so torch-free callers (the CLI's argument checks, :mod:`a2r_kernels.vocab`) start fast.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "BackendUnavailable": "errors",
    "CacheFullError": "errors",
    "DenoiseResult": "denoise",
    "EntropyBoundResult": "entropy_bound",
    "TreeAttentionWrapper": "wrapper",
    "TreeKVCache": "cache",
    "TreeLayout": "layout",
    "denoise_step": "denoise",
    "entropy_bound_step": "entropy_bound",
    "kv_bytes": "layout",
    "merge_attention_states": "attention",
    "paged_decode_attention": "attention",
    "tree_decode_attention": "attention",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value   # later lookups skip this hook
        return value
    # A submodule (a2r_kernels.reference, a2r_kernels.hf, ...): importing binds it here.
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'a2r_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
