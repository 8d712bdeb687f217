"""Backend selection shared by every public op.

``backend`` is one of ``"auto"``, ``"cuda"`` (the compiled extension ``a2r_kernels._C``),
``"triton"``, ``"cpu"`` (the host-compiled extension ``a2r_kernels._cpu``: OpenMP, AVX2 where the
CPU has it) and ``"torch"`` (the fp32 reference, any device). Asking for one that cannot run
raises :class:`BackendUnavailable`; nothing silently falls back.

``"auto"`` picks, per op, the fastest backend available for the tensors' device: the first entry
of ``AUTO_PREFERENCE[device type][op]`` that is available (CPU tensors: ``cpu`` where the
extension was built and implements the op, else ``torch``; CUDA tensors: see the table). The
table is the decision rule; see README ("Backends") for the measurements behind it.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import BackendUnavailable
from .vocab import BACKENDS

# Per device type and op, the order "auto" tries. On CUDA, until the CUDA kernels are measured
# on a GPU (issue 6), Triton comes first: it is the backend whose numbers are committed. On the
# CPU the compiled kernels beat the reference (benchmarks/bench_tree_attention.py --cpu).
AUTO_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    "tree_decode_attention": ("triton", "cuda", "torch"),
    "paged_decode_attention": ("triton", "cuda", "torch"),
    "merge_attention_states": ("triton", "cuda", "torch"),
    "denoise_step": ("triton", "cuda", "torch"),
    "entropy_bound_step": ("triton", "torch"),   # no CUDA kernel yet
}
AUTO_CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "tree_decode_attention": ("cpu", "torch"),
    "paged_decode_attention": ("cpu", "torch"),
    "merge_attention_states": ("cpu", "torch"),
    "denoise_step": ("torch",),                  # no CPU kernel: the reference
    "entropy_bound_step": ("torch",),
}
AUTO_PREFERENCE = {"cuda": AUTO_CUDA_PREFERENCE, "cpu": AUTO_CPU_PREFERENCE}


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


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """The compiled module ``a2r_kernels._cpu``, or None when it was not built."""
    try:
        from . import _cpu  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cpu


def backend_unavailable_reason(backend: str, device: torch.device, op: str | None = None
                               ) -> str | None:
    """None when the concrete ``backend`` can run on ``device`` (and implements ``op``, when
    given), else the reason it cannot (one sentence, for error messages such as the CLI's)."""
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
            return ("a2r_kernels._C was not built (no GPU visible or nvcc missing at install "
                    "time, or A2R_BUILD_CUDA=0); reinstall with A2R_BUILD_CUDA=1")
        return _missing_op(cuda_extension(), "the CUDA extension", op)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the CPU extension needs CPU tensors, got {device}"
        if cpu_extension() is None:
            return ("a2r_kernels._cpu was not built (A2R_BUILD_CPU=0 at install time, or no "
                    "C++17 compiler); reinstall with a C++ compiler")
        return _missing_op(cpu_extension(), "the CPU extension", op)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _missing_op(extension, what: str, op: str | None) -> str | None:
    if op is None or op in getattr(extension, "PUBLIC_OPS", ()):
        return None
    return f"{what} has no {op} kernel"


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        why = backend_unavailable_reason(backend, device, op)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend={backend!r} is unavailable: {why}")
        return backend
    for candidate in AUTO_PREFERENCE.get(device.type, {}).get(op, ()):
        if backend_unavailable_reason(candidate, device, op) is None:
            return candidate
    return "torch"
