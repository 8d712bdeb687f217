"""The DiffusionGemma thinker loop: transformers' block diffusion, :func:`ak.entropy_bound_step`
as its sampler.

``DiffusionGemmaForBlockDiffusion`` (transformers >= 5.19) is an encoder-decoder diffusion LM: an
encoder runs causal attention over the prompt and fills a KV cache; a decoder denoises a
*canvas* of ``canvas_length`` uniformly random tokens (no mask token) with bidirectional
self-attention and attention into that cache. Text is produced canvas by canvas (block
diffusion). This module runs the model's own encoder and decoder forward passes and replaces its
sampler step (``torch.softmax`` over ``[B, L, V]``, ``torch.multinomial``, ``argmax``, two
``Categorical(logits).entropy()`` passes, sort, renoise) by one ``ak.entropy_bound_step``.

Per canvas, as transformers' ``DiffusionGemmaGenerationMixin.generate``:

1. encode the not yet encoded tokens (the prompt, then each finished canvas) into the cache;
2. ``canvas`` = uniform random tokens; for ``n = N, N-1, ..., 1`` (``N = max_denoising_steps``):
   ``logits = decoder(canvas, self_conditioning_logits)`` (fp32, soft-capped),
   ``x = logits / T(n)`` with the linear schedule ``T(n) = t_min + (t_max - t_min) n / N``,
   ``res = entropy_bound_step(x, canvas, entropy_bound)`` (accept low-entropy samples, renoise
   the rest, in place), ``self_conditioning_logits = x``. A row stops denoising once its argmax
   canvas equals the last ``stability_threshold`` ones and the mean entropy of ``x`` is below
   ``confidence_threshold`` (``StableAndConfidentStoppingCriteria``); a stopped row keeps its
   canvas, argmax and self-conditioning logits while the others go on;
3. the canvas's final ``argmax`` is the block's text; a row holding an EOS is finished; the loop
   ends when every row is.

Defaults for ``max_denoising_steps``, ``entropy_bound`` (``sampler_config``), ``t_min``,
``t_max``, ``stability_threshold``, ``confidence_threshold``, ``eos_token_id`` and
``pad_token_id`` come from the checkpoint's ``generation_config.json``
(``model.generation_config``), then transformers' global defaults, exactly as ``model.generate``
resolves them.

N traces per prompt (``num_traces``): the prompt is encoded once; its cache rows are expanded to
the ``B * N`` canvases as views (no copy for a single prompt), so all traces' first canvases
attend into the same encoder KV. From the second canvas on each trace encodes its own tokens
(the cache concatenates, so the rows then hold their own copies: transformers' cache is not
paged).

The RNG: canvases are initialised with ``torch.randint(generator=generator)`` and every step
draws one seed from ``generator`` for ``entropy_bound_step``'s Philox stream, so a seeded run is
reproducible on every backend; it does not reproduce ``model.generate``'s draws
(``torch.multinomial``).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import torch

import a2r_kernels as ak
from a2r_kernels.entropy_bound import resolve_entropy_bound_backend
from a2r_kernels.vocab import eos_ids as to_eos_ids, positive_int, text_config

from .common import DiffusionResult, as_prompt, cut_after_eos

__all__ = ["DIFFUSION_GEMMA_MODEL_TYPE", "build_tiny_diffusion_gemma", "diffusion_gemma_available",
           "diffusion_gemma_generate", "is_diffusion_gemma", "is_diffusion_gemma_config"]

DIFFUSION_GEMMA_MODEL_TYPE = "diffusion_gemma"
MIN_TRANSFORMERS = "5.19"   # the first release with DiffusionGemma


@functools.lru_cache(maxsize=None)
def _model_class():
    """``transformers.DiffusionGemmaForBlockDiffusion``, or None on a transformers without it."""
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError:
        return None
    return DiffusionGemmaForBlockDiffusion


def diffusion_gemma_available() -> bool:
    """True when the installed transformers ships DiffusionGemma."""
    return _model_class() is not None


def is_diffusion_gemma(model) -> bool:
    """True for a ``DiffusionGemmaForBlockDiffusion`` instance."""
    cls = _model_class()
    return cls is not None and isinstance(model, cls)


def is_diffusion_gemma_config(raw_config: dict) -> bool:
    """True when a checkpoint's ``config.json`` (a dict) describes a DiffusionGemma model."""
    return raw_config.get("model_type") == DIFFUSION_GEMMA_MODEL_TYPE or \
        "DiffusionGemmaForBlockDiffusion" in (raw_config.get("architectures") or [])


