"""The ``a2r`` command line: ``demo``, ``run``, ``eval``, ``bench``.

    a2r demo                                   embedded tiny models, two built-in questions
    a2r run --explorer DIR [--synthesizer DIR] [--thinker DIR] "question"
    a2r eval FILE.jsonl [--explorer DIR ... | --tiny] [--out results.json]
    a2r bench [--quick] [--only NAME]          runs benchmarks/bench_*.py

Set-up errors (missing model directory or tokenizer, unsupported architecture, tokenizers that must
match and do not, unreadable eval file, blank or too long question, unavailable backend, unusable
``--home`` or ``--out``, bad option value, usage errors) print one line ``a2r: error: ...`` on
stderr and exit with status 2, before any model runs. ``A2R_DEBUG=1`` re-raises them with the traceback
instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

__all__ = ["main", "build_parser"]

DEMO_QUESTIONS = (
    ("What is 12 * 7?", "84"),
    ("A train travels 150 km in 2.5 hours. What is its average speed in km/h?", "60"),
)
# The trained embedded models know one task (a2r.demo.task): their demo asks two of its questions.
TRAINED_DEMO_QUESTIONS = (
    ("What is 347 + 85 + 912 + 6?", "1350"),
    ("What is 58 + 904 + 7 + 263 + 91?", "1323"),
)
TRAINED_NOTE = ("note: the embedded default models are tiny models trained in minutes on a CPU "
                "(python -m a2r.demo.train) for one synthetic task, sums like 'What is 347 + 85 + 912 + "
                "6?'; on any other question their answers are noise.")
# Thinker settings when none are given: the trained thinker writes a trace of this many tokens
# (a2r.demo.tiny.TRACE_LENGTH), one token per step; other thinkers get LLaDA-style defaults.
THINKER_DEFAULTS = {"thinker_gen_length": 64, "thinker_block_length": 32, "thinker_steps": 16}

# Printed (and put in the JSON as "note") when a loaded model directory holds random weights
# (a2r.demo.tiny.is_random_model); {models} names them.
RANDOM_MODELS_NOTE = ("note: the {models} model(s) are random (untrained) tiny models: their "
                      "answers and accuracies are noise. They show the pipeline's stages, times, "
                      "token counts and KV sharing, not reasoning quality.")


class CLIError(Exception):
    """A user error the CLI reports on one line with exit status 2."""


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


def _reference_cap(text: str) -> int:
    value = _int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for no cap, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _generation_options(max_new_tokens_default: int) -> argparse.ArgumentParser:
    """Options shared by demo, run and eval."""
    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("generation")
    g.add_argument("-n", "--num-paths", type=_positive_int, default=4,
                   help="explorer paths N (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens_default,
                   help="tokens per explorer path (default: %(default)s)")
    g.add_argument("--synth-max-new-tokens", type=_positive_int, default=None,
                   help="synthesizer tokens (default: --max-new-tokens)")
    g.add_argument("--temperature", type=_non_negative_float, default=1.0,
                   help="explorer sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="explorer nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="explorer top-k sampling (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="RNG seed of every stage (default: 0)")
    g.add_argument("--answer-max-chars", type=_reference_cap, default=1024,
                   help="cap on each reference handed to the synthesizer, keeping the end "
                   "(-1: no cap; default: %(default)s)")
    g.add_argument("--no-thinker", action="store_true", help="skip the diffusion thinker")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every stage's whole prompt instead of reusing the cached KV "
                   "of the whole blocks it shares with earlier prompts (the explorer's, earlier "
                   "questions')")
    g.add_argument("--thinker-gen-length", type=_positive_int, default=None,
                   help="trace length in tokens (default: 64; the trained embedded thinker: 8)")
    g.add_argument("--thinker-block-length", type=_positive_int, default=None,
                   help="semi-autoregressive block; divides the trace length (default: 32; the "
                   "trained embedded thinker: 8)")
    g.add_argument("--thinker-steps", type=_positive_int, default=None,
                   help="denoising steps in all; a multiple of the block count (default: 16; the "
                   "trained embedded thinker: 8)")
    g.add_argument("--thinker-threshold", type=float, default=None,
                   help="Fast-dLLM confidence threshold instead of a fixed step count")
    g.add_argument("--thinker-traces", type=_positive_int, default=1,
                   help="thinker traces from one prompt, all handed to the synthesizer "
                   "(DiffusionGemma: one encoder pass for all) (default: %(default)s)")
    r = parent.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if "
                   "available, else cpu)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: float32 on CPU, the checkpoint's on GPU)")
    r.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="a2r_kernels backend for tree decode attention")
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


VLLM_ONLY_OPTIONS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization")


def _vllm_options(args) -> dict | None:
    """The vLLM engine arguments of ``args`` (None for --engine transformers, which must not
    have any)."""
    given = {k: getattr(args, k) for k in VLLM_ONLY_OPTIONS if getattr(args, k, None) is not None}
    if getattr(args, "engine", "transformers") != "vllm":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise CLIError(f"{flag} needs --engine vllm")
        return None
    from .vllm_engine import vllm_available

    if not vllm_available():
        raise CLIError("--engine vllm needs vLLM installed (pip install vllm)")
    if args.backend != "auto":
        raise CLIError("--backend selects a2r_kernels kernels for --engine transformers; with "
                       "--engine vllm the A2R_TREE backend picks them by device")
    # vLLM logs to stdout by default; the CLI keeps stdout for its report (and --json).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    return given


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
                          help="run the pipeline on built-in questions with the embedded models",
                          description="Load the embedded tiny models and run A2R on two "
                          "built-in questions. " + TRAINED_NOTE + " --random-models: the random "
                          "ones (built once).")
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
    bench.add_argument("--json", action="store_true", help="machine-readable summary")
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """transformers' per-load progress bars and info logs would drown the stage report."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s)")
    return name


