"""Loading models for the pipeline's roles, and what the stages read off a loaded model.

Loaders (:func:`load_causal_lm`, :func:`load_thinker`; vLLM's: :func:`a2r.engine.load_vllm`)
take a ``save_pretrained`` directory or a hub id (:func:`check_model_dir`: its snapshot in the
Hugging Face cache), check the directory, its ``config.json``,
the architecture and the tokenizer first and raise :class:`~a2r.config.ModelDirError` or
:class:`~a2r.config.UnsupportedArchitectureError` naming the directory; :func:`check_fits` raises
:class:`~a2r.config.PromptTooLongError` before a prompt outgrows a model's positions. They return
``(model, tokenizer)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from a2r_kernels.vocab import attention_geometry, eos_ids, text_config

from .config import ModelDirError, PromptTooLongError, UnsupportedArchitectureError

__all__ = ["QUESTION_TOO_LONG", "check_fits", "check_model_dir", "check_tokenizer",
           "hub_snapshot_dir", "kv_bytes_per_token", "load_causal_lm", "load_thinker",
           "model_dtype", "parse_dtype", "position_limit", "read_config_json",
           "references_too_long_hint", "stop_ids", "tokenizer_differences", "unsupported_reason"]

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


def references_too_long_hint(names: Mapping[str, str | None] | None = None) -> str:
    """What shortens a prompt that the references made too long: the config fields that cap them,
    each named by ``names[field]`` when given (see :meth:`a2r.config.A2RConfig.validate`; a field
    mapped to None has no name there, the CLI has no flag for it, and is left out)."""
    knobs = [name for name in ((names or {}).get(field, field) for field in
                               ("answer_max_chars", "answer_max_tokens", "num_paths")) if name]
    return f"the references made it too long: lower {', '.join(knobs[:-1])} or {knobs[-1]}"


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


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` names a local path, never a hub id: it exists on disk, starts with ``.``,
    ``/`` or ``~`` (or a drive on Windows), uses the OS's own separator when that is not ``/``, or
    has more than one ``/`` (a hub id is ``name`` or ``org/name``)."""
    if os.path.lexists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return True
    return (os.sep != "/" and os.sep in text) or bool(os.path.splitdrive(text)[0])


# Files a model directory needs (config, weights, tokenizer, chat template, remote code): what a
# hub id's download fetches, not the repository's other formats (GGUF, ONNX, original/, ...).
_HUB_MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken")


def hub_snapshot_dir(repo_id: str, role: str) -> Path:
    """The local directory of hub model ``repo_id``: its snapshot in the Hugging Face cache
    (``HF_HUB_CACHE``), downloaded first where there is a network and ``HF_HUB_OFFLINE`` is not
    set, as ``from_pretrained`` would. :class:`ModelDirError` when it is neither cached nor
    downloadable."""
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(_HUB_MODEL_FILES)))
        if not offline and not any(folder.glob("*.safetensors")):   # a PyTorch-only repository
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin"]))
    except Exception as err:  # noqa: BLE001 - hub and cache errors have no common base
        where = ("the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else
                 "the local Hugging Face cache or on the Hub")
        raise ModelDirError(f"{role} model {repo_id!r} is not a local directory, and not a model "
                            f"in {where}: {first_line(err)}") from None
    return folder


def check_model_dir(path, role: str) -> Path:
    """The local model directory ``path`` names: a directory, or a hub id (``org/name``) resolved
    through the Hugging Face cache (:func:`hub_snapshot_dir`). :class:`ModelDirError` for a
    missing path, a file, or a directory without ``config.json``."""
    if path is None:
        raise ModelDirError(f"{role} model directory is required")
    text = os.fspath(path)
    if not _looks_like_path(text):
        return check_model_dir(hub_snapshot_dir(text, role), role)
    directory = Path(text).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ModelDirError(f"{role} model path {directory} is a file, not a model directory (give "
                            "the directory that holds config.json and the weights)")
    if not directory.is_dir():
        raise ModelDirError(f"{role} model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"{role} model directory has no config.json (not a saved model): "
                            f"{directory}")
    return directory


