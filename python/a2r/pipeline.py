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

  Each model's :class:`~a2r.engine.TreeEngine` keeps its :class:`~a2r_kernels.hf.TreeDecoder`
  across stages and runs, and its prefill reuses every whole block of a prompt that a live or freed (not yet evicted)
  sequence holds (``TreeKVCache`` prefix reuse: blocks keyed by their tokens and everything before
  them). So the synthesizer forwards only what follows the last whole block it shares with the
  explorer prompt, and ``a2r eval`` over many questions reuses what their prompts share. The
  explorer's pool is sized for the synthesizer's prompt too (an estimate: the synthesizer prompt
  with empty references plus ``max_new_tokens + 2`` tokens per reference and the traces), so the
  explorer's prompt is still cached when the synthesizer runs; a prompt that outgrows the pool gets
  a larger one, recomputing the prefix (``KVSharing.reuse_note`` says so). With
  ``reuse_prefix_kv=False`` every stage prefills its whole prompt in a pool of its own.

Engines (:mod:`a2r.engine`) run the explorer and synthesizer; prompts are built once per
question (:mod:`a2r.prompts`); the KV-bytes accounting is :mod:`a2r.results`'.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Sequence

from .config import A2RConfig, PipelineError, TokenizerMismatchError, option_name
from .engine import ENGINES, Generation, Room, as_engine, load_vllm
from .extract import extract_answer_component, extract_final_answer, majority_vote
from .models import (QUESTION_TOO_LONG, check_fits, check_model_dir, kv_bytes_per_token,
                     load_causal_lm, load_thinker, parse_dtype, references_too_long_hint,
                     stop_ids, tokenizer_differences)
from .prompts import Prompt, PromptBuilder, decode
from .results import A2RResult, KVSharing, StageReport, joined_trace
from .sampling import SamplingParams

# The pipeline's public names; the errors, config and results are re-exported from their modules.
from .config import (ModelDirError, PromptTooLongError,  # noqa: E402,F401
                     UnsupportedArchitectureError)

__all__ = ["A2RConfig", "A2RPipeline", "A2RResult", "KVSharing", "ModelDirError", "PipelineError",
           "PromptTooLongError", "StageReport", "TokenizerMismatchError",
           "UnsupportedArchitectureError", "kv_bytes_per_token", "parse_dtype"]

