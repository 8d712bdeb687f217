"""The explorer and synthesizer as vLLM ``LLM`` engines (``a2r run/eval --engine vllm``).

:class:`VLLMModel` stands where :class:`~a2r.pipeline.A2RPipeline` holds a transformers causal LM.
It keeps what the pipeline reads from a model (``config``, ``generation_config``, ``dtype``,
``device``) from the checkpoint's files and samples through ``LLM.generate``:

* prompts go in as token ids (tokenised by the pipeline, as for transformers), outputs come back
  as token ids; vLLM's detokenizer is off.
* ``n`` paths of one prompt are one request with ``SamplingParams(n=...)``: vLLM's prefix caching
  stores the prompt's full blocks once for all of them, and with ``A2R_VLLM=1`` (set here unless
  the environment says ``A2R_VLLM=0``) the A2R_TREE attention backend reads them once per decode
  step. Greedy (``temperature=0``) paths are identical, so they are sampled once (vLLM refuses
  ``n > 1`` without sampling) and repeated.
* ``tensor_parallel_size``, ``pipeline_parallel_size`` and ``gpu_memory_utilization`` go to the
  engine as given; each engine takes ``gpu_memory_utilization`` of the device for itself, so an
  asymmetric set-up (two engines) needs two fractions that fit together.
* vLLM's CPU build binds each rank's OpenMP threads to cores; on a machine with one NUMA node it
  refuses more than one rank unless ``VLLM_CPU_OMP_THREADS_BIND`` lists the cores of each rank.
  When that variable is unset and the engine has several ranks on the CPU, it is set here
  (:func:`cpu_threads_bind`: this process's cores split evenly, ``"0|1"`` for two ranks on two
  cores) and one line on stderr says so.

The thinker stays on transformers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["ENGINES", "VLLMModel", "cpu_threads_bind", "vllm_available"]

ENGINES = ("transformers", "vllm")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def cpu_threads_bind(world_size: int, cores: Sequence[int]) -> str:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value: ``cores`` split into ``world_size`` groups of equal
    size (the first cores, in order), one per vLLM rank, ``"|"``-separated (``"0|1"``, ``"0,1|2,3"``).
    ValueError when there are fewer cores than ranks."""
    cores = sorted(cores)
    if world_size < 1 or len(cores) < world_size:
        raise ValueError(f"vLLM on the CPU needs a core per rank: {world_size} ranks "
                         f"(tensor x pipeline parallel size) but {len(cores)} cores are usable")
    per_rank = len(cores) // world_size
    return "|".join(",".join(map(str, cores[r * per_rank:(r + 1) * per_rank]))
                    for r in range(world_size))


def _bind_cpu_threads(world_size: int) -> None:
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` for a multi-rank engine on vLLM's CPU platform when the
    user has not (module docstring)."""
    if world_size <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    value = cpu_threads_bind(world_size, os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
    print(f"a2r: VLLM_CPU_OMP_THREADS_BIND={value} (the cores of each of vLLM's {world_size} CPU "
          f"ranks; set the variable to choose them yourself)", file=sys.stderr)


class VLLMModel:
    """One vLLM engine over a ``save_pretrained`` directory.

    Args:
        path: the model directory (``config.json``, weights, tokenizer).
        dtype: ``None`` (the checkpoint's) or a torch dtype.
        seed: the engine's seed (per-request seeds come with each :meth:`sample`).
        tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization: passed to
            ``vllm.LLM`` (None: vLLM's default).
        engine_kwargs: any other ``vllm.LLM`` argument (``max_model_len``, ``enforce_eager``...).
    """

    def __init__(self, path: str | os.PathLike, *, dtype=None, seed: int | None = 0,
                 tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None,
                 gpu_memory_utilization: float | None = None, **engine_kwargs):
        import torch
        from transformers import AutoConfig, GenerationConfig

        os.environ.setdefault("A2R_VLLM", "1")
        if os.environ["A2R_VLLM"] == "1":
            import a2r_kernels.vllm

            a2r_kernels.vllm.enable()   # also in this process, if vLLM loaded its plugins already
        from vllm import LLM

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path)
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.path)
        except OSError:   # no generation_config.json
            self.generation_config = None
        options = {"tensor_parallel_size": tensor_parallel_size,
                   "pipeline_parallel_size": pipeline_parallel_size,
                   "gpu_memory_utilization": gpu_memory_utilization}
        options = {k: v for k, v in options.items() if v is not None}
        _bind_cpu_threads((tensor_parallel_size or 1) * (pipeline_parallel_size or 1))
        self.llm = LLM(str(self.path), dtype=str(dtype).replace("torch.", "") if dtype else "auto",
                       seed=seed if seed is not None else 0, **options, **engine_kwargs)
        vllm_config = self.llm.llm_engine.vllm_config
        self.dtype = vllm_config.model_config.dtype
        self.block_size = vllm_config.cache_config.block_size   # prefix caching shares whole blocks
        self.device = torch.device("cpu")   # where prompt ids live: vLLM takes them from the host
        archs = getattr(self.config, "architectures", None) or [type(self.config).__name__]
        self.architecture = f"{archs[0]} (vLLM)"
        self.last_cached_tokens = 0   # prompt tokens of the last sample() read from vLLM's cache

    def sample(self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, *,
               temperature: float, top_p: float = 1.0, top_k: int = 0,
               eos_token_id=None, seed: int | None = None) -> list[list[int]]:
        """``n`` continuations of ``prompt_ids``: lists of generated token ids, each ending at
        (and including) an eos token when one was sampled. Arguments as
        :func:`a2r.sample_parallel` (``top_k=0``: off, ``eos_token_id`` an int or a list)."""
        from vllm import SamplingParams

        eos = [] if eos_token_id is None else (
            list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        greedy = temperature == 0
        params = SamplingParams(n=1 if greedy else n, temperature=temperature, top_p=top_p,
                                top_k=top_k, max_tokens=max_new_tokens, seed=seed,
                                stop_token_ids=eos, detokenize=False)
        (output,) = self.llm.generate([{"prompt_token_ids": list(map(int, prompt_ids))}], params,
                                      use_tqdm=False)
        self.last_cached_tokens = int(output.num_cached_tokens or 0)
        sequences = [list(c.token_ids) for c in output.outputs]
        return sequences * n if greedy else sequences
