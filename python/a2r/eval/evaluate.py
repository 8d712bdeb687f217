"""``a2r eval``: every method graded on ONE set of explorer samples per question, resumable.

Per question, the explorer samples N paths once (``A2RPipeline.run``); everything else reads them:

============================  ================================================================
``pass_at_1``                 the first path's answer
``mean_at_1``                 fraction of the N paths whose answer is right
``cons_at_n``                 majority vote of the N answers (Cons@N)
``a2r``                       the synthesizer over the question + the N references (no trace)
``synthesizer_alone``         the synthesizer on the bare question (the control: same model,
                              no references)
``nar_ar``                    (with a thinker) the diffusion thinker's trace, then the
                              synthesizer over question + references + that trace
``ar_ar``                     (with a thinker) the same with an AR model writing the trace
============================  ================================================================

With ``deepconf`` (``a2r eval --deepconf``): ``deepconf_offline``, ``deepconf_online`` and
``a2r_conf`` from the same paths (:mod:`a2r.eval.deepconf`), and the summary's ``confidence``
(AUROC of path confidence against correctness). Every summary has ``tokens_by_method``: the
generated tokens each method needs (``cons_at_n``: the N paths; ``a2r``: those and the
synthesizer's; ``deepconf_online``: its own run's).

With ``sweep_n`` the accuracy of ``mean_at_1``, ``cons_at_n`` and ``a2r`` is also taken for prefixes
of the same N paths (``k`` in :data:`SWEEP_N` up to N, and N), for the accuracy-against-N plot.

Cost, counted one way for every method (:data:`COST_DEFINITION`): the token-parameters of the
stages the method needs, ``sum over stages of forwarded token positions x parameters of the stage's
model`` (about half the forward FLOPs; attention's own reads left out). ``pass_at_1`` needs the
explorer prompt and the first path; ``mean_at_1`` the prompt and an average path; ``cons_at_n`` the
prompt (once: the paths share it) and all N paths; ``a2r`` that plus the synthesizer; ``nar_ar`` /
``ar_ar`` that plus their thinker and their synthesizer; ``synthesizer_alone`` its own stage only;
``deepconf_offline`` as ``cons_at_n``, ``a2r_conf`` that plus its synthesizer, ``deepconf_online``
its own explorer run (prompt once + its paths, the stopped ones as far as they went).
Each thinker's trace accuracy (the answer in its trace against the gold) and wall time go beside
``nar_ar`` and ``ar_ar`` (summary ``thinkers``).

Answers are graded by :class:`a2r.eval.grading.AnswerChecker` (Math-Verify, our normaliser where it
cannot decide); each record says which checker decided each method.

Files (``--out FILE``): every question's record is appended to :func:`records_path` ``(FILE)``
(``FILE`` with suffix ``.jsonl``) and flushed as soon as the question finishes. A rerun with the
same ``--out`` and the same settings skips the questions recorded there (a run with other settings
is refused); a half-written last line (a kill during the write) is dropped. When all questions are
done, ``FILE`` gets the summary (``accuracy`` ...) plus ``per_question``, computed from the
records alone, so an interrupted-and-resumed run writes the same summary as an uninterrupted one
(timings aside).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..extract import extract_final_answer, majority_vote
from .deepconf import DEEPCONF_METHODS, deepconf_methods, summarize_confidence

__all__ = ["COST_DEFINITION", "EvalRecordsError", "METHODS", "METHOD_EXPLORER", "METHOD_STAGES",
           "method_costs", "parameter_count", "SWEEP_N", "STAGES", "evaluate_question",
           "load_records", "plot_accuracy", "records_path", "settings_key", "summarize",
           "tokens_by_method"]

METHODS = ("pass_at_1", "mean_at_1", "cons_at_n", "a2r", "synthesizer_alone", "ar_ar", "nar_ar",
           *DEEPCONF_METHODS)
THINKER_METHODS = ("ar_ar", "nar_ar")
SWEEP_N = (1, 2, 4, 8)
SWEEP_METHODS = ("mean_at_1", "cons_at_n", "a2r")
# Stages whose generated tokens and seconds the summary adds up.
STAGES = ("explorer", "synthesizer", "synthesizer_alone", "thinker", "ar_thinker",
          "synthesizer_nar", "synthesizer_ar", "explorer_online", "synthesizer_conf")
# The stages (besides the explorer) each method needs: its cost is theirs plus its explorer part.
METHOD_STAGES = {"pass_at_1": (), "mean_at_1": (), "cons_at_n": (), "a2r": ("synthesizer",),
                 "synthesizer_alone": ("synthesizer_alone",),
                 "nar_ar": ("thinker", "synthesizer_nar"), "ar_ar": ("ar_thinker", "synthesizer_ar"),
                 "deepconf_offline": (), "deepconf_online": (), "a2r_conf": ("synthesizer_conf",)}
# Methods whose explorer part is another explorer run's (the online stop's), not the explorer's.
METHOD_EXPLORER = {"deepconf_online": "explorer_online"}
# The thinker behind each thinker method (summary "thinkers": trace accuracy, wall time).
METHOD_THINKER = {"nar_ar": ("nar", "thinker"), "ar_ar": ("ar", "ar_thinker")}
COST_DEFINITION = ("token-parameters per question: sum over the stages a method needs of the token "
                   "positions the stage's model forwarded x that model's parameters (about half the "
                   "forward FLOPs). AR stages forward the prompt once and each generated token once "
                   "(the N paths share one prompt); a diffusion thinker forwards its canvas at every "
                   "denoising step. pass@1: prompt + first path; mean@1: prompt + an average path; "
                   "Cons@N: prompt + all paths; A2R, NAR->AR, AR->AR: Cons@N's + their own stages.")
# Record fields that hold wall-clock time: the only ones two runs of the same eval may differ in.
TIMING_KEYS = ("seconds", "wall_seconds", "seconds_per_question")


class EvalRecordsError(ValueError):
    """The records file of ``--out`` cannot be resumed (other settings, another eval file, not
    JSON)."""


def records_path(out: str | os.PathLike) -> Path:
    """Where the per-question records of ``--out FILE`` go: ``FILE`` with suffix ``.jsonl``."""
    out = Path(out)
    if out.suffix == ".jsonl":
        raise ValueError(f"--out {out}: give the summary file (e.g. results.json); the records go "
                         "beside it with suffix .jsonl")
    return out.with_suffix(".jsonl")


def sweep_sizes(num_paths: int) -> list[int]:
    """Prefix sizes of the accuracy-against-N sweep: :data:`SWEEP_N` up to N, and N."""
    return sorted({k for k in SWEEP_N if k <= num_paths} | {num_paths})


def settings_key(settings: dict[str, Any]) -> str:
    """Short hash of everything that decides a record (config, models, sweep)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_records(path: Path, key: str) -> dict[int, dict]:
    """Records already in ``path`` (by question index). Raises ValueError when they were made with
    other settings (:class:`EvalRecordsError`). A trailing line without newline (an interrupted write) is dropped from the
    file."""
    if not path.is_file():
        return {}
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    if lines and lines[-1]:               # last line not newline-terminated: half written
        with path.open("r+", encoding="utf-8") as handle:
            handle.truncate(len(raw.encode("utf-8")) - len(lines[-1].encode("utf-8")))
    records = {}
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalRecordsError(f"{path}:{number}: not a JSON record ({err.msg}); delete the file or "
                             "choose another --out") from err
        if record.get("settings_key") != key:
            raise EvalRecordsError(f"{path}: records were made with other settings (models, options or "
                             "file); rerun with the same options, or choose another --out")
        records[int(record["index"])] = record
    return records