SYNTHESIZER_SEED, THINKER_SEED = 1, 2   # stage seeds: A2RConfig.seed + these


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _thinker_forwarded_tokens(details, uncached: bool) -> int:
    """Token positions a diffusion thinker's forward passes ran over (``details``: its
    ``DiffusionResult``; ``tokens`` is ``[R, P + G]``). Without a cache every call forwards the
    whole canvas, ``calls * R * (P + G)``; with one (Fast-dLLM prefix cache, DiffusionGemma's
    encoder) the prompt is forwarded once per encoder pass and each call forwards the generated
    part, ``R * P * max(1, encoder calls) + calls * R * G`` (an upper bound for block caches)."""
    rows, length = details.tokens.shape
    prompt = details.prompt_length
    if uncached:
        return details.num_forward_calls * rows * length
    return (rows * prompt * max(1, details.encoder_forward_calls)
            + details.num_forward_calls * rows * (length - prompt))


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

    ``option_names`` (a dict field -> name, None: no name; empty by default) makes its errors
    name a config field as the caller's user knows it (the ``a2r`` CLI sets its flags:
    ``--top-p``, not ``top_p``; see :meth:`A2RConfig.validate`).

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
        # How errors name the config's fields: the names the caller's user typed (the a2r command
        # line sets its flags, see A2RConfig.validate); empty: the field names.
        self.option_names: dict[str, str | None] = {}
        # One engine per model (the symmetric set-up's one model: one engine, one cache), kept
        # across stages and runs: its cache holds the prompts' blocks for prefix reuse.
        self.explorer_engine = as_engine(explorer)
        self.synthesizer_engine = (self.explorer_engine if self.symmetric
                                   else as_engine(self.synthesizer))
        self.prompts = PromptBuilder(self.config, self.explorer_tokenizer, self.thinker_tokenizer,
                                     self.synthesizer_tokenizer)
        self.explorer_confidence = None   # a2r.confidence.ConfidenceConfig: run()'s explorer
        self._check_tokenizers()

    def _check_tokenizers(self) -> None:
        diffs = tokenizer_differences(self.explorer_tokenizer, self.synthesizer_tokenizer)
        if diffs and self.symmetric:
            raise TokenizerMismatchError(
                "symmetric set-up (one model explores and synthesizes) needs identical tokenizers, "
                "but " + "; ".join(diffs))
        if diffs and any("vocabularies" in d for d in diffs):
            warnings.warn("explorer and synthesizer tokenizers have different vocabularies; "
                          "references are handed over as text and re-tokenized", stacklevel=3)
        if self.thinker is not None and (self.thinker_tokenizer.get_vocab()
                                         != self.explorer_tokenizer.get_vocab()):
            warnings.warn("thinker and explorer tokenizers have different vocabularies; "
                          "references are handed over as text and re-tokenized", stacklevel=3)

    @classmethod
    def from_pretrained(cls, explorer: str | os.PathLike, synthesizer: str | os.PathLike | None = None,
                        thinker: str | os.PathLike | None = None, *, device="cpu", dtype=None,
                        config: A2RConfig | None = None, engine: str = "transformers",
                        vllm_options: dict | None = None) -> "A2RPipeline":
        """Load the models from ``save_pretrained`` directories (each with its tokenizer) or hub
        ids (their snapshot in the Hugging Face cache: :func:`a2r.models.check_model_dir`).

        ``synthesizer=None`` or the explorer's own directory gives the symmetric set-up (the model
        is loaded once). ``dtype``: ``None``/``"auto"`` keeps the checkpoint's, else a name accepted
        by :func:`parse_dtype`. ``engine="vllm"`` runs the explorer and the synthesizer as vLLM
        engines (:class:`a2r.engine.VLLMEngine`, ``vllm_options`` its keyword arguments:
        ``tensor_parallel_size``, ``pipeline_parallel_size``, ``gpu_memory_utilization``, ...;
        ``device`` is then the thinker's only). Raises :class:`ModelDirError`,
        :class:`UnsupportedArchitectureError` or :class:`TokenizerMismatchError`.
        """
        if engine not in ENGINES:
            raise PipelineError(f"engine must be one of {ENGINES}, got {engine!r}")

        def load(directory, role):
            if engine == "transformers":
                return load_causal_lm(directory, role, device, dtype)
            return load_vllm(directory, role, device, dtype, options=dict(vllm_options or {}),
                             seed=(config or A2RConfig()).seed)

        explorer_dir = check_model_dir(explorer, "explorer")
        synthesizer_dir = check_model_dir(synthesizer, "synthesizer") if synthesizer else None
        thinker_dir = check_model_dir(thinker, "thinker") if thinker else None
        parse_dtype(dtype)  # reject a bad dtype before loading anything
        explorer_model, explorer_tok = load(explorer_dir, "explorer")
        synthesizer_model = synthesizer_tok = None
        if synthesizer_dir is not None and synthesizer_dir.resolve() != explorer_dir.resolve():
            synthesizer_model, synthesizer_tok = load(synthesizer_dir, "synthesizer")
        thinker_model = thinker_tok = None
        if thinker_dir is not None:
            thinker_model, thinker_tok = load_thinker(thinker_dir, device, dtype)
        return cls(explorer_model, explorer_tok, synthesizer_model, synthesizer_tok,
                   thinker_model, thinker_tok, config=config)

    # ---- prompts (texts; PromptBuilder renders and encodes each once per question) ----------

    def explorer_prompt(self, question: str) -> str:
        return self.prompts.explorer(question)

    def thinker_prompt(self, question: str, references: Sequence[str], tokenizer=None) -> str:
        """The thinker's prompt, rendered with ``tokenizer`` (default: the thinker's)."""
        return self.prompts.thinker(question, references, tokenizer)

    def synthesizer_prompt(self, question: str, references: Sequence[str],
                           trace: str | None = None) -> str:
        return self.prompts.synthesizer(question, references, trace)

    def synthesizer_alone_prompt(self, question: str) -> str:
        """The control of ``a2r eval``: the synthesizer on the bare question, no references."""
        return self.prompts.synthesizer_alone(question)

    def _explorer(self, question: str) -> Prompt:
        return self.prompts.encoded(self.explorer_tokenizer, self.explorer_prompt(question),
                                    question)

    def _thinker(self, question: str, references: Sequence[str], tokenizer=None) -> Prompt:
        tokenizer = tokenizer or self.thinker_tokenizer
        return self.prompts.encoded(tokenizer, self.thinker_prompt(question, references, tokenizer),
                                    question)

    def _synthesizer(self, question: str, references: Sequence[str], trace=None) -> Prompt:
        return self.prompts.encoded(self.synthesizer_tokenizer,
                                    self.synthesizer_prompt(question, references, trace), question)

    # ---- stages ------------------------------------------------------------------------------

    def _generate(self, name: str, engine, tokenizer, prompt: Prompt, n: int,
                  max_new_tokens: int, sampling: SamplingParams, seed: int | None,
                  cfg: A2RConfig, *, reuse_prefix: bool = False, room: Room | None = None,
                  confidence=None) -> tuple[StageReport, Generation]:
        """One sampling stage on ``engine``: its report and the engine's :class:`Generation`."""
        # Question-only prompts were checked up front (check_question); this catches the rest.
        check_fits(name, engine, len(prompt.ids), max_new_tokens,
                   references_too_long_hint(self.option_names))
        stops = stop_ids(engine, tokenizer)
        generation = engine.generate(prompt.ids, n, max_new_tokens, sampling, seed=seed,
                                     stop_ids=stops, backend=cfg.backend,
                                     reuse_prefix=reuse_prefix, room=room, confidence=confidence)
        texts = [decode(tokenizer, s, stops) for s in generation.sequences]
        return StageReport(name, prompt.text, len(prompt.ids), texts, generation.sequences,
                           generation.seconds, confidences=generation.confidences,
                           stop_reasons=generation.stop_reasons), generation

    def _synthesizer_room(self, question: str, cfg: A2RConfig) -> Room | None:
        """Symmetric set-up: an estimate of the synthesizer's prompt (the prompt with empty
        references plus ``max_new_tokens + 2`` tokens per reference and the traces), for which
        the explorer's pool keeps room, so that the explorer's prompt is still cached when the
        synthesizer prefills. Asymmetric: None (two models, two caches)."""
        if not self.symmetric:
            return None
        use_thinker = self.thinker is not None and cfg.use_thinker
        bare = len(self._synthesizer(question, [""] * cfg.num_paths,
                                     "x" if use_thinker else None).ids)
        reference_tokens = cfg.max_new_tokens + 2   # + 2: re-tokenisation at the cut
        if cfg.answer_max_tokens is not None:
            reference_tokens = min(reference_tokens, cfg.answer_max_tokens + 2)
        traces = cfg.thinker_traces * (cfg.thinker_gen_length + 8) if use_thinker else 0
        return Room(bare + cfg.num_paths * reference_tokens + traces, cfg.synth_max)

    def _think(self, question: str, references: Sequence[str], cfg: A2RConfig) -> StageReport:
        import torch

        from . import thinker as thinkers

        tokenizer, model = self.thinker_tokenizer, self.thinker
        prompt = self._thinker(question, references)
        check_fits("thinker", model, len(prompt.ids),
                   thinkers.generated_positions(model, cfg.thinker_gen_length),
                   references_too_long_hint(self.option_names))
        device = next(model.parameters()).device
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=device).manual_seed(cfg.stage_seed(THINKER_SEED))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        details = thinkers.diffusion_generate(
            model, prompt.tensor(device), gen_length=cfg.thinker_gen_length,
            eos_token_id=tokenizer.eos_token_id, generator=generator,
            num_traces=cfg.thinker_traces, return_details=True,
            **thinkers.schedule(model, cfg, tokenizer))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        trace_ids = [[int(t) for t in row] for row in details.sequences]
        stops = thinkers.stop_ids(tokenizer)
        traces = [decode(tokenizer, ids, stops).strip() for ids in trace_ids]
        uncached = cfg.thinker_cache == "none" and thinkers.kind(model) == "masked diffusion"
        return StageReport("thinker", prompt.text, len(prompt.ids), traces, trace_ids, seconds,
                           forwarded_tokens=_thinker_forwarded_tokens(details, uncached))

    # ---- single stages (``a2r eval`` re-runs them on one set of explorer samples) -------------

    def explore_with_confidence(self, question: str, confidence) -> StageReport:
        """The explorer stage alone, ``"explorer_online"`` (prompt, seed, kept cache as
        :meth:`run`'s), with a :class:`a2r.confidence.ConfidenceConfig` (issue 22)."""
        cfg = self.config
        return self._generate(
            "explorer_online", self.explorer_engine, self.explorer_tokenizer, self._explorer(question),
            cfg.num_paths, cfg.max_new_tokens, cfg.sampling, cfg.seed, cfg,
            reuse_prefix=cfg.reuse_prefix_kv, room=self._synthesizer_room(question, cfg),
            confidence=confidence)[0]

    def answer(self, prompt: str, *, name: str = "synthesizer") -> StageReport:
        """The synthesizer on a rendered ``prompt`` (its own full prefill; no KV reuse), with the
        config's synthesizer settings (greedy by default)."""
        cfg = self.config
        from .prompts import encode

        encoded = Prompt(prompt, encode(self.synthesizer_tokenizer, prompt))
        report, _ = self._generate(name, self.synthesizer_engine, self.synthesizer_tokenizer,
                                   encoded, 1, cfg.synth_max, self._synth_sampling(cfg),
                                   cfg.stage_seed(SYNTHESIZER_SEED), cfg)
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
        engine = (self.synthesizer_engine if model is self.synthesizer
                  else self.explorer_engine if model is self.explorer else as_engine(model))
        prompt = self._thinker(question, references, tokenizer)
        report, _ = self._generate("ar_thinker", engine, tokenizer, prompt, 1,
                                   cfg.thinker_gen_length, SamplingParams(temperature=0.0),
                                   cfg.seed, cfg)
        report.texts = [report.texts[0].strip()]
        return report

    @staticmethod
    def _synth_sampling(cfg: A2RConfig) -> SamplingParams:
        """The synthesizer samples with the explorer's filters at its own temperature."""
        return cfg.replace(temperature=cfg.synth_temperature).sampling

    def _config(self, overrides) -> A2RConfig:
        cfg = self.config.replace(**overrides)
        cfg.validate(self.option_names)
        if self.thinker is not None and cfg.use_thinker:
            from . import thinker as thinkers

            defaults = A2RConfig()
            changed = [option_name(name, self.option_names)
                       for name in thinkers.unused_settings(self.thinker)
                       if getattr(cfg, name) != getattr(defaults, name)]
            if changed:
                raise PipelineError(f"{', '.join(changed)}: options the {thinkers.kind(self.thinker)} "
                                    "thinker does not use (its generation config sets its "
                                    "schedule)")
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
        hint = QUESTION_TOO_LONG
        check_fits("explorer", self.explorer_engine, len(self._explorer(question).ids),
                   cfg.max_new_tokens, hint)
        no_references = [""] * cfg.num_paths
        use_thinker = self.thinker is not None and cfg.use_thinker
        if use_thinker:
            from . import thinker as thinkers

            check_fits("thinker", self.thinker,
                       len(self._thinker(question, no_references).ids),
                       thinkers.generated_positions(self.thinker, cfg.thinker_gen_length), hint)
        synth_prompt = self._synthesizer(question, no_references, "x" if use_thinker else None)
        check_fits("synthesizer", self.synthesizer_engine, len(synth_prompt.ids), cfg.synth_max,
                   hint)

    def run(self, question: str, **overrides) -> A2RResult:
        """Run explorer -> thinker -> synthesizer on ``question``.

        ``overrides`` replace fields of :attr:`config` (or of its ``sampling``) for this call
        only (e.g. ``num_paths=8, max_new_tokens=512, temperature=0.7``).
        """
        cfg = self._config(overrides)
        self._check_question(question, cfg)
        run_start = time.perf_counter()

        # 1. Explorer: N paths from one prompt; the prompt KV is shared through the tree cache.
        explorer_prompt = self._explorer(question)
        explorer, _ = self._generate(
            "explorer", self.explorer_engine, self.explorer_tokenizer, explorer_prompt,
            cfg.num_paths, cfg.max_new_tokens, cfg.sampling, cfg.seed, cfg,
            reuse_prefix=cfg.reuse_prefix_kv, room=self._synthesizer_room(question, cfg),
            confidence=self.explorer_confidence)
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
        synth_prompt = self._synthesizer(question, references,
                                         joined_trace(thinker.texts) if thinker else None)
        synthesizer, generation = self._generate(
            "synthesizer", self.synthesizer_engine, self.synthesizer_tokenizer, synth_prompt, 1,
            cfg.synth_max, self._synth_sampling(cfg), cfg.stage_seed(SYNTHESIZER_SEED), cfg,
            reuse_prefix=cfg.reuse_prefix_kv)
        kv = self._kv_sharing(explorer_prompt, synth_prompt, generation, cfg)
        return A2RResult(
            question=question, mode="symmetric" if self.symmetric else "asymmetric",
            explorer=explorer, references=references, explorer_answers=explorer_answers,
            thinker=thinker, synthesizer=synthesizer,
            final_answer=extract_final_answer(synthesizer.texts[0]),
            pass_at_1_answer=explorer_answers[0], cons_answer=cons_answer, cons_votes=cons_votes,
            kv=kv, seconds=time.perf_counter() - run_start)

    __call__ = run

    def _kv_sharing(self, explorer_prompt: Prompt, synth_prompt: Prompt,
                    synthesis: Generation, cfg: A2RConfig) -> KVSharing:
        """What prompt sharing saved in one run (:mod:`a2r.results` has the formula)."""
        bytes_per_token = kv_bytes_per_token(self.explorer_engine)
        shared_prefix = (_common_prefix_length(explorer_prompt.ids, synth_prompt.ids)
                         if self.symmetric else 0)
        reused, note = self.synthesizer_engine.reuse_report(
            synthesis, shared_prefix, self.symmetric, cfg.reuse_prefix_kv)
        explorer_shared = self.explorer_engine.kv_shared_prompt_tokens(len(explorer_prompt.ids))
        return KVSharing(
            prompt_tokens=len(explorer_prompt.ids), num_paths=cfg.num_paths,
            bytes_per_token=bytes_per_token,
            explorer_saved_bytes=explorer_shared * (cfg.num_paths - 1) * bytes_per_token,
            symmetric=self.symmetric, synthesizer_shared_prefix_tokens=shared_prefix,
            synthesizer_reusable_bytes=shared_prefix * bytes_per_token,
            synthesizer_prefix_reused=reused > 0, reused_prefix_tokens=reused,
            synthesizer_prefill_tokens=len(synth_prompt.ids) - reused,
            synthesizer_saved_bytes=reused * bytes_per_token, reuse_note=note)
