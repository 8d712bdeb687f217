"""The ``a2r`` command line: ``demo``, ``run``, ``eval``, ``bench``.

    a2r demo                                   embedded tiny models: a scoreboard on held-out sums
    a2r run --explorer DIR [--synthesizer DIR] [--thinker DIR] "question"
    a2r eval FILE.jsonl [--explorer DIR ... | --tiny] [--out results.json]
    a2r bench [--quick] [--only NAME]          runs benchmarks/bench_*.py

Set-up errors (missing model directory or tokenizer, unsupported architecture, tokenizers that must
match and do not, unreadable eval file, blank or too long question, unavailable backend, unusable
``--home`` or ``--out``, bad option value, usage errors) print one line ``a2r: error: ...`` on
stderr and exit with status 2, before any model runs. ``A2R_DEBUG=1`` re-raises them with the traceback
instead. Ctrl-C (SIGINT), at any point of any command, prints one line ``a2r: interrupted`` and
exits with status 130; files the command writes (``--out``, ``--plot``) are replaced whole or not
at all (written to a temporary file beside them, then renamed: :func:`a2r.report.replaced_whole`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .demo.scoreboard import DEFAULT_QUESTIONS, RANDOM_MODELS_QUESTIONS, TRAINED_NOTE, cmd_demo
from .eval.command import add_deepconf_options, cmd_eval
from .launch import (CLIError, check_question_text, load_pipeline, quiet_transformers,
                     random_models_note, run_note)
from .report import NO_ANSWER, emit_json, print_result

__all__ = ["main", "build_parser"]

class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``a2r: error:`` line plus a pointer to ``--help`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"a2r: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _generation_options(max_new_tokens_default: int) -> argparse.ArgumentParser:
    """Options shared by demo, run and eval."""
    from .sampling import SamplingParams   # imports torch: here, inside main()'s Ctrl-C handling

    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("generation")
    # Ranges are A2RConfig.validate's (one "a2r: error:" line before any model loads); argparse
    # only parses.
    g.add_argument("-n", "--num-paths", type=_int, default=4,
                   help="explorer paths N (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=_int, default=max_new_tokens_default,
                   help="tokens per explorer path (default: %(default)s)")
    g.add_argument("--synth-max-new-tokens", type=_int, default=None,
                   help="synthesizer tokens (default: --max-new-tokens)")
    for knob in fields(SamplingParams):   # one flag per sampling knob: --temperature, --min-p...
        g.add_argument("--" + knob.name.replace("_", "-"), default=knob.default,
                       type=_int if isinstance(knob.default, int) else _number,
                       help=knob.metadata["help"])
    g.add_argument("--seed", type=_int, default=0, help="RNG seed of every stage (default: 0)")
    g.add_argument("--answer-max-chars", type=_int, default=1024,
                   help="cap on each reference handed to the synthesizer, keeping the end "
                   "(-1: no cap; default: %(default)s)")
    g.add_argument("--no-thinker", action="store_true", help="skip the diffusion thinker")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every stage's whole prompt instead of reusing the cached KV "
                   "of the whole blocks it shares with earlier prompts (the explorer's, earlier "
                   "questions')")
    g.add_argument("--thinker-gen-length", type=_int, default=None,
                   help="trace length in tokens (default: 64; the trained embedded thinker: 8)")
    g.add_argument("--thinker-block-length", type=_int, default=None,
                   help="semi-autoregressive block; divides the trace length (default: 32; the "
                   "trained embedded thinker: 8)")
    g.add_argument("--thinker-steps", type=_int, default=None,
                   help="denoising steps in all; a multiple of the block count (default: 16; the "
                   "trained embedded thinker: 8)")
    g.add_argument("--thinker-threshold", type=_number, default=None,
                   help="Fast-dLLM confidence threshold instead of a fixed step count")
    g.add_argument("--thinker-traces", type=_int, default=1,
                   help="thinker traces from one prompt, all handed to the synthesizer "
                   "(DiffusionGemma: one encoder pass for all) (default: %(default)s)")
    r = parent.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if "
                   "available, else cpu)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: float32 on CPU, the checkpoint's on GPU)")
    r.add_argument("--backend", default="auto",
                   help="a2r_kernels backend for tree decode attention: auto, torch, triton or "
                   "cuda (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    return parent


def _memory_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _engine_options(parser: argparse.ArgumentParser) -> None:
    e = parser.add_argument_group("engine")
    e.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="run the explorer and synthesizer on transformers (tree-shared KV cache) "
                   "or as vLLM engines with the A2R_TREE attention backend; the thinker stays on "
                   "transformers, on --device (default: %(default)s)")
    e.add_argument("--tensor-parallel-size", type=_positive_int, default=None,
                   help="vLLM tensor parallelism (--engine vllm)")
    e.add_argument("--pipeline-parallel-size", type=_positive_int, default=None,
                   help="vLLM pipeline parallelism (--engine vllm)")
    e.add_argument("--gpu-memory-utilization", type=_memory_fraction, default=None,
                   help="fraction of device memory each vLLM engine takes (--engine vllm; "
                   "default: vLLM's)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("models (save_pretrained directories, each with its tokenizer)")
    m.add_argument("--explorer", metavar="DIR", help="explorer causal LM")
    m.add_argument("--synthesizer", metavar="DIR",
                   help="synthesizer causal LM (default: the explorer: symmetric set-up)")
    m.add_argument("--thinker", metavar="DIR", help="masked-diffusion thinker (optional)")
    m.add_argument("--tiny", action="store_true",
                   help="use the embedded tiny models (trained on the sums task, a2r.demo.task) "
                   "instead of directories")
    m.add_argument("--random-models", action="store_true",
                   help="with --tiny: the random (untrained) embedded models instead")
    m.add_argument("--home", metavar="DIR", help="where the embedded models live "
                   "(default: $A2R_HOME or ~/.cache/a2r)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="a2r", description="A2R parallel reasoning: explorer -> diffusion thinker -> "
        "synthesizer over a tree-shared KV cache.")
    parser.add_argument("--version", action="version", version=f"a2r {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run,eval,bench}")
    sub.required = True

    demo = sub.add_parser("demo", parents=[_generation_options(80)],
                          help="a scoreboard of every method on held-out questions, with the "
                          "embedded models",
                          description="Load the embedded tiny models, grade pass@1, Cons@N, the "
                          "synthesizer alone, A2R and NAR->AR / AR->AR on held-out questions of "
                          "their task (a2r.demo.scoreboard), then show one worked example. "
                          + TRAINED_NOTE + " --random-models: the random ones (built once).")
    demo.add_argument("--questions", type=_positive_int, default=None,
                      help=f"held-out questions to grade (default: {DEFAULT_QUESTIONS}; "
                      f"{RANDOM_MODELS_QUESTIONS} with --random-models)")
    demo.add_argument("--home", metavar="DIR",
                      help="where the random embedded models live (default: $A2R_HOME or "
                      "~/.cache/a2r)")
    demo.add_argument("--random-models", action="store_true",
                      help="the random (untrained) embedded models instead of the trained ones")

    run = sub.add_parser("run", parents=[_generation_options(256)],
                         help="answer one question with your models")
    _model_options(run)
    _engine_options(run)
    run.add_argument("question", help="the question (quote it)")

    ev = sub.add_parser("eval", parents=[_generation_options(256)],
                        help="accuracy of pass@1, Cons@N, A2R, the synthesizer alone and "
                        "AR->AR / NAR->AR on a JSONL file (resumable)")
    _model_options(ev)
    _engine_options(ev)
    ev.add_argument("file", metavar="FILE.jsonl", help="one JSON object per line")
    ev.add_argument("--question-key", default="question", help="(default: %(default)s)")
    ev.add_argument("--answer-key", default="answer", help="(default: %(default)s)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="first K questions only")
    ev.add_argument("--out", metavar="FILE.json", help="write the summary and per-question "
                    "results here; each question's record is appended to FILE.jsonl as soon as it "
                    "finishes, and a rerun with the same --out skips the recorded questions (its "
                    "directory must exist, or pass --mkdir)")
    ev.add_argument("--plot", metavar="PNG", help="also grade prefixes of the same paths "
                    "(N = 1, 2, 4, 8 up to -n) and plot accuracy against N here")
    ev.add_argument("--ar-thinker", metavar="DIR", help="causal LM writing the AR->AR trace "
                    "(default: the embedded AR thinker with --tiny, else the synthesizer)")
    ev.add_argument("--shard", metavar="I/K", default=None,
                    help="evaluate only the questions whose index is I mod K (with --out: K such "
                    "processes fill one records file; the summary is written once all are done)")
    ev.add_argument("--check-timeout", type=_positive_float, default=5.0, metavar="S",
                    help="seconds per Math-Verify check (default: %(default)s)")
    ev.add_argument("--mkdir", action="store_true",
                    help="create the directory of --out (and of --plot) if it is missing: only "
                    "that directory, its parent must exist")
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress bar (it is shown on stderr when that is a terminal)")
    add_deepconf_options(ev, integer=_int, positive_int=_positive_int, number=_float)

    bench = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None,
                      help="small shapes (the default without a CUDA GPU)")
    size.add_argument("--full", dest="quick", action="store_false",
                      help="full shapes even without a GPU")
    bench.add_argument("--only", metavar="NAME", action="append", default=[],
                       help="run only scripts whose name contains NAME (repeatable)")
    bench.add_argument("--list", action="store_true", help="list the scripts and exit")
    bench.add_argument("--bench-dir", metavar="DIR", help="benchmarks directory "
                       "(default: the repository's benchmarks/)")
    bench.add_argument("--out", metavar="DIR", help="where the scripts write their result files "
                       "(created if missing; benchmarks/results to update the repository's). "
                       "Default: benchmarks/results with a CUDA GPU; without one a new scratch "
                       "directory, so CPU runs never touch the checkout")
    bench.add_argument("--json", action="store_true", help="machine-readable summary")
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    check_question_text(args.question)
    pipeline, models = load_pipeline(args, use_tiny=args.tiny)
    pipeline.check_question(args.question)   # too long for a model: before any model runs
    note = run_note(models, [args.question])
    result = pipeline.run(args.question)
    if args.json:
        emit_json({"note": note, "models": models, **result.to_dict()})
    else:
        print_result(result, models)
        answer = result.final_answer if result.final_answer is not None else NO_ANSWER
        print(f"\nFinal answer (A2R): {answer}")
        if note:
            print(note)
    return 0


def _default_bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


# Shared with benchmarks/common.py (RESULTS_DIR_ENV, SKIPPED_EXIT_STATUS), which the installed
# package cannot import; tests/test_cli.py holds them equal.
BENCH_RESULTS_DIR_ENV = "A2R_BENCH_RESULTS_DIR"
BENCH_SKIPPED_EXIT_STATUS = 77


def _bench_results_dir(out: str | None, bench_dir: Path, on_gpu: bool) -> tuple[Path, bool]:
    """(where the benchmark scripts write their result files, whether it is a scratch directory):
    ``--out DIR`` (created when its parent exists), else ``benchmarks/results`` on a CUDA machine,
    else a new temporary directory: the CPU rows of a casual run must not dirty the checkout."""
    if out is None:
        if on_gpu:
            return bench_dir / "results", False
        return Path(tempfile.mkdtemp(prefix="a2r-bench-")), True
    directory = Path(out).expanduser()
    if directory.exists() and not directory.is_dir():
        raise CLIError(f"--out {out}: is a file (give a directory for the result files)")
    if not directory.exists():
        if not directory.parent.is_dir():
            raise CLIError(f"--out {out}: its parent {directory.parent} does not exist")
        try:
            directory.mkdir()
        except OSError as err:
            raise CLIError(f"--out {out}: cannot create it ({err.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise CLIError(f"--out {out}: directory is not writable")
    return directory, False


def _bench_scripts(args) -> tuple[Path, list[Path]]:
    """(the benchmarks directory, its ``bench_*.py`` scripts that --only selects)."""
    bench_dir = Path(args.bench_dir) if args.bench_dir else _default_bench_dir()
    if not bench_dir.is_dir():
        raise CLIError(f"benchmarks directory not found: {bench_dir} (pass --bench-dir; "
                       "benchmarks ship with the source checkout, not the wheel)")
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(name in s.name for name in args.only)]
    if not scripts:
        raise CLIError(f"no benchmark scripts matched in {bench_dir}")
    return bench_dir, scripts


def cmd_bench(args) -> int:
    import torch

    bench_dir, scripts = _bench_scripts(args)
    if args.list:
        for script in scripts:
            print(script.name)
        return 0
    on_gpu = torch.cuda.is_available()
    quick = (not on_gpu) if args.quick is None else args.quick
    results_dir, scratch = _bench_results_dir(args.out, bench_dir, on_gpu)
    env = {**os.environ, BENCH_RESULTS_DIR_ENV: str(results_dir)}
    runs = []
    for script in scripts:
        command = [sys.executable, str(script)] + (["--quick"] if quick else [])
        if not args.json:
            print(f"$ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=bench_dir.parent, env=env,
                                   stdout=subprocess.PIPE if args.json else None)
        status = {0: "succeeded", BENCH_SKIPPED_EXIT_STATUS: "skipped"}.get(
            completed.returncode, "failed")
        runs.append({"script": script.name, "returncode": completed.returncode,
                     "status": status, "seconds": time.perf_counter() - start, "quick": quick})
    names = {status: [r["script"] for r in runs if r["status"] == status]
             for status in ("succeeded", "skipped", "failed")}
    if scratch and not any(results_dir.iterdir()):   # nothing written: leave no empty directory
        results_dir.rmdir()
        results_dir = None
    if args.json:
        emit_json({"runs": runs, "failed": names["failed"], "skipped": names["skipped"],
                   "results_dir": str(results_dir) if results_dir else None, "scratch": scratch})
    else:
        detail = "".join(f"; {status}: {', '.join(names[status])}"
                         for status in ("skipped", "failed") if names[status])
        where = ("nothing written" if results_dir is None else f"results in {results_dir}"
                 + (" (a scratch directory: pass --out DIR to keep them)" if scratch else ""))
        print(f"{len(names['succeeded'])}/{len(runs)} benchmarks succeeded{detail}; {where}")
    return 1 if names["failed"] else 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "eval": cmd_eval, "bench": cmd_bench}


def _own_package_dirs() -> tuple[str, ...]:
    """Directories of a2r and a2r_kernels (each ending in a separator)."""
    import a2r_kernels

    return tuple(str(Path(module.__file__).resolve().parent) + os.sep
                 for module in (sys.modules[__package__], a2r_kernels))


INTERRUPTED_EXIT_STATUS = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``a2r`` console script; returns the exit status. Ctrl-C anywhere (the
    imports of torch and transformers, model loading, generation, writing results) is one line
    ``a2r: interrupted`` on stderr and status 130; ``A2R_DEBUG=1`` re-raises it instead."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if os.environ.get("A2R_DEBUG"):
            raise
        print("a2r: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 (one line, _Parser.error)
    quiet_transformers()

    from .config import PipelineError

    own_dirs = _own_package_dirs()
    with warnings.catch_warnings():
        show_third_party = warnings.showwarning

        # Warnings raised in our packages print as one "a2r: warning:" line; any other
        # (transformers, torch, ...) keeps Python's usual format, which names where it came from.
        def show(message, category, filename, lineno, file=None, line=None):
            if str(Path(filename).resolve()).startswith(own_dirs):
                print(f"a2r: warning: {message}", file=sys.stderr)
            else:
                show_third_party(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            code = COMMANDS[args.command](args)
            sys.stdout.flush()   # a closed pipe shows here, not as a traceback at exit
            return code
        except (CLIError, PipelineError) as err:
            if os.environ.get("A2R_DEBUG"):
                raise
            print(f"a2r: error: {err}", file=sys.stderr)
            return 2
        except BrokenPipeError:   # `a2r demo | head`: the reader left early; nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