def _graded(checker, answer: str | None, gold: str) -> dict[str, Any]:
    verdict = checker.check(answer, gold)
    return {"answer": answer, "correct": verdict.correct, "checker": verdict.checker,
            **({"note": verdict.note} if verdict.note else {})}


def parameter_count(model) -> int | None:
    """Parameters of ``model`` (tied embeddings once); None for an engine without them (vLLM)."""
    parameters = getattr(model, "parameters", None)
    return None if parameters is None else sum(p.numel() for p in parameters())


def method_costs(stages: dict, parameters: dict[str, int | None],
                 methods: Sequence[str] | None = None) -> dict[str, float | None]:
    """Each method's cost (:data:`COST_DEFINITION`) from its stages' reports (``stages[name]``:
    a :class:`~a2r.results.StageReport`) and ``parameters[name]``; None where a count is missing.
    ``methods``: only these (default: every method whose stages ran). A method of
    :data:`METHOD_EXPLORER` (``deepconf_online``) counts its own explorer run's tokens."""
    explorer = stages["explorer"]
    paths = [len(ids) for ids in explorer.token_ids]
    explorer_part = {"pass_at_1": explorer.prompt_tokens + paths[0],
                     "mean_at_1": explorer.prompt_tokens + sum(paths) / len(paths)}
    costs = {}
    for method, needed in METHOD_STAGES.items():
        run = METHOD_EXPLORER.get(method, "explorer")
        if (methods is not None and method not in methods) or run not in stages \
                or any(name not in stages for name in needed):
            continue
        weight = parameters.get(run)
        weights = [weight] + [parameters.get(name) for name in needed]
        if any(w is None for w in weights):
            costs[method] = None
            continue
        cost = 0.0 if method == "synthesizer_alone" else \
            weight * explorer_part.get(method, stages[run].processed_tokens)
        costs[method] = cost + sum(parameters[name] * stages[name].processed_tokens
                                   for name in needed)
    return costs


