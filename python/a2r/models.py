"""Loading models for the pipeline's roles, and what the stages read off a loaded model.

Loaders (:func:`load_causal_lm`, :func:`load_thinker`; vLLM's: :func:`a2r.engine.load_vllm`)
check the directory,
the architecture and the tokenizer first and raise :class:`~a2r.config.ModelDirError` or
:class:`~a2r.config.UnsupportedArchitectureError` naming the directory; :func:`check_fits` raises
:class:`~a2r.config.PromptTooLongError` before a prompt outgrows a model's positions. They return
``(model, tokenizer)``.
"""

from __future__ import annotations

from pathlib import Path

from a2r_kernels.vocab import attention_geometry, eos_ids, text_config

from .config import ModelDirError, PromptTooLongError, UnsupportedArchitectureError

__all__ = ["QUESTION_TOO_LONG", "REFERENCES_TOO_LONG", "check_fits", "check_model_dir",
           "check_tokenizer", "kv_bytes_per_token", "load_causal_lm", "load_thinker",
           "model_dtype", "parse_dtype", "position_limit", "stop_ids", "tokenizer_differences",
           "unsupported_reason"]

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16"}


def parse_dtype(name):
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` -> torch dtype;
    ``None``/``"auto"`` -> ``None`` (keep the checkpoint's dtype); a torch dtype passes through."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES)) + ['auto']}, got {name!r}")
    return getattr(torch, _DTYPES[name])


def model_dtype(model):
    """The dtype of ``model``'s weights (and KV cache)."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None and not callable(dtype):
        return dtype
    return next(model.parameters()).dtype


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token occupies in ``model``: ``2 * layers * kv_heads * head_dim * size``."""
    import torch

    config = text_config(model.config)
    _, num_kv_heads, head_dim = attention_geometry(config)
    element_size = torch.empty((), dtype=model_dtype(model)).element_size()
    return 2 * config.num_hidden_layers * num_kv_heads * head_dim * element_size


def stop_ids(model, tokenizer=None) -> list[int]:
    """Every id that ends generation: ``model``'s generation config's eos ids (else its config's),
    plus ``tokenizer``'s eos id when given. The one EOS resolver of the stages (explore, engines)."""
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    extra = [] if tokenizer is None else eos_ids(tokenizer.eos_token_id)
    return eos_ids([*eos_ids(configured), *extra])


def tokenizer_differences(a, b) -> list[str]:
    """What differs between two tokenizers in ways that change token ids."""
    diffs = []
    if a.get_vocab() != b.get_vocab():
        diffs.append(f"vocabularies differ ({len(a)} vs {len(b)} tokens)")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            diffs.append(f"{attr} differs ({getattr(a, attr, None)} vs {getattr(b, attr, None)})")
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        diffs.append("chat templates differ")
    return diffs


def check_tokenizer(tokenizer, directory: Path, role: str) -> None:
    """transformers builds an empty tokenizer from ``config.json`` alone when a directory has no
    tokenizer files; it encodes every text to no tokens. Refuse it here, naming the directory."""
    if not tokenizer("0 a", add_special_tokens=False)["input_ids"]:
        raise ModelDirError(f"{role} model directory {directory} has no tokenizer (it loads as an "
                            f"empty {type(tokenizer).__name__}); save one there with "
                            "tokenizer.save_pretrained(DIR)")


def position_limit(model) -> int | None:
    """The model's ``max_position_embeddings`` (None when its config has none)."""
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


QUESTION_TOO_LONG = "shorten the question or ask for fewer new tokens"
REFERENCES_TOO_LONG = ("the references made it too long: lower answer_max_chars, "
                        "answer_max_tokens or num_paths")


def check_fits(role: str, model, prompt_tokens: int, new_tokens: int, hint: str) -> None:
    """Raise :class:`PromptTooLongError` when ``prompt_tokens + new_tokens`` positions exceed the
    model's ``max_position_embeddings`` (positions past it are outside what the model was built
    for: RoPE models drift, learned position tables fail). ``model``: a transformers model or an
    :class:`~a2r.engine.Engine` (which names its model's architecture)."""
    limit = position_limit(model)
    if limit is not None and prompt_tokens + new_tokens > limit:
        where = getattr(model, "name_or_path", "") or "in memory"
        architecture = getattr(model, "architecture", None) or type(model).__name__
        raise PromptTooLongError(
            f"the {role} prompt is {prompt_tokens} tokens + {new_tokens} new tokens = "
            f"{prompt_tokens + new_tokens} > max_position_embeddings={limit} of the {role} model "
            f"({architecture}, {where}): "
            f"{hint}")


def check_model_dir(path, role: str) -> Path:
    if path is None:
        raise ModelDirError(f"{role} model directory is required")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelDirError(f"{role} model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"{role} model directory has no config.json (not a saved model): "
                            f"{directory}")
    return directory


def unsupported_reason(config, causal_lm_mapping) -> str | None:
    """Why ``a2r.sample_parallel`` cannot drive this architecture, or None when it can.

    It needs a decoder-only causal LM whose attention goes through transformers'
    ``AttentionInterface`` (Llama, Qwen2/3, Mistral, ...) with full attention in every layer.
    """
    if type(config) not in causal_lm_mapping:
        return "is not a causal LM"
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", None) is False:
        return "is not a decoder-only causal LM"
    if not getattr(causal_lm_mapping[type(config)], "_supports_attention_backend", False):
        return "does not route attention through transformers' AttentionInterface"
    layer_types = set(getattr(text_config(config), "layer_types", None) or [])
    if layer_types - {"full_attention"}:
        return f"has non-full-attention layers {sorted(layer_types - {'full_attention'})}"
    return None


def load_causal_lm(path, role: str, device, dtype):
    """Load a transformers causal LM + tokenizer from ``path``; clear errors for the CLI."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory = check_model_dir(path, role)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        raise UnsupportedArchitectureError(
            f"{role} model in {directory} has an architecture transformers does not know: "
            f"{first_line(err)}") from err
    why = unsupported_reason(config, MODEL_FOR_CAUSAL_LM_MAPPING)
    if why is not None:
        raise UnsupportedArchitectureError(
            f"{role} model in {directory} (model_type={config.model_type!r}, architectures="
            f"{getattr(config, 'architectures', None)}) {why}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"{role} model directory {directory} has no loadable tokenizer: "
                            f"{first_line(err)}") from err
    check_tokenizer(tokenizer, directory, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=parse_dtype(dtype))
    except OSError as err:  # config.json but no weights, or unreadable weights
        raise ModelDirError(f"{role} model directory {directory} has no loadable weights: "
                            f"{first_line(err)}") from err
    model.to(device).eval()
    return model, tokenizer


def load_thinker(path, device, dtype):
    """A diffusion thinker (any family :mod:`a2r.thinker` knows) + its tokenizer from ``path``."""
    from transformers import AutoTokenizer

    from . import thinker

    directory = check_model_dir(path, "thinker")
    remote_code = "auto_map" in (directory / "config.json").read_text()  # LLaDA / Dream ship code
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote_code)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable tokenizer: "
                            f"{first_line(err)}") from err
    check_tokenizer(tokenizer, directory, "thinker")
    try:
        model = thinker.load_thinker_model(directory, tokenizer, device=device,
                                           dtype=parse_dtype(dtype))
    except OSError as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable weights: "
                            f"{first_line(err)}") from err
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"thinker model in {directory} is not a masked-diffusion model a2r can drive: "
            f"{first_line(err)}") from err
    return model, tokenizer


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
