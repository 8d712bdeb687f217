"""What every ``a2r`` command does before a model runs: its options become an
:class:`~a2r.config.A2RConfig`, the device, dtype and backend are checked, and the models are
loaded (the embedded ones, or directories). A user error raises :class:`CLIError` (one
``a2r: error:`` line, exit status 2)."""

from __future__ import annotations

import json
import os

__all__ = ["CLIError", "check_question_text", "config_from_args", "load_pipeline",
           "quiet_transformers", "random_models_note", "resolve_device", "resolve_dtype",
           "tiny_paths"]


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


VLLM_ONLY_OPTIONS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization")


def vllm_engine_options(args) -> dict | None:
    """The vLLM engine arguments of ``args`` (None for --engine transformers, which must not
    have any)."""
    given = {k: getattr(args, k) for k in VLLM_ONLY_OPTIONS if getattr(args, k, None) is not None}
    if getattr(args, "engine", "transformers") != "vllm":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise CLIError(f"{flag} needs --engine vllm")
        return None
    from .engine import vllm_available

    if not vllm_available():
        raise CLIError("--engine vllm needs vLLM installed (pip install vllm)")
    if args.backend != "auto":
        raise CLIError("--backend selects a2r_kernels kernels for --engine transformers; with "
                       "--engine vllm the A2R_TREE backend picks them by device")
    # vLLM logs to stdout by default; the CLI keeps stdout for its report (and --json).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    return given


def quiet_transformers() -> None:
    """transformers' per-load progress bars and info logs would drown the stage report."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str) -> str:
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


def resolve_dtype(name: str, device: str):
    if name == "auto":
        return "float32" if device == "cpu" else None
    return name


def check_backend(backend: str, device: str) -> None:
    """--backend must run on --device; checked before any model is loaded."""
    import torch

    from a2r_kernels.backend import backend_unavailable_reason

    why = None if backend == "auto" else backend_unavailable_reason(backend, torch.device(device))
    if why is not None:
        raise CLIError(f"--backend {backend} is unavailable on device {device}: {why}")


def check_question_text(question, what: str = "the question") -> None:
    if not isinstance(question, str) or not question.strip():
        raise CLIError(f"{what} must be a non-empty string, got {json.dumps(question)}")


def random_models_note(models) -> str | None:
    """RANDOM_MODELS_NOTE naming the loaded models that are random, or None when none is."""
    random_roles = [role for role in ("explorer", "thinker", "synthesizer")
                    if models.get(role) and models[role]["random"]]
    return RANDOM_MODELS_NOTE.format(models=", ".join(random_roles)) if random_roles else None


def config_from_args(args, thinker_defaults=None):
    """The :class:`~a2r.config.A2RConfig` of the generation options (range checks are its
    ``validate``'s, not argparse's)."""
    from .config import A2RConfig
    from .sampling import SamplingParams

    thinker = {name: getattr(args, name) if getattr(args, name) is not None else default
               for name, default in (thinker_defaults or THINKER_DEFAULTS).items()}
    return A2RConfig(
        num_paths=args.num_paths, max_new_tokens=args.max_new_tokens,
        synth_max_new_tokens=args.synth_max_new_tokens,
        sampling=SamplingParams(**{name: getattr(args, name)
                                   for name in SamplingParams.field_names()}),
        seed=args.seed,
        answer_max_chars=None if args.answer_max_chars == -1 else args.answer_max_chars,
        use_thinker=not args.no_thinker, **thinker,
        thinker_threshold=args.thinker_threshold, thinker_traces=args.thinker_traces,
        backend=args.backend,
        reuse_prefix_kv=not args.no_prefix_reuse)


def tiny_paths(args, thinker: bool):
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


def load_pipeline(args, *, use_tiny: bool):
    """(pipeline, description of the models) from --explorer/--synthesizer/--thinker or --tiny."""
    from .models import model_dtype
    from .pipeline import A2RPipeline

    if getattr(args, "random_models", False) and not use_tiny:
        raise CLIError("--random-models needs --tiny (the embedded models)")
    trained = use_tiny and not getattr(args, "random_models", False)
    from .demo.tiny import TRAINED_THINKER_SETTINGS

    config = config_from_args(args, TRAINED_THINKER_SETTINGS if trained else None)
    config.validate()   # bad option values fail here, before any model is loaded
    vllm_options = vllm_engine_options(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_backend(args.backend, device)
    if use_tiny:
        if getattr(args, "explorer", None) or getattr(args, "synthesizer", None) \
                or getattr(args, "thinker", None):
            raise CLIError("--tiny cannot be combined with --explorer/--synthesizer/--thinker")
        paths = tiny_paths(args, thinker=not args.no_thinker)
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
        arch = getattr(model, "architecture", type(model).__name__)   # VLLMEngine: "... (vLLM)"
        return {"path": str(path), "arch": arch, "random": is_random_model(path)}

    from . import thinker as thinkers

    models = {
        "explorer": describe(explorer, pipeline.explorer),
        "synthesizer": describe(synthesizer or explorer, pipeline.synthesizer),
        "thinker": (None if pipeline.thinker is None else {
            **describe(thinker, pipeline.thinker), "kind": thinkers.kind(pipeline.thinker)}),
        "mode": "symmetric" if pipeline.symmetric else "asymmetric",
        "device": device,
        "dtype": str(model_dtype(pipeline.explorer)).replace("torch.", ""),
        "trained": paths.trained if use_tiny else None,
    }
    if vllm_options is not None:
        models["engine"] = {"name": "vllm", **vllm_options}
    return pipeline, models
