"""A2R end to end: explorer (N paths) -> answer components -> thinker (optional) -> synthesizer.

    question ──explorer prompt──> sample_parallel(n=N)           N reasoning paths, prompt KV shared
                                    │ extract_answer_component     (text after </think>, capped)
                                    ▼
                          references [1]..[N] ──> diffusion_generate   compact trace (optional)
                                    │                   │
                                    ▼                   ▼
                 synthesizer prompt = question + references + trace ──> greedy answer
                                    │
                                    ▼ extract_final_answer                final answer

Baselines come from the same explorer samples: pass@1 (the first path's answer, plus the mean
accuracy over paths) and self-consistency Cons@N (majority vote, ties to the earliest answer).

Set-ups:
* asymmetric — a small explorer and a larger synthesizer. Text is handed over and re-tokenised, so
  the tokenizers may differ (a warning says so when their vocabularies do).
* symmetric — one model explores and synthesizes. Tokenizers must then be identical. The
  synthesizer prompt is built to start with the explorer prompt's question turn, so the two share a
  token prefix, and the synthesizer reuses its KV through automatic prefix reuse
  (``A2RConfig.reuse_prefix_kv``, on by default)::

        explorer prompt ──prefill──> N paths        (its full blocks stay cached after the run)
        synthesizer prompt: [whole 16-token blocks shared with a cached prompt][rest] ──> answer
                             reused, not recomputed                            forwarded

  The pipeline keeps one :class:`~a2r_kernels.hf.TreeDecoder` per model across stages and runs,
  and its prefill reuses every whole block of a prompt that a live or freed (not yet evicted)
  sequence holds (``TreeKVCache`` prefix reuse: blocks keyed by their tokens and everything before
  them). So the synthesizer forwards only what follows the last whole block it shares with the
  explorer prompt, and ``a2r eval`` over many questions reuses what their prompts share. The
  explorer's pool is sized for the synthesizer's prompt too (an estimate: the synthesizer prompt
  with empty references plus ``max_new_tokens + 2`` tokens per reference and the traces), so the
  explorer's prompt is still cached when the synthesizer runs; a prompt that outgrows the pool gets
  a larger one, recomputing the prefix (``KVSharing.reuse_note`` says so). With
  ``reuse_prefix_kv=False`` every stage prefills its whole prompt in a pool of its own.

KV bytes saved by sharing: the explorer's prompt KV is stored once for N paths instead of N times,
``prompt_tokens * (N - 1) * bytes_per_token`` with
``bytes_per_token = 2 (K and V) * num_layers * num_kv_heads * head_dim * dtype size``; plus
``reused_prefix_tokens * bytes_per_token``: the synthesizer prompt tokens whose KV came from the
cache, neither recomputed nor stored again. With ``engine="vllm"`` both are vLLM's prefix caching,
which shares whole blocks: the explorer prompt's full blocks, and the prompt tokens vLLM reports
cached for the synthesizer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .extract import (
    ANSWER_MODES,
    answers_equal,
    extract_answer_component,
    extract_final_answer,
    majority_vote,
)

__all__ = [
    "A2RConfig",
    "A2RPipeline",
    "A2RResult",
    "KVSharing",
    "ModelDirError",
    "PipelineError",
    "PromptTooLongError",
    "StageReport",
    "TokenizerMismatchError",
    "UnsupportedArchitectureError",
    "kv_bytes_per_token",
    "parse_dtype",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class PipelineError(ValueError):
    """A user-facing set-up error (bad model directory, architecture, tokenizers). The CLI prints
    its message on one line and exits with status 2."""


class ModelDirError(PipelineError):
    """A model directory is missing or holds no model."""


class UnsupportedArchitectureError(PipelineError):
    """A model's architecture cannot play the role it was given."""


class TokenizerMismatchError(PipelineError):
    """Explorer and synthesizer tokenizers disagree where the set-up needs them identical."""


class PromptTooLongError(PipelineError):
    """A stage's prompt plus its new tokens exceed its model's ``max_position_embeddings``."""


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------

# What a2r.thinker and a2r_kernels accept (kept here so validating a config imports no torch;
# tests/test_vocab.py holds them equal to a2r_kernels/vocab.py's).
THINKER_REMASKING = ("low_confidence", "margin", "entropy", "random")
THINKER_CACHE_MODES = ("none", "prefix")
BACKENDS = ("auto", "torch", "triton", "cuda")

EXPLORER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINKER_INSTRUCTION = "Write a short reasoning trace that reconciles the reference answers."
SYNTHESIZER_INSTRUCTION = (
    "The reference answers above come from independent attempts and may be wrong. Re-reason about "
    "the question using them, and put your final answer within \\boxed{}.")


def joined_trace(traces: Sequence[str]) -> str:
    """The thinker text handed to the synthesizer: the trace itself, or with several traces each
    headed ``Trace i:`` (blank lines between)."""
    if len(traces) == 1:
        return traces[0]
    return "\n\n".join(f"Trace {i}:\n{t}" for i, t in enumerate(traces, 1))


