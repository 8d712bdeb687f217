"""Thin wrappers over the compiled CUDA kernels (``a2r_kernels._C``, built from ``csrc/``).

Each function checks its tensors (all on one CUDA device, dtypes, shapes, unit stride in the last
dimension) and raises ``ValueError`` naming the argument before anything runs, then hands ``_C``
the data pointers, element strides, sizes and the current torch CUDA stream. Outputs are
pre-allocated by the caller (the public ops in :mod:`a2r_kernels.attention` and
:mod:`a2r_kernels.denoise`), so every call is free of host syncs and CUDA-graph capturable.

``_C`` links no libtorch and its own static CUDA runtime; it imports on machines without a GPU.
When it was not built, every function here raises :class:`a2r_kernels.BackendUnavailable`.

Kernel semantics and layouts: ``csrc/tree_attention.cu`` and ``csrc/denoise.cu``.
"""

from __future__ import annotations

import functools
import math

import torch

from ._backend import cuda_extension
from ._errors import BackendUnavailable

# dtype codes of csrc/ops.h (a2r::DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# remasking codes of csrc/ops.h (a2r::Remasking).
REMASKING_CODES = {"low_confidence": 0, "margin": 1, "entropy": 2, "random": 3}
MAX_HEAD_DIM = 256
WORK_INFO_COLUMNS = 6
# csrc/denoise.cu: threads of a predict CTA, fp32 words of one (position, split) state.
DENOISE_PREDICT_THREADS = 256
DENOISE_PARTIAL_WORDS = 8


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise BackendUnavailable("a2r_kernels._C was not built (nvcc missing at install time, or "
                                 "A2R_BUILD_CUDA=0); reinstall with nvcc on PATH")
    return ext


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def _check(name: str, t, *, shape: tuple | None = None, ndim: int | None = None,
           dtypes: tuple = (), device: torch.device | None = None, unit_last: bool = False,
           contiguous: bool = False, expect: str = "") -> None:
    """Raise ValueError naming ``name`` unless ``t`` is a CUDA tensor of the given form."""
    what = expect or (f"{list(shape)}" if shape is not None else f"{ndim}-D")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a CUDA tensor {what}, got {_describe(t)}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other tensors are on {device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got {_describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {list(shape)}, got {_describe(t)}")
    if dtypes and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {t.dtype}")
    if t.numel() > 0:
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
        if unit_last and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides "
                             f"{t.stride()}")


def _strides(t: torch.Tensor) -> list[int]:
    """Element strides of every dimension but the last (which is 1)."""
    return list(t.stride()[:-1])


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_FLOATS = tuple(DTYPE_CODES)


# ---------------------------------------------------------------------------------- attention
def tree_attention_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            work_info: torch.Tensor, row_seq: torch.Tensor,
                            page_table: torch.Tensor, partial_o: torch.Tensor,
                            partial_lse: torch.Tensor, sm_scale: float) -> None:
    """One partial attention state per (work item, q head) of a :class:`~a2r_kernels.TreeLayout`.

    For work item ``(q_start, q_len, page_start, kv_start, kv_end, partial_start)``, kv head ``h``,
    ``r < q_len``, ``g < G = Hq // Hkv`` (``qh = h * G + g``, ``seq = row_seq[q_start + r]``),
    over the node tokens ``kv_start <= t < kv_end`` stored at
    ``k_cache[page_table[page_start + t // block_size], t % block_size, h]``::

        s_t = sm_scale * <q[seq, qh], k_t>
        partial_lse[partial_start + r, qh] = log(sum_t exp(s_t))          (natural log)
        partial_o[partial_start + r, qh]   = sum_t softmax(s)_t v_t        (fp32)

    An empty chunk writes o = 0, lse = -inf.

    Args:
        q: ``[S, Hq, D]`` fp16/bf16/fp32, unit stride in D.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype, unit stride in D.
        work_info: int32 ``[W, 6]`` contiguous. row_seq: int32 ``[S]``. page_table: int32 ``[P]``.
        partial_o: fp32 ``[R, Hq, D]`` unit stride in D (written).
        partial_lse: fp32 ``[R, Hq]`` (written).
        sm_scale: softmax scale (positive, finite).

    The values inside work_info / page_table are trusted (TreeLayout validates them when it is
    built); checking them here would need a host sync.
    """
    _check("q", q, ndim=3, dtypes=_FLOATS, unit_last=True, expect="[S, Hq, D]")
    device = q.device
    num_seqs, num_q_heads, head_dim = q.shape
    _check("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device, unit_last=True,
           expect="[num_blocks, block_size, Hkv, D]")
    _check("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(q.dtype,), device=device,
           unit_last=True, expect="k_cache's shape [num_blocks, block_size, Hkv, D]")
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head_dim {cache_head_dim} must equal q's head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[2]) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's num_q_heads ({num_q_heads}) must be a multiple of k_cache's "
                         f"num_kv_heads ({num_kv_heads})")
    if block_size == 0:
        raise ValueError("k_cache block_size (shape[1]) must be >= 1")
    _check("work_info", work_info, ndim=2, dtypes=(torch.int32,), device=device, contiguous=True,
           expect=f"int32 [W, {WORK_INFO_COLUMNS}]")
    if work_info.shape[1] != WORK_INFO_COLUMNS:
        raise ValueError(f"work_info must be int32 [W, {WORK_INFO_COLUMNS}], got "
                         f"{_describe(work_info)}")
    _check("row_seq", row_seq, shape=(num_seqs,), dtypes=(torch.int32,), device=device,
           contiguous=True, expect="int32 [S]")
    _check("page_table", page_table, ndim=1, dtypes=(torch.int32,), device=device,
           contiguous=True, expect="int32 [P]")
    _check("partial_o", partial_o, ndim=3, dtypes=(torch.float32,), device=device, unit_last=True,
           expect="fp32 [R, Hq, D]")
    num_rows = partial_o.shape[0]
    if tuple(partial_o.shape[1:]) != (num_q_heads, head_dim):
        raise ValueError(f"partial_o must be fp32 [R, Hq={num_q_heads}, D={head_dim}], got "
                         f"{_describe(partial_o)}")
    _check("partial_lse", partial_lse, shape=(num_rows, num_q_heads), dtypes=(torch.float32,),
           device=device, expect="fp32 [R, Hq]")
    sm_scale = float(sm_scale)
    if not (sm_scale > 0 and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a positive finite float, got {sm_scale}")
    if work_info.shape[0] == 0:
        return
    _ext().tree_attention_partials(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), work_info.data_ptr(),
        row_seq.data_ptr(), page_table.data_ptr(), partial_o.data_ptr(), partial_lse.data_ptr(),
        _strides(q), _strides(k_cache), _strides(v_cache), _strides(partial_o),
        list(partial_lse.stride()), work_info.shape[0], num_seqs, num_q_heads, num_kv_heads,
        head_dim, block_size, sm_scale, DTYPE_CODES[q.dtype], device.index, _stream(device))


