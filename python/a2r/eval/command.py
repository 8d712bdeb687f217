"""``a2r eval FILE.jsonl``: the command (its options are parsed by :mod:`a2r.cli`)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..launch import (CLIError, check_question_text, load_pipeline, resolve_device, resolve_dtype,
                      run_note, tiny_paths)
from ..report import emit_json, format_bytes, replaced_whole

__all__ = ["add_deepconf_options", "cmd_eval"]


def read_jsonl(path: str, question_key: str, answer_key: str, limit: int | None):
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"eval file not found: {file}")
    items = []
    with file.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{file}:{line_number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or question_key not in record or answer_key not in record:
                raise CLIError(f"{file}:{line_number}: needs keys {question_key!r} and {answer_key!r}")
            question, gold = record[question_key], record[answer_key]
            check_question_text(question, f"{file}:{line_number}: {question_key!r}")
            # A number is a fine gold answer; null, true, lists and blank strings are not.
            if isinstance(gold, bool) or not isinstance(gold, (str, int, float)) or \
                    (isinstance(gold, str) and not gold.strip()):
                raise CLIError(f"{file}:{line_number}: {answer_key!r} must be a non-empty string "
                               f"or a number, got {json.dumps(gold)}")
            items.append((question, str(gold)))
            if limit is not None and len(items) == limit:
                break
    if not items:
        raise CLIError(f"{file}: no questions")
    return items


def check_out_path(option: str, out: str, mkdir: bool) -> None:
    """The file ``out`` of ``option`` (--out, --plot) must be writable before the run starts; with
    --mkdir its directory (only that one, never its ancestors) is created here."""
    path = Path(out)
    if path.is_dir():
        raise CLIError(f"{option} {out}: is a directory (give a file name)")
    directory = path.parent
    if not directory.is_dir():
        if directory.exists():
            raise CLIError(f"{option} {out}: {directory} is not a directory")
        if not mkdir:
            raise CLIError(f"{option} {out}: directory {directory} does not exist (create it, or "
                           "pass --mkdir)")
        if not directory.parent.is_dir():
            raise CLIError(f"{option} {out}: --mkdir creates only the file's own directory, and "
                           f"its parent {directory.parent} does not exist")
        try:
            directory.mkdir()
        except OSError as err:
            raise CLIError(f"{option} {out}: cannot create {directory} ({err.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise CLIError(f"{option} {out}: directory {directory} is not writable")


def load_ar_thinker(args, pipeline, use_tiny: bool):
    """(model, tokenizer) writing the AR->AR trace: --ar-thinker DIR, else the embedded AR thinker
    (--tiny), else the synthesizer itself."""
    from ..models import load_causal_lm

    path = getattr(args, "ar_thinker", None)
    if path is None and use_tiny:
        path = tiny_paths(args, thinker=True).ar_thinker
    if path is None:
        return (pipeline.synthesizer, pipeline.synthesizer_tokenizer), "synthesizer"
    device = resolve_device(args.device)
    return load_causal_lm(path, "ar thinker", device, resolve_dtype(args.dtype, device)), str(path)


def cmd_eval(args) -> int:
    from ..config import PipelineError
    from . import evaluate
    from .grading import AnswerChecker

    if args.mkdir and not (args.out or args.plot):
        raise CLIError("--mkdir needs --out or --plot")
    deepconf = deepconf_from_args(args)
    items = read_jsonl(args.file, args.question_key, args.answer_key, args.limit)
    shard, records_file = _outputs(args, evaluate)
    pipeline, models = load_pipeline(args, use_tiny=args.tiny)
    for number, (question, _) in enumerate(items, start=1):
        try:   # every question is checked before any model runs
            pipeline.check_question(question)
        except PipelineError as err:
            raise CLIError(f"{args.file}: question {number}: {err}") from None
    note = run_note(models, [question for question, _ in items])
    ar_thinker = None
    if pipeline.thinker is not None and pipeline.config.use_thinker:
        ar_thinker, models["ar_thinker"] = load_ar_thinker(args, pipeline, args.tiny)
    config = asdict(pipeline.config)
    settings = {"file": str(Path(args.file).resolve()), "question_key": args.question_key,
                "answer_key": args.answer_key, "config": config, "sweep_n": bool(args.plot),
                "models": {k: v for k, v in models.items() if k != "device"}}
    if deepconf is not None:   # absent otherwise: earlier records keep their key
        settings["deepconf"] = deepconf.to_dict()
        pipeline.explorer_confidence = deepconf.tracking()
    key = evaluate.settings_key(settings)
    from tqdm.auto import tqdm

    def progress(total, initial):
        return tqdm(total=total, initial=initial, desc="a2r eval", unit="q", file=sys.stderr,
                    disable=args.no_progress or None, dynamic_ncols=True)

    start = time.perf_counter()
    checker = AnswerChecker(timeout_s=args.check_timeout)
    try:
        records = evaluate.run_eval(pipeline, items, checker, key=key, records_file=records_file,
                                    sweep_n=bool(args.plot), ar_thinker=ar_thinker,
                                    progress=progress, shard=shard, deepconf=deepconf)
    except evaluate.EvalRecordsError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:
        where = (f"; {records_file} holds the finished questions: rerun the same command to "
                 "resume" if records_file is not None else "")
        print(f"a2r: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        checker.close()
    if records is None:
        print(f"a2r: shard {args.shard} done; {records_file} does not hold every question yet "
              "(the summary is written by the run that completes it)", file=sys.stderr)
        return 0
    summary = evaluate.summarize(records, file=str(args.file), models=models, config=config,
                                 wall_seconds=time.perf_counter() - start)
    if note:
        summary["note"] = note
    if deepconf is not None:
        summary["deepconf"] = deepconf.to_dict()
    _write_eval_files(args, summary, records, evaluate)
    if args.json:
        emit_json(summary)
        return 0
    _print_summary(summary, models, args, records_file, note, evaluate.STAGES)
    return 0


def _write_eval_files(args, summary: dict, records: list, evaluate) -> None:
    """--out (summary + per-question records) and --plot, each replaced whole (replaced_whole:
    an interrupted or failed write leaves the old file, or none, never part of one)."""
    if args.out:
        try:
            with replaced_whole(args.out) as temporary:
                Path(temporary).write_text(json.dumps({**summary, "per_question": records},
                                                      indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        except OSError as err:
            raise CLIError(f"--out {args.out}: cannot write ({err.strerror})") from None
    if args.plot:
        with replaced_whole(args.plot) as temporary:
            evaluate.plot_accuracy(summary, temporary)


def _outputs(args, evaluate) -> tuple[tuple[int, int], Path | None]:
    """``(shard (I, K), records file or None)`` of the eval options, checked (writable --out
    and --plot, matplotlib for --plot) before any model loads."""
    shard = (0, 1)
    if args.shard is not None:
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
                raise ValueError
        except ValueError:
            raise CLIError(f"--shard {args.shard}: expected I/K with 0 <= I < K") from None
        if not args.out:
            raise CLIError("--shard needs --out (the shards share its records file)")
    records_file = None
    if args.out:
        try:
            records_file = evaluate.records_path(args.out)
        except ValueError as err:
            raise CLIError(str(err)) from None
        # Resuming reads the records file and cuts a half-written last line: never the eval file.
        if records_file.resolve() == Path(args.file).resolve():
            raise CLIError(f"--out {args.out}: its records file {records_file} is the eval file; "
                           "choose another --out")
        check_out_path("--out", args.out, args.mkdir)
    if args.plot:
        check_out_path("--plot", args.plot, args.mkdir)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None
    return shard, records_file


def _print_summary(summary: dict, models: dict, args, records_file, note, stages) -> None:
    """The human-readable summary of ``a2r eval``."""
    count, n, acc = summary["num_questions"], summary["num_paths"], summary["accuracy"]
    names = {"pass_at_1": "pass@1", "mean_at_1": "mean@1", "cons_at_n": f"Cons@{n}",
             "a2r": "A2R", "synthesizer_alone": "synth-alone", "ar_ar": "AR->AR",
             "nar_ar": "NAR->AR", "deepconf_offline": "DeepConf-offline",
             "deepconf_online": "DeepConf-online", "a2r_conf": "A2R-conf"}
    print(f"{count} questions, N={n} paths, {models['mode']} set-up")
    print("  accuracy   " + "   ".join(f"{names[m]} {v:.3f}" for m, v in acc.items()))
    spent = summary["tokens_by_method"]
    print("  tokens/q   " + "   ".join(f"{names[m]} {spent[m] / count:.1f}" for m in acc
                                       if m in spent))
    conf = summary.get("confidence")
    if conf:
        print(f"  confidence AUROC (lowest group vs correct, {conf['paths']} paths): "
              f"{conf['auroc_lowest_group']}; online stops: {conf.get('online_stop_reasons')}")
    for k, row in summary.get("accuracy_by_n", {}).items():
        print(f"  N={k:<3} " + "   ".join(f"{names[m].replace(f'@{n}', f'@{k}')} {v:.3f}"
                                        for m, v in row.items()))
    cost = summary.get("cost_per_question")
    if cost:   # one unit for every method: evaluate.COST_DEFINITION
        print("  cost/q     " + "   ".join(f"{names[m]} {'-' if v is None else f'{v / 1e6:.1f}M'}"
                                          for m, v in cost.items()) + "  (token-parameters)")
    for m, t in summary.get("thinkers", {}).items():
        print(f"  {names[m]:<8}   {t['stage']} trace accuracy {t['trace_accuracy']:.3f}, "
              f"{t['seconds_per_question']:.3f} s per question")
    print("  checkers   " + "  ".join(f"{c}: {k}" for c, k in summary["checkers"].items()))
    for s in stages:
        if summary["tokens"][s] or summary["seconds"][s]:
            print(f"  {s:<18} {summary['tokens'][s]:>8} tok  {summary['seconds'][s]:8.2f} s  "
                  f"({summary['tokens_per_question'][s]:.1f} tok, "
                  f"{summary['seconds_per_question'][s]:.2f} s per question)")
    print(f"  KV bytes saved by prompt sharing: {format_bytes(summary['kv_bytes_saved'])}")
    if args.out:
        print(f"  wrote {args.out} (records: {records_file})")
    if args.plot:
        print(f"  wrote {args.plot}")
    if note:
        print(note)


def add_deepconf_options(parser, *, integer, positive_int, number) -> None:
    """``a2r eval --deepconf`` and its settings (issue 22; :mod:`a2r.eval.deepconf`).
    ``integer``, ``positive_int``, ``number``: the CLI's argparse types."""
    from .deepconf import DeepConfOptions

    d = parser.add_argument_group("DeepConf (confidence-aware exploration)")
    defaults = DeepConfOptions()
    d.add_argument("--deepconf", action="store_true",
                   help="also grade deepconf_offline, deepconf_online and a2r_conf from the "
                   "explorer's paths, with each token's confidence")
    d.add_argument("--deepconf-window", type=positive_int, default=defaults.window,
                   help="tokens per group (default: %(default)s)")
    d.add_argument("--deepconf-top-k", type=positive_int, default=defaults.top_k,
                   help="top log-probabilities per token confidence (default: %(default)s)")
    d.add_argument("--deepconf-warmup", type=integer, default=defaults.warmup_paths,
                   help="warm-up paths of deepconf_online, 1 .. N-1; 0: no deepconf_online "
                   "(needed with --engine vllm) (default: %(default)s)")
    d.add_argument("--deepconf-percentile", type=number, default=defaults.percentile,
                   help="online threshold: this percentile of the warm-up paths' lowest group "
                   "confidences (default: %(default)s)")
    d.add_argument("--deepconf-eta", type=number, default=defaults.eta,
                   help="fraction of the paths deepconf_offline and a2r_conf keep, most "
                   "confident first (default: %(default)s)")