def _stage_parameters(pipeline, ar_thinker) -> dict[str, int | None]:
    synthesizer = parameter_count(pipeline.synthesizer)
    return {"explorer": parameter_count(pipeline.explorer), "synthesizer": synthesizer,
            "synthesizer_alone": synthesizer, "synthesizer_nar": synthesizer,
            "synthesizer_ar": synthesizer,
            "thinker": parameter_count(pipeline.thinker) if pipeline.thinker is not None else None,
            "ar_thinker": parameter_count(ar_thinker[0]) if ar_thinker is not None else None}


def _trace_answer(trace: str) -> str | None:
    """The answer a thinker's trace states: its final answer, else the trace itself."""
    return extract_final_answer(trace) or (trace.strip() or None)


def evaluate_question(pipeline, index: int, question: str, gold: str, checker, *,
                      key: str, sweep_n: bool = False, ar_thinker=None,
                      deepconf=None) -> dict[str, Any]:
    """One question's record (see the module docstring). ``ar_thinker``: ``(model, tokenizer)`` of
    the AR trace writer, used with the pipeline's diffusion thinker. ``deepconf``: a
    :class:`a2r.eval.deepconf.DeepConfOptions` (``pipeline.explorer_confidence`` set to its
    ``tracking()``) adds the DeepConf methods."""
    result = pipeline.run(question, use_thinker=False)
    n = len(result.explorer_answers)
    paths = [_graded(checker, a, gold) for a in result.explorer_answers]
    cons_answer, _ = majority_vote(result.explorer_answers)
    stages = {"explorer": result.explorer, "synthesizer": result.synthesizer}
    methods = {
        "pass_at_1": paths[0],
        "mean_at_1": {"correct": sum(p["correct"] for p in paths) / n},
        "cons_at_n": _graded(checker, cons_answer, gold),
        "a2r": _graded(checker, result.final_answer, gold),
    }
    alone = pipeline.answer(pipeline.synthesizer_alone_prompt(question), name="synthesizer_alone")
    stages["synthesizer_alone"] = alone
    methods["synthesizer_alone"] = _graded(checker, extract_final_answer(alone.texts[0]), gold)
    traces = {}
    if pipeline.thinker is not None and pipeline.config.use_thinker:
        traces["nar"] = pipeline.think(question, result.references)
        traces["ar"] = pipeline.think_autoregressive(*ar_thinker, question, result.references)
        stages["thinker"], stages["ar_thinker"] = traces["nar"], traces["ar"]
        for kind in ("nar", "ar"):
            synth = pipeline.answer(pipeline.synthesizer_prompt(question, result.references,
                                                                traces[kind].texts[0]),
                                    name=f"synthesizer_{kind}")
            stages[f"synthesizer_{kind}"] = synth
            methods[f"{kind}_ar"] = _graded(checker, extract_final_answer(synth.texts[0]), gold)
    confidence_info = None
    if deepconf is not None:   # confidence (issue 22)
        more, more_stages, confidence_info = deepconf_methods(
            pipeline, question, result, lambda answer: _graded(checker, answer, gold), deepconf)
        methods.update(more)
        stages.update(more_stages)
    parameters = _stage_parameters(pipeline, ar_thinker)
    if deepconf is not None:
        parameters.update(explorer_online=parameters["explorer"],
                          synthesizer_conf=parameters["synthesizer"])
    record: dict[str, Any] = {
        "index": index, "question": question, "gold": gold, "settings_key": key, "num_paths": n,
        "correct": {m: v["correct"] for m, v in methods.items()},
        "answers": {m: v.get("answer") for m, v in methods.items() if m != "mean_at_1"},
        "checkers": {m: v["checker"] for m, v in methods.items() if "checker" in v},
        "paths": paths,
        "traces": {kind: t.texts[0] for kind, t in traces.items()},
        "trace_correct": {kind: checker.check(_trace_answer(t.texts[0]), gold).correct
                          for kind, t in traces.items()},
        "cost": method_costs(stages, parameters, list(methods)),
        "parameters": parameters,
        "outputs": {name: s.texts[0] for name, s in stages.items() if name != "explorer"},
        "tokens": {name: s.generated_tokens for name, s in stages.items()},
        "path_tokens": [len(ids) for ids in result.explorer.token_ids],
        "seconds": {name: s.seconds for name, s in stages.items()},
        "kv_bytes_saved": result.kv_bytes_saved,
        "result": result.to_dict(),
    }
    if confidence_info is not None:
        record["confidence"] = confidence_info
    notes = {m: v["note"] for m, v in methods.items() if v.get("note")}
    if notes:
        record["checker_notes"] = notes
    if sweep_n:
        by_n = {}
        for k in sweep_sizes(n):
            vote, _ = majority_vote(result.explorer_answers[:k])
            if k == n:
                a2r_k = methods["a2r"]["correct"]
            else:
                synth = pipeline.answer(pipeline.synthesizer_prompt(question, result.references[:k]),
                                        name=f"synthesizer_n{k}")
                a2r_k = checker.check(extract_final_answer(synth.texts[0]), gold).correct
            by_n[str(k)] = {"mean_at_1": sum(p["correct"] for p in paths[:k]) / k,
                            "cons_at_n": checker.check(vote, gold).correct, "a2r": a2r_k}
        record["by_n"] = by_n
    return record


