"""Training data of the embedded models' later stages (:mod:`a2r.demo.train`,
:mod:`a2r.demo.train_large`): the explorer's sampled paths and the prompts rendered from them."""

from __future__ import annotations

import random

import torch

from .task import worked_answer

__all__ = ["max_answer_tokens", "reference_counts", "sample_paths", "stage_examples"]


@torch.no_grad()
def sample_paths(model, tokenizer, prompts: list[str], paths: int, max_new_tokens: int,
                 batch: int, seed: int) -> list[list[str]]:
    """``paths`` samples (temperature 1) of ``model`` for each rendered prompt, decoded text."""
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        generated = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=paths,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
        out.extend(texts[i * paths:(i + 1) * paths] for i in range(len(chunk)))
    tokenizer.padding_side = "right"
    return out


def reference_counts(paths: int) -> list[int]:
    """Reference counts k of the training prompts, drawn uniformly: the N of ``a2r eval``'s
    accuracy-against-N sweep (1, 2, 4, 8) up to ``paths``, and ``paths``."""
    from ..eval.evaluate import sweep_sizes

    return sweep_sizes(paths)


def max_answer_tokens() -> int:
    """Tokens enough for the longest worked answer of the task (5 terms of 999), plus a margin."""
    longest = worked_answer([999] * 5)
    return len(longest) + 8


def stage_examples(pipe, encode, eos, ref_problems, references, answers, config):
    """The synthesizer's and the thinkers' training examples ``(prompt ids, target ids)`` from
    the explorer's sampled references (one RNG, seeded ``config.seed + 3``, for both); ``config``
    is a :class:`a2r.demo.train.TrainConfig` (its paths, examples per question, fractions)."""
    rng = random.Random(config.seed + 3)
    synth_examples = []
    for problem, refs, row in zip(ref_problems, references, answers):
        target = encode(worked_answer(problem.terms)) + eos
        for _ in range(config.examples_per_question):
            draw = rng.random()
            if draw < config.alone_fraction:
                prompt = pipe.synthesizer_alone_prompt(problem.question)
            else:
                k = rng.choice(reference_counts(config.paths))
                chosen = rng.sample(range(config.paths), k)
                trace = None
                if rng.random() < config.trace_fraction:
                    wrong = [a for a in row if a and a != problem.gold]
                    trace = (problem.gold if rng.random() < config.trace_gold_fraction or not wrong
                             else rng.choice(wrong))
                prompt = pipe.synthesizer_prompt(problem.question, [refs[i] for i in chosen],
                                                 trace)
            synth_examples.append((encode(prompt), target))
    # 4. Thinkers: the same examples, the same steps; NAR (masked diffusion) and AR.
    thinker_examples = []
    for problem, refs in zip(ref_problems, references):
        for _ in range(config.examples_per_question):
            k = rng.choice(reference_counts(config.paths))
            chosen = rng.sample(range(config.paths), k)
            thinker_examples.append((encode(pipe.thinker_prompt(problem.question,
                                                                 [refs[i] for i in chosen])),
                                     encode(problem.gold)))
    return synth_examples, thinker_examples