def require_diffusion_gemma() -> type:
    """The model class, or ValueError saying which transformers is needed."""
    cls = _model_class()
    if cls is None:
        import transformers
        raise ValueError(f"DiffusionGemma needs transformers >= {MIN_TRANSFORMERS}; "
                         f"this is transformers {transformers.__version__}")
    return cls


def build_tiny_diffusion_gemma(vocab_size: int = 101, *, canvas_length: int = 8, seed: int = 0,
                               hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                               num_kv_heads: int = 1, head_dim: int = 16, num_experts: int = 2,
                               max_position_embeddings: int = 1024):
    """A randomly initialised DiffusionGemma (~0.1M parameters) for tests and demos.

    The text config sets the MoE fields (``num_experts``, ``top_k_experts = 1``,
    ``moe_intermediate_size``) that the model requires; the vision tower (which the class always
    builds) is one layer of width 16 with a 16-entry position table, so it adds a few thousand
    parameters instead of transformers' default 168M. Layers alternate sliding / full attention
    (the last is full, as the config requires). Weights depend on ``seed`` and the shape only.

    Returns ``DiffusionGemmaForBlockDiffusion`` in float32 on the CPU, eval mode, with an empty
    generation config (transformers' defaults apply).
    """
    cls = require_diffusion_gemma()
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    for name, v in (("vocab_size", vocab_size), ("canvas_length", canvas_length),
                    ("hidden_size", hidden_size), ("num_layers", num_layers),
                    ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("num_experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, global_head_dim=head_dim,
        num_experts=num_experts, top_k_experts=1, moe_intermediate_size=hidden_size,
        layer_types=layer_types, sliding_window=4 * canvas_length,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                                position_embedding_size=16)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                  canvas_length=canvas_length,
                                  # ids past the vocabulary: the tiny model has no images
                                  boi_token_id=vocab_size, eoi_token_id=vocab_size + 1,
                                  image_token_id=vocab_size + 2)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


# ---------------------------------------------------------------------------------- settings
def _resolve_generation_config(model, overrides: dict):
    """transformers' own resolution: ``overrides`` > ``model.generation_config`` > global
    defaults; its ``validate`` raises ValueError naming a bad field."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "entropy_bound" in overrides:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            EntropyBoundSamplerConfig)
        bound = overrides.pop("entropy_bound")
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not bound > 0:
            raise ValueError(f"entropy_bound must be a float > 0, got {bound!r}")
        overrides["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(bound))
    config, unused = model._prepare_generation_config(None, **overrides)
    if unused:
        raise ValueError(f"unknown DiffusionGemma generation options: {sorted(unused)}")
    return config


class _Stopping:
    """``StableAndConfidentStoppingCriteria`` on the step's own outputs (no extra V pass):
    stable = the argmax canvas equals each of the last ``stability_threshold`` ones;
    confident = mean over the canvas of the entropy of the processed logits < threshold."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history = None

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        if self.stability_threshold == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability_threshold, *argmax.shape), -1,
                                          dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(dim=-1) < self.confidence_threshold)