def deepconf_from_args(args):
    """The :class:`~a2r.eval.deepconf.DeepConfOptions` of ``args`` (None without --deepconf);
    CLIError on bad values, before any model loads."""
    from .deepconf import DeepConfOptions

    names = ("window", "top_k", "warmup", "percentile", "eta")
    if not args.deepconf:
        changed = [n for n in names if getattr(args, f"deepconf_{n}")
                   != getattr(DeepConfOptions(), "warmup_paths" if n == "warmup" else n)]
        if changed:
            raise CLIError(f"--deepconf-{changed[0].replace('_', '-')} needs --deepconf")
        return None
    # (-n below 1 is A2RConfig.validate's error)
    if args.num_paths >= 1 and not 0 <= args.deepconf_warmup < args.num_paths:
        raise CLIError(f"--deepconf-warmup must be in [0, N - 1] = [0, {args.num_paths - 1}] "
                       f"(-n {args.num_paths}), got {args.deepconf_warmup}")
    if args.deepconf_warmup and getattr(args, "engine", "transformers") == "vllm":
        raise CLIError("--deepconf: the online stop (deepconf_online) is not available with "
                       "--engine vllm; pass --deepconf-warmup 0 for the offline methods")
    try:
        return DeepConfOptions(window=args.deepconf_window, top_k=args.deepconf_top_k,
                               warmup_paths=args.deepconf_warmup,
                               percentile=args.deepconf_percentile, eta=args.deepconf_eta)
    except ValueError as err:
        raise CLIError(f"--deepconf: {err}") from None
