"""The knobs of an A2R run (:class:`A2RConfig`) and the set-up errors the CLI reports on one line.

:class:`A2RConfig` holds the explorer's :class:`~a2r.sampling.SamplingParams` as one field, so a
new sampling knob is a field of ``SamplingParams`` and nothing here; ``A2RPipeline.run(**overrides)``
and :meth:`A2RConfig.replace` take its fields by name (``temperature=0``) as well.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from a2r_kernels.vocab import BACKENDS, REMASKING

from .extract import ANSWER_MODES
from .sampling import SamplingParams

__all__ = ["A2RConfig", "ModelDirError", "PipelineError", "PromptTooLongError",
           "TokenizerMismatchError", "UnsupportedArchitectureError"]


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


THINKER_CACHE_MODES = ("none", "prefix")   # a2r.thinker.masked.CACHE_MODES (torch-free here)

EXPLORER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINKER_INSTRUCTION = "Write a short reasoning trace that reconciles the reference answers."
SYNTHESIZER_INSTRUCTION = (
    "The reference answers above come from independent attempts and may be wrong. Re-reason about "
    "the question using them, and put your final answer within \\boxed{}.")


@dataclass
class A2RConfig:
    """Knobs of one A2R run. Token counts are in each model's own tokens."""

    num_paths: int = 4                       # N explorer paths
    max_new_tokens: int = 256                # per explorer path
    sampling: SamplingParams = field(default_factory=SamplingParams)   # explorer sampling
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
    # Synthesizer (greedy by default: the synthesis should be reproducible). It samples with the
    # explorer's filters (top-p, top-k, ...) at its own temperature.
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

    @property
    def synth_max(self) -> int:
        """The synthesizer's new-token budget."""
        return self.synth_max_new_tokens or self.max_new_tokens

    def stage_seed(self, offset: int) -> int | None:
        """The seed of a stage: explorer ``seed``, synthesizer ``seed + 1``, thinker ``seed + 2``."""
        return None if self.seed is None else self.seed + offset

    def replace(self, **overrides) -> "A2RConfig":
        """A copy with ``overrides``: fields of A2RConfig, or of its SamplingParams by name."""
        own = {f.name for f in fields(A2RConfig)}
        sampling_names = set(SamplingParams.field_names()) - own
        unknown = set(overrides) - own - sampling_names
        if unknown:
            raise ValueError(f"unknown A2RConfig fields: {sorted(unknown)}")
        values = {**asdict(self), **{k: v for k, v in overrides.items() if k in own}}
        sampling = overrides.get("sampling", self.sampling)
        sampling_changes = {k: v for k, v in overrides.items() if k in sampling_names}
        values["sampling"] = (SamplingParams(**{**asdict(sampling), **sampling_changes})
                              if isinstance(sampling, SamplingParams) else sampling)
        return A2RConfig(**values)

    def validate(self) -> None:
        """Raise :class:`PipelineError` (a ValueError) naming the first bad field."""
        for name in ("num_paths", "max_new_tokens"):
            _check_positive(name, getattr(self, name))
        if self.synth_max_new_tokens is not None:
            _check_positive("synth_max_new_tokens", self.synth_max_new_tokens)
        if not isinstance(self.sampling, SamplingParams):
            raise PipelineError(f"sampling must be an a2r.sampling.SamplingParams, "
                                f"got {type(self.sampling).__name__}")
        try:   # the sampling knobs fail here, before any model is loaded or run
            self.sampling.validate()
        except ValueError as err:
            raise PipelineError(str(err)) from None
        for name in ("synth_temperature", "thinker_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PipelineError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("answer_max_chars", "answer_max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise PipelineError(f"{name} must be an int >= 0 or None (no cap), got {value!r}")
        for name, allowed in (("answer_mode", ANSWER_MODES), ("thinker_remasking", REMASKING),
                              ("thinker_cache", THINKER_CACHE_MODES), ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise PipelineError(f"{name} must be one of {allowed}, "
                                    f"got {getattr(self, name)!r}")
        self._validate_thinker_schedule()

    def _validate_thinker_schedule(self) -> None:
        if self.thinker_threshold is not None and not 0.0 < self.thinker_threshold <= 1.0:
            raise PipelineError(f"thinker_threshold must be in (0, 1] or None, "
                                f"got {self.thinker_threshold}")
        for name in ("thinker_gen_length", "thinker_block_length", "thinker_steps",
                     "thinker_traces"):
            _check_positive(name, getattr(self, name))
        if self.thinker_gen_length % self.thinker_block_length:
            raise PipelineError(f"thinker_gen_length={self.thinker_gen_length} must be a multiple "
                                f"of thinker_block_length={self.thinker_block_length}")
        num_blocks = self.thinker_gen_length // self.thinker_block_length
        if self.thinker_threshold is None and self.thinker_steps % num_blocks:
            raise PipelineError(f"thinker_steps={self.thinker_steps} must be a multiple of the "
                                f"number of thinker blocks ({num_blocks}) when no threshold is set")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"{name} must be >= 1, got {value!r}")