def merge_partials(partial_o: torch.Tensor, partial_lse: torch.Tensor, merge_indptr: torch.Tensor,
                   merge_rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge each sequence's partial states by LSE.

    For sequence ``i`` and head ``h``, rows ``= merge_rows[merge_indptr[i] : merge_indptr[i + 1]]``::

        lse[i, h] = logsumexp_rows partial_lse[row, h]
        out[i, h] = sum_rows exp(partial_lse[row, h] - lse[i, h]) * partial_o[row, h]

    No rows (or all ``-inf``) gives ``out = 0``, ``lse = -inf``.

    Args:
        partial_o: fp32 ``[R, H, D]`` unit stride in D. partial_lse: fp32 ``[R, H]``.
        merge_indptr: int32 ``[S + 1]`` contiguous. merge_rows: int32 ``[M]`` contiguous.
        out: ``[S, H, D]`` fp16/bf16/fp32, unit stride in D (written).
        lse: fp32 ``[S, H]`` (written).
    """
    _check("out", out, ndim=3, dtypes=_FLOATS, unit_last=True, expect="[S, H, D]")
    device = out.device
    num_seqs, num_heads, head_dim = out.shape
    _check("partial_o", partial_o, ndim=3, dtypes=(torch.float32,), device=device, unit_last=True,
           expect="fp32 [R, H, D]")
    if tuple(partial_o.shape[1:]) != (num_heads, head_dim):
        raise ValueError(f"partial_o must be fp32 [R, H={num_heads}, D={head_dim}], got "
                         f"{_describe(partial_o)}")
    _check("partial_lse", partial_lse, shape=(partial_o.shape[0], num_heads),
           dtypes=(torch.float32,), device=device, expect="fp32 [R, H]")
    _check("merge_indptr", merge_indptr, shape=(num_seqs + 1,), dtypes=(torch.int32,),
           device=device, contiguous=True, expect="int32 [S + 1]")
    _check("merge_rows", merge_rows, ndim=1, dtypes=(torch.int32,), device=device,
           contiguous=True, expect="int32 [M]")
    _check("lse", lse, shape=(num_seqs, num_heads), dtypes=(torch.float32,), device=device,
           expect="fp32 [S, H]")
    if num_seqs == 0 or num_heads == 0:
        return
    _ext().merge_partials(
        partial_o.data_ptr(), partial_lse.data_ptr(), merge_indptr.data_ptr(),
        merge_rows.data_ptr(), out.data_ptr(), lse.data_ptr(), _strides(partial_o),
        list(partial_lse.stride()), _strides(out), list(lse.stride()), num_seqs, num_heads,
        head_dim, DTYPE_CODES[out.dtype], device.index, _stream(device))


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.

    Args:
        out_a, out_b: ``[S, H, D]`` same dtype (fp16/bf16/fp32), unit stride in D.
        lse_a, lse_b: fp32 ``[S, H]``, natural log.
        out: ``[S, H, D]`` fp16/bf16/fp32, unit stride in D (written); lse: fp32 ``[S, H]``.
    Both empty (``-inf``) gives ``out = 0``, ``lse = -inf``.
    """
    _check("out_a", out_a, ndim=3, dtypes=_FLOATS, unit_last=True, expect="[S, H, D]")
    device = out_a.device
    shape = tuple(out_a.shape)
    _check("out_b", out_b, shape=shape, dtypes=(out_a.dtype,), device=device, unit_last=True,
           expect="out_a's shape and dtype")
    _check("out", out, shape=shape, dtypes=_FLOATS, device=device, unit_last=True,
           expect="out_a's shape")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b), ("lse", lse)):
        _check(name, t, shape=shape[:2], dtypes=(torch.float32,), device=device,
               expect="fp32 [S, H]")
    num_seqs, num_heads, head_dim = shape
    if num_seqs == 0 or num_heads == 0:
        return
    _ext().merge_states(
        out_a.data_ptr(), lse_a.data_ptr(), out_b.data_ptr(), lse_b.data_ptr(), out.data_ptr(),
        lse.data_ptr(), _strides(out_a), list(lse_a.stride()), _strides(out_b),
        list(lse_b.stride()), _strides(out), list(lse.stride()), num_seqs, num_heads, head_dim,
        DTYPE_CODES[out_a.dtype], DTYPE_CODES[out.dtype], device.index, _stream(device))


