"""The diffusion "thinker" loop: LLaDA-style semi-autoregressive masked-diffusion generation.

The sequence is ``prompt + gen_length`` [MASK] tokens, cut into ``gen_length / block_length``
blocks decoded left to right. Every step runs the model, slices the logits to the *active* block
(``[B, block_length, V]``) and calls :func:`a2r_kernels.denoise_step` on it, which commits some of
the block's masked positions in place. Positions after the active block stay masked and are only
context.

Two schedules (``steps`` / ``threshold``):

- fixed (LLaDA ``generate``): each block gets ``steps / num_blocks`` steps; step ``i`` commits
  ``num_transfer[i]`` tokens with ``base = masked // steps_per_block`` and the remainder spread on
  the first steps (LLaDA's ``get_num_transfer_tokens``). A step that would commit 0 tokens in every
  row (``block_length < steps_per_block``) is skipped: it would change nothing.
- threshold (Fast-dLLM parallel decoding): commit every masked position whose confidence is
  ``>= threshold`` and at least the most confident one, until the block has no mask left; so
  ``1 <= steps <= block_length`` per block and ``steps`` is ignored.

The [MASK] logit is set to ``-inf`` before every step: [MASK] is never a prediction.

Two caches (``cache``):

- ``"none"``: exact. Every step is a full forward over prompt + the whole generation.
- ``"prefix"``: Fast-dLLM's prefix cache. The first step of each block is a full forward; it also
  records, for every layer, the K/V of all positions *before* the block into an
  :class:`a2r_kernels.TreeKVCache` (one sequence per batch row). The block's later steps forward
  only ``x[:, block_start:]`` (the block *and* the still-masked suffix, as Fast-dLLM's
  ``generate_with_prefix_cache``) and attend bidirectionally to ``[cached prefix K/V ; current]``.

  The approximation, precisely: in the exact model the K/V of a prefix position at layer ``l >= 1``
  is a function of the *whole* current sequence (attention is bidirectional), so it changes every
  time a token of the active block is committed. The cache freezes it at its value at the block's
  first step, where the active block and the suffix were all [MASK]. What stays exact: the first
  step of every block (a full forward); layer 0's prefix K/V (they depend on the token and its
  position only), hence a 1-layer model decodes identically in both modes; and everything when a
  block has a single step. It applies to the first block too: the prompt's deeper-layer K/V saw
  the block as masks. The error is the model's sensitivity of prefix states to the block, which
  Fast-dLLM measures as small for LLaDA; here it is exposed, not hidden (see the tests).

EOS: with ``eos_token_id`` set, a row is *finished* as soon as it holds a committed EOS with no
[MASK] before it in the generation: nothing after that EOS can reach the returned tokens (they are
trimmed at the first EOS), so its remaining masked positions are filled with EOS (committed tokens
are never changed) and it costs no more denoising. Generation stops when every row is finished:
checked at each block start with the fixed schedule (the loop reads the host once per block, so a
block in which every row finishes runs its remaining steps), after every step in threshold mode
(which reads the host once per step anyway, to end the block).
Returned ids end at, and include, the first EOS (as :func:`a2r.sample_parallel`).

Batches are left-padded. Padding keys are masked out of every attention (the model must honour
``attention_mask``; ours does, through transformers' mask builder) and position ids count real
tokens only (``cumsum(mask) - 1``), so every row decodes as it would alone (up to the float
rounding of a different batch shape).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

import a2r_kernels as ak
from a2r_kernels.backend import resolve_backend
from a2r_kernels.vocab import (REMASKING, attention_geometry, eos_ids as _eos_ids,
                                positive_int as _positive_int)

from .gemma import diffusion_gemma_generate, is_diffusion_gemma
from .models import (A2R_ATTENTION, build_tiny_diffusion_model, is_causal_prompt_model,
                              is_remote_code_model, load_diffusion_model, uses_a2r_attention)

__all__ = ["DiffusionResult", "build_tiny_diffusion_model", "diffusion_generate",
           "get_num_transfer_tokens", "load_diffusion_model"]

CACHE_MODES = ("none", "prefix")
# Tokens per block of the prefix KV pool. Any value works; 16 is the pool's default.
PREFIX_KV_BLOCK_SIZE = 16


@dataclass
class DiffusionResult:
    """What :func:`diffusion_generate` returns with ``return_details=True``.

    Attributes:
        sequences: per row, the generated ids (trimmed at and including the first EOS).
        tokens: int64 ``[B, P + gen_length]``: the padded prompt and the whole generation
            (EOS-filled after a finished row's EOS; no [MASK] left).
        num_forward_calls: model forward calls (a classifier-free-guidance step batches its
            conditional and unconditional passes into one call).
        steps_per_block: denoising steps (= forward calls) of each block; 0 for blocks skipped
            because every row had finished.
        prompt_length: ``P``, the padded prompt length (generation starts at column ``P``).
        encoder_forward_calls: DiffusionGemma only: encoder passes (the prompt once, then one
            per later canvas); ``num_forward_calls`` then counts decoder passes.
    """

    sequences: list[list[int]]
    tokens: torch.Tensor
    num_forward_calls: int
    steps_per_block: list[int] = field(default_factory=list)
    prompt_length: int = 0
    encoder_forward_calls: int = 0


def get_num_transfer_tokens(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: tokens to commit at each of ``steps`` steps.

    ``num_masked``: int64 ``[B]`` masked positions of the block at its start. Returns int64
    ``[B, steps]`` with ``base = num_masked // steps`` everywhere and ``+1`` on the first
    ``num_masked % steps`` steps, so each row sums to ``num_masked``.
    """
    base = num_masked // steps
    remainder = num_masked - base * steps
    step = torch.arange(steps, device=num_masked.device)
    return base[:, None] + (step[None, :] < remainder[:, None]).long()


# ---------------------------------------------------------------------------------- prefix KV
class PrefixKV:
    """Per-layer K/V of the prefix ``[0, prefix_len)`` of every row, in an ``ak.TreeKVCache``.

    One cache sequence per row. ``start_block(prefix_len)`` grows each sequence to ``prefix_len``
    tokens (the slots of earlier tokens are kept and overwritten: their K/V are recomputed at every
    block start). The attention function (``a2r.thinker.models``) calls :meth:`attend_layer`:

    - ``mode == "capture"`` (the block's full forward): scatter ``key/value[:, :, :prefix_len]`` of
      each layer into the pool; attention itself runs on the unchanged full K/V.
    - ``mode == "extend"`` (the block's later steps): return ``cat([prefix K/V, key/value])``.
    """

    def __init__(self, num_rows: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_prefix_len: int, dtype: torch.dtype, device: torch.device):
        blocks_per_row = max(1, -(-max_prefix_len // PREFIX_KV_BLOCK_SIZE))
        self.cache = ak.TreeKVCache(num_layers, num_kv_heads, head_dim,
                                    num_blocks=num_rows * blocks_per_row,
                                    block_size=PREFIX_KV_BLOCK_SIZE, dtype=dtype, device=device)
        self.seqs = [self.cache.new_sequence() for _ in range(num_rows)]
        self.num_rows = num_rows
        self.slots = torch.empty(num_rows, 0, dtype=torch.int64, device=self.cache.device)
        self.mode = "capture"

    @property
    def prefix_len(self) -> int:
        return self.slots.shape[1]

    def start_block(self, prefix_len: int) -> None:
        """Grow every row's sequence to ``prefix_len`` tokens and switch to ``capture``."""
        new = prefix_len - self.prefix_len
        if new < 0:
            raise RuntimeError(f"prefix shrank from {self.prefix_len} to {prefix_len}")
        if new:
            new_slots = self.cache.reserve(self.seqs, num_tokens=new).view(self.num_rows, new)
            self.slots = torch.cat([self.slots, new_slots], dim=1)
        self.mode = "capture"

    def attend_layer(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """``key, value``: ``[R, Hkv, T, D]`` of the current forward -> the K/V attention uses."""
        num_rows, num_kv_heads, _, head_dim = key.shape
        plen = self.prefix_len
        if plen == 0:
            return key, value
        flat_slots = self.slots.reshape(-1)
        if self.mode == "capture":
            # [R, Hkv, P, D] -> [R * P, Hkv, D], row-major like the slots. The casts are no-ops
            # unless the forward runs in another dtype than the weights (autocast).
            dtype = self.cache.dtype
            self.cache.write(
                layer, flat_slots,
                key[:, :, :plen].transpose(1, 2).reshape(-1, num_kv_heads, head_dim).to(dtype),
                value[:, :, :plen].transpose(1, 2).reshape(-1, num_kv_heads, head_dim).to(dtype))
            return key, value
        pool_k = self.cache.k[layer].view(-1, num_kv_heads, head_dim)
        pool_v = self.cache.v[layer].view(-1, num_kv_heads, head_dim)
        prefix_k = pool_k.index_select(0, flat_slots).view(num_rows, plen, num_kv_heads, head_dim)
        prefix_v = pool_v.index_select(0, flat_slots).view(num_rows, plen, num_kv_heads, head_dim)
        return (torch.cat([prefix_k.transpose(1, 2).to(key.dtype), key], dim=2),
                torch.cat([prefix_v.transpose(1, 2).to(value.dtype), value], dim=2))


# ---------------------------------------------------------------------------------- model calls
class _ModelRunner:
    """Runs one forward and returns the logits of the active block, ``[R, block_length, V]``.

    Hides the three model families: ours (``A2R_ATTENTION``: 2-D padding mask, position ids,
    ``logits_to_keep``, prefix cache), LLaDA's remote code (2-D mask, its own positions) and
    Dream's remote code (4-D boolean mask or ``"full"``, ``tok_idx`` positions, logits shifted by
    one: position ``i`` is predicted by the output at ``i - 1``).
    """

    def __init__(self, model, row_mask: torch.Tensor, positions: torch.Tensor, prompt_len: int):
        self.model = model
        self.row_mask = row_mask            # bool [R, L], False at left padding
        self.positions = positions          # int64 [R, L]
        self.has_padding = not bool(row_mask.all())
        self.ours = uses_a2r_attention(model)
        # A prefix-causal model's forward is told where the prompt ends (diffusion_model docs).
        self.prompt_len = prompt_len if self.ours and is_causal_prompt_model(model) else None
        self.dream = getattr(model.config, "model_type", "").lower() == "dream"
        params = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        if self.has_padding and not (self.takes_positions or self.dream):
            warnings.warn(f"{type(model).__name__}.forward takes no position_ids: with left "
                          "padding its positions count the pad tokens (as in LLaDA's own "
                          "generate)", stacklevel=3)
        self.num_forward_calls = 0

    def block_logits(self, tokens: torch.Tensor, block_start: int, block_end: int,
                     prefix: PrefixKV | None = None) -> torch.Tensor:
        """Logits of positions ``[block_start, block_end)`` given the model sees ``tokens``.

        ``tokens`` is ``[R, L]`` (full sequence) or, with ``prefix`` in ``extend`` mode,
        ``[R, L - block_start]`` (the block and the suffix; the prefix comes from the cache).
        """
        self.num_forward_calls += 1
        offset = block_start if prefix is not None and prefix.mode == "extend" else 0
        keep = torch.arange(block_start - offset, block_end - offset, device=tokens.device)
        if self.ours:
            # The 2-D padding mask always spans all L columns: in extend mode that is the cached
            # prefix + the current tokens, the keys the attention function sees.
            kwargs = dict(attention_mask=self.row_mask.long() if self.has_padding else None,
                          position_ids=self.positions[:, offset:], use_cache=False)
            if prefix is not None:
                kwargs["a2r_prefix"] = prefix
            if self.prompt_len is not None:
                kwargs["a2r_prompt_len"] = self.prompt_len
            if self.takes_logits_to_keep:
                kwargs["logits_to_keep"] = keep
                return self.model(tokens, **kwargs).logits
            return self.model(tokens, **kwargs).logits[:, keep]
        if self.dream:
            if self.has_padding:
                mask = self.row_mask[:, None, None, :].expand(-1, 1, tokens.shape[1], -1)
                logits = self.model(tokens, mask, self.positions).logits
            else:
                logits = self.model(tokens, "full", None).logits
            return logits[:, (keep - 1).clamp_min(0)]
        kwargs = {"attention_mask": self.row_mask.long()} if self.has_padding else {}
        if self.takes_positions and self.has_padding:
            kwargs["position_ids"] = self.positions
        return self.model(tokens, **kwargs).logits[:, keep]


# ---------------------------------------------------------------------------------- inputs
def _as_prompt(prompt_ids, attention_mask, pad_token_id,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (prompt int64 [B, P], keep bool [B, P]) on ``device``, left-padded."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
            raise ValueError("prompt_ids must be an int tensor [B, P] (or [P]) with B >= 1, got "
                             f"shape {tuple(prompt_ids.shape)}")
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
        prompt = prompt_ids.to(device=device, dtype=torch.int64)
        if attention_mask is None:
            keep = torch.ones_like(prompt, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or \
                    tuple(attention_mask.shape) != tuple(prompt.shape):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) \
                    else type(attention_mask).__name__
                raise ValueError(f"attention_mask must have prompt_ids' shape "
                                 f"[B={prompt.shape[0]}, P={prompt.shape[1]}], got {got}")
            keep = attention_mask.to(device) != 0
            # Left padding only: once a row's mask turns on it stays on.
            if bool((keep[:, :-1] & ~keep[:, 1:]).any()):
                raise ValueError("attention_mask must be left-padded (zeros, then ones, per row)")
        return prompt, keep
    if attention_mask is not None:
        raise ValueError("attention_mask: pass it only with a prompt_ids tensor; a list of rows "
                         "is left-padded here")
    try:
        rows = [[int(t) for t in row] for row in prompt_ids]
    except (TypeError, ValueError) as exc:
        raise ValueError("prompt_ids must be an int tensor [B, P] or a list of lists of "
                         "ints") from exc
    if not rows:
        raise ValueError("prompt_ids must hold at least one row, got an empty list")
    width = max(len(r) for r in rows)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    prompt = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    keep = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows],
                        dtype=torch.bool).reshape(len(rows), width)
    return prompt.reshape(len(rows), width).to(device), keep.to(device)


def _cut_after_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first token of ``eos_ids`` (the whole row if none)."""
    eos = set(eos_ids)
    cut = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        cut.append(row[:end])
    return cut


# ---------------------------------------------------------------------------------- loop steps
def _model_rows(x: torch.Tensor, start: int, prompt_len: int,
                uncond_prompt: torch.Tensor | None) -> torch.Tensor:
    """Tokens the model sees from column ``start`` on, ``[R, L - start]``: ``x`` (``[B, L]``), and
    with classifier-free guidance (``uncond_prompt [B, P]``) the unconditional rows below it."""
    if uncond_prompt is None:
        return x[:, start:]
    uncond = x.clone()
    uncond[:, :prompt_len] = uncond_prompt
    return torch.cat([x, uncond], dim=0)[:, start:]


def _guided(logits: torch.Tensor, batch: int, cfg_scale: float) -> torch.Tensor:
    """``un + (cfg_scale + 1) (cond - un)`` over the rows of :func:`_model_rows`; identity
    without guidance."""
    if float(cfg_scale) <= 0:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + (float(cfg_scale) + 1.0) * (cond - uncond)


def _finish_rows(gen: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor,
                 mask_id: int) -> torch.Tensor:
    """Rows of ``gen`` (int64 ``[B, G]``, updated in place) holding a committed EOS with no mask
    before it are finished: their masks after that EOS become ``eos[0]``. Returns the updated
    ``finished`` (bool ``[B]``). No host sync."""
    length = gen.shape[1]
    is_eos = torch.isin(gen, eos)
    masked = gen == mask_id
    first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), length)
    column = torch.arange(length, device=gen.device)
    masks_before = (masked & (column[None] < first_eos[:, None])).any(1)
    done = (first_eos < length) & ~masks_before
    fill = done[:, None] & masked & (column[None] > first_eos[:, None])
    gen.masked_fill_(fill, eos[0])
    return finished | done


# ---------------------------------------------------------------------------------- the loop
@torch.no_grad()
def diffusion_generate(model, prompt_ids, *, gen_length: int = 128, block_length: int = 32,
                       steps: int = 32, threshold: float | None = None, temperature: float = 0.0,
                       remasking: str = "low_confidence", cfg_scale: float = 0.0,
                       mask_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                       pad_token_id: int | None = None,
                       attention_mask: torch.Tensor | None = None, cache: str = "none",
                       generator: torch.Generator | None = None, backend: str = "auto",
                       num_traces: int = 1, return_details: bool = False):
    """Generate ``gen_length`` tokens per row with a masked-diffusion LM (LLaDA / Fast-dLLM), or
    with a DiffusionGemma model (:mod:`a2r.thinker.gemma`).

    Args:
        model: a bidirectional masked-diffusion LM: one from :func:`build_tiny_diffusion_model` /
            :func:`load_diffusion_model` (attention ``A2R_ATTENTION``), or a LLaDA / Dream
            remote-code model (``cache="none"`` only). ``model(ids).logits`` is ``[R, L, V]``.
        prompt_ids: int tensor ``[B, P]`` or ``[P]``, left-padded when ``attention_mask`` is
            given; or a list of ``B`` lists of ids (left-padded here with ``pad_token_id``).
        gen_length: generated positions per row; a multiple of ``block_length``.
        block_length: positions per semi-autoregressive block.
        steps: total denoising steps of the fixed schedule; a multiple of
            ``num_blocks = gen_length // block_length``. Ignored when ``threshold`` is set.
        threshold: Fast-dLLM confidence threshold in ``(0, 1]``; None for the fixed schedule.
        temperature: 0 -> greedy ``argmax``; > 0 -> Gumbel-max sampling (``generator``).
        remasking: ``"low_confidence" | "margin" | "entropy" | "random"``, see ``ak.denoise_step``.
        cfg_scale: classifier-free guidance; > 0 adds an unconditional pass (prompt tokens set to
            [MASK]) batched with the conditional one: ``logits = un + (cfg_scale + 1) (cond - un)``.
        mask_id: the [MASK] id; default ``model.config.mask_token_id``.
        eos_token_id: an id or list of ids that end a row (see the module docstring); None: no
            early stop, no trimming.
        pad_token_id: the id for left padding when ``prompt_ids`` is a list of rows (default 0);
            padded positions are masked out of attention whatever their id.
        attention_mask: ``[B, P]`` 0/1, left padding; default all ones.
        cache: ``"none"`` (exact) or ``"prefix"`` (Fast-dLLM prefix cache; approximate, see the
            module docstring; needs ``A2R_ATTENTION``).
        generator: ``torch.Generator`` on the model's device for sampling / random remasking.
        backend: ``ak.denoise_step`` backend: ``"auto" | "torch" | "triton" | "cuda"``.
        num_traces: traces per prompt row; outputs are row-major (trace ``j`` of prompt ``b`` is
            row ``b * num_traces + j``). A masked-diffusion model decodes each trace as its own
            row (identical at ``temperature=0`` unless ``remasking="random"``); DiffusionGemma
            encodes the prompt once for all of them.
        return_details: return a :class:`DiffusionResult` instead of the id lists.

    A ``DiffusionGemmaForBlockDiffusion`` model runs
    :func:`a2r.thinker.gemma.diffusion_gemma_generate` with ``gen_length``, ``eos_token_id``,
    ``pad_token_id``, ``attention_mask``, ``generator``, ``backend``, ``num_traces`` and
    ``return_details``; its schedule comes from its generation config, and the masked-diffusion
    options above must stay at their defaults (ValueError).

    Returns:
        ``list[list[int]]``: per row, the generated ids (through the first EOS if any), or a
        :class:`DiffusionResult` with ``return_details=True``.
    """
    if is_diffusion_gemma(model):
        given = {name: value for name, value in (
            ("block_length", block_length), ("steps", steps), ("threshold", threshold),
            ("temperature", temperature), ("remasking", remasking), ("cfg_scale", cfg_scale),
            ("mask_id", mask_id), ("cache", cache))
            if value != _LLADA_DEFAULTS[name]}
        if given:
            raise ValueError(f"{', '.join(sorted(given))}: masked-diffusion options, not used by "
                             "DiffusionGemma (its schedule comes from its generation config; "
                             "a2r.thinker.gemma.diffusion_gemma_generate overrides it)")
        return diffusion_gemma_generate(
            model, prompt_ids, gen_length=gen_length, num_traces=num_traces,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, attention_mask=attention_mask,
            generator=generator, backend=backend, return_details=return_details)
    gen_length = _positive_int(gen_length, "gen_length")
    num_traces = _positive_int(num_traces, "num_traces")
    block_length = _positive_int(block_length, "block_length")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of "
                         f"block_length={block_length}")
    num_blocks = gen_length // block_length
    if threshold is None:
        steps = _positive_int(steps, "steps")
        if steps % num_blocks:
            raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                             f"gen_length // block_length = {num_blocks}")
        steps_per_block = steps // num_blocks
    else:
        threshold = float(threshold)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        steps_per_block = block_length       # an upper bound: >= 1 token per step
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if float(cfg_scale) < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers model, got {type(model).__name__}")
    if not uses_a2r_attention(model) and not is_remote_code_model(model):
        raise ValueError(
            f"model: {type(model).__name__} runs attention {model.config._attn_implementation!r}, "
            f"which is causal for transformers' decoder classes; build it with "
            f"build_tiny_diffusion_model / load it with load_diffusion_model, or call "
            f"model.set_attn_implementation({A2R_ATTENTION!r}) and set config.is_causal=False")
    if cache == "prefix" and not uses_a2r_attention(model):
        raise ValueError(f"cache='prefix' needs a model running {A2R_ATTENTION!r} attention "
                         f"(its K/V are cached through it); {type(model).__name__} uses its own "
                         "attention code: use cache='none'")
    if mask_id is None:
        mask_id = getattr(model.config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id: not given and model.config.mask_token_id is not set")
    mask_id = int(mask_id)
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must be in [0, vocab_size={vocab_size})")
    eos_ids = _eos_ids(eos_token_id)

    device = next(model.parameters()).device
    resolve_backend("denoise_step", backend, device)   # BackendUnavailable before any forward
    prompt, prompt_keep = _as_prompt(prompt_ids, attention_mask, pad_token_id, device)
    if num_traces > 1:
        prompt = prompt.repeat_interleave(num_traces, dim=0)
        prompt_keep = prompt_keep.repeat_interleave(num_traces, dim=0)
    batch, prompt_len = prompt.shape
    total_len = prompt_len + gen_length
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and total_len > max_positions:
        raise ValueError(f"prompt length {prompt_len} + gen_length {gen_length} exceeds the "
                         f"model's max_position_embeddings={max_positions}")

    x = torch.full((batch, total_len), mask_id, dtype=torch.int64, device=device)
    x[:, :prompt_len] = prompt
    gen_keep = torch.ones(batch, gen_length, dtype=torch.bool, device=device)
    keep = torch.cat([prompt_keep, gen_keep], dim=1)
    positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
    use_cfg = float(cfg_scale) > 0
    if use_cfg:   # rows [0, B): conditional; rows [B, 2B): unconditional (prompt -> [MASK])
        keep, positions = keep.repeat(2, 1), positions.repeat(2, 1)
    num_rows = keep.shape[0]
    runner = _ModelRunner(model, keep, positions, prompt_len)

    prefix = None
    if cache == "prefix":
        cfg = model.config
        _, num_kv_heads, head_dim = attention_geometry(cfg)
        prefix = PrefixKV(num_rows, cfg.num_hidden_layers, num_kv_heads, head_dim,
                          total_len - block_length, next(model.parameters()).dtype, device)

    gen = x[:, prompt_len:]                          # view: the generation, [B, gen_length]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos_ids, dtype=torch.int64, device=device)
    if generator is not None and generator.device.type != "cpu":
        # Every step draws its seed from the generator: a CPU generator seeded once from this one
        # keeps those draws free of host syncs.
        generator = torch.Generator().manual_seed(int(torch.randint(
            0, 2 ** 63 - 1, (1,), generator=generator, device=generator.device).item()))
    uncond_prompt = torch.where(prompt_keep, mask_id, prompt) if use_cfg else None

    # Host syncs: fixed schedule, one per block (its schedule and "every row finished" in one
    # read); threshold mode, one per step ("block done" and "every row finished").
    block_steps = [0] * num_blocks
    all_done = False
    for block in range(num_blocks):
        if all_done:
            break
        start = prompt_len + block * block_length
        end = start + block_length
        block_tokens = x[:, start:end]               # view: denoise_step writes through it
        if threshold is None:
            num_masked = (block_tokens == mask_id).sum(1)
            schedule = get_num_transfer_tokens(num_masked, steps_per_block)
            host = torch.cat([finished.all().view(1).long(), schedule.flatten()]).tolist()
            if host[0]:
                break
            # a host tensor: the per-step num_transfer costs no sync
            schedule = torch.tensor(host[1:], dtype=torch.int64).view(batch, steps_per_block)
            step_commits = [any(host[1 + step::steps_per_block]) for step in range(steps_per_block)]
        else:
            schedule, step_commits = None, [True] * steps_per_block
        if prefix is not None:
            prefix.start_block(start)
        for step in range(steps_per_block):
            if not step_commits[step]:
                continue   # commits nothing in any row: an identical forward, skip it
            extend = prefix is not None and step > 0
            if extend:
                prefix.mode = "extend"
            rows = _model_rows(x, start if extend else 0, prompt_len, uncond_prompt)
            logits = _guided(runner.block_logits(rows, start, end, prefix), batch, cfg_scale)
            block_steps[block] += 1
            # [MASK] is never a valid prediction (a trained model gives it ~0 probability; an
            # untrained one may not): committing it would leave the position masked forever.
            logits[..., mask_id] = float("-inf")
            ak.denoise_step(logits, block_tokens, mask_id,
                            num_transfer=None if schedule is None else schedule[:, step],
                            threshold=threshold, temperature=float(temperature),
                            remasking=remasking, generator=generator, backend=backend)
            if eos_ids:
                finished = _finish_rows(gen, finished, eos_tensor, mask_id)
            if threshold is not None:
                block_left, all_done = torch.stack(
                    [(block_tokens == mask_id).any(), finished.all()]).tolist()
                if all_done or not block_left:
                    break

    generated = gen.tolist()
    for row in generated:
        if mask_id in row:
            block = row.index(mask_id) // block_length
            raise RuntimeError(f"block {block} still has masked positions after "
                               f"{block_steps[block]} steps: denoise_step committed too few tokens")
    sequences = _cut_after_eos(generated, eos_ids)
    if not return_details:
        return sequences
    return DiffusionResult(sequences=sequences, tokens=x,
                           num_forward_calls=runner.num_forward_calls,
                           steps_per_block=block_steps, prompt_length=prompt_len)


# The masked-diffusion options' defaults: a DiffusionGemma call must leave them unset.
_LLADA_DEFAULTS = {
    name: param.default for name, param in inspect.signature(diffusion_generate).parameters.items()
    if name in ("block_length", "steps", "threshold", "temperature", "remasking", "cfg_scale",
                "mask_id", "cache")}
