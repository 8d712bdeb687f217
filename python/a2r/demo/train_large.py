"""A larger synthesizer for the trained explorer (A2R-Efficient in miniature), trained by
:mod:`a2r.demo.train` beside the other models (``synthesizer_large``) with
``python -m a2r.demo.train --large-synthesizer``.

The synthesizer of :mod:`a2r.demo.train` has the explorer's shape (2 layers of hidden 128). This
one is deeper (:attr:`LargeConfig.layers` layers of the same width): its first layers are the
trained explorer's, each added layer starts as the identity (its attention output and MLP down
projections zero, so the model starts as the explorer, function for function), and it is trained
on ``synthesizer_prompt(question, references) -> worked answer`` exactly as the small one
(:func:`a2r.demo.train_data.stage_examples`), with the trained explorer's own temperature-1
paths as references. Its reference questions are drawn over the whole stated task with term lengths
weighted towards 3 digits (:attr:`LargeConfig.digit_weights`): long terms are where the explorer's
paths fail, so that is where the synthesizer must add for itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .task import TRAIN_SEED, draw_problems
from .train_data import max_answer_tokens, sample_paths, stage_examples

__all__ = ["LARGE", "LargeConfig", "deepen", "large_synthesizer_job", "sample_references"]


@dataclass(frozen=True)
class LargeConfig:
    """Shape, data and steps of the larger synthesizer."""

    layers: int = 4                        # the explorer's layers, then identity-initialised ones
    reference_questions: int = 2000        # questions the explorer samples paths for
    digit_weights: tuple = (1, 2, 4)       # weight of 1, 2, 3-digit terms in those questions
    steps: int = 1200
    batch: int = 16
    lr: float = 2e-3
    alone_fraction: float = 0.25
    threads: int = 1
    seed: int = TRAIN_SEED + 6             # offsets 0..5 are train.py's


LARGE = LargeConfig()


def deepen(model, layers: int):
    """A copy of the Qwen3 ``model`` with ``layers`` decoder layers: its own first, then added
    layers whose ``o_proj`` and ``down_proj`` are zero (each adds 0 to the residual stream, so the
    copy computes what ``model`` computes until training moves them)."""
    from transformers import Qwen3ForCausalLM

    base = model.config.num_hidden_layers
    if layers < base:
        raise ValueError(f"layers must be >= {base}, got {layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * layers
    deep = Qwen3ForCausalLM(config)
    deep.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer in deep.model.layers[base:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    deep.tie_weights()
    return deep


def sample_references(explorer, tokenizer, pipe, config: LargeConfig, *, paths: int,
                      sample_batch: int, max_new_tokens: int):
    """The explorer's temperature-1 paths on :attr:`LargeConfig.reference_questions` questions
    drawn with :attr:`LargeConfig.digit_weights`: ``(problems, references, answers, accuracy)``."""
    from ..extract import extract_answer_component, extract_final_answer

    problems = draw_problems(config.reference_questions, config.seed, config.digit_weights)
    prompts = [pipe.explorer_prompt(p.question) for p in problems]
    sampled = sample_paths(explorer, tokenizer, prompts, paths, max_new_tokens, sample_batch,
                           config.seed + 1)
    references = [[extract_answer_component(t) for t in texts] for texts in sampled]
    answers = [[extract_final_answer(t) for t in texts] for texts in sampled]
    right = sum(a == p.gold for row, p in zip(answers, problems) for a in row)
    return problems, references, answers, right / max(1, len(problems) * paths)


def large_synthesizer_job(explorer, tokenizer, pipe, encode, eos, config: LargeConfig, base, log):
    """The larger synthesizer (:func:`deepen` of the trained ``explorer``) and its training job
    (keyword arguments of :func:`a2r.demo.train._train`), with the data of :func:`sample_references`
    rendered by :func:`a2r.demo.train_data.stage_examples` under ``base`` (a ``TrainConfig``: paths,
    reference counts, traces) and :attr:`LargeConfig.alone_fraction`. Returns ``(model, job,
    explorer path accuracy on its reference questions)``."""
    problems, references, answers, accuracy = sample_references(
        explorer, tokenizer, pipe, config, paths=base.paths, sample_batch=base.sample_batch,
        max_new_tokens=max_answer_tokens())
    if log:
        log(f"  explorer paths for the large synthesizer: {accuracy:.3f} correct")
    stage_config = replace(base, alone_fraction=config.alone_fraction, seed=config.seed + 2)
    examples, _ = stage_examples(pipe, encode, eos, problems, references, answers, stage_config)
    job = dict(examples=examples, steps=config.steps, batch=config.batch, lr=config.lr,
               seed=config.seed + 3, pad_id=tokenizer.pad_token_id, mask_id=None)
    return deepen(explorer, config.layers), job, accuracy