# ---------------------------------------------------------------------------------- denoise
@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def denoise_num_splits(num_positions: int, vocab: int, element_size: int, num_sms: int) -> int:
    """CTAs per position over V for the predict kernel: about one full wave of the SMs (8 CTAs of
    256 threads per SM), but every split at least 8 iterations of its loop (8 x 256 threads x one
    16-byte group), so that splitting pays off only where ``B * L`` alone leaves SMs idle."""
    logits_per_group = 16 // element_size
    max_splits = max(1, -(-vocab // (8 * DENOISE_PREDICT_THREADS * logits_per_group)))
    wanted = -(-8 * num_sms // max(num_positions, 1))
    return max(1, min(wanted, max_splits, 65535))


def denoise_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                 num_transfer: torch.Tensor | None, threshold: float | None, temperature: float,
                 remasking: str, seed: int, x0: torch.Tensor, confidence: torch.Tensor,
                 transferred: torch.Tensor, num_splits: int | None = None) -> None:
    """One masked-denoising step on the GPU (formulas: :mod:`a2r_kernels.reference_denoise`).

    Args:
        logits: ``[B, L, V]`` fp32/fp16/bf16, unit stride in V; read only at masked positions.
        tokens: int64 ``[B, L]``; ``tokens[b, l] = x0[b, l]`` where committed (in place).
        mask_id: the mask token id.
        num_transfer: int64 ``[B]`` on the logits' device (top-k mode), or None with ``threshold``.
        threshold: float (threshold mode) or None with ``num_transfer``.
        temperature: ``>= 0`` (0: argmax; else Gumbel-max sampling).
        remasking: ``"low_confidence" | "margin" | "entropy" | "random"``.
        seed: Philox key in ``[0, 2**64)`` (used when temperature > 0 or remasking="random").
        x0: int64 ``[B, L]``; confidence: fp32 ``[B, L]`` (``-inf`` at unmasked positions);
            transferred: bool ``[B, L]`` (all written).
        num_splits: CTAs per position over V; None picks :func:`denoise_num_splits` (tests force
            several on small vocabularies).
    """
    _check("logits", logits, ndim=3, dtypes=_FLOATS, unit_last=True, expect="[B, L, V]")
    device = logits.device
    batch, length, vocab = logits.shape
    if vocab < 1:
        raise ValueError(f"logits must have V >= 1 in [B, L, V], got {list(logits.shape)}")
    for name, t, dtype in (("tokens", tokens, torch.int64), ("x0", x0, torch.int64),
                           ("confidence", confidence, torch.float32),
                           ("transferred", transferred, torch.bool)):
        _check(name, t, shape=(batch, length), dtypes=(dtype,), device=device,
               expect=f"{str(dtype).replace('torch.', '')} [B, L]")
    if (num_transfer is None) == (threshold is None):
        raise ValueError("give exactly one of num_transfer and threshold")
    if num_transfer is not None:
        _check("num_transfer", num_transfer, shape=(batch,), dtypes=(torch.int64,), device=device,
               expect="int64 [B]")
    else:
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float, got {threshold}")
    temperature = float(temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
    if remasking not in REMASKING_CODES:
        raise ValueError(f"remasking must be one of {tuple(REMASKING_CODES)}, got {remasking!r}")
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if batch * length >= 2 ** 31:
        raise ValueError(f"logits must have B * L < 2**31 positions, got {batch} * {length}")
    if batch == 0 or length == 0:
        return
    if num_splits is None:
        num_splits = denoise_num_splits(batch * length, vocab, logits.element_size(),
                                        _num_sms(device.index))
    if not isinstance(num_splits, int) or not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be an int in [1, 65535], got {num_splits!r}")
    split_stats = None
    if num_splits > 1:
        split_stats = torch.empty(batch * length * num_splits * DENOISE_PARTIAL_WORDS,
                                  dtype=torch.float32, device=device)
    _ext().denoise_step(
        logits.data_ptr(), tokens.data_ptr(),
        None if num_transfer is None else num_transfer.data_ptr(),
        x0.data_ptr(), confidence.data_ptr(), transferred.data_ptr(),
        _strides(logits), list(tokens.stride()),
        0 if num_transfer is None else num_transfer.stride(0),
        list(x0.stride()), list(confidence.stride()), list(transferred.stride()),
        batch, length, vocab, int(mask_id), threshold, temperature, REMASKING_CODES[remasking],
        seed, DTYPE_CODES[logits.dtype], device.index, _stream(device), num_splits,
        None if split_stats is None else split_stats.data_ptr())