def read_config_json(directory: Path, role: str) -> dict:
    """``directory/config.json`` parsed; :class:`ModelDirError` when it is not a JSON object
    (transformers would report invalid JSON as an unknown architecture)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{role} model directory {directory}: config.json is not valid JSON "
                            f"({err.msg}: line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{role} model directory {directory}: config.json is not UTF-8 "
                            "text") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{role} model directory {directory}: config.json holds a "
                            f"{type(config).__name__}, not a JSON object")
    return config


def _weights_errors() -> tuple[type[BaseException], ...]:
    """What loading unreadable weights raises: OSError (missing, unreadable) and safetensors'
    SafetensorError (a truncated or corrupt file)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - transformers requires safetensors
        return (OSError,)
    return (OSError, SafetensorError)


def _decoder_only_reason(config) -> str | None:
    """Why ``config`` (in transformers' causal-LM mapping) is not a decoder-only model, or None.

    Decided by the architecture, not by ``config.is_decoder``: that flag defaults to False in every
    config and decoder-only architectures (Llama, Qwen, GPT-NeoX, ...) ignore it. It matters only
    for encoders that also have a causal-LM head (BERT, RoBERTa, ...: the architectures
    transformers also maps to a masked LM), which attend causally only with ``is_decoder=True``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "is not a decoder-only causal LM (an encoder-decoder model)"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder",
                                                                              False):
        return ("is not a decoder-only causal LM (an encoder architecture; its causal-LM head "
                "attends causally only with is_decoder=true in config.json)")
    return None


def unsupported_reason(config, causal_lm_mapping) -> str | None:
    """Why ``a2r.sample_parallel`` cannot drive this architecture, or None when it can.

    It needs a decoder-only causal LM (:func:`_decoder_only_reason`) whose attention goes through
    transformers' ``AttentionInterface`` (Llama, Qwen2/3, Mistral, GPT-NeoX, ...) with full
    attention in every layer.
    """
    if type(config) not in causal_lm_mapping:
        return "is not a causal LM"
    why = _decoder_only_reason(config)
    if why is not None:
        return why
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
    read_config_json(directory, role)   # invalid JSON is named as such, not as an unknown model
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
    except _weights_errors() as err:  # config.json but no weights, or unreadable/truncated ones
        raise ModelDirError(f"{role} model directory {directory} has no loadable weights: "
                            f"{first_line(err)}") from err
    model.to(device).eval()
    return model, tokenizer


def load_thinker(path, device, dtype):
    """A diffusion thinker (any family :mod:`a2r.thinker` knows) + its tokenizer from ``path``."""
    from transformers import AutoTokenizer

    from . import thinker

    directory = check_model_dir(path, "thinker")
    raw_config = read_config_json(directory, "thinker")
    remote_code = "auto_map" in raw_config  # LLaDA / Dream ship code
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote_code)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable tokenizer: "
                            f"{first_line(err)}") from err
    check_tokenizer(tokenizer, directory, "thinker")
    if (not thinker.is_diffusion_gemma_config(raw_config)
            and getattr(tokenizer, "mask_token_id", None) is None):
        _check_thinker_mask_token(directory, remote_code)
    try:
        model = thinker.load_thinker_model(directory, tokenizer, device=device,
                                           dtype=parse_dtype(dtype))
    except _weights_errors() as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable weights: "
                            f"{first_line(err)}") from err
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"thinker model in {directory} is not a masked-diffusion model a2r can drive: "
            f"{first_line(err)}") from err
    return model, tokenizer


def _check_thinker_mask_token(directory: Path, remote_code: bool) -> None:
    """A masked-diffusion thinker whose tokenizer has no mask token needs ``mask_token_id`` in its
    config (as loaded: remote-code configs may set it themselves); :class:`ModelDirError` saying
    where to put it otherwise, before any weights load (not the library's "pass mask_id=", which
    the command line has no way to do)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=remote_code)
    except (ValueError, KeyError, OSError):
        return   # load_thinker_model reports the unusable config itself
    if getattr(config, "mask_token_id", None) is None:
        raise ModelDirError(
            f"thinker model directory {directory} names no mask token: its tokenizer has no "
            "mask_token and its config.json no mask_token_id (a masked-diffusion thinker needs "
            "one: add \"mask_token_id\": ID to config.json)")


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