# ---------------------------------------------------------------------------------- one canvas
def _denoise_canvas(model, cache, canvas: torch.Tensor, mask_mapping, position_ids: torch.Tensor,
                    settings, generator, backend: str) -> tuple[torch.Tensor, int]:
    """Denoise one canvas in place against the encoder ``cache``; returns (argmax canvas int64
    ``[R, C]``, decoder forward calls). ``canvas``: int64 ``[R, C]``, the starting tokens."""
    num_steps = settings.max_denoising_steps
    bound = settings.sampler_config.entropy_bound
    stopping = None
    if settings.stability_threshold is not None and settings.confidence_threshold is not None:
        stopping = _Stopping(settings.stability_threshold, settings.confidence_threshold)
    scheduled = settings.t_min is not None and settings.t_max is not None
    embed_dtype = model.model.decoder.embed_tokens.weight.dtype
    rows = canvas.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=canvas.device)
    any_finished = False
    argmax = canvas
    self_conditioning = None
    calls = 0
    for step in range(num_steps, 0, -1):     # transformers counts the steps *remaining*
        logits = model(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                       decoder_attention_mask=mask_mapping, cache=cache,
                       decoder_position_ids=position_ids).logits
        calls += 1
        if scheduled:
            span = settings.t_max - settings.t_min
            logits = logits / (settings.t_min + span * step / num_steps)
        previous = canvas.clone() if any_finished else None
        res = ak.entropy_bound_step(logits, canvas, bound, generator=generator, backend=backend)
        new_argmax = res.argmax
        if stopping is not None:
            if any_finished:   # stopped rows keep their state while the others go on
                keep = finished[:, None]
                new_argmax = torch.where(keep, argmax, new_argmax)
                canvas.copy_(torch.where(keep, previous, canvas))
                logits = torch.where(keep[..., None], self_conditioning, logits)
            finished |= stopping(new_argmax, res.entropy)
        argmax = new_argmax
        self_conditioning = logits.to(embed_dtype)
        if stopping is not None:
            done = finished.tolist()          # the step's one host sync
            if all(done):
                break
            any_finished = any(done)
    return argmax, calls


def _expand_rows(cache, num_traces: int, batch: int) -> None:
    """Give each of the ``batch`` cache rows ``num_traces`` consecutive copies (row-major):
    expanded views when ``batch == 1`` (no memory), ``repeat_interleave`` otherwise."""
    if num_traces == 1:
        return
    if batch != 1:
        cache.batch_repeat_interleave(num_traces)
        return
    for layer in cache.layers:
        layer.keys = layer.keys.expand(num_traces, *layer.keys.shape[1:])
        layer.values = layer.values.expand(num_traces, *layer.values.shape[1:])


# ---------------------------------------------------------------------------------- the loop
@torch.no_grad()
def _stop_and_pad_ids(model, settings, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """The EOS ids and the pad id of a call: the arguments, else the generation config's, else
    (pad) the text config's."""
    if eos_token_id is None:
        eos_token_id = settings.eos_token_id
    if pad_token_id is None:
        pad_token_id = settings.pad_token_id
    if pad_token_id is None:
        pad_token_id = text_config(model.config).pad_token_id
    return to_eos_ids(eos_token_id), pad_token_id


def _num_canvases(model, prompt_len: int, gen_length: int, canvas_length: int) -> int:
    """Canvases covering ``gen_length``; ValueError when they outgrow the model's positions (or
    when there is no prompt)."""
    if prompt_len == 0:
        raise ValueError("prompt_ids must hold at least one token per row (the encoder needs "
                         "a prefix)")
    num_canvases = math.ceil(gen_length / canvas_length)
    total = prompt_len + num_canvases * canvas_length
    max_positions = getattr(text_config(model.config), "max_position_embeddings", None)
    if max_positions is not None and total > max_positions:
        raise ValueError(f"prompt length {prompt_len} + gen_length {gen_length} (rounded up to "
                         f"{num_canvases} canvases of {canvas_length}) exceeds the model's "
                         f"max_position_embeddings={max_positions}")
    return num_canvases


def _denoise_fresh_canvas(model, cache, attention: torch.Tensor, start: int, settings,
                          generator, backend) -> tuple[torch.Tensor, int]:
    """A uniform-noise canvas at positions ``start ..`` (one ``randint`` draw from
    ``generator``) denoised against ``cache``; ``attention`` bool ``[R, start]``. Returns
    ``(argmax int64 [R, C], decoder passes)``."""
    rows, device = attention.shape[0], attention.device
    canvas_length = int(model.config.canvas_length)
    vocab = int(text_config(model.config).vocab_size)
    decoder_attention = torch.nn.functional.pad(attention, (0, canvas_length), value=True)
    canvas = torch.randint(0, vocab, (rows, canvas_length), generator=generator, device=device)
    decoder_masks = model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=canvas.unsqueeze(-1), cache=cache,
        decoder_attention_mask=decoder_attention)
    decoder_positions = torch.arange(start, start + canvas_length, dtype=torch.int32,
                                     device=device)[None]
    return _denoise_canvas(model, cache, canvas, decoder_masks, decoder_positions, settings,
                           generator, backend)


