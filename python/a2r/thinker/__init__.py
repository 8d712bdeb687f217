"""The diffusion thinker: masked diffusion (LLaDA / Fast-dLLM, :mod:`a2r.thinker.masked`) and
uniform-noise block diffusion (DiffusionGemma, :mod:`a2r.thinker.gemma`), the bidirectional
attention and loaders of :mod:`a2r.thinker.models`."""

from __future__ import annotations

from a2r_kernels.vocab import REMASKING

from .masked import (CACHE_MODES, DiffusionResult, PrefixKV, diffusion_generate,
                     get_num_transfer_tokens)
from .models import build_tiny_diffusion_model, load_diffusion_model

__all__ = ["CACHE_MODES", "DiffusionResult", "PrefixKV", "REMASKING", "build_tiny_diffusion_model",
           "diffusion_generate", "get_num_transfer_tokens", "load_diffusion_model"]
