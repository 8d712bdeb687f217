"""Thin wrappers over the compiled CUDA kernels (``a2r_kernels._C``, built from ``csrc/``).

Each function hands ``_C`` its tensors as DLPack capsules (``torch.utils.dlpack.to_dlpack``: no
copy, no stream sync, so CUDA-graph capturable) and the current torch CUDA stream. ``_C`` checks
the tensors next to the launch (csrc/tensor_view.h): devices, dtypes, ranks, the shapes the
kernels index by, unit strides, alignment; ``ValueError`` naming the argument. What is not about
memory (GQA divisibility, ``sm_scale``, ``temperature``, the remasking name, ...) the public ops in
:mod:`a2r_kernels.attention`, :mod:`a2r_kernels.denoise` and :mod:`a2r_kernels.wrapper` check, once,
before they call here. Outputs are pre-allocated by those callers; only the denoise split scratch
is allocated here.

``_C`` links no libtorch and its own static CUDA runtime; it imports on machines without a GPU.
When it was not built, every function here raises :class:`a2r_kernels.BackendUnavailable`.

Kernel semantics and layouts: ``csrc/ops.h``, ``csrc/tree_attention.cu`` and ``csrc/denoise.cu``.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.dlpack import to_dlpack

from .backend import cuda_extension
from .errors import BackendUnavailable
from .vocab import MAX_HEAD_DIM, REMASKING_CODES, WORK_INFO_COLUMNS  # noqa: F401 (re-exported)

# csrc/denoise.cu: threads of a predict CTA, fp32 words of one (position, split) state.
DENOISE_PREDICT_THREADS = 256
DENOISE_PARTIAL_WORDS = 8


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise BackendUnavailable("a2r_kernels._C was not built (nvcc missing at install time, or "
                                 "A2R_BUILD_CUDA=0); reinstall with nvcc on PATH")
    return ext


def _dl(t):
    """A tensor as a DLPack capsule (borrowed by _C for the call); anything else as is, for _C to
    reject by name."""
    return to_dlpack(t) if isinstance(t, torch.Tensor) else t


def _stream(t) -> int:
    """The current torch stream of ``t``'s CUDA device (0 for anything else: _C rejects it)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


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
        work_info: int32 ``[W, WORK_INFO_COLUMNS]`` contiguous. row_seq: int32 ``[S]``. page_table: int32 ``[P]``.
        partial_o: fp32 ``[R, Hq, D]`` unit stride in D (written).
        partial_lse: fp32 ``[R, Hq]`` (written).
        sm_scale: softmax scale (positive, finite).

    The values inside work_info / page_table are trusted (TreeLayout validates them when it is
    built); checking them here would need a host sync.
    """
    _ext().tree_attention_partials(
        _dl(q), _dl(k_cache), _dl(v_cache), _dl(work_info), _dl(row_seq), _dl(page_table),
        _dl(partial_o), _dl(partial_lse), float(sm_scale), _stream(q))


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
    _ext().merge_partials(_dl(partial_o), _dl(partial_lse), _dl(merge_indptr), _dl(merge_rows),
                          _dl(out), _dl(lse), _stream(out))


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.

    Args:
        out_a, out_b: ``[S, H, D]`` same dtype (fp16/bf16/fp32), unit stride in D.
        lse_a, lse_b: fp32 ``[S, H]``, natural log.
        out: ``[S, H, D]`` fp16/bf16/fp32, unit stride in D (written); lse: fp32 ``[S, H]``.
    Both empty (``-inf``) gives ``out = 0``, ``lse = -inf``.
    """
    _ext().merge_states(_dl(out_a), _dl(lse_a), _dl(out_b), _dl(lse_b), _dl(out), _dl(lse),
                        _stream(out_a))


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
    ext = _ext()
    on_cuda = isinstance(logits, torch.Tensor) and logits.is_cuda and logits.dim() == 3
    if num_splits is None:
        num_splits = 1
        if on_cuda and logits.numel() > 0:
            num_splits = denoise_num_splits(logits.shape[0] * logits.shape[1], logits.shape[2],
                                            logits.element_size(), _num_sms(logits.device.index))
    split_stats = None
    if num_splits > 1 and on_cuda:
        split_stats = torch.empty(logits.shape[0] * logits.shape[1] * num_splits
                                  * DENOISE_PARTIAL_WORDS, dtype=torch.float32,
                                  device=logits.device)
    ext.denoise_step(
        _dl(logits), _dl(tokens), None if num_transfer is None else _dl(num_transfer), _dl(x0),
        _dl(confidence), _dl(transferred), None if split_stats is None else _dl(split_stats),
        int(mask_id), None if threshold is None else float(threshold), float(temperature),
        REMASKING_CODES.get(remasking, -1), int(seed), int(num_splits), _stream(logits))
