"""Plain-torch fp32 reference of ``denoise_step``: the spec the Triton and CUDA kernels match.

One step of masked iterative denoising (LLaDA ``generate.py``; threshold rule of Fast-dLLM), for
``B`` rows of ``L`` positions over a vocabulary of ``V``:

1. ``x0[b, l]``: ``argmax_v logits[b, l, v]`` at ``temperature == 0`` (ties -> lowest ``v``, as
   ``torch.argmax``); else the Gumbel-max sample
   ``argmax_v (logits[b, l, v] * (1 / temperature) + g[b, l, v])``, ``g = -log(-log(u))``, which is
   LLaDA's ``add_gumbel_noise`` (``exp(logits) / (-log u) ** T``) taken to log space.
2. ``confidence[b, l]`` from ``p = softmax(logits[b, l])`` (untempered, as LLaDA):
   ``"low_confidence"``: ``p[x0]``; ``"margin"``: ``p_(1) - p_(2)`` (two largest probabilities);
   ``"entropy"``: ``sum_v p_v log p_v`` (negative entropy; ``0 log 0 = 0``);
   ``"random"``: a uniform ``u[b, l]`` in (0, 1).
3. Per row, among committable positions (masked: ``tokens == mask_id``, with a confidence that
   is not NaN, see below), ordered by confidence descending with ties broken by lower position:
   commit the first ``min(num_transfer[b], committable count)``; or, in threshold mode, every one
   with ``confidence >= threshold`` and always the first.
4. ``tokens[b, l] = x0[b, l]`` where committed (in place). At unmasked positions ``x0`` is the token
   itself and ``confidence`` is ``-inf``.

Non-finite logits at a masked position (every backend, without an extra pass over the logits:
the row's running max, which propagates NaN, classifies it):

- A row holding a NaN, or no logit above ``-inf``, has no distribution: ``x0 = mask_id``,
  ``confidence = NaN`` (whatever the remasking mode), and it is never committed. Step 3 ranks only
  the committable positions (masked, confidence not NaN): ``num_transfer`` clamps to their count,
  and the threshold rule's "always the most confident one" means the most confident committable
  one (none when there is none).
- A row holding ``+inf`` (and no NaN) is the point mass on its lowest ``+inf`` index: ``x0`` is that
  index at any temperature; confidence ``1`` (``"low_confidence"``, ``"margin"``), ``0``
  (``"entropy"``), ``u`` (``"random"``).
- ``-inf`` logits (banned tokens) are ordinary: ``p = 0`` and ``0 log 0 = 0``.

Finite logits of any size (``torch.finfo(dtype).min``, as transformers'
``InfNanRemoveLogitsProcessor`` writes, up to ``finfo.max``) are ordinary too: ``p`` and the
confidences are computed from ``x - max``, never from ``x`` alone, so nothing overflows. The
Gumbel key ``x * (1 / temperature)`` is an fp32 product: at ``temperature < 1`` logits beyond
``finfo(float32).max * temperature`` give keys of ``+-inf``, which tie (lowest index, as above;
a row whose every key is ``-inf`` samples index 0).

Random numbers (counter-based, reproducible from ``seed`` alone on any backend)
------------------------------------------------------------------------------
Philox-4x32-10 (Salmon et al. 2011, the generator of ``tl.philox`` / curand), key
``(k0, k1) = (seed & 0xffffffff, seed >> 32)`` for a ``seed`` in ``[0, 2**63)``, counter
``(c0, c1, c2, c3)``; the first output word ``r`` (uint32) becomes the uniform
``u = ((r >> 9) + 0.5) * 2**-23``, exact in fp32 and strictly inside (0, 1).

- Gumbel noise of vocabulary entry ``v`` at flat position ``pos = b * L + l``:
  counter ``(v, pos, 0, 0)``.
- The ``"random"`` remasking score of position ``pos``: counter ``(0, pos, 1, 0)``.

Both words of the counter are 32-bit, so any ``V < 2**32`` and ``B * L < 2**32`` (far beyond
``B * L * V = 2**40``) get distinct counters without overflow.
"""

from __future__ import annotations

import torch

from .vocab import (GUMBEL_BOUND, GUMBEL_STREAM, NEG_HUGE, RANDOM_SCORE_STREAM,  # noqa: F401
                    REMASKING, TOPK_PROBE)

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10