def _encode(model, cache, new_tokens: torch.Tensor, begin: int, attention: torch.Tensor) -> None:
    """One encoder pass over ``new_tokens`` (int64 ``[R, T]``, positions ``begin ..
    begin + T - 1``) into ``cache``; ``attention``: bool ``[R, begin + T]``, False at padding."""
    device = new_tokens.device
    positions = torch.arange(begin, begin + new_tokens.shape[1], dtype=torch.int32,
                             device=device)[None]
    encoder = model.model.encoder
    masks = encoder.create_masks_for_generate(
        config=model.config,
        inputs_embeds=torch.empty(new_tokens.shape[0], new_tokens.shape[1], 0,
                                  dtype=model.dtype, device=device),
        attention_mask=attention, cache=cache, position_ids=positions)
    encoder(input_ids=new_tokens.contiguous(), attention_mask=masks, cache=cache,
            position_ids=positions)


def _pad_after_eos(block_tokens: torch.Tensor, eos: torch.Tensor, pad_token_id) -> torch.Tensor:
    """As transformers' ``_finalize_canvas``: a row's tokens after its first EOS of the canvas
    (``[R, C]``) become ``pad_token_id`` (unchanged when there is none)."""
    if pad_token_id is None:
        return block_tokens
    is_eos = torch.isin(block_tokens, eos)
    seen = is_eos.long().cumsum(dim=-1)
    after_eos = (seen > 0) & ~((seen == 1) & is_eos)
    return torch.where(after_eos, pad_token_id, block_tokens)