def _resolve_dtype(name: str, device: str):
    if name == "auto":
        return "float32" if device == "cpu" else None
    return name


def _check_backend(backend: str, device: str) -> None:
    """--backend must run on --device; checked before any model is loaded."""
    import torch

    from a2r_kernels.backend import backend_unavailable_reason

    why = None if backend == "auto" else backend_unavailable_reason(backend, torch.device(device))
    if why is not None:
        raise CLIError(f"--backend {backend} is unavailable on device {device}: {why}")


def _check_question_text(question, what: str = "the question") -> None:
    if not isinstance(question, str) or not question.strip():
        raise CLIError(f"{what} must be a non-empty string, got {json.dumps(question)}")


def _random_models_note(models) -> str | None:
    """RANDOM_MODELS_NOTE naming the loaded models that are random, or None when none is."""
    random_roles = [role for role in ("explorer", "thinker", "synthesizer")
                    if models.get(role) and models[role]["random"]]
    return RANDOM_MODELS_NOTE.format(models=", ".join(random_roles)) if random_roles else None


def _config_from_args(args, thinker_defaults=None):
    from .pipeline import A2RConfig

    thinker = {name: getattr(args, name) if getattr(args, name) is not None else default
               for name, default in (thinker_defaults or THINKER_DEFAULTS).items()}
    return A2RConfig(
        num_paths=args.num_paths, max_new_tokens=args.max_new_tokens,
        synth_max_new_tokens=args.synth_max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        answer_max_chars=args.answer_max_chars if args.answer_max_chars >= 0 else None,
        use_thinker=not args.no_thinker, **thinker,
        thinker_threshold=args.thinker_threshold, thinker_traces=args.thinker_traces,
        backend=args.backend,
        reuse_prefix_kv=not args.no_prefix_reuse)


def _tiny_paths(args, thinker: bool):
    """The embedded models: the trained ones, or with --random-models the random ones."""
    from .demo.tiny import ensure_tiny_models, tiny_dir, trained_models

    home = args.home
    if not getattr(args, "random_models", False):
        if home is not None:   # an option that would do nothing is an error, not ignored
            raise CLIError(f"--home {home}: only --random-models builds models under --home "
                           "(the trained embedded models ship inside the package)")
        try:
            return trained_models(thinker=thinker)
        except ValueError as err:
            raise CLIError(str(err)) from None
    try:
        return ensure_tiny_models(home, thinker=thinker)
    except OSError as err:
        if home is not None:
            where = f"--home {home}"
        elif os.environ.get("A2R_HOME"):
            where = f"A2R_HOME={os.environ['A2R_HOME']}"
        else:
            where = "the default home (~/.cache/a2r; set --home or A2R_HOME)"
        reason = f"{err.strerror}: {err.filename}" if err.strerror else str(err)
        raise CLIError(f"{where}: cannot build the embedded models in {tiny_dir(home)} ({reason})"
                       ) from None


