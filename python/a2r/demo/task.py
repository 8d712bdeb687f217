"""The synthetic reasoning task of the trained embedded models: sums of a few small integers.

A question is ``What is 347 + 85 + 912 + 6?``: :data:`MIN_TERMS` to :data:`MAX_TERMS` terms of 1 to
:data:`MAX_DIGITS` digits; the gold answer is the integer sum. The worked answer (what the explorer
learns to write, and the synthesizer to re-derive) keeps a running sum, one addition per line, then
the boxed result. Every number in the working is written with :data:`WIDTH` digits, least
significant digit first (347 is ``7430``)::

    7430+5800=2340        (0347 + 0085 = 0432)
    2340+2190=4431        (0432 + 0912 = 1344)
    4431+6000=0531        (1344 + 0006 = 1350)
    \\boxed{1350}

Written least significant digit first, each digit of a sum depends only on digits already written
(the carry comes from the left, as in column addition), which a causal model can learn, where most
significant first needs the carry from digits it has not written yet; small transformers learn
reversed addition in far fewer steps (Lee et al., 2023, "Teaching Arithmetic to Small
Transformers"). The fixed width puts each digit at a fixed distance from the digits it is computed
from. The box holds the answer in the usual order.

Every line is a place a path can go wrong (a term mis-copied out of the question, a wrong digit,
a dropped carry), and every later line carries that error on, so paths sampled at temperature 1
from an under-trained explorer fail in different places: the correct fragments are spread across
paths.

Questions are drawn from ``random.Random(seed)`` (Python's Mersenne Twister: the same on every
platform). Training draws use :data:`TRAIN_SEED` and its offsets; the committed held-out file uses
:data:`HELDOUT_SEED`, never used in training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DIGIT_MIXES", "HELDOUT_SEED", "MAX_DIGITS", "MAX_TERMS", "MIN_TERMS", "MIX_HELDOUT_SEED",
           "Problem", "TRAIN_SEED", "WIDTH", "draw_problems", "parse_question", "reversed_digits",
           "worked_answer", "write_jsonl"]

MIN_TERMS, MAX_TERMS, MAX_DIGITS = 3, 5, 3
WIDTH = 4   # digits of every number in the working: the largest sum, 5 * 999, has 4
TRAIN_SEED = 16_000
HELDOUT_SEED = 99_991
# Seed of held-out sets drawn with another mix of term lengths (DIGIT_MIXES): never used in training.
MIX_HELDOUT_SEED = 99_992
# Named mixes of term lengths: the weight of 1, 2, ..., MAX_DIGITS digits (None: uniform, the
# training draw). Every mix stays inside the stated task (3 to 5 terms of 1 to 3 digits).
DIGIT_MIXES = {"uniform": None, "mostly-3-digit": (1, 1, 8), "mostly-1-digit": (8, 1, 1)}


@dataclass(frozen=True)
class Problem:
    """One question: its ``terms``, the ``question`` text and the ``gold`` answer (a string)."""

    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "What is " + " + ".join(map(str, self.terms)) + "?"

    @property
    def gold(self) -> str:
        return str(sum(self.terms))

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.gold}


_QUESTION = re.compile(r"What is ([0-9]+(?: \+ [0-9]+)+)\?")


def parse_question(text: str) -> Problem | None:
    """The :class:`Problem` whose ``question`` is ``text`` (surrounding whitespace aside), or None
    when ``text`` is not a question of this task: the inverse of :attr:`Problem.question` over what
    :func:`draw_problems` can write (:data:`MIN_TERMS` to :data:`MAX_TERMS` terms of 1 to
    :data:`MAX_DIGITS` digits, no leading zeros, written exactly so). The trained embedded models
    saw only such questions; their answers to any other text are noise."""
    match = _QUESTION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    terms = match.group(1).split(" + ")
    if not MIN_TERMS <= len(terms) <= MAX_TERMS or any(
            len(t) > MAX_DIGITS or (len(t) > 1 and t.startswith("0")) for t in terms):
        return None
    return Problem(tuple(int(t) for t in terms))


def draw_problems(count: int, seed: int, digit_weights=None) -> list[Problem]:
    """``count`` problems from ``random.Random(seed)``: the number of terms uniform in
    ``[MIN_TERMS, MAX_TERMS]``, each term's digit count uniform in ``[1, MAX_DIGITS]`` and its value
    uniform among numbers with that many digits (so short and long terms are equally common).

    ``digit_weights``: relative weights of 1, 2, ..., :data:`MAX_DIGITS` digits per term (e.g.
    ``DIGIT_MIXES["mostly-3-digit"]``) instead of uniform; ``None`` (the default) is the uniform
    draw, the same questions as before the option existed for a given seed."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if digit_weights is not None:
        digit_weights = tuple(digit_weights)
        if len(digit_weights) != MAX_DIGITS or any(not w >= 0 for w in digit_weights) \
                or not sum(digit_weights) > 0:
            raise ValueError(f"digit_weights must be {MAX_DIGITS} weights >= 0 with a positive "
                             f"sum, got {digit_weights}")
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        terms = []
        for _ in range(rng.randint(MIN_TERMS, MAX_TERMS)):
            if digit_weights is None:
                digits = rng.randint(1, MAX_DIGITS)
            else:
                digits = rng.choices(range(1, MAX_DIGITS + 1), weights=digit_weights)[0]
            terms.append(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))
        problems.append(Problem(tuple(terms)))
    return problems


def reversed_digits(number: int) -> str:
    """``number`` as :data:`WIDTH` digits, least significant first: ``reversed_digits(85) ==
    "5800"``."""
    return f"{number:0{WIDTH}d}"[::-1]


def worked_answer(terms) -> str:
    """The chain of thought for ``terms``: one ``running+term=new`` line per term after the first
    (numbers as :func:`reversed_digits`), then ``\\boxed{sum}`` (usual digit order)."""
    terms = list(terms)
    if len(terms) < 2:
        raise ValueError(f"terms must hold at least 2 numbers, got {terms}")
    if any(not 0 <= t < 10 ** WIDTH for t in terms) or not sum(terms) < 10 ** WIDTH:
        raise ValueError(f"terms and their sum must have at most {WIDTH} digits, got {terms}")
    lines, running = [], terms[0]
    for term in terms[1:]:
        lines.append(f"{reversed_digits(running)}+{reversed_digits(term)}="
                     f"{reversed_digits(running + term)}")
        running += term
    return "\n".join(lines) + f"\n\\boxed{{{running}}}"


def write_jsonl(path: str | Path, problems) -> Path:
    """Write ``{"question", "answer"}`` lines (the format ``a2r eval`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems), encoding="utf-8")
    return path


def main(argv=None) -> int:
    """``python -m a2r.demo.task OUT.jsonl [--count K] [--seed S] [--mix NAME]``: write a held-out
    file of the task (default: 100 questions, :data:`MIX_HELDOUT_SEED`, the mostly-3-digit mix)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m a2r.demo.task", description=main.__doc__)
    parser.add_argument("out", help="JSONL file to write ({question, answer} per line)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=MIX_HELDOUT_SEED)
    parser.add_argument("--mix", choices=sorted(DIGIT_MIXES), default="mostly-3-digit")
    args = parser.parse_args(argv)
    if args.seed in range(TRAIN_SEED, TRAIN_SEED + 10):
        parser.error(f"--seed {args.seed} is a training seed (TRAIN_SEED and its offsets)")
    path = write_jsonl(args.out, draw_problems(args.count, args.seed, DIGIT_MIXES[args.mix]))
    print(f"wrote {args.count} questions ({args.mix}, seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
