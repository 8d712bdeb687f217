"""a2r-kernels: tree-shared KV cache + tree decode attention, the masked denoising step and
the entropy-bound (uniform-noise) diffusion step.

Public contract: ``docs/API.md``. Every op takes ``backend`` in
``"auto" | "cuda" | "triton" | "torch"``; see :mod:`a2r_kernels.backend`.
"""

from .errors import BackendUnavailable, CacheFullError
from .attention import merge_attention_states, paged_decode_attention, tree_decode_attention
from .cache import TreeKVCache
from .denoise import DenoiseResult, denoise_step
from .entropy_bound import EntropyBoundResult, entropy_bound_step
from .layout import TreeLayout, kv_bytes
from .wrapper import TreeAttentionWrapper

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CacheFullError",
    "DenoiseResult",
    "EntropyBoundResult",
    "TreeAttentionWrapper",
    "TreeKVCache",
    "TreeLayout",
    "denoise_step",
    "entropy_bound_step",
    "kv_bytes",
    "merge_attention_states",
    "paged_decode_attention",
    "tree_decode_attention",
]
