"""Backend selection shared by every public op.

``backend`` is one of ``"auto"``, ``"cuda"`` (the compiled extension ``a2r_kernels._C``),
``"triton"`` and ``"torch"`` (the fp32 reference, any device). Asking for one that cannot run
raises :class:`BackendUnavailable`; nothing silently falls back.

``"auto"`` picks, per op, the fastest backend available for the tensors' device:
CPU tensors -> ``torch``; CUDA tensors -> the entry of ``AUTO_CUDA_PREFERENCE`` for the op that is
available. The table is the decision rule; see README ("Backends") for the measurements behind it.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import BackendUnavailable
from .vocab import BACKENDS

# Per op, the order "auto" tries on a CUDA device. Until the CUDA kernels are measured on a GPU
# (issue 6), Triton comes first: it is the backend whose numbers are committed.
AUTO_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    "tree_decode_attention": ("triton", "cuda", "torch"),
    "paged_decode_attention": ("triton", "cuda", "torch"),
    "merge_attention_states": ("triton", "cuda", "torch"),
    "denoise_step": ("triton", "cuda", "torch"),
    "entropy_bound_step": ("triton", "torch"),   # no CUDA kernel yet
}


def as_device(device, name: str = "device") -> torch.device:
    """``torch.device(device)``, with ``ValueError`` naming ``name`` for what torch cannot parse
    (``"bogus"``, ``None``, ``3.5``) where torch raises ``RuntimeError`` / ``TypeError``."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:0', "
                         f"got {device!r}") from None


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled module ``a2r_kernels._C``, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when the concrete ``backend`` can run on ``device``, else the reason it cannot
    (one sentence, for error messages such as the CLI's)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {device}"
        if cuda_extension() is None:
            return ("a2r_kernels._C was not built (nvcc missing at install time, or "
                    "A2R_BUILD_CUDA=0); reinstall with nvcc on PATH")
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        why = backend_unavailable_reason(backend, device)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend={backend!r} is unavailable: {why}")
        return backend
    if device.type != "cuda":
        return "torch"
    for candidate in AUTO_CUDA_PREFERENCE[op]:
        if backend_unavailable_reason(candidate, device) is None and (
                candidate != "cuda" or op in getattr(cuda_extension(), "PUBLIC_OPS", ())):
            return candidate
    return "torch"
