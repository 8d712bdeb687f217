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
from dataclasses import dataclass
from typing import Sequence

import torch

import a2r_kernels as ak
from a2r_kernels.backend import resolve_backend
from a2r_kernels.vocab import (DEFAULT_BLOCK_SIZE, REMASKING, SEED_BOUND, attention_geometry,
                                eos_ids, positive_int as _positive_int)

from .common import DiffusionResult, as_prompt, cut_after_eos
from .models import A2R_ATTENTION, is_causal_prompt_model, is_remote_code_model, uses_a2r_attention

__all__ = ["CACHE_MODES", "MaskedSchedule", "PrefixKV", "check_masked_args",
           "get_num_transfer_tokens", "masked_diffusion_generate"]

CACHE_MODES = ("none", "prefix")
# Tokens per block of the prefix KV pool. Any value works: the pool's default.
PREFIX_KV_BLOCK_SIZE = DEFAULT_BLOCK_SIZE


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


# ---------------------------------------------------------------------------------- arguments
@dataclass
class MaskedSchedule:
    """The checked arguments of :func:`masked_diffusion_generate`."""

    gen_length: int
    block_length: int
    num_blocks: int
    steps_per_block: int        # fixed schedule; with a threshold, the bound block_length
    threshold: float | None
    temperature: float
    remasking: str
    cfg_scale: float
    cache: str
    mask_id: int
    eos_ids: list[int]
    num_traces: int


def check_masked_args(model, *, gen_length, block_length, steps, threshold, temperature,
                      remasking, cfg_scale, mask_id, eos_token_id, cache,
                      num_traces) -> MaskedSchedule:
    """ValueError naming the first bad argument of :func:`masked_diffusion_generate`, else its
    :class:`MaskedSchedule`."""
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
    _check_model(model, cache)
    return MaskedSchedule(gen_length, block_length, num_blocks, steps_per_block, threshold,
                          float(temperature), remasking, float(cfg_scale), cache,
                          _mask_id(model, mask_id), eos_ids(eos_token_id), num_traces)


def _check_model(model, cache: str) -> None:
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


