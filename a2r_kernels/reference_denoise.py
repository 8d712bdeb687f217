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
3. Per row, among masked positions (``tokens == mask_id``), ordered by confidence descending with
   ties broken by lower position: commit the first ``min(num_transfer[b], masked count)``; or, in
   threshold mode, every one with ``confidence >= threshold`` and always the first.
4. ``tokens[b, l] = x0[b, l]`` where committed (in place). At unmasked positions ``x0`` is the token
   itself and ``confidence`` is ``-inf``.

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

REMASKING = ("low_confidence", "margin", "entropy", "random")

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
GUMBEL_STREAM = 0
RANDOM_SCORE_STREAM = 1


def _mulhilo32(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``constant * x`` for a uint32 ``constant`` and int64 ``x`` in
    ``[0, 2**32)``, without int64 overflow (x is split into 16-bit halves)."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    prod_lo = constant * x_lo                        # < 2**48
    mid = constant * x_hi + (prod_lo >> 16)          # == (constant * x) >> 16, < 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (prod_lo & 0xFFFF)


def philox_word(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int = 0
                ) -> torch.Tensor:
    """First output word ``r`` of Philox-4x32-10 at counters ``(c0, c1, c2, c3)``, key ``seed``.

    ``c0``, ``c1``: integer tensors (broadcastable) with values in ``[0, 2**32)``. Returns int64
    holding the uint32 ``r``, bit-exact with ``tl.philox(seed, c0, c1, c2, c3)[0]``.
    """
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64))
    c2t = torch.full_like(c0, c2)
    c3t = torch.full_like(c0, c3)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2t)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2t, c3t = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3t ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int = 0
                   ) -> torch.Tensor:
    """Uniform fp32 in (0, 1) from Philox-4x32-10 at counters ``(c0, c1, c2, c3)``, key ``seed``.

    ``c0``, ``c1``: integer tensors (broadcastable) with values in ``[0, 2**32)``. Bit-exact with
    ``tl.philox(seed, c0, c1, c2, c3)[0]`` followed by ``((r >> 9) + 0.5) * 2**-23``.
    """
    r = philox_word(seed, c0, c1, c2, c3)
    return ((r >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel_noise(seed: int, batch: int, length: int, vocab: int, device) -> torch.Tensor:
    """``g = -log(-log(u))`` fp32 ``[batch, length, vocab]`` at counters ``(v, b * length + l, 0, 0)``."""
    positions = torch.arange(batch * length, device=device).view(batch, length, 1)
    vocab_ids = torch.arange(vocab, device=device).view(1, 1, vocab)
    u = philox_uniform(seed, vocab_ids, positions, GUMBEL_STREAM)
    return -torch.log(-torch.log(u))


def random_scores(seed: int, batch: int, length: int, device) -> torch.Tensor:
    """Uniform fp32 ``[batch, length]`` remasking scores at counters ``(0, b * length + l, 1, 0)``."""
    positions = torch.arange(batch * length, device=device).view(batch, length)
    return philox_uniform(seed, torch.zeros_like(positions), positions, RANDOM_SCORE_STREAM)


def select_transfer(confidence: torch.Tensor, masked: torch.Tensor,
                    num_transfer: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """bool ``[B, L]``: the positions each row commits.

    confidence fp32 [B, L]; masked bool [B, L]; num_transfer int64 [B] (top-k mode) or None with a
    float ``threshold``. Order: confidence descending, ties -> lower position (a stable sort).
    """
    batch, length = confidence.shape
    transferred = torch.zeros(batch, length, dtype=torch.bool, device=confidence.device)
    for b in range(batch):
        candidates = masked[b].nonzero().flatten()             # ascending positions
        if candidates.numel() == 0:
            continue
        order = torch.sort(confidence[b, candidates], descending=True, stable=True).indices
        ranked = candidates[order]
        if num_transfer is not None:
            take = ranked[:max(0, min(int(num_transfer[b]), ranked.numel()))]
        else:
            above = confidence[b, ranked] >= threshold
            above[0] = True                                    # always the most confident one
            take = ranked[above]
        transferred[b, take] = True
    return transferred


def denoise_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                 num_transfer: torch.Tensor | None, threshold: float | None,
                 temperature: float, remasking: str, seed: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 reference step; see the module docstring for the formulas.

    logits [B, L, V] float (any strides); tokens int64 [B, L], updated in place;
    num_transfer int64 [B] on any device, or None (then ``threshold`` is a float).
    Returns (x0 int64 [B, L], confidence fp32 [B, L], transferred bool [B, L]).
    Inputs are assumed valid (the public op checks them).
    """
    batch, length, vocab = logits.shape
    x = logits.float()
    masked = tokens == mask_id
    log_probs = torch.log_softmax(x, dim=-1)
    probs = log_probs.exp()

    if temperature > 0:
        noisy = x * (1.0 / temperature) + gumbel_noise(seed, batch, length, vocab, x.device)
        x0 = noisy.argmax(dim=-1)
    else:
        x0 = x.argmax(dim=-1)

    if remasking == "low_confidence":
        score = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == "margin":
        top2 = probs.topk(2, dim=-1).values if vocab >= 2 else torch.cat(
            [probs, torch.zeros_like(probs)], dim=-1)
        score = top2[..., 0] - top2[..., 1]
    elif remasking == "entropy":
        plogp = torch.where(log_probs == float("-inf"), 0.0, probs * log_probs)
        score = plogp.sum(dim=-1)
    elif remasking == "random":
        score = random_scores(seed, batch, length, x.device)
    else:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")

    x0 = torch.where(masked, x0, tokens)
    confidence = torch.where(masked, score, float("-inf"))
    if num_transfer is not None:
        num_transfer = num_transfer.to(confidence.device)
    transferred = select_transfer(confidence, masked, num_transfer, threshold)
    tokens.copy_(torch.where(transferred, x0, tokens))
    return x0, confidence, transferred