def _mulhilo32(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``constant * x`` for a uint32 ``constant`` and int64 ``x`` in
    ``[0, 2**32)``. The product needs 64 unsigned bits: int64 multiplication wraps modulo 2**64
    (two's complement), so its bits are the unsigned product's; the arithmetic shift of a
    wrapped (negative) product sign-extends, which the mask removes."""
    product = x * constant
    return torch.bitwise_right_shift(product, 32) & _MASK32, product & _MASK32


def philox_word(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int = 0
                ) -> torch.Tensor:
    """First output word ``r`` of Philox-4x32-10 at counters ``(c0, c1, c2, c3)``, key ``seed``.

    ``c0``, ``c1``: integer tensors (broadcastable) with values in ``[0, 2**32)``. Returns int64
    holding the uint32 ``r`` (the broadcast shape), bit-exact with
    ``tl.philox(seed, c0, c1, c2, c3)[0]``.

    Cost (it is what sampling costs on the torch backend): counter words keep their own shapes
    until a round mixes them (``c2``, ``c3`` are scalars, ``c0 = [1, V]`` and ``c1 = [P, 1]`` for
    the Gumbel noise), so the multiplies of the first two rounds are O(P + V). The other rounds
    run over the full shape in place in six int64 buffers allocated once (fresh multi-MB tensors
    per op cost more than the arithmetic), 10 ops a round: the words carry garbage above bit 31,
    which XOR and the low product word never move down, so only the two multiplicands are masked.
    """
    shape = torch.broadcast_shapes(c0.shape, c1.shape)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    x0, x1 = c0.to(torch.int64), c1.to(torch.int64)
    x2 = torch.tensor(c2 & _MASK32, dtype=torch.int64, device=x0.device)
    x3 = torch.tensor(c3 & _MASK32, dtype=torch.int64, device=x0.device)
    for _ in range(2):   # small operands: the shapes of c0, c1 and scalars
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, x2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, x0)
        x0, x1, x2, x3 = hi_b ^ x1 ^ k0, lo_b, hi_a ^ x3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    x0, x1, x2, x3 = (torch.broadcast_to(w, shape).clone() for w in (x0, x1, x2, x3))
    prod_a, prod_b = torch.empty_like(x0), torch.empty_like(x0)
    for _ in range(2, _PHILOX_ROUNDS):
        torch.mul(x2.bitwise_and_(_MASK32), _PHILOX_ROUND_B, out=prod_b)
        torch.mul(x0.bitwise_and_(_MASK32), _PHILOX_ROUND_A, out=prod_a)
        torch.bitwise_right_shift(prod_b, 32, out=x0).bitwise_xor_(x1).bitwise_xor_(k0)  # hi_b ^ x1 ^ k0
        torch.bitwise_right_shift(prod_a, 32, out=x2).bitwise_xor_(x3).bitwise_xor_(k1)  # hi_a ^ x3 ^ k1
        x1, prod_b = prod_b, x1                                                          # lo_b
        x3, prod_a = prod_a, x3                                                          # lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return x0.bitwise_and_(_MASK32)


def philox_uniform(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int = 0
                   ) -> torch.Tensor:
    """Uniform fp32 in (0, 1) from Philox-4x32-10 at counters ``(c0, c1, c2, c3)``, key ``seed``.

    ``c0``, ``c1``: integer tensors (broadcastable) with values in ``[0, 2**32)``. Bit-exact with
    ``tl.philox(seed, c0, c1, c2, c3)[0]`` followed by ``((r >> 9) + 0.5) * 2**-23``.
    """
    r = philox_word(seed, c0, c1, c2, c3)
    return torch.bitwise_right_shift(r, 9, out=r).to(torch.float32).add_(0.5).mul_(2.0 ** -23)


# Positions per chunk of the torch step: about this many logits, so that the chunk's fp32 and
# int64 temporaries (7 int64 Philox words and buffers when sampling) stay in the CPU's L2 / L3
# instead of streaming [B, L, V] temporaries through DRAM.
_CHUNK_LOGITS = 1 << 17


def _gumbel_rows(seed: int, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``g = -log(-log(u))`` fp32 ``[P, vocab]`` at counters ``(v, positions[p], 0, 0)``."""
    vocab_ids = torch.arange(vocab, device=positions.device).view(1, vocab)
    u = philox_uniform(seed, vocab_ids, positions.view(-1, 1), GUMBEL_STREAM)
    return u.log_().neg_().log_().neg_()


# GUMBEL_BOUND (a2r_kernels.vocab) is an upper bound on every Gumbel draw g = -log(-log u):
# u <= 1 - 2**-24 gives g <= 16.636 (fp32). A draw at a logit x cannot beat a running best when
# fl(x + GUMBEL_BOUND) < best, because fl is monotone; the margin over 16.636 covers the log
# implementations of every backend. TOPK_PROBE: the largest logits whose noisy values give the
# first bound of the Gumbel-max.


def _gumbel(seed: int, vocab_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 Gumbel noise at Philox counters ``(vocab_ids, positions, 0, 0)`` (broadcast)."""
    u = philox_uniform(seed, vocab_ids, positions, GUMBEL_STREAM)
    return -torch.log(-torch.log(u))


def gumbel_argmax(x: torch.Tensor, seed: int, valid: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax_v (x[n, v] + g[n, v])`` for fp32 ``x [N, V]``, ``g`` the Gumbel noise at flat
    position ``positions[n]`` (int64 ``[N]``; default ``n``); int64 ``[N]``, ties -> lowest ``v``;
    0 where ``valid [N]`` (bool) is False.

    Equal to materialising ``x + gumbel_noise`` (the definition; a test holds them equal) but
    draws noise only where it can matter: ``best0`` is the best noisy value among the row's
    ``TOPK_PROBE`` largest logits, and only entries with ``x + GUMBEL_BOUND >= best0`` can reach
    it. For a peaked (LM-like) distribution that is a few entries per row; when more than half
    of all entries are candidates (flat rows) the dense definition runs instead.
    """
    num_rows, vocab = x.shape
    probe_x, probe_v = x.topk(min(TOPK_PROBE, vocab), dim=-1)
    rows = torch.arange(num_rows, device=x.device)
    if positions is None:
        positions = rows
    best0 = (probe_x + _gumbel(seed, probe_v, positions[:, None])).amax(dim=-1)
    best0 = torch.where(valid, best0, float("inf"))            # invalid rows: no candidates
    candidates = x + GUMBEL_BOUND >= best0[:, None]
    if 2 * int(candidates.sum()) > candidates.numel():
        # Mostly flat rows: the definition itself (dense noise, no gather) is cheaper, in chunks
        # of rows whose Philox temporaries stay in cache (as denoise_step's torch path).
        sample = torch.empty(num_rows, dtype=torch.int64, device=x.device)
        step = max(1, _CHUNK_LOGITS // vocab)
        for first in range(0, num_rows, step):
            chunk = slice(first, first + step)
            sample[chunk] = (x[chunk] + _gumbel_rows(seed, positions[chunk], vocab)).argmax(dim=-1)
        return torch.where(valid, sample, 0)
    cand_row, cand_v = candidates.nonzero(as_tuple=True)
    noisy = x[cand_row, cand_v] + _gumbel(seed, cand_v, positions[cand_row])
    row_best = torch.full((num_rows,), float("-inf"), device=x.device)
    row_best = row_best.scatter_reduce(0, cand_row, noisy, reduce="amax")
    at_best = noisy == row_best[cand_row]                      # lowest index among the best
    first = torch.full((num_rows,), vocab, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, cand_row[at_best], cand_v[at_best], reduce="amin")
    return torch.where(valid & (first < vocab), first, 0)


def gumbel_noise(seed: int, batch: int, length: int, vocab: int, device) -> torch.Tensor:
    """``g = -log(-log(u))`` fp32 ``[batch, length, vocab]`` at counters ``(v, b * length + l, 0, 0)``."""
    positions = torch.arange(batch * length, device=device)
    return _gumbel_rows(seed, positions, vocab).view(batch, length, vocab)


def random_scores(seed: int, batch: int, length: int, device) -> torch.Tensor:
    """Uniform fp32 ``[batch, length]`` remasking scores at counters ``(0, b * length + l, 1, 0)``."""
    positions = torch.arange(batch * length, device=device).view(batch, length)
    return philox_uniform(seed, torch.zeros_like(positions), positions, RANDOM_SCORE_STREAM)


def select_transfer(confidence: torch.Tensor, masked: torch.Tensor,
                    num_transfer: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """bool ``[B, L]``: the positions each row commits.

    confidence fp32 [B, L]; masked bool [B, L]; num_transfer int64 [B] (top-k mode) or None with a
    float ``threshold``. Candidates are the committable positions: masked, confidence not NaN
    (their confidence is finite). Order: confidence descending, ties -> lower position (a stable
    sort); rank r of a candidate = its place in that order. Top-k: rank < num_transfer[b].
    Threshold: confidence >= threshold or rank 0. No host sync.
    """
    batch, length = confidence.shape
    committable = masked & ~confidence.isnan()
    key = torch.where(committable, confidence, float("-inf"))   # candidates first, in order
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(length, device=order.device).expand(batch, length))
    if num_transfer is not None:
        return committable & (rank < num_transfer.view(batch, 1))
    return committable & ((confidence >= threshold) | (rank == 0))


def _predict_rows(x: torch.Tensor, positions: torch.Tensor, mask_id: int, temperature: float,
                  remasking: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 int64 ``[P]`` and confidence fp32 ``[P]`` of masked rows ``x`` fp32 ``[P, V]``
    (``positions``: their flat indices ``b * L + l``, the Philox counter), the rows classified
    by their max as in the module docstring. ``x`` is the caller's scratch: overwritten."""
    row_max = x.amax(dim=-1)                      # propagates NaN: it classifies the row
    if temperature > 0:   # noise drawn only where it can win (exact; see gumbel_argmax)
        x0 = gumbel_argmax(torch.mul(x, 1.0 / temperature), seed, row_max > float("-inf"),
                           positions)             # lowest index on ties (+inf rows included)
        x0_logit = x.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        x0 = x.argmax(dim=-1)
        x0_logit = row_max
    if remasking == "margin":
        second = x.topk(2, dim=-1).values[:, 1] if x.shape[1] >= 2 else torch.full_like(
            row_max, float("-inf"))
    shifted = x.sub_(row_max.unsqueeze(-1))       # x - m (in place: x is scratch)
    if remasking == "entropy":
        shifted.clamp_(min=NEG_HUGE)
        weights = shifted.exp()
        sum_exp = weights.sum(dim=-1)
        score = weights.mul_(shifted).sum(dim=-1) / sum_exp - sum_exp.log()   # sum p log p
    else:
        sum_exp = shifted.exp_().sum(dim=-1)
        if remasking == "low_confidence":
            score = torch.exp(x0_logit - row_max) / sum_exp
        elif remasking == "margin":
            score = (1.0 - torch.exp(second - row_max)) / sum_exp
        else:   # random
            score = philox_uniform(seed, torch.zeros_like(positions), positions,
                                   RANDOM_SCORE_STREAM)
    point_mass = row_max == float("inf")
    if remasking != "random":
        score = torch.where(point_mass, 1.0 if remasking != "entropy" else 0.0, score)
    undefined = ~(row_max > float("-inf"))        # NaN, or no logit above -inf
    return (torch.where(undefined, mask_id, x0),
            torch.where(undefined, float("nan"), score))


def denoise_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                 num_transfer: torch.Tensor | None, threshold: float | None,
                 temperature: float, remasking: str, seed: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 reference step; see the module docstring for the formulas.

    logits [B, L, V] float (any strides); tokens int64 [B, L], updated in place;
    num_transfer int64 [B] on any device, or None (then ``threshold`` is a float).
    Returns (x0 int64 [B, L], confidence fp32 [B, L], transferred bool [B, L]).
    Inputs are assumed valid (the public op checks them).

    Only masked rows are read, in chunks of about ``_CHUNK_LOGITS`` logits: per chunk one fp32
    copy of the rows, then max, argmax (or the Gumbel-max sample), one ``exp`` pass and a sum;
    p itself (``[B, L, V]`` softmax and log-softmax) is never materialised.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    batch, length, vocab = logits.shape
    masked = tokens == mask_id
    flat_tokens = tokens.reshape(-1)
    x0 = flat_tokens.clone()
    confidence = torch.full((batch * length,), float("-inf"), dtype=torch.float32,
                            device=logits.device)
    rows = logits.reshape(batch * length, vocab)
    positions = masked.reshape(-1).nonzero().squeeze(-1)
    chunk = max(1, _CHUNK_LOGITS // max(vocab, 1))
    for start in range(0, positions.numel(), chunk):
        pos = positions[start:start + chunk]
        x = rows.index_select(0, pos).float()     # a copy: scratch for _predict_rows
        x0[pos], confidence[pos] = _predict_rows(x, pos, mask_id, temperature, remasking, seed)
    x0 = x0.view(batch, length)
    confidence = confidence.view(batch, length)
    if num_transfer is not None:
        num_transfer = num_transfer.to(confidence.device)
    transferred = select_transfer(confidence, masked, num_transfer, threshold)
    tokens.copy_(torch.where(transferred, x0, tokens))
    return x0, confidence, transferred
