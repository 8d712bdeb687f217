"""``a2r demo``: a scoreboard over a batch of held-out questions, then one worked example.

The demo grades the first ``--questions K`` questions of the held-out draw
(:func:`a2r.demo.task.draw_problems` with :data:`~a2r.demo.task.HELDOUT_SEED`: the first K lines
of the committed ``heldout.jsonl``) with ``a2r eval``'s own code (:mod:`a2r.eval.evaluate`: one set
of N explorer paths per question, every method read from it, the same grader), and prints the
accuracy of pass@1, Cons@N, the synthesizer alone, A2R and the NAR->AR / AR->AR pair, with each
method's cost.

The worked example is chosen without looking at correctness: the first question (in file order)
whose N paths do not all give the same answer (:func:`example_index`): the case A2R exists for.
When every question's paths agree, the first question.

``--random-models``: the same questions on the random embedded models; the figures are noise and
the output says so.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..launch import load_pipeline, random_models_note
from ..report import emit_json, short
from .task import HELDOUT_SEED, draw_problems

__all__ = ["DEFAULT_QUESTIONS", "EXAMPLE_RULE", "RANDOM_MODELS_QUESTIONS", "TRAINED_NOTE",
           "cmd_demo", "example_index", "heldout_items", "scoreboard"]

# Questions the demo grades: enough that one question moves a figure by about 2 points (a
# standard error of about 7 points at 50% accuracy), few enough that the demo stays under a
# minute on the 2-core CPU: 25 s measured on the quiet box (about 0.35 s per question with every
# method, plus start-up), about twice that at load 5-7.
DEFAULT_QUESTIONS = 48
# With --random-models: random models write every stage to its token limit (about 3x slower per
# question), and their figures are noise whatever the count.
RANDOM_MODELS_QUESTIONS = 8
EXAMPLE_RULE = "the first question whose paths disagree, chosen without looking at correctness"
# torch threads while the demo runs, unless OMP_NUM_THREADS says otherwise. The embedded models
# are tiny (hidden 128): on the 2-core AMD EPYC one thread is as fast as two when the machine is quiet
# (25.4 vs 24.9 s) and 4x faster when another process holds a core (24.1 vs 94.1 s), where
# torch's second OpenMP worker waits for its core while the first spins at every barrier.
DEMO_THREADS = 1
TRAINED_NOTE = ("note: the embedded default models are tiny models trained in minutes on a CPU "
                "(python -m a2r.demo.train) for one synthetic task, sums like 'What is 347 + 85 + "
                "912 + 6?'; on any other question their answers are noise.")
NAMES = {"pass_at_1": "pass@1 (first path)", "mean_at_1": "mean@1 (average path)",
         "cons_at_n": "Cons@{n} (majority vote)", "synthesizer_alone": "synthesizer alone",
         "a2r": "A2R (synthesizer over the {n} paths)",
         "nar_ar": "NAR->AR (diffusion trace, then A2R)",
         "ar_ar": "AR->AR (AR trace, then A2R)"}
ORDER = ("pass_at_1", "mean_at_1", "cons_at_n", "synthesizer_alone", "a2r", "nar_ar", "ar_ar")


def heldout_items(count: int) -> list[tuple[str, str]]:
    """The first ``count`` held-out questions as ``(question, gold)``."""
    return [(p.question, p.gold) for p in draw_problems(count, HELDOUT_SEED)]


def example_index(records: Sequence[dict]) -> int:
    """Index (into ``records``) of the worked example: :data:`EXAMPLE_RULE`; 0 when every
    question's paths agree. Reads the paths' answers only, never a verdict."""
    for position, record in enumerate(records):
        if len({path["answer"] for path in record["paths"]}) > 1:
            return position
    return 0


def scoreboard(pipeline, ar_thinker, items, checker, *, models: dict) -> dict:
    """Grade ``items`` with :func:`a2r.eval.evaluate.evaluate_question`; returns ``{"summary":
    evaluate.summarize(...), "records": [...], "example": index}``."""
    from ..eval import evaluate

    start = time.perf_counter()
    records = [evaluate.evaluate_question(pipeline, index, question, gold, checker, key="demo",
                                          ar_thinker=ar_thinker)
               for index, (question, gold) in enumerate(items)]
    from dataclasses import asdict

    summary = evaluate.summarize(records, file=f"held-out draw (seed {HELDOUT_SEED})",
                                 models=models, config=asdict(pipeline.config),
                                 wall_seconds=time.perf_counter() - start)
    return {"summary": summary, "records": records, "example": example_index(records)}


def _print_scoreboard(board: dict, out, noise: bool) -> None:
    summary = board["summary"]
    n, count = summary["num_paths"], summary["num_questions"]
    cost = summary.get("cost_per_question", {})
    print(f"Scoreboard: {count} held-out questions, one set of {n} explorer paths each "
          f"(temperature {summary['config']['sampling']['temperature']}), every other stage "
          "greedy, graded as `a2r eval` grades:", file=out)
    print(f"  {'method':<40} {'accuracy':>9} {'right':>7}   cost/question", file=out)
    for method in ORDER:
        if method not in summary["accuracy"]:
            continue
        value = summary["accuracy"][method]
        right = "" if method == "mean_at_1" else f"{round(value * count)}/{count}"
        spent = cost.get(method)
        print(f"  {NAMES[method].format(n=n):<40} {100 * value:8.1f}% {right:>7}   "
              f"{'-' if spent is None else f'{spent / 1e6:.1f}M'}", file=out)
    for method, thinker in summary.get("thinkers", {}).items():
        print(f"  {method}: its {thinker['stage']} wrote the right answer in "
              f"{100 * thinker['trace_accuracy']:.1f}% of traces, "
              f"{thinker['seconds_per_question']:.3f} s per question", file=out)
    if noise:
        print("  (random models: these figures are noise, not a measure of A2R)", file=out)
    if cost:
        print("  cost: token-parameters (forwarded token positions x model parameters, "
              "summed over the stages a method needs; a2r eval's definition)", file=out)


def _print_example(board: dict, out) -> None:
    record = board["records"][board["example"]]
    print(f"\nWorked example, question {board['example'] + 1}: {EXAMPLE_RULE}.", file=out)
    print(f"Question: {record['question']}   (gold: {record['gold']})", file=out)
    paths = record["result"]["stages"]["explorer"]["texts"]
    for number, (path, text) in enumerate(zip(record["paths"], paths), start=1):
        verdict = "right" if path["correct"] else "wrong"
        print(f"  path {number}: answer={path['answer']!s:<6} {verdict} | {short(text, 60)}",
              file=out)
    for kind, trace in record["traces"].items():
        print(f"  {kind.upper()} thinker trace: {short(trace, 40)}", file=out)
    print(f"  synthesizer (A2R): {short(record['outputs']['synthesizer'], 70)}", file=out)
    answers = "  ".join(f"{m}={record['answers'][m]}{'' if record['correct'][m] else ' (wrong)'}"
                        for m in ORDER if m in record["answers"])
    print(f"  answers: {answers}", file=out)


def cmd_demo(args) -> int:
    """``a2r demo`` (options: :mod:`a2r.cli`)."""
    from ..eval.command import load_ar_thinker
    from ..eval.grading import AnswerChecker

    args.explorer = args.synthesizer = args.thinker = None
    start = time.perf_counter()
    out = sys.stdout
    if not args.json:
        print("A2R demo: explorer -> diffusion thinker -> synthesizer on the embedded tiny models.",
              file=out)
        if args.random_models:
            print("Loading (the first run builds them; later runs reuse the saved files)...",
                  file=out)
    pipeline, models = load_pipeline(args, use_tiny=True)
    note = random_models_note(models) or (TRAINED_NOTE if models["trained"] else None)
    ar_thinker = None
    if pipeline.thinker is not None and pipeline.config.use_thinker:
        ar_thinker, models["ar_thinker"] = load_ar_thinker(args, pipeline, True)
    if not args.json:
        if note:
            print(note, file=out)
        print(f"explorer={models['explorer']['arch']}  thinker="
              f"{(models['thinker'] or {}).get('arch', 'none')}  synthesizer="
              f"{models['synthesizer']['arch']}  ({models['mode']}, {models['device']}, "
              f"{models['dtype']}) from {Path(models['explorer']['path']).parent}\n", file=out)
    import torch

    checker = AnswerChecker()
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(DEMO_THREADS)
    try:
        count = args.questions or (RANDOM_MODELS_QUESTIONS if args.random_models
                                   else DEFAULT_QUESTIONS)
        board = scoreboard(pipeline, ar_thinker, heldout_items(count), checker, models=models)
    finally:
        torch.set_num_threads(threads)
        checker.close()
    seconds = time.perf_counter() - start
    if args.json:
        emit_json({"note": note, "models": models, **board["summary"],
                   "example_rule": EXAMPLE_RULE, "example": board["records"][board["example"]],
                   "per_question": board["records"], "seconds": seconds})
        return 0
    _print_scoreboard(board, out, noise=bool(random_models_note(models)))
    _print_example(board, out)
    print(f"\ndemo finished in {seconds:.1f} s." + (f" {note}" if note else ""), file=out)
    return 0