@dataclass
class A2RConfig:
    """Knobs of one A2R run. Token counts are in each model's own tokens."""

    num_paths: int = 4                       # N explorer paths
    max_new_tokens: int = 256                # per explorer path
    temperature: float = 1.0                 # explorer sampling
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0                     # explorer / thinker / synthesizer RNG (None: unseeded)
    # Answer components handed to the thinker and synthesizer (see extract_answer_component).
    answer_mode: str = "auto"
    answer_max_chars: int | None = 1024
    answer_max_tokens: int | None = None     # counted with the explorer tokenizer
    # Diffusion thinker (used only when the pipeline has one).
    use_thinker: bool = True
    thinker_gen_length: int = 64
    thinker_block_length: int = 32
    thinker_steps: int = 16
    thinker_threshold: float | None = None
    thinker_temperature: float = 0.0
    thinker_remasking: str = "low_confidence"
    thinker_cache: str = "none"
    thinker_traces: int = 1                  # thinker traces from one prompt (one encoder pass
                                             # with DiffusionGemma); all go to the synthesizer
    # Synthesizer (greedy by default: the synthesis should be reproducible).
    synth_max_new_tokens: int | None = None  # None: max_new_tokens
    synth_temperature: float = 0.0
    explorer_instruction: str = EXPLORER_INSTRUCTION
    thinker_instruction: str = THINKER_INSTRUCTION
    synthesizer_instruction: str = SYNTHESIZER_INSTRUCTION
    backend: str = "auto"                    # a2r_kernels backend for sample_parallel
    # Automatic prefix reuse: each model's stages run in one tree cache kept across runs, and a
    # prefill reuses the whole blocks its prompt shares with cached ones (symmetric: the
    # synthesizer's with the explorer's). False: every stage prefills its whole prompt.
    reuse_prefix_kv: bool = True

    def validate(self) -> None:
        """Raise :class:`PipelineError` (a ValueError) naming the first bad field."""
        if self.num_paths < 1:
            raise PipelineError(f"num_paths must be >= 1, got {self.num_paths}")
        if self.max_new_tokens < 1:
            raise PipelineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.synth_max_new_tokens is not None and self.synth_max_new_tokens < 1:
            raise PipelineError(f"synth_max_new_tokens must be >= 1, got {self.synth_max_new_tokens}")
        for name in ("temperature", "synth_temperature", "thinker_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PipelineError(f"{name} must be a finite number >= 0, got {value!r}")
        # The sampling and thinker knobs are checked here too, so a bad value fails before any
        # model is loaded or run (not after the explorer stage).
        if not 0.0 < self.top_p <= 1.0:
            raise PipelineError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PipelineError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        for name in ("answer_max_chars", "answer_max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise PipelineError(f"{name} must be an int >= 0 or None (no cap), got {value!r}")
        if self.answer_mode not in ANSWER_MODES:
            raise PipelineError(f"answer_mode must be one of {ANSWER_MODES}, "
                                f"got {self.answer_mode!r}")
        if self.thinker_threshold is not None and not 0.0 < self.thinker_threshold <= 1.0:
            raise PipelineError(f"thinker_threshold must be in (0, 1] or None, "
                                f"got {self.thinker_threshold}")
        if self.thinker_remasking not in THINKER_REMASKING:
            raise PipelineError(f"thinker_remasking must be one of {THINKER_REMASKING}, "
                                f"got {self.thinker_remasking!r}")
        if self.thinker_cache not in THINKER_CACHE_MODES:
            raise PipelineError(f"thinker_cache must be one of {THINKER_CACHE_MODES}, "
                                f"got {self.thinker_cache!r}")
        if self.backend not in BACKENDS:
            raise PipelineError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("thinker_gen_length", "thinker_block_length", "thinker_steps",
                     "thinker_traces"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.thinker_gen_length % self.thinker_block_length:
            raise PipelineError(f"thinker_gen_length={self.thinker_gen_length} must be a multiple "
                                f"of thinker_block_length={self.thinker_block_length}")
        num_blocks = self.thinker_gen_length // self.thinker_block_length
        if self.thinker_threshold is None and self.thinker_steps % num_blocks:
            raise PipelineError(f"thinker_steps={self.thinker_steps} must be a multiple of the "
                                f"number of thinker blocks ({num_blocks}) when no threshold is set")


# Masked-diffusion schedule knobs a DiffusionGemma thinker has no use for (its generation config
# sets its schedule); thinker_block_length stays free: validate() ties it to thinker_gen_length.
_MASKED_DIFFUSION_ONLY = ("thinker_steps", "thinker_threshold", "thinker_temperature",
                          "thinker_remasking", "thinker_cache")


def _thinker_positions(thinker, cfg: A2RConfig) -> int:
    """Positions the thinker generates: ``thinker_gen_length``, rounded up to whole canvases for
    DiffusionGemma (it denoises ``canvas_length`` tokens at a time)."""
    from .thinker.gemma import is_diffusion_gemma
    if not is_diffusion_gemma(thinker):
        return cfg.thinker_gen_length
    canvas = int(thinker.config.canvas_length)
    return -(-cfg.thinker_gen_length // canvas) * canvas


def _check_uniform_noise_thinker(cfg: A2RConfig) -> None:
    """PipelineError naming the masked-diffusion knobs set away from their defaults."""
    defaults = A2RConfig()
    changed = [name for name in _MASKED_DIFFUSION_ONLY
               if getattr(cfg, name) != getattr(defaults, name)]
    if changed:
        raise PipelineError(f"{', '.join(changed)}: masked-diffusion options, not used by the "
                            "DiffusionGemma thinker (its generation config sets its schedule)")


@dataclass
class StageReport:
    """One stage's prompt, outputs and cost.

    ``texts[i]`` is the decoded text of output ``i`` (special tokens removed); ``token_ids[i]`` its
    generated token ids. ``generated_tokens`` sums their lengths; ``seconds`` is wall time of the
    stage (device synchronised).
    """

    name: str
    prompt: str
    prompt_tokens: int
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
               "texts": list(self.texts), "generated_tokens": self.generated_tokens,
               "seconds": self.seconds}
        if include_token_ids:
            out["token_ids"] = [list(ids) for ids in self.token_ids]
        return out


@dataclass
class KVSharing:
    """KV-cache bytes that prompt sharing saves (see the module docstring for the formula)."""

    prompt_tokens: int               # explorer prompt, stored once for all paths
    num_paths: int
    bytes_per_token: int             # explorer: 2 * layers * kv_heads * head_dim * dtype size
    explorer_saved_bytes: int        # prompt_tokens * (num_paths - 1) * bytes_per_token
    symmetric: bool
    synthesizer_shared_prefix_tokens: int  # symmetric only: common token prefix of the two prompts
    synthesizer_reusable_bytes: int  # synthesizer_shared_prefix_tokens * bytes_per_token
    synthesizer_prefix_reused: bool = False  # the synthesizer read some prompt KV from the cache
    # Tokens of the synthesizer prompt whose KV came from the cache (the explorer's prompt, or an
    # earlier run's): whole blocks, at most the prompt's length - 1 (0: no reuse).
    reused_prefix_tokens: int = 0
    synthesizer_prefill_tokens: int = 0  # synthesizer prompt tokens forwarded: prompt - reused
    synthesizer_saved_bytes: int = 0     # reused_prefix_tokens * bytes_per_token: not recomputed,
                                         # not stored a second time
    reuse_note: str = ""                 # why the prefix was not reused (or how), "" otherwise


@dataclass
class A2RResult:
    """Everything one :meth:`A2RPipeline.run` produced."""

    question: str
    mode: str                                  # "symmetric" | "asymmetric"
    explorer: StageReport
    references: list[str]                      # answer components, one per path
    explorer_answers: list[str | None]         # extract_final_answer of each path
    thinker: StageReport | None
    synthesizer: StageReport
    final_answer: str | None                   # A2R's answer
    pass_at_1_answer: str | None               # first path's answer
    cons_answer: str | None                    # Cons@N
    cons_votes: int
    kv: KVSharing
    seconds: float

    @property
    def trace(self) -> str | None:
        """The thinker text the synthesizer read (its traces joined, see :func:`joined_trace`)."""
        return joined_trace(self.thinker.texts) if self.thinker is not None else None

    @property
    def kv_bytes_saved(self) -> int:
        """Explorer prompt stored once for N paths, plus (symmetric, reused) the synthesizer's
        shared prefix neither recomputed nor stored again."""
        return self.kv.explorer_saved_bytes + self.kv.synthesizer_saved_bytes

    def grade(self, gold: str | None) -> dict[str, float | bool]:
        """Correctness of each method against ``gold`` (see :func:`a2r.extract.answers_equal`).

        ``mean_at_1`` is the fraction of explorer paths whose answer is correct.
        """
        per_path = [answers_equal(a, gold) for a in self.explorer_answers]
        return {
            "pass_at_1": answers_equal(self.pass_at_1_answer, gold),
            "mean_at_1": sum(per_path) / len(per_path) if per_path else 0.0,
            "cons_at_n": answers_equal(self.cons_answer, gold),
            "a2r": answers_equal(self.final_answer, gold),
        }

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        return {
            "question": self.question,
            "mode": self.mode,
            "final_answer": self.final_answer,
            "pass_at_1_answer": self.pass_at_1_answer,
            "cons_answer": self.cons_answer,
            "cons_votes": self.cons_votes,
            "explorer_answers": list(self.explorer_answers),
            "references": list(self.references),
            "trace": self.trace,
            "stages": {
                "explorer": self.explorer.to_dict(include_token_ids),
                "thinker": self.thinker.to_dict(include_token_ids) if self.thinker else None,
                "synthesizer": self.synthesizer.to_dict(include_token_ids),
            },
            "kv": asdict(self.kv),
            "kv_bytes_saved": self.kv_bytes_saved,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

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


def _model_device(model):
    device = getattr(model, "device", None)   # PreTrainedModel and VLLMModel have one
    if device is not None and not callable(device):
        return device
    return next(model.parameters()).device


def _model_dtype(model):
    """The dtype of ``model``'s weights (and KV cache)."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None and not callable(dtype):
        return dtype
    return next(model.parameters()).dtype


def _is_vllm(model) -> bool:
    from .vllm_engine import VLLMModel

    return isinstance(model, VLLMModel)


def _synchronize(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token occupies in ``model``: ``2 * layers * kv_heads * head_dim * size``."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    import torch

    from a2r_kernels.vocab import attention_geometry

    _, num_kv_heads, head_dim = attention_geometry(text_config)

    element_size = torch.empty((), dtype=_model_dtype(model)).element_size()
    return 2 * text_config.num_hidden_layers * num_kv_heads * head_dim * element_size


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's eos ids plus the tokenizer's."""
    from a2r_kernels.vocab import eos_ids

    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    return eos_ids([*eos_ids(configured), *eos_ids(tokenizer.eos_token_id)])


def _render_prompt(tokenizer, user_message: str, plain_prefix: str, plain_suffix: str) -> str:
    """The prompt text: the tokenizer's chat template when it has one, else a plain template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{plain_prefix}{user_message}{plain_suffix}"


def _encode(tokenizer, text: str, device):
    """Token ids ``[1, P]`` of a rendered prompt. A chat template already wrote every special
    token it wants; a plain prompt gets the tokenizer's usual ones (e.g. BOS)."""
    import torch

    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=not has_template)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=device)


def _decode(tokenizer, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenizer_differences(a, b) -> list[str]:
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


def _check_tokenizer(tokenizer, directory: Path, role: str) -> None:
    """transformers builds an empty tokenizer from ``config.json`` alone when a directory has no
    tokenizer files; it encodes every text to no tokens. Refuse it here, naming the directory."""
    if not tokenizer("0 a", add_special_tokens=False)["input_ids"]:
        raise ModelDirError(f"{role} model directory {directory} has no tokenizer (it loads as an "
                            f"empty {type(tokenizer).__name__}); save one there with "
                            "tokenizer.save_pretrained(DIR)")


def _position_limit(model) -> int | None:
    """The model's ``max_position_embeddings`` (None when its config has none)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


_QUESTION_TOO_LONG = "shorten the question or ask for fewer new tokens"
_REFERENCES_TOO_LONG = ("the references made it too long: lower answer_max_chars, "
                        "answer_max_tokens or num_paths")


def _check_fits(role: str, model, prompt_tokens: int, new_tokens: int, hint: str) -> None:
    """Raise :class:`PromptTooLongError` when ``prompt_tokens + new_tokens`` positions exceed the
    model's ``max_position_embeddings`` (positions past it are outside what the model was built
    for: RoPE models drift, learned position tables fail)."""
    limit = _position_limit(model)
    if limit is not None and prompt_tokens + new_tokens > limit:
        # transformers models know their directory as name_or_path; a2r.vllm_engine's as path.
        where = getattr(model, "name_or_path", "") or getattr(model, "path", "") or "in memory"
        raise PromptTooLongError(
            f"the {role} prompt is {prompt_tokens} tokens + {new_tokens} new tokens = "
            f"{prompt_tokens + new_tokens} > max_position_embeddings={limit} of the {role} model "
            f"({type(model).__name__}, {where}): "
            f"{hint}")


def _check_model_dir(path, role: str) -> Path:
    if path is None:
        raise ModelDirError(f"{role} model directory is required")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelDirError(f"{role} model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"{role} model directory has no config.json (not a saved model): "
                            f"{directory}")
    return directory


def _unsupported_reason(config, causal_lm_mapping) -> str | None:
    """Why ``a2r.sample_parallel`` cannot drive this architecture, or None when it can.

    It needs a decoder-only causal LM whose attention goes through transformers'
    ``AttentionInterface`` (Llama, Qwen2/3, Mistral, ...) with full attention in every layer.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if type(config) not in causal_lm_mapping:
        return "is not a causal LM"
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", None) is False:
        return "is not a decoder-only causal LM"
    if not getattr(causal_lm_mapping[type(config)], "_supports_attention_backend", False):
        return "does not route attention through transformers' AttentionInterface"
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    if layer_types - {"full_attention"}:
        return f"has non-full-attention layers {sorted(layer_types - {'full_attention'})}"
    return None


def _load_causal_lm(path, role: str, device, dtype):
    """Load a transformers causal LM + tokenizer from ``path``; clear errors for the CLI."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory = _check_model_dir(path, role)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        raise UnsupportedArchitectureError(
            f"{role} model in {directory} has an architecture transformers does not know: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    why = _unsupported_reason(config, MODEL_FOR_CAUSAL_LM_MAPPING)
    if why is not None:
        raise UnsupportedArchitectureError(
            f"{role} model in {directory} (model_type={config.model_type!r}, architectures="
            f"{getattr(config, 'architectures', None)}) {why}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"{role} model directory {directory} has no loadable tokenizer: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    _check_tokenizer(tokenizer, directory, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=parse_dtype(dtype))
    except OSError as err:  # config.json but no weights, or unreadable weights
        raise ModelDirError(f"{role} model directory {directory} has no loadable weights: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    model.to(device).eval()
    return model, tokenizer


def _load_vllm_model(path, role: str, device, dtype, *, options: dict, seed):
    """A :class:`~a2r.vllm_engine.VLLMModel` + tokenizer from ``path`` (``device`` unused: vLLM
    places the engine itself)."""
    from transformers import AutoTokenizer

    from .vllm_engine import VLLMModel, vllm_available

    if not vllm_available():
        raise PipelineError("engine 'vllm' needs vLLM installed (pip install vllm)")
    directory = _check_model_dir(path, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"{role} model directory {directory} has no loadable tokenizer: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return VLLMModel(directory, dtype=parse_dtype(dtype), seed=seed, **options), tokenizer


def _load_thinker(path, device, dtype):
    from transformers import AutoTokenizer

    directory = _check_model_dir(path, "thinker")
    try:
        from .thinker.masked import load_diffusion_model
    except ImportError as err:  # pragma: no cover - depends on the checkout
        raise UnsupportedArchitectureError(f"the diffusion thinker needs a2r.thinker: {err}") from err
    remote_code = "auto_map" in (directory / "config.json").read_text()  # LLaDA / Dream ship code
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote_code)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable tokenizer: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    _check_tokenizer(tokenizer, directory, "thinker")
    from .thinker.gemma import is_diffusion_gemma_config
    uniform_noise = is_diffusion_gemma_config(json.loads((directory / "config.json").read_text()))
    mask_id = None if uniform_noise else getattr(tokenizer, "mask_token_id", None)
    try:
        model = load_diffusion_model(str(directory), mask_id=mask_id, device=device,
                                     dtype=parse_dtype(dtype))
    except OSError as err:
        raise ModelDirError(f"thinker model directory {directory} has no loadable weights: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"thinker model in {directory} is not a masked-diffusion model a2r can drive: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return model, tokenizer


_BLOCK_SIZE = 16   # tokens per KV block of the pipeline's decoders (sample_parallel's default)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class A2RPipeline:
    """Explorer -> (diffusion thinker) -> synthesizer over loaded transformers models.

    Args:
        explorer, explorer_tokenizer: causal LM (any device/dtype) sampling the N paths.
        synthesizer, synthesizer_tokenizer: causal LM writing the final answer. ``None`` (or the
            explorer object itself) is the symmetric set-up: one model does both, the
            tokenizers must be identical, and the synthesizer reuses the KV of the whole blocks
            its prompt shares with the explorer's (``A2RConfig.reuse_prefix_kv``; module
            docstring).
        thinker, thinker_tokenizer: optional masked-diffusion model (``a2r.thinker``) writing a
            compact trace from the question and the references; its tokenizer defaults to the
            explorer's.
        config: :class:`A2RConfig` (defaults when ``None``); ``run`` takes per-call overrides.

    Example::

        pipe = A2RPipeline.from_pretrained("explorer/", synthesizer="synth/", thinker="dllm/")
        result = pipe.run("What is 12 * 7?", num_paths=8)
        result.final_answer, result.cons_answer, result.kv_bytes_saved
    """

    def __init__(self, explorer, explorer_tokenizer, synthesizer=None, synthesizer_tokenizer=None,
                 thinker=None, thinker_tokenizer=None, *, config: A2RConfig | None = None):
        self.explorer = explorer
        self.explorer_tokenizer = explorer_tokenizer
        self.symmetric = synthesizer is None or synthesizer is explorer
        self.synthesizer = explorer if self.symmetric else synthesizer
        self.synthesizer_tokenizer = synthesizer_tokenizer or explorer_tokenizer
        self.thinker = thinker
        self.thinker_tokenizer = thinker_tokenizer or explorer_tokenizer
        self.config = config or A2RConfig()
        self.config.validate()
        # One TreeDecoder per (model, backend), kept across stages and runs: its cache holds the
        # prompts' blocks for automatic prefix reuse.
        self._decoders: dict[tuple[int, str], Any] = {}

        diffs = _tokenizer_differences(self.explorer_tokenizer, self.synthesizer_tokenizer)
        if diffs and self.symmetric:
            raise TokenizerMismatchError(
                "symmetric set-up (one model explores and synthesizes) needs identical tokenizers, "
                "but " + "; ".join(diffs))
        if diffs and any("vocabularies" in d for d in diffs):
            warnings.warn("explorer and synthesizer tokenizers have different vocabularies; "
                          "references are handed over as text and re-tokenized", stacklevel=2)
        if thinker is not None and self.thinker_tokenizer.get_vocab() != explorer_tokenizer.get_vocab():
            warnings.warn("thinker and explorer tokenizers have different vocabularies; "
                          "references are handed over as text and re-tokenized", stacklevel=2)

    @classmethod
    def from_pretrained(cls, explorer: str | os.PathLike, synthesizer: str | os.PathLike | None = None,
                        thinker: str | os.PathLike | None = None, *, device="cpu", dtype=None,
                        config: A2RConfig | None = None, engine: str = "transformers",
                        vllm_options: dict | None = None) -> "A2RPipeline":
        """Load the models from ``save_pretrained`` directories (each with its tokenizer).

        ``synthesizer=None`` or the explorer's own directory gives the symmetric set-up (the model
        is loaded once). ``dtype``: ``None``/``"auto"`` keeps the checkpoint's, else a name accepted
        by :func:`parse_dtype`. ``engine="vllm"`` runs the explorer and the synthesizer as vLLM
        engines (:class:`a2r.vllm_engine.VLLMModel`, ``vllm_options`` its keyword arguments:
        ``tensor_parallel_size``, ``pipeline_parallel_size``, ``gpu_memory_utilization``, ...;
        ``device`` is then the thinker's only). Raises :class:`ModelDirError`,
        :class:`UnsupportedArchitectureError` or :class:`TokenizerMismatchError`.
        """
        from .vllm_engine import ENGINES

        if engine not in ENGINES:
            raise PipelineError(f"engine must be one of {ENGINES}, got {engine!r}")
        load = _load_causal_lm if engine == "transformers" else functools.partial(
            _load_vllm_model, options=dict(vllm_options or {}),
            seed=(config or A2RConfig()).seed)
        explorer_dir = _check_model_dir(explorer, "explorer")
        synthesizer_dir = _check_model_dir(synthesizer, "synthesizer") if synthesizer else None
        thinker_dir = _check_model_dir(thinker, "thinker") if thinker else None
        parse_dtype(dtype)  # reject a bad dtype before loading anything
        explorer_model, explorer_tok = load(explorer_dir, "explorer", device, dtype)
        synthesizer_model = synthesizer_tok = None
        if synthesizer_dir is not None and synthesizer_dir.resolve() != explorer_dir.resolve():
            synthesizer_model, synthesizer_tok = load(synthesizer_dir, "synthesizer", device,
                                                      dtype)
        thinker_model = thinker_tok = None
        if thinker_dir is not None:
            thinker_model, thinker_tok = _load_thinker(thinker_dir, device, dtype)
        return cls(explorer_model, explorer_tok, synthesizer_model, synthesizer_tok,
                   thinker_model, thinker_tok, config=config)

    # ---- prompts -----------------------------------------------------------------------------

    def explorer_prompt(self, question: str) -> str:
        return _render_prompt(self.explorer_tokenizer,
                              f"{question}\n{self.config.explorer_instruction}",
                              "Question: ", "\nAnswer:")

    @staticmethod
    def _numbered(references: Sequence[str]) -> str:
        return "\n".join(f"[{i}] {ref if ref else '(no answer)'}" for i, ref in
                         enumerate(references, start=1))

    def thinker_prompt(self, question: str, references: Sequence[str], tokenizer=None) -> str:
        """The thinker's prompt, rendered with ``tokenizer`` (default: the thinker's)."""
        message = (f"{question}\n\nReference answers:\n{self._numbered(references)}\n\n"
                   f"{self.config.thinker_instruction}")
        return _render_prompt(tokenizer or self.thinker_tokenizer, message, "Question: ",
                              "\nTrace:")

    def synthesizer_prompt(self, question: str, references: Sequence[str],
                           trace: str | None = None) -> str:
        # Starts with the question, like the explorer prompt: in the symmetric set-up the two
        # prompts share that token prefix.
        message = f"{question}\n\nReference answers:\n{self._numbered(references)}\n\n"
        if trace:
            message += f"Reasoning trace:\n{trace}\n\n"
        message += self.config.synthesizer_instruction
        return _render_prompt(self.synthesizer_tokenizer, message, "Question: ", "\nAnswer:")

    def synthesizer_alone_prompt(self, question: str) -> str:
        """The control of ``a2r eval``: the synthesizer on the bare question, no references (the
        explorer's instruction, rendered with the synthesizer's tokenizer)."""
        return _render_prompt(self.synthesizer_tokenizer,
                              f"{question}\n{self.config.explorer_instruction}",
                              "Question: ", "\nAnswer:")

    # ---- stages ------------------------------------------------------------------------------

    def _decoder(self, model, num_blocks: int, cfg: A2RConfig) -> tuple[Any, str]:
        """The pipeline's decoder over ``model`` with at least ``num_blocks`` blocks, and ``""``;
        or, when the kept one is smaller, a new one of ``num_blocks`` (its cached prompts are
        lost) and a note saying so."""
        from a2r_kernels.hf import TreeDecoder

        key = (id(model), cfg.backend)
        decoder = self._decoders.get(key)
        if decoder is not None and decoder.cache.num_blocks >= num_blocks:
            return decoder, ""
        note = "" if decoder is None else (
            f"the prompt needed {num_blocks} KV blocks, more than the pool's "
            f"{decoder.cache.num_blocks}: a larger pool was built and cached prompts recomputed")
        self._decoders[key] = TreeDecoder(model, num_blocks, block_size=_BLOCK_SIZE,
                                          backend=cfg.backend)
        return self._decoders[key], note

    def _generate(self, name: str, model, tokenizer, prompt: str, n: int, max_new_tokens: int,
                  temperature: float, seed: int | None, cfg: A2RConfig, *, input_ids=None,
                  decoder=None) -> tuple[StageReport, int]:
        """One sampling stage; returns its report and the prompt tokens whose KV ``decoder`` (the
        pipeline's, for prefix reuse; None: a pool of the stage's own) took from its cache."""
        from . import explore

        device = _model_device(model)
        if input_ids is None:
            input_ids = _encode(tokenizer, prompt, device)
        # Question-only prompts were checked up front (check_question); this catches the rest.
        _check_fits(name, model, input_ids.shape[1], max_new_tokens, _REFERENCES_TOO_LONG)
        eos_ids = _eos_ids(model, tokenizer)
        eos_token_id = eos_ids if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None)
        sampling = dict(temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        eos_token_id=eos_token_id, seed=seed)
        if decoder is not None:   # the decoder was built with cfg.backend
            sampling["decoder"] = decoder
            reused_before = decoder.reused_tokens
        _synchronize(device)
        start = time.perf_counter()
        if _is_vllm(model):
            sequences = model.sample(input_ids[0].tolist(), n, max_new_tokens, **sampling)
        else:
            # Looked up on the module at call time, so tests can script the explorer.
            if decoder is None:
                sampling["backend"] = cfg.backend
            sequences = explore.sample_parallel(model, input_ids, n, max_new_tokens, **sampling)
        _synchronize(device)
        seconds = time.perf_counter() - start
        sequences = [list(map(int, s)) for s in sequences]
        texts = [_decode(tokenizer, s, eos_ids) for s in sequences]
        reused = 0 if decoder is None else decoder.reused_tokens - reused_before
        return StageReport(name, prompt, int(input_ids.shape[1]), texts, sequences, seconds), reused

    def _explorer_pool_blocks(self, question: str, explorer_ids, cfg: A2RConfig) -> int:
        """KV blocks for the explorer stage; symmetric: also enough for the synthesizer's prompt
        (an estimate, see the module docstring), so the explorer's prompt blocks are still
        cached when the synthesizer prefills."""
        from .explore import tree_blocks_needed

        blocks = tree_blocks_needed(explorer_ids.shape[1], [cfg.num_paths], [cfg.max_new_tokens],
                                    _BLOCK_SIZE)
        if not self.symmetric:
            return blocks
        use_thinker = self.thinker is not None and cfg.use_thinker
        bare = _encode(self.synthesizer_tokenizer, self.synthesizer_prompt(
            question, [""] * cfg.num_paths, "x" if use_thinker else None), "cpu").shape[1]
        reference_tokens = cfg.max_new_tokens + 2   # + 2: re-tokenisation at the cut
        if cfg.answer_max_tokens is not None:
            reference_tokens = min(reference_tokens, cfg.answer_max_tokens + 2)
        synth_tokens = (bare + cfg.num_paths * reference_tokens
                        + (cfg.thinker_traces * (cfg.thinker_gen_length + 8) if use_thinker
                           else 0))
        synth_max = cfg.synth_max_new_tokens or cfg.max_new_tokens
        # The explorer's prompt blocks stay cached (free) while the synthesizer's need the rest.
        return max(blocks, tree_blocks_needed(synth_tokens, [1], [synth_max], _BLOCK_SIZE)
                   + -(-explorer_ids.shape[1] // _BLOCK_SIZE))

    def _think(self, question: str, references: Sequence[str], cfg: A2RConfig) -> StageReport:
        import torch

        from .thinker.masked import diffusion_generate
        from .thinker.gemma import is_diffusion_gemma

        tokenizer = self.thinker_tokenizer
        prompt = self.thinker_prompt(question, references)
        device = _model_device(self.thinker)
        input_ids = _encode(tokenizer, prompt, device)
        _check_fits("thinker", self.thinker, input_ids.shape[1],
                    _thinker_positions(self.thinker, cfg), _REFERENCES_TOO_LONG)
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        stop_ids = [i for i in (tokenizer.eos_token_id, getattr(tokenizer, "mask_token_id", None))
                    if i is not None]
        if is_diffusion_gemma(self.thinker):   # schedule from its generation config
            schedule = {}
        else:
            schedule = dict(block_length=cfg.thinker_block_length, steps=cfg.thinker_steps,
                            threshold=cfg.thinker_threshold, temperature=cfg.thinker_temperature,
                            remasking=cfg.thinker_remasking, cache=cfg.thinker_cache,
                            mask_id=getattr(tokenizer, "mask_token_id", None))
        _synchronize(device)
        start = time.perf_counter()
        rows = diffusion_generate(
            self.thinker, input_ids, gen_length=cfg.thinker_gen_length,
            eos_token_id=tokenizer.eos_token_id, generator=generator,
            num_traces=cfg.thinker_traces, **schedule)
        _synchronize(device)
        seconds = time.perf_counter() - start
        trace_ids = [[int(t) for t in row] for row in rows]
        traces = [_decode(tokenizer, ids, stop_ids).strip() for ids in trace_ids]
        return StageReport("thinker", prompt, int(input_ids.shape[1]), traces, trace_ids, seconds)

    # ---- single stages (``a2r eval`` re-runs them on one set of explorer samples) -------------

    def answer(self, prompt: str, *, name: str = "synthesizer") -> StageReport:
        """The synthesizer on a rendered ``prompt`` (its own full prefill; no KV reuse), with the
        config's synthesizer settings (greedy by default)."""
        cfg = self.config
        seed = None if cfg.seed is None else cfg.seed + 1
        report, _ = self._generate(name, self.synthesizer, self.synthesizer_tokenizer, prompt, 1,
                                   cfg.synth_max_new_tokens or cfg.max_new_tokens,
                                   cfg.synth_temperature, seed, cfg)
        return report

    def think(self, question: str, references: Sequence[str]) -> StageReport:
        """The diffusion thinker's trace for ``question`` and ``references`` (NAR); needs a thinker."""
        if self.thinker is None:
            raise PipelineError("this pipeline has no diffusion thinker")
        return self._think(question, references, self.config)

    def think_autoregressive(self, model, tokenizer, question: str,
                             references: Sequence[str]) -> StageReport:
        """An AR model's trace for the thinker prompt (the AR->AR counterpart of :meth:`think`):
        greedy, at most ``thinker_gen_length`` tokens, stopped at EOS."""
        cfg = self.config
        prompt = self.thinker_prompt(question, references, tokenizer)
        report, _ = self._generate("ar_thinker", model, tokenizer, prompt, 1,
                                   cfg.thinker_gen_length, 0.0, cfg.seed, cfg)
        report.texts = [report.texts[0].strip()]
        return report

    def _config(self, overrides) -> A2RConfig:
        unknown = set(overrides) - set(A2RConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown A2RConfig fields: {sorted(unknown)}")
        cfg = A2RConfig(**{**asdict(self.config), **overrides})
        cfg.validate()
        if self.thinker is not None and cfg.use_thinker:
            from .thinker.gemma import is_diffusion_gemma
            if is_diffusion_gemma(self.thinker):
                _check_uniform_noise_thinker(cfg)
        return cfg

    def check_question(self, question: str, **overrides) -> None:
        """Raise :class:`PipelineError` when :meth:`run` would refuse ``question``, without running
        any model: it is not a non-blank string, or a stage's prompt (the thinker's and the
        synthesizer's with empty references: their shortest form) plus that stage's new tokens
        exceeds its model's ``max_position_embeddings`` (:class:`PromptTooLongError`)."""
        self._check_question(question, self._config(overrides))

    def _check_question(self, question, cfg: A2RConfig) -> None:
        if not isinstance(question, str) or not question.strip():
            raise PipelineError(f"question must be a non-empty string, got {question!r}")
        hint = _QUESTION_TOO_LONG
        _check_fits("explorer", self.explorer, len(_encode(
            self.explorer_tokenizer, self.explorer_prompt(question), "cpu")[0]),
            cfg.max_new_tokens, hint)
        no_references = [""] * cfg.num_paths
        use_thinker = self.thinker is not None and cfg.use_thinker
        if use_thinker:
            _check_fits("thinker", self.thinker, len(_encode(
                self.thinker_tokenizer, self.thinker_prompt(question, no_references), "cpu")[0]),
                _thinker_positions(self.thinker, cfg), hint)
        synth_prompt = self.synthesizer_prompt(question, no_references, "x" if use_thinker else None)
        _check_fits("synthesizer", self.synthesizer, len(_encode(
            self.synthesizer_tokenizer, synth_prompt, "cpu")[0]),
            cfg.synth_max_new_tokens or cfg.max_new_tokens, hint)

    def run(self, question: str, **overrides) -> A2RResult:
        """Run explorer -> thinker -> synthesizer on ``question``.

        ``overrides`` replace fields of :attr:`config` for this call only
        (e.g. ``num_paths=8, max_new_tokens=512``).
        """
        cfg = self._config(overrides)
        self._check_question(question, cfg)
        run_start = time.perf_counter()

        # 1. Explorer: N paths from one prompt; the prompt KV is shared through the tree cache.
        explorer_prompt = self.explorer_prompt(question)
        explorer_ids = _encode(self.explorer_tokenizer, explorer_prompt,
                               _model_device(self.explorer))
        explorer_decoder = None
        if cfg.reuse_prefix_kv and not _is_vllm(self.explorer):
            explorer_decoder, _ = self._decoder(
                self.explorer, self._explorer_pool_blocks(question, explorer_ids, cfg), cfg)
        explorer, _ = self._generate(
            "explorer", self.explorer, self.explorer_tokenizer, explorer_prompt,
            cfg.num_paths, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg,
            input_ids=explorer_ids, decoder=explorer_decoder)
        references = [extract_answer_component(
            text, mode=cfg.answer_mode, max_chars=cfg.answer_max_chars,
            max_tokens=cfg.answer_max_tokens,
            tokenizer=self.explorer_tokenizer if cfg.answer_max_tokens is not None else None)
            for text in explorer.texts]
        explorer_answers = [extract_final_answer(text) for text in explorer.texts]
        cons_answer, cons_votes = majority_vote(explorer_answers)

        # 2. Thinker (optional): a compact trace in a few parallel denoising steps.
        thinker = None
        if self.thinker is not None and cfg.use_thinker:
            thinker = self._think(question, references, cfg)

        # 3. Synthesizer: greedy by default, one sequence. Symmetric: its prefill reuses the
        #    whole blocks its prompt shares with the explorer's, still cached in the same pool.
        synth_seed = None if cfg.seed is None else cfg.seed + 1
        synth_prompt = self.synthesizer_prompt(question, references,
                                               joined_trace(thinker.texts) if thinker else None)
        synth_ids = _encode(self.synthesizer_tokenizer, synth_prompt,
                            _model_device(self.synthesizer))
        synth_max = cfg.synth_max_new_tokens or cfg.max_new_tokens
        synth_decoder = None
        if _is_vllm(self.synthesizer):   # refined below (symmetric) from vLLM's report
            reuse_note = ("vLLM prefix caching" if self.symmetric
                          else "asymmetric set-up: two models, two caches")
        elif not cfg.reuse_prefix_kv:
            reuse_note = "reuse_prefix_kv is off"
        else:
            from .explore import tree_blocks_needed

            synth_decoder, reuse_note = self._decoder(
                self.synthesizer,
                tree_blocks_needed(synth_ids.shape[1], [1], [synth_max], _BLOCK_SIZE), cfg)
        synthesizer, reused = self._generate(
            "synthesizer", self.synthesizer, self.synthesizer_tokenizer, synth_prompt, 1,
            synth_max, cfg.synth_temperature, synth_seed, cfg, input_ids=synth_ids,
            decoder=synth_decoder)
        if synth_decoder is not None and not reused and not reuse_note:
            reuse_note = ("asymmetric set-up: two models, two caches" if not self.symmetric else
                          f"the synthesizer prompt shares no whole {_BLOCK_SIZE}-token block "
                          "with a cached prompt")

        bytes_per_token = kv_bytes_per_token(self.explorer)
        shared_prefix = (_common_prefix_length(explorer_ids[0].tolist(), synth_ids[0].tolist())
                         if self.symmetric else 0)
        explorer_shared = explorer.prompt_tokens
        if _is_vllm(self.explorer):   # vLLM shares whole blocks (prefix caching)
            explorer_shared -= explorer_shared % self.explorer.block_size
            if self.symmetric:
                reused = min(self.synthesizer.last_cached_tokens, shared_prefix)
                block = self.explorer.block_size
                reuse_note = (f"vLLM prefix caching reused {reused} of the {shared_prefix} shared "
                              f"prefix tokens (whole {block}-token blocks)")
        kv = KVSharing(
            prompt_tokens=explorer.prompt_tokens, num_paths=cfg.num_paths,
            bytes_per_token=bytes_per_token,
            explorer_saved_bytes=explorer_shared * (cfg.num_paths - 1) * bytes_per_token,
            symmetric=self.symmetric, synthesizer_shared_prefix_tokens=shared_prefix,
            synthesizer_reusable_bytes=shared_prefix * bytes_per_token,
            synthesizer_prefix_reused=reused > 0, reused_prefix_tokens=reused,
            synthesizer_prefill_tokens=synthesizer.prompt_tokens - reused,
            synthesizer_saved_bytes=reused * bytes_per_token, reuse_note=reuse_note)
        return A2RResult(
            question=question, mode="symmetric" if self.symmetric else "asymmetric",
            explorer=explorer, references=references, explorer_answers=explorer_answers,
            thinker=thinker, synthesizer=synthesizer,
            final_answer=extract_final_answer(synthesizer.texts[0]),
            pass_at_1_answer=explorer_answers[0], cons_answer=cons_answer, cons_votes=cons_votes,
            kv=kv, seconds=time.perf_counter() - run_start)

    __call__ = run