def _mask_id(model, mask_id) -> int:
    if mask_id is None:
        mask_id = getattr(model.config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id: not given and model.config.mask_token_id is not set")
    mask_id = int(mask_id)
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must be in [0, vocab_size={vocab_size})")
    return mask_id


# ---------------------------------------------------------------------------------- the loop
class _Canvas:
    """The sequence being denoised (``x``: int64 ``[B, P + gen_length]``, the generation
    masked at first) and what every forward over it needs."""

    def __init__(self, model, prompt_ids, attention_mask, pad_token_id, schedule: MaskedSchedule,
                 device):
        prompt, prompt_keep = as_prompt(prompt_ids, attention_mask, pad_token_id, device)
        if schedule.num_traces > 1:
            prompt = prompt.repeat_interleave(schedule.num_traces, dim=0)
            prompt_keep = prompt_keep.repeat_interleave(schedule.num_traces, dim=0)
        self.batch, self.prompt_len = prompt.shape
        total_len = self.prompt_len + schedule.gen_length
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and total_len > max_positions:
            raise ValueError(f"prompt length {self.prompt_len} + gen_length {schedule.gen_length} "
                             f"exceeds the model's max_position_embeddings={max_positions}")
        mask_id = schedule.mask_id
        self.x = torch.full((self.batch, total_len), mask_id, dtype=torch.int64, device=device)
        self.x[:, :self.prompt_len] = prompt
        gen_keep = torch.ones(self.batch, schedule.gen_length, dtype=torch.bool, device=device)
        keep = torch.cat([prompt_keep, gen_keep], dim=1)
        positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
        use_cfg = schedule.cfg_scale > 0
        if use_cfg:   # rows [0, B): conditional; rows [B, 2B): unconditional (prompt -> [MASK])
            keep, positions = keep.repeat(2, 1), positions.repeat(2, 1)
        self.runner = _ModelRunner(model, keep, positions, self.prompt_len)
        self.prefix = None
        if schedule.cache == "prefix":
            cfg = model.config
            _, num_kv_heads, head_dim = attention_geometry(cfg)
            self.prefix = PrefixKV(keep.shape[0], cfg.num_hidden_layers, num_kv_heads, head_dim,
                                   total_len - schedule.block_length,
                                   next(model.parameters()).dtype, device)
        self.gen = self.x[:, self.prompt_len:]   # view: the generation, [B, gen_length]
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(schedule.eos_ids, dtype=torch.int64, device=device)
        self.uncond_prompt = torch.where(prompt_keep, mask_id, prompt) if use_cfg else None

    def block_schedule(self, block_tokens, schedule: MaskedSchedule):
        """(per-step commits int64 ``[B, steps]`` on the host or None, steps that commit
        anything); None when every row has finished. One host read."""
        if schedule.threshold is not None:
            return None, [True] * schedule.steps_per_block
        steps = schedule.steps_per_block
        num_masked = (block_tokens == schedule.mask_id).sum(1)
        plan = get_num_transfer_tokens(num_masked, steps)
        host = torch.cat([self.finished.all().view(1).long(), plan.flatten()]).tolist()
        if host[0]:
            return None
        # a host tensor: the per-step num_transfer costs no sync
        return (torch.tensor(host[1:], dtype=torch.int64).view(self.batch, steps),
                [any(host[1 + step::steps]) for step in range(steps)])


def _denoise_blocks(canvas: _Canvas, schedule: MaskedSchedule, generator, backend) -> list[int]:
    """Every block left to right; returns the steps (forwards) each block ran.

    Host syncs: fixed schedule, one per block (its schedule and "every row finished" in one
    read); threshold mode, one per step ("block done" and "every row finished")."""
    x, prefix, mask_id = canvas.x, canvas.prefix, schedule.mask_id
    block_steps = [0] * schedule.num_blocks
    all_done = False
    for block in range(schedule.num_blocks):
        if all_done:
            break
        start = canvas.prompt_len + block * schedule.block_length
        end = start + schedule.block_length
        block_tokens = x[:, start:end]               # view: denoise_step writes through it
        planned = canvas.block_schedule(block_tokens, schedule)
        if planned is None:
            break
        commits, step_commits = planned
        if prefix is not None:
            prefix.start_block(start)
        for step in range(schedule.steps_per_block):
            if not step_commits[step]:
                continue   # commits nothing in any row: an identical forward, skip it
            extend = prefix is not None and step > 0
            if extend:
                prefix.mode = "extend"
            rows = _model_rows(x, start if extend else 0, canvas.prompt_len, canvas.uncond_prompt)
            logits = _guided(canvas.runner.block_logits(rows, start, end, prefix), canvas.batch,
                             schedule.cfg_scale)
            block_steps[block] += 1
            # [MASK] is never a valid prediction (a trained model gives it ~0 probability; an
            # untrained one may not): committing it would leave the position masked forever.
            logits[..., mask_id] = float("-inf")
            ak.denoise_step(logits, block_tokens, mask_id,
                            num_transfer=None if commits is None else commits[:, step],
                            threshold=schedule.threshold, temperature=schedule.temperature,
                            remasking=schedule.remasking, generator=generator, backend=backend)
            if schedule.eos_ids:
                canvas.finished = _finish_rows(canvas.gen, canvas.finished, canvas.eos, mask_id)
            if schedule.threshold is not None:
                block_left, all_done = torch.stack(
                    [(block_tokens == mask_id).any(), canvas.finished.all()]).tolist()
                if all_done or not block_left:
                    break
    return block_steps


@torch.no_grad()
def masked_diffusion_generate(model, prompt_ids, *, gen_length: int = 128,
                              block_length: int = 32, steps: int = 32,
                              threshold: float | None = None, temperature: float = 0.0,
                              remasking: str = "low_confidence", cfg_scale: float = 0.0,
                              mask_id: int | None = None,
                              eos_token_id: int | Sequence[int] | None = None,
                              pad_token_id: int | None = None,
                              attention_mask: torch.Tensor | None = None, cache: str = "none",
                              generator: torch.Generator | None = None, backend: str = "auto",
                              num_traces: int = 1, return_details: bool = False):
    """:func:`a2r.thinker.diffusion_generate` for a masked-diffusion LM (LLaDA / Fast-dLLM; the
    arguments are documented there)."""
    schedule = check_masked_args(
        model, gen_length=gen_length, block_length=block_length, steps=steps,
        threshold=threshold, temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
        mask_id=mask_id, eos_token_id=eos_token_id, cache=cache, num_traces=num_traces)
    device = next(model.parameters()).device
    resolve_backend("denoise_step", backend, device)   # BackendUnavailable before any forward
    canvas = _Canvas(model, prompt_ids, attention_mask, pad_token_id, schedule, device)
    if generator is not None and generator.device.type != "cpu":
        # Every step draws its seed from the generator: a CPU generator seeded once from this one
        # keeps those draws free of host syncs.
        generator = torch.Generator().manual_seed(int(torch.randint(
            0, SEED_BOUND, (1,), generator=generator, device=generator.device).item()))
    block_steps = _denoise_blocks(canvas, schedule, generator, backend)
    generated = canvas.gen.tolist()
    for row in generated:
        if schedule.mask_id in row:
            block = row.index(schedule.mask_id) // schedule.block_length
            raise RuntimeError(f"block {block} still has masked positions after "
                               f"{block_steps[block]} steps: denoise_step committed too few tokens")
    sequences = cut_after_eos(generated, schedule.eos_ids)
    if not return_details:
        return sequences
    return DiffusionResult(sequences=sequences, tokens=canvas.x,
                           num_forward_calls=canvas.runner.num_forward_calls,
                           steps_per_block=block_steps, prompt_length=canvas.prompt_len)