def summarize(records: Sequence[dict], *, file: str, models: dict, config: dict,
              wall_seconds: float) -> dict[str, Any]:
    """The summary of finished records (in index order): accuracy per method, tokens, seconds."""
    count = len(records)
    methods = [m for m in METHODS if all(m in r["correct"] for r in records)]
    tokens = {s: sum(r["tokens"].get(s, 0) for r in records) for s in STAGES}
    seconds = {s: sum(r["seconds"].get(s, 0.0) for r in records) for s in STAGES}
    checkers: dict[str, int] = {}
    for r in records:
        for used in r["checkers"].values():
            checkers[used] = checkers.get(used, 0) + 1
    summary = {
        "file": file, "num_questions": count, "num_paths": records[0]["num_paths"],
        "accuracy": {m: sum(float(r["correct"][m]) for r in records) / count for m in methods},
        "checkers": dict(sorted(checkers.items())),
        "tokens": tokens,
        "tokens_per_question": {s: tokens[s] / count for s in STAGES},
        "seconds": seconds,
        "seconds_per_question": {s: seconds[s] / count for s in STAGES},
        "kv_bytes_saved": sum(r["kv_bytes_saved"] for r in records),
        "wall_seconds": wall_seconds, "models": models, "config": config,
    }
    summary["tokens_by_method"] = tokens_by_method(records, methods)
    confidence = summarize_confidence(records)
    if confidence:
        summary["confidence"] = confidence
    summary.update(_cost_summary(records, methods, seconds))
    if all("by_n" in r for r in records):
        sizes = list(records[0]["by_n"])
        summary["accuracy_by_n"] = {
            k: {m: sum(float(r["by_n"][k][m]) for r in records) / count for m in SWEEP_METHODS}
            for k in sizes}
    return summary


def tokens_by_method(records: Sequence[dict], methods: Sequence[str]) -> dict[str, int]:
    """Generated tokens each method needs, summed over ``records``: its explorer part
    (``pass_at_1``: the first path; ``mean_at_1``: the mean path; ``synthesizer_alone``: none;
    the others: every path of their explorer run, :data:`METHOD_EXPLORER`) plus its
    :data:`METHOD_STAGES`' (records without per-path counts leave ``pass_at_1`` and
    ``mean_at_1`` out)."""
    totals = {}
    per_path = all("path_tokens" in r for r in records)
    for method in methods:
        if method not in METHOD_STAGES or (method in ("pass_at_1", "mean_at_1") and not per_path):
            continue
        total = 0.0
        for r in records:
            if method == "pass_at_1":
                total += r["path_tokens"][0]
            elif method == "mean_at_1":
                total += sum(r["path_tokens"]) / len(r["path_tokens"])
            elif method != "synthesizer_alone":
                total += r["tokens"].get(METHOD_EXPLORER.get(method, "explorer"), 0)
            total += sum(r["tokens"].get(s, 0) for s in METHOD_STAGES[method])
        totals[method] = round(total)
    return totals