def _load_pipeline(args, *, use_tiny: bool):
    """(pipeline, description of the models) from --explorer/--synthesizer/--thinker or --tiny."""
    from .pipeline import A2RPipeline, _model_dtype

    if getattr(args, "random_models", False) and not use_tiny:
        raise CLIError("--random-models needs --tiny (the embedded models)")
    trained = use_tiny and not getattr(args, "random_models", False)
    from .demo.tiny import TRAINED_THINKER_SETTINGS

    config = _config_from_args(args, TRAINED_THINKER_SETTINGS if trained else None)
    config.validate()   # bad option values fail here, before any model is loaded
    vllm_options = _vllm_options(args)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    _check_backend(args.backend, device)
    if use_tiny:
        if getattr(args, "explorer", None) or getattr(args, "synthesizer", None) \
                or getattr(args, "thinker", None):
            raise CLIError("--tiny cannot be combined with --explorer/--synthesizer/--thinker")
        paths = _tiny_paths(args, thinker=not args.no_thinker)
        explorer, synthesizer, thinker = paths.explorer, paths.synthesizer, paths.thinker
    else:
        if not args.explorer:
            raise CLIError("--explorer DIR is required (or --tiny for the embedded models)")
        explorer, synthesizer = args.explorer, args.synthesizer
        thinker = None if args.no_thinker else args.thinker
    pipeline = A2RPipeline.from_pretrained(
        explorer, synthesizer, thinker, device=device, dtype=dtype, config=config,
        engine="vllm" if vllm_options is not None else "transformers", vllm_options=vllm_options)
    from .demo.tiny import is_random_model

    def describe(path, model):
        arch = getattr(model, "architecture", type(model).__name__)   # VLLMModel: "... (vLLM)"
        return {"path": str(path), "arch": arch, "random": is_random_model(path)}

    models = {
        "explorer": describe(explorer, pipeline.explorer),
        "synthesizer": describe(synthesizer or explorer, pipeline.synthesizer),
        "thinker": (describe(thinker, pipeline.thinker) if pipeline.thinker is not None else None),
        "mode": "symmetric" if pipeline.symmetric else "asymmetric",
        "device": device,
        "dtype": str(_model_dtype(pipeline.explorer)).replace("torch.", ""),
        "trained": paths.trained if use_tiny else None,
    }
    if vllm_options is not None:
        models["engine"] = {"name": "vllm", **vllm_options}
    return pipeline, models


def _short(text: str | None, limit: int = 70) -> str:
    if text is None:
        return "-"
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _format_bytes(n: int) -> str:
    """``1,234 B`` below 1 KiB, else ``136.5 KiB (139,776 B)``."""
    if n < 1024:
        return f"{n:,} B"
    scaled, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:,.1f} {unit} ({n:,} B)"


def _print_result(result, models, gold: str | None = None, out=None) -> None:
    """Human-readable report of one A2R run: every stage with its time and tokens."""
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced (tests, redirects)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"Question: {result.question}" + (f"   (gold: {gold})" if gold is not None else ""))
    e = result.explorer
    p(f"  [explorer]    {models['explorer']['arch']}: {len(e.texts)} paths, prompt "
      f"{e.prompt_tokens} tok, {e.generated_tokens} tok generated, {e.seconds:.2f} s")
    for i, (text, answer) in enumerate(zip(e.texts, result.explorer_answers), start=1):
        p(f"      path {i}: answer={answer!s:<10} | {_short(text)}")
    if result.thinker is not None:
        t = result.thinker
        kind = ("uniform-noise diffusion" if "DiffusionGemma" in models['thinker']['arch']
                else "masked diffusion")
        p(f"  [thinker]     {models['thinker']['arch']} ({kind}): prompt "
          f"{t.prompt_tokens} tok, {t.generated_tokens} tok, {t.seconds:.2f} s")
        for i, text in enumerate(t.texts, start=1):
            p(f"      trace{f' {i}' if len(t.texts) > 1 else ''}: {_short(text)}")
    else:
        p("  [thinker]     (none)")
    s = result.synthesizer
    p(f"  [synthesizer] {models['synthesizer']['arch']} ({result.mode}): prompt "
      f"{s.prompt_tokens} tok, {s.generated_tokens} tok generated, {s.seconds:.2f} s")
    p(f"      output: {_short(s.texts[0])}")
    kv = result.kv
    p(f"  KV bytes saved by sharing the explorer prompt: {_format_bytes(kv.explorer_saved_bytes)}"
      f" = {kv.prompt_tokens} prompt tok x {kv.num_paths - 1} extra paths x "
      f"{kv.bytes_per_token} B/tok")
    if kv.symmetric:
        shared = (f"  symmetric: explorer and synthesizer prompts share "
                  f"{kv.synthesizer_shared_prefix_tokens} tokens")
        if kv.synthesizer_prefix_reused:
            p(f"{shared}; the synthesizer reused {kv.reused_prefix_tokens} tokens' KV "
              f"({_format_bytes(kv.synthesizer_saved_bytes)}) and forwarded "
              f"{kv.synthesizer_prefill_tokens}")
        else:
            p(f"{shared}; not reused ({kv.reuse_note})")
    cons = f"{result.cons_answer} ({result.cons_votes}/{len(e.texts)} votes)"
    p(f"  answers: pass@1={result.pass_at_1_answer}  Cons@{len(e.texts)}={cons}  "
      f"A2R={result.final_answer}")
    if gold is not None:
        grade = result.grade(gold)
        p("  correct: " + "  ".join(f"{k}={v}" for k, v in grade.items()))
    p(f"  total {result.seconds:.2f} s")