def diffusion_gemma_generate(model, prompt_ids, *, gen_length: int = 256, num_traces: int = 1,
                             max_denoising_steps: int | None = None,
                             entropy_bound: float | None = None, t_min: float | None = None,
                             t_max: float | None = None, stability_threshold: int | None = None,
                             confidence_threshold: float | None = None,
                             eos_token_id: int | Sequence[int] | None = None,
                             pad_token_id: int | None = None,
                             attention_mask: torch.Tensor | None = None,
                             generator: torch.Generator | None = None, backend: str = "auto",
                             return_details: bool = False):
    """Generate ``gen_length`` tokens per row (and trace) with a DiffusionGemma model.

    Args:
        model: ``transformers.DiffusionGemmaForBlockDiffusion``.
        prompt_ids: int tensor ``[B, P]`` or ``[P]`` (left-padded with ``attention_mask``), or a
            list of ``B`` lists of ids (left-padded here with ``pad_token_id``).
        gen_length: tokens per row; generation runs ``ceil(gen_length / canvas_length)``
            canvases and keeps the first ``gen_length`` tokens.
        num_traces: canvases per prompt row (all from one encoder pass over the prompt); the
            outputs are row-major: trace ``j`` of prompt ``b`` is row ``b * num_traces + j``.
        max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold,
        confidence_threshold: override the generation config (see the module docstring).
        eos_token_id: id(s) that end a row; default: the generation config's.
        pad_token_id: left padding of a list prompt and the filler after a finished row's EOS;
            default: the generation config's, else the text config's.
        attention_mask: ``[B, P]`` 0/1, left padding; default all ones.
        generator: ``torch.Generator`` on the model's device (canvases and every step's seed).
        backend: ``ak.entropy_bound_step`` backend: ``"auto" | "torch" | "triton"``.
        return_details: return an ``a2r.thinker.DiffusionResult``.

    Returns:
        ``list[list[int]]`` (per row, the generated ids through the first EOS), or a
        ``DiffusionResult`` whose ``num_forward_calls`` counts decoder passes,
        ``encoder_forward_calls`` encoder passes and ``steps_per_block`` the decoder passes of
        each canvas.
    """
    if not is_diffusion_gemma(model):
        raise ValueError(f"model must be a DiffusionGemmaForBlockDiffusion, got "
                         f"{type(model).__name__}")
    gen_length = positive_int(gen_length, "gen_length")
    num_traces = positive_int(num_traces, "num_traces")
    settings = _resolve_generation_config(model, dict(
        max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
        t_max=t_max, stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold))
    eos_ids, pad_token_id = _stop_and_pad_ids(model, settings, eos_token_id, pad_token_id)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    device = next(model.parameters()).device
    backend = resolve_entropy_bound_backend(backend, device)   # before any forward
    prompt, prompt_keep = as_prompt(prompt_ids, attention_mask, pad_token_id, device)
    batch, prompt_len = prompt.shape
    canvas_length = int(model.config.canvas_length)
    num_canvases = _num_canvases(model, prompt_len, gen_length, canvas_length)
    total = prompt_len + num_canvases * canvas_length
    from transformers import DynamicCache   # transformers >= 5.19: imported only here
    rows = batch * num_traces
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    tokens = torch.full((rows, total), pad_token_id if pad_token_id is not None else 0,
                        dtype=torch.int64, device=device)
    tokens[:, :prompt_len] = prompt.repeat_interleave(num_traces, dim=0)
    attention = prompt_keep
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos_ids, dtype=torch.int64, device=device)
    steps_per_block = [0] * num_canvases
    encoder_calls = 0
    for block in range(num_canvases):
        start = prompt_len + block * canvas_length
        # 1. encode the tokens the cache does not hold yet: the prompt (once, B rows), then the
        #    previous canvas (every row).
        first = block == 0
        new_tokens = prompt if first else tokens[:, start - canvas_length:start]
        _encode(model, cache, new_tokens, 0 if first else start - canvas_length, attention)
        encoder_calls += 1
        if first:
            _expand_rows(cache, num_traces, batch)
            attention = attention.repeat_interleave(num_traces, dim=0)
        # 2. denoise a fresh canvas against the cache
        argmax, calls = _denoise_fresh_canvas(model, cache, attention, start, settings,
                                              generator, backend)
        steps_per_block[block] = calls
        # 3. the argmax canvas is the block's text. As transformers' _finalize_canvas: rows
        #    finished before keep padding, a row finishing here gets padding after its first EOS
        #    (what the encoder then reads).
        block_tokens = torch.where(finished[:, None], tokens[:, start:start + canvas_length],
                                   argmax)
        attention = torch.nn.functional.pad(attention, (0, canvas_length), value=True)
        if eos_ids:
            block_tokens = _pad_after_eos(block_tokens, eos_tensor, pad_token_id)
            finished |= torch.isin(block_tokens, eos_tensor).any(dim=-1)
        tokens[:, start:start + canvas_length] = block_tokens
        if eos_ids and bool(finished.all()):
            break
    sequences = cut_after_eos(tokens[:, prompt_len:prompt_len + gen_length].tolist(), eos_ids)
    if not return_details:
        return sequences
    return DiffusionResult(sequences=sequences, tokens=tokens[:, :prompt_len + gen_length],
                           num_forward_calls=sum(steps_per_block),
                           steps_per_block=steps_per_block, prompt_length=prompt_len,
                           encoder_forward_calls=encoder_calls)