def _cost_summary(records: Sequence[dict], methods, seconds: dict) -> dict[str, Any]:
    """``cost_per_question`` (each method, :data:`COST_DEFINITION`; None where a model's
    parameters are unknown), ``parameters`` and ``thinkers`` (each thinker method's trace accuracy
    and wall time). Records without costs (written before they existed) give none."""
    count = len(records)
    if not all("cost" in r for r in records):
        return {}
    cost = {}
    for m in methods:
        values = [r["cost"].get(m) for r in records]
        cost[m] = None if any(v is None for v in values) else sum(values) / count
    thinkers = {}
    for method, (kind, stage) in METHOD_THINKER.items():
        if method in methods:
            thinkers[method] = {
                "stage": stage, "seconds": seconds[stage], "seconds_per_question": seconds[stage] / count,
                "trace_accuracy": sum(float(r["trace_correct"][kind]) for r in records) / count}
    return {"cost_per_question": cost, "cost_definition": COST_DEFINITION,
            "parameters": records[0]["parameters"], "thinkers": thinkers}


def plot_accuracy(summary: dict[str, Any], png: str | os.PathLike) -> Path:
    """Accuracy against N (prefixes of the same paths) as a PNG: Cons@N, A2R, mean@1, and the
    synthesizer alone as a line. Needs matplotlib and ``summary["accuracy_by_n"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_n = summary["accuracy_by_n"]
    sizes = [int(k) for k in by_n]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    labels = {"a2r": "A2R (synthesizer over N references)", "cons_at_n": "Cons@N (majority vote)",
              "mean_at_1": "mean@1 (single path)"}
    for method, style in (("a2r", "o-"), ("cons_at_n", "s--"), ("mean_at_1", "^:")):
        ax.plot(sizes, [100 * by_n[str(k)][method] for k in sizes], style, label=labels[method])
    if "synthesizer_alone" in summary["accuracy"]:
        ax.axhline(100 * summary["accuracy"]["synthesizer_alone"], color="gray", lw=1,
                   label="synthesizer alone (control)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.set_xlabel("N explorer paths (prefixes of the same samples)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{summary['num_questions']} questions: {Path(summary['file']).name}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def run_eval(pipeline, items: Sequence[tuple[str, str]], checker, *, key: str,
             records_file: Path | None, sweep_n: bool, ar_thinker,
             progress: Callable[..., Any], shard: tuple[int, int] = (0, 1),
             deepconf=None) -> list[dict] | None:
    """Evaluate ``items`` (question, gold), appending each record to ``records_file`` as it
    finishes and skipping those already there; returns all records in index order.
    ``progress(total=, initial=)`` returns a tqdm-like bar (``update``, ``set_postfix``, ``close``).

    ``shard=(i, k)``: evaluate only the questions whose index is ``i`` mod ``k`` (``k`` processes
    can fill one records file side by side: each record is appended by a single ``write``); returns
    ``None`` unless every question then has a record. ``deepconf``: :func:`evaluate_question`'s."""
    done = load_records(records_file, key) if records_file is not None else {}
    done = {i: r for i, r in done.items() if i < len(items)}
    index_of, count = shard
    mine = [i for i in range(len(items)) if i % count == index_of]
    bar = progress(total=len(mine), initial=sum(i in done for i in mine))
    fd = None
    if records_file is not None:
        records_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(records_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for index in mine:
            question, gold = items[index]
            if index in done:
                if done[index]["question"] != question:
                    raise EvalRecordsError(f"{records_file}: record {index} is for another question; "
                                     "the eval file changed, choose another --out")
                continue
            record = evaluate_question(pipeline, index, question, gold, checker, key=key,
                                       sweep_n=sweep_n, ar_thinker=ar_thinker,
                                       deepconf=deepconf)
            done[index] = record
            if fd is not None:
                os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                os.fsync(fd)
            bar.update(1)
            bar.set_postfix(a2r=f"{sum(r['correct']['a2r'] for r in done.values()) / len(done):.2f}")
    finally:
        bar.close()
        if fd is not None:
            os.close(fd)
    if count > 1 and records_file is not None:   # the other shards may have finished meanwhile
        done = {**load_records(records_file, key), **done}
    if any(i not in done for i in range(len(items))):
        return None
    return [done[i] for i in range(len(items))]


def strip_timings(value):
    """``value`` without :data:`TIMING_KEYS` (recursively): what two runs of one eval share."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value

