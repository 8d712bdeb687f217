"""Masked-diffusion "thinker" models: a bidirectional attention implementation for transformers,
a tiny random model for tests and demos, and a loader for local checkpoints.

A masked-diffusion LM (LLaDA, Dream) is a decoder-only transformer without the causal mask. We do
not fork any modeling code for that: the model's own modules (embeddings, RoPE, projections, MLPs)
run unmodified and only the attention *function* changes. ``A2R_ATTENTION`` is registered in
transformers' ``AttentionInterface`` (the function) and ``AttentionMaskInterface`` (its mask
builder, transformers' ``sdpa_mask``: boolean ``[B, 1, q_len, kv_len]``, True = attend). A model
runs it when ``config._attn_implementation == A2R_ATTENTION`` and ``config.is_causal = False``
(the latter makes ``create_causal_mask`` build a bidirectional mask that still honours padding).

Why a function of our own and not stock ``"sdpa"`` with ``is_causal=False`` in the config: the
attention modules keep ``module.is_causal = True``, and transformers' sdpa path turns that into
``is_causal=True`` whenever the mask was skipped (no padding), silently making the model causal.
Our function never applies a causal mask.

A model whose config sets :data:`CAUSAL_PROMPT` (``config.a2r_causal_prompt = True``) is a
*prefix-causal* masked-diffusion LM: the prompt attends causally, exactly as in the autoregressive
model it was adapted from, and the generated positions attend to the whole prompt and to each
other (block diffusion with one block, as in Fast-dLLM v2 and BD3-LMs). Adapted from an AR
checkpoint, it keeps that checkpoint's prompt representations, so a short fine-tune teaches it
only the denoising; and its prompt K/V do not depend on the canvas, so the prefix cache of a
single block is exact. Its forward takes ``a2r_prompt_len`` (the prompt's column count).

The same function implements the Fast-dLLM prefix cache (``a2r.thinker``): when the forward is
given ``a2r_prefix=<PrefixKV>`` it either records the K/V of the prefix positions (``capture``) or
prepends the cached prefix K/V to the current keys and values (``extend``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

A2R_ATTENTION = "a2r_bidirectional"
CAUSAL_PROMPT = "a2r_causal_prompt"   # config flag: the prompt attends causally (module docstring)


def a2r_bidirectional_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                scaling: float | None = None, dropout: float = 0.0,
                                a2r_prefix=None, a2r_prompt_len=None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """Full (non-causal) attention, optionally over ``[cached prefix K/V ; current K/V]``.

    ``out[b, i, h] = sum_j softmax_j(scaling * q[b, h, i] . k[b, h // G, j] + mask[b, 0, i, j])
    v[b, h // G, j]`` over every key ``j`` (G = num_q_heads // num_kv_heads, GQA).

    Args:
        query: ``[B, Hq, Lq, D]`` (transformers' layout, after RoPE).
        key, value: ``[B, Hkv, Lk, D]``, the current tokens' keys/values.
        attention_mask: None (attend everything), boolean ``[B, 1, Lq, P + Lk]`` (True = attend)
            or additive float of that shape; ``P`` is the cached prefix length (0 without one).
        a2r_prefix: None, or the loop's ``PrefixKV`` (``a2r.thinker``): ``capture`` mode stores
            ``key/value[:, :, :P]``; ``extend`` mode returns ``cat([prefix_k, key], dim=2)``.
        a2r_prompt_len: None (every query attends every key), or, for a prefix-causal model, an
            int or int64 ``[B]``: query ``i < a2r_prompt_len[b]`` attends only keys ``j <= i``
            (the prompt is causal); the others attend every key. An ``extend`` step's queries are
            all past the prompt, so it needs no restriction.

    Returns:
        ``(out [B, Lq, Hq, D] in query's dtype, None)``, what transformers' attention modules
        expect.
    """
    extending = a2r_prefix is not None and a2r_prefix.mode == "extend"
    if a2r_prefix is not None:
        key, value = a2r_prefix.attend_layer(module.layer_idx, key, value)
    if a2r_prompt_len is not None and not extending:
        attention_mask = _with_causal_prompt(attention_mask, a2r_prompt_len, query.shape[2],
                                             key.shape[2], query.device)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys but attention has "
                         f"{key.shape[2]} (cached prefix + current tokens): the 2-D mask passed to "
                         "the model must span prefix and current tokens")
    group = query.shape[1] // key.shape[1]
    if group > 1:   # GQA: expand (no copy) then flatten heads, as transformers' repeat_kv
        b, h, n, d = key.shape
        key = key[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)
        value = value[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling, is_causal=False)
    return out.transpose(1, 2).contiguous(), None


def _with_causal_prompt(mask: torch.Tensor | None, prompt_len, q_len: int, k_len: int,
                        device) -> torch.Tensor:
    """``mask`` (None, bool or additive ``[B, 1, q_len, k_len]``) AND ``j <= i or i >= prompt_len``
    (bool where ``mask`` is None or bool, additive otherwise)."""
    if q_len != k_len:
        raise ValueError(f"a2r_prompt_len needs a full forward (queries = keys), got {q_len} "
                         f"queries and {k_len} keys")
    row = torch.arange(q_len, device=device)[:, None]
    allowed = (torch.arange(k_len, device=device)[None, :] <= row) | (
        row >= torch.as_tensor(prompt_len, device=device).reshape(-1, 1, 1, 1))
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def is_causal_prompt_model(model) -> bool:
    """True for a prefix-causal masked-diffusion model (:data:`CAUSAL_PROMPT` set)."""
    return bool(getattr(getattr(model, "config", None), CAUSAL_PROMPT, False))


def register_a2r_attention() -> str:
    """Register ``A2R_ATTENTION`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(A2R_ATTENTION, a2r_bidirectional_attention)
    AttentionMaskInterface.register(A2R_ATTENTION, sdpa_mask)
    return A2R_ATTENTION


def uses_a2r_attention(model) -> bool:
    """True when ``model`` runs its attention through ``A2R_ATTENTION`` (prefix cache possible)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == A2R_ATTENTION


def is_remote_code_model(model) -> bool:
    """True for models whose class comes from a checkpoint's own code (``trust_remote_code``)."""
    return type(model).__module__.startswith("transformers_modules")


def build_tiny_diffusion_model(vocab_size: int, mask_token_id: int, *, seed: int = 0,
                               hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                               num_kv_heads: int = 2, max_position_embeddings: int = 2048):
    """A randomly initialised LLaDA-shaped model: a Llama with full bidirectional attention.

    Args:
        vocab_size: tokens in the vocabulary, mask token included.
        mask_token_id: the [MASK] token id, ``0 <= mask_token_id < vocab_size``; stored as
            ``config.mask_token_id`` (what :func:`a2r.diffusion_generate` reads).
        seed: weights are a function of the seed (and the shape arguments) only.
        hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings: the shape.

    Returns:
        ``transformers.LlamaForCausalLM`` in float32 on the CPU, eval mode, attention
        ``A2R_ATTENTION``, ``config.is_causal = False``, ``config.use_cache = False``. Save it with
        ``save_pretrained`` and load it back with :func:`load_diffusion_model`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                    ("num_layers", num_layers), ("num_heads", num_heads),
                    ("num_kv_heads", num_kv_heads),
                    ("max_position_embeddings", max_position_embeddings)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(mask_token_id, int) and 0 <= mask_token_id < vocab_size):
        raise ValueError(f"mask_token_id must be an int in [0, vocab_size={vocab_size}), "
                         f"got {mask_token_id!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")

    register_a2r_attention()
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        # A wider init than Llama's 0.02 so a random model has peaked, well-separated logits:
        # greedy decisions then do not hinge on float rounding (tests compare runs exactly).
        initializer_range=0.2,
        is_causal=False, use_cache=False, mask_token_id=mask_token_id,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    config._attn_implementation = A2R_ATTENTION
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _mask_id_from(model, path: str | None, mask_id: int | None) -> int:
    """``mask_id`` if given, else ``config.mask_token_id``, else the tokenizer's ``mask_token``."""
    if mask_id is not None:
        return int(mask_id)
    config_id = getattr(model.config, "mask_token_id", None)
    if config_id is not None:
        return int(config_id)
    if path is not None:
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        except Exception:   # no tokenizer files in the directory: nothing more to look at
            tokenizer = None
        if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
    raise ValueError(f"mask_id: no mask token id found for {path or type(model).__name__} "
                     "(neither config.mask_token_id nor the tokenizer's mask_token); pass mask_id=")


def load_diffusion_model(path: str, *, mask_id: int | None = None, device="cpu", dtype=None):
    """Load a masked-diffusion LM from a local directory (no hub access).

    - Checkpoints of a transformers architecture (e.g. saved :func:`build_tiny_diffusion_model`)
      load as ``AutoModelForCausalLM`` with ``A2R_ATTENTION`` (bidirectional; prefix cache works).
    - Checkpoints that ship their own code (LLaDA, Dream: ``auto_map`` in config.json) load with
      ``trust_remote_code=True`` and their own attention (exact mode only).
    - DiffusionGemma checkpoints (``model_type`` ``"diffusion_gemma"``) load as
      ``DiffusionGemmaForBlockDiffusion`` with their ``generation_config.json``; they have no mask
      token (``mask_id`` must be None). ValueError on a transformers without DiffusionGemma.

    The mask token id is ``mask_id`` if given, else ``config.mask_token_id``, else the tokenizer's
    ``mask_token``; it is stored as ``model.config.mask_token_id``. ValueError if none is found.

    Returns the model in eval mode on ``device`` (``dtype``: a torch dtype, or None for the
    checkpoint's own).
    """
    import json

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(f"path must be a local model directory, got {path!r}")
    with open(os.path.join(path, "config.json")) as f:
        raw_config = json.load(f)
    kwargs = {} if dtype is None else {"dtype": dtype}
    from .gemma import is_diffusion_gemma_config, require_diffusion_gemma
    if is_diffusion_gemma_config(raw_config):
        if mask_id is not None:
            raise ValueError(f"mask_id: {path} is a DiffusionGemma checkpoint (uniform-noise "
                             "diffusion), which has no mask token")
        model = require_diffusion_gemma().from_pretrained(path, **kwargs)
        return model.to(device).eval()
    auto_map = raw_config.get("auto_map", {})
    if auto_map:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        # LLaDA maps AutoModel (and AutoModelForCausalLM); Dream maps AutoModel only.
        loader = AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else AutoModel
        model = loader.from_pretrained(path, config=config, trust_remote_code=True, **kwargs)
    else:
        register_a2r_attention()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=A2R_ATTENTION,
                                                     **kwargs)
        model.config.is_causal = False
        model.config.use_cache = False
    model.config.mask_token_id = _mask_id_from(model, path, mask_id)
    return model.to(device).eval()


register_a2r_attention()
