"""The diffusion thinker: one entry, :func:`diffusion_generate`, over its model families.

* masked diffusion (LLaDA / Fast-dLLM; :mod:`a2r.thinker.masked`), on a model whose attention
  is :mod:`a2r.thinker.models`' bidirectional one, or a LLaDA / Dream remote-code model;
* uniform-noise block diffusion (DiffusionGemma; :mod:`a2r.thinker.gemma`).

What the pipeline asks of a thinker goes through the functions here (:func:`load_thinker_model`,
:func:`generated_positions`, :func:`schedule`, :func:`unused_settings`, :func:`kind`,
:func:`stop_ids`), so a new family touches this package only. Modules: ``common`` (the result type,
prompt handling) <- ``models`` <- ``masked``, ``gemma``; this file dispatches (no cycle).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

import torch

from a2r_kernels.vocab import REMASKING

from .common import DiffusionResult
from .gemma import diffusion_gemma_generate, is_diffusion_gemma, is_diffusion_gemma_config
from .masked import CACHE_MODES, PrefixKV, get_num_transfer_tokens, masked_diffusion_generate
from .models import build_tiny_diffusion_model, load_diffusion_model

__all__ = ["CACHE_MODES", "DiffusionResult", "PrefixKV", "REMASKING", "build_tiny_diffusion_model",
           "diffusion_generate", "generated_positions", "get_num_transfer_tokens", "kind",
           "load_diffusion_model", "load_thinker_model", "schedule", "stop_ids",
           "unused_settings"]

# The masked-diffusion options: a DiffusionGemma call must leave them at their defaults.
_MASKED_ONLY = ("block_length", "steps", "threshold", "temperature", "remasking", "cfg_scale",
                "mask_id", "cache")


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
    if not is_diffusion_gemma(model):
        return masked_diffusion_generate(
            model, prompt_ids, gen_length=gen_length, block_length=block_length, steps=steps,
            threshold=threshold, temperature=temperature, remasking=remasking,
            cfg_scale=cfg_scale, mask_id=mask_id, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, attention_mask=attention_mask, cache=cache,
            generator=generator, backend=backend, num_traces=num_traces,
            return_details=return_details)
    options = dict(block_length=block_length, steps=steps, threshold=threshold,
                   temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                   mask_id=mask_id, cache=cache)
    given = [name for name, value in options.items() if value != _DEFAULTS[name]]
    if given:
        raise ValueError(f"{', '.join(sorted(given))}: masked-diffusion options, not used by "
                         "DiffusionGemma (its schedule comes from its generation config; "
                         "a2r.thinker.gemma.diffusion_gemma_generate overrides it)")
    return diffusion_gemma_generate(
        model, prompt_ids, gen_length=gen_length, num_traces=num_traces,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, attention_mask=attention_mask,
        generator=generator, backend=backend, return_details=return_details)


_DEFAULTS = {name: param.default
             for name, param in inspect.signature(diffusion_generate).parameters.items()
             if name in _MASKED_ONLY}

# What the pipeline's config calls each masked-diffusion knob (A2RConfig.thinker_*).
_SETTINGS = {"block_length": "thinker_block_length", "steps": "thinker_steps",
             "threshold": "thinker_threshold", "temperature": "thinker_temperature",
             "remasking": "thinker_remasking", "cache": "thinker_cache"}


def load_thinker_model(directory: str | Path, tokenizer, *, device, dtype):
    """The thinker in ``directory`` (any family here), its [MASK] id taken from ``tokenizer``
    when the family has one."""
    directory = Path(directory)
    uniform_noise = is_diffusion_gemma_config(json.loads((directory / "config.json").read_text()))
    mask_id = None if uniform_noise else getattr(tokenizer, "mask_token_id", None)
    return load_diffusion_model(str(directory), mask_id=mask_id, device=device, dtype=dtype)


def kind(model) -> str:
    """The thinker's family in words."""
    return "uniform-noise diffusion" if is_diffusion_gemma(model) else "masked diffusion"


def generated_positions(model, gen_length: int) -> int:
    """Positions the thinker writes for ``gen_length`` tokens: ``gen_length``, rounded up to
    whole canvases for DiffusionGemma (it denoises ``canvas_length`` tokens at a time)."""
    if not is_diffusion_gemma(model):
        return gen_length
    canvas = int(model.config.canvas_length)
    return -(-gen_length // canvas) * canvas


def unused_settings(model) -> tuple[str, ...]:
    """The pipeline settings (``A2RConfig`` field names) the thinker has no use for: they must
    stay at their defaults. DiffusionGemma's generation config sets its schedule;
    ``thinker_block_length`` stays free (it only has to divide ``thinker_gen_length``)."""
    if not is_diffusion_gemma(model):
        return ()
    return tuple(name for option, name in _SETTINGS.items() if option != "block_length")


def schedule(model, config, tokenizer) -> dict:
    """The keyword arguments of :func:`diffusion_generate` for the pipeline's ``config`` (its
    ``thinker_*`` fields); none for DiffusionGemma (its generation config)."""
    if is_diffusion_gemma(model):
        return {}
    kwargs = {option: getattr(config, name) for option, name in _SETTINGS.items()}
    return {**kwargs, "mask_id": getattr(tokenizer, "mask_token_id", None)}


def stop_ids(tokenizer) -> list[int]:
    """Ids where a decoded trace ends: the tokenizer's EOS and [MASK] ids."""
    return [i for i in (tokenizer.eos_token_id, getattr(tokenizer, "mask_token_id", None))
            if i is not None]