def _emit_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    args.explorer = args.synthesizer = args.thinker = None
    start = time.perf_counter()
    questions = DEMO_QUESTIONS if args.random_models else TRAINED_DEMO_QUESTIONS
    if not args.json:
        print("A2R demo: explorer -> diffusion thinker -> synthesizer on the embedded tiny models.")
        if args.random_models:
            print("Loading (the first run builds them; later runs reuse the saved files)...")
    pipeline, models = _load_pipeline(args, use_tiny=True)
    note = _random_models_note(models) or (TRAINED_NOTE if models["trained"] else None)
    if not args.json:
        if note:
            print(note)
        print(f"explorer={models['explorer']['arch']}  thinker="
              f"{(models['thinker'] or {}).get('arch', 'none')}  synthesizer="
              f"{models['synthesizer']['arch']}  ({models['mode']}, {models['device']}, "
              f"{models['dtype']}) from {Path(models['explorer']['path']).parent}\n")
    results = []
    for question, gold in questions:
        result = pipeline.run(question)
        results.append({**result.to_dict(), "gold": gold, "correct": result.grade(gold)})
        if not args.json:
            _print_result(result, models, gold)
            print()
    if args.json:
        _emit_json({"note": note, "models": models, "results": results,
                    "seconds": time.perf_counter() - start})
    else:
        print(f"demo finished in {time.perf_counter() - start:.1f} s."
              + (f" {note}" if note else ""))
    return 0


def cmd_run(args) -> int:
    _check_question_text(args.question)
    pipeline, models = _load_pipeline(args, use_tiny=args.tiny)
    pipeline.check_question(args.question)   # too long for a model: before any model runs
    note = _random_models_note(models)
    result = pipeline.run(args.question)
    if args.json:
        _emit_json({"note": note, "models": models, **result.to_dict()})
    else:
        _print_result(result, models)
        print(f"\nFinal answer (A2R): {result.final_answer}")
        if note:
            print(note)
    return 0


def _read_jsonl(path: str, question_key: str, answer_key: str, limit: int | None):
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
            _check_question_text(question, f"{file}:{line_number}: {question_key!r}")
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


def _check_out_path(option: str, out: str, mkdir: bool) -> None:
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


def _ar_thinker(args, pipeline, use_tiny: bool):
    """(model, tokenizer) writing the AR->AR trace: --ar-thinker DIR, else the embedded AR thinker
    (--tiny), else the synthesizer itself."""
    from .pipeline import _load_causal_lm

    path = getattr(args, "ar_thinker", None)
    if path is None and use_tiny:
        path = _tiny_paths(args, thinker=True).ar_thinker
    if path is None:
        return (pipeline.synthesizer, pipeline.synthesizer_tokenizer), "synthesizer"
    device = _resolve_device(args.device)
    return _load_causal_lm(path, "ar thinker", device, _resolve_dtype(args.dtype, device)), str(path)


def cmd_eval(args) -> int:
    from .eval import evaluate
    from .eval.grading import AnswerChecker
    from .pipeline import PipelineError

    if args.mkdir and not (args.out or args.plot):
        raise CLIError("--mkdir needs --out or --plot")
    items = _read_jsonl(args.file, args.question_key, args.answer_key, args.limit)
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
        _check_out_path("--out", args.out, args.mkdir)
    if args.plot:
        _check_out_path("--plot", args.plot, args.mkdir)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None
    pipeline, models = _load_pipeline(args, use_tiny=args.tiny)
    for number, (question, _) in enumerate(items, start=1):
        try:   # every question is checked before any model runs
            pipeline.check_question(question)
        except PipelineError as err:
            raise CLIError(f"{args.file}: question {number}: {err}") from None
    note = _random_models_note(models)
    ar_thinker = None
    if pipeline.thinker is not None and pipeline.config.use_thinker:
        ar_thinker, models["ar_thinker"] = _ar_thinker(args, pipeline, args.tiny)
    config = asdict(pipeline.config)
    settings = {"file": str(Path(args.file).resolve()), "question_key": args.question_key,
                "answer_key": args.answer_key, "config": config, "sweep_n": bool(args.plot),
                "models": {k: v for k, v in models.items() if k != "device"}}
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
                                    progress=progress, shard=shard)
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
    if args.out:
        try:
            Path(args.out).write_text(json.dumps({**summary, "per_question": records}, indent=2,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as err:
            raise CLIError(f"--out {args.out}: cannot write ({err.strerror})") from None
    if args.plot:
        evaluate.plot_accuracy(summary, args.plot)
    if args.json:
        _emit_json(summary)
        return 0
    count, n, acc = summary["num_questions"], summary["num_paths"], summary["accuracy"]
    names = {"pass_at_1": "pass@1", "mean_at_1": "mean@1", "cons_at_n": f"Cons@{n}",
             "a2r": "A2R", "synthesizer_alone": "synth-alone", "ar_ar": "AR->AR",
             "nar_ar": "NAR->AR"}
    print(f"{count} questions, N={n} paths, {models['mode']} set-up")
    print("  accuracy   " + "   ".join(f"{names[m]} {v:.3f}" for m, v in acc.items()))
    for k, row in summary.get("accuracy_by_n", {}).items():
        print(f"  N={k:<3} " + "   ".join(f"{names[m].replace(f'@{n}', f'@{k}')} {v:.3f}"
                                        for m, v in row.items()))
    print("  checkers   " + "  ".join(f"{c}: {k}" for c, k in summary["checkers"].items()))
    for s in evaluate.STAGES:
        if summary["tokens"][s] or summary["seconds"][s]:
            print(f"  {s:<18} {summary['tokens'][s]:>8} tok  {summary['seconds'][s]:8.2f} s  "
                  f"({summary['tokens_per_question'][s]:.1f} tok, "
                  f"{summary['seconds_per_question'][s]:.2f} s per question)")
    print(f"  KV bytes saved by prompt sharing: {_format_bytes(summary['kv_bytes_saved'])}")
    if args.out:
        print(f"  wrote {args.out} (records: {records_file})")
    if args.plot:
        print(f"  wrote {args.plot}")
    if note:
        print(note)
    return 0


def _default_bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_bench(args) -> int:
    import torch

    bench_dir = Path(args.bench_dir) if args.bench_dir else _default_bench_dir()
    if not bench_dir.is_dir():
        raise CLIError(f"benchmarks directory not found: {bench_dir} (pass --bench-dir; "
                       "benchmarks ship with the source checkout, not the wheel)")
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(name in s.name for name in args.only)]
    if not scripts:
        raise CLIError(f"no benchmark scripts matched in {bench_dir}")
    if args.list:
        for script in scripts:
            print(script.name)
        return 0
    quick = (not torch.cuda.is_available()) if args.quick is None else args.quick
    runs = []
    for script in scripts:
        command = [sys.executable, str(script)] + (["--quick"] if quick else [])
        if not args.json:
            print(f"$ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=bench_dir.parent,
                                   stdout=subprocess.PIPE if args.json else None)
        runs.append({"script": script.name, "returncode": completed.returncode,
                     "seconds": time.perf_counter() - start, "quick": quick})
    failed = [r["script"] for r in runs if r["returncode"] != 0]
    if args.json:
        _emit_json({"runs": runs, "failed": failed, "results_dir": str(bench_dir / "results")})
    else:
        print(f"{len(runs) - len(failed)}/{len(runs)} benchmarks succeeded; results in "
              f"{bench_dir / 'results'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "eval": cmd_eval, "bench": cmd_bench}


def _own_package_dirs() -> tuple[str, ...]:
    """Directories of a2r and a2r_kernels (each ending in a separator)."""
    import a2r_kernels

    return tuple(str(Path(module.__file__).resolve().parent) + os.sep
                 for module in (sys.modules[__package__], a2r_kernels))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``a2r`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 (one line, _Parser.error)
    _quiet_transformers()

    from .pipeline import PipelineError

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
