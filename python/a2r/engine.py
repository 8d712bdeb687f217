"""The generation engines the explorer and synthesizer stages run on: one protocol
(:class:`Engine`), two implementations.

* :class:`TreeEngine`: a transformers causal LM over a2r_kernels' tree-shared KV cache
  (:func:`a2r.explore.explore`). It owns its :class:`~a2r_kernels.hf.TreeDecoder` (one per
  attention backend, kept across stages and runs: its cache holds earlier prompts' whole blocks
  for automatic prefix reuse) and sizes its pool.
* :class:`VLLMEngine`: a vLLM ``LLM`` (``a2r run/eval --engine vllm``), whose prefix caching
  does the same.

Both take prompt token ids (tokenised once by :mod:`a2r.prompts`) and a
:class:`~a2r.sampling.SamplingParams`, and return a :class:`Generation` with their own counts (the
prompt tokens whose KV came from the cache). The stages read from an engine what they read from
a model: ``config``, ``generation_config``, ``dtype``, ``name_or_path``, ``architecture``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from a2r_kernels.vocab import DEFAULT_BLOCK_SIZE

from .sampling import SamplingParams

__all__ = ["ENGINES", "Engine", "Generation", "TreeEngine", "VLLMEngine", "as_engine",
           "load_vllm", "vllm_available"]

ENGINES = ("transformers", "vllm")


@dataclass
class Generation:
    """What one :meth:`Engine.generate` call produced.

    ``sequences[i]``: generated token ids of path ``i`` (ending at and including a stop id when
    one was sampled). ``reused_prefix_tokens``: prompt tokens whose KV came from the engine's cache
    (not recomputed). ``seconds``: wall time, the device synchronised. ``note``: why the
    engine's kept cache could not serve the prompt (a larger pool was built), else ``""``.
    """

    sequences: list[list[int]]
    reused_prefix_tokens: int
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class Room:
    """A later prompt (``prompt_tokens`` + ``max_new_tokens``, one path) that must fit in the
    pool while an earlier prompt's blocks stay cached (so that its prefill can reuse them)."""

    prompt_tokens: int
    max_new_tokens: int


class Engine:
    """The generation protocol of a stage.

    :meth:`generate` samples ``n`` paths of one prompt. With ``reuse_prefix`` the engine serves
    it from its kept cache (prefix reuse; ``room`` sizes that cache for a later prompt too),
    else from a cache of the call's own.
    """

    name: str
    config: object
    generation_config: object
    dtype: object
    architecture: str
    name_or_path: str

    def generate(self, prompt_ids: Sequence[int], n: int, max_new_tokens: int,
                 sampling: SamplingParams, *, seed: int | None, stop_ids: Sequence[int],
                 backend: str = "auto", reuse_prefix: bool = False,
                 room: Room | None = None) -> Generation:
        raise NotImplementedError

    def kv_shared_prompt_tokens(self, prompt_tokens: int) -> int:
        """Tokens of an ``n``-path prompt whose KV is stored once for all paths."""
        raise NotImplementedError

    def reuse_report(self, generation: Generation, shared_prefix: int, symmetric: bool,
                     reuse_prefix: bool) -> tuple[int, str]:
        """The synthesizer's ``(reused prefix tokens, note)`` as reported, from its
        ``generation`` (run with ``reuse_prefix``); ``shared_prefix``: the tokens its prompt
        shares with the explorer's (symmetric set-up). The note says why nothing was reused, or
        how, else ``""``."""
        raise NotImplementedError


def as_engine(model) -> Engine:
    """``model`` itself when it is an :class:`Engine`, else a :class:`TreeEngine` over it."""
    return model if isinstance(model, Engine) else TreeEngine(model)


def _synchronize(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


class TreeEngine(Engine):
    """A transformers causal LM over a2r_kernels' tree-shared KV cache.

    Args:
        model: Llama / Qwen2 / Qwen3 style causal LM (full attention), any device and dtype.
        block_size: tokens per KV block of its decoders.
    """

    name = "transformers"

    def __init__(self, model, *, block_size: int = DEFAULT_BLOCK_SIZE):
        self.model = model
        self.block_size = block_size
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.name_or_path = getattr(model, "name_or_path", "") or "in memory"
        self.architecture = type(model).__name__
        self._decoders: dict[str, object] = {}   # backend -> TreeDecoder, kept across runs

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def pool_blocks(self, prompt_tokens: int, n: int, max_new_tokens: int,
                    room: Room | None = None) -> int:
        """KV blocks for ``n`` paths of a prompt, and with ``room`` also for that later prompt
        while this prompt's blocks stay cached."""
        from .explore import tree_blocks_needed

        blocks = tree_blocks_needed(prompt_tokens, [n], [max_new_tokens], self.block_size)
        if room is None:
            return blocks
        return max(blocks, tree_blocks_needed(room.prompt_tokens, [1], [room.max_new_tokens],
                                              self.block_size)
                   + math.ceil(prompt_tokens / self.block_size))

    def decoder(self, num_blocks: int, backend: str):
        """``(decoder, "")``: the kept decoder for ``backend`` when it has ``num_blocks`` blocks;
        else a new one of ``num_blocks`` (its cached prompts are lost) and a note saying so."""
        from a2r_kernels.hf import TreeDecoder

        decoder = self._decoders.get(backend)
        if decoder is not None and decoder.cache.num_blocks >= num_blocks:
            return decoder, ""
        note = "" if decoder is None else (
            f"the prompt needed {num_blocks} KV blocks, more than the pool's "
            f"{decoder.cache.num_blocks}: a larger pool was built and cached prompts recomputed")
        self._decoders[backend] = TreeDecoder(self.model, num_blocks, block_size=self.block_size,
                                              backend=backend)
        return self._decoders[backend], note

    def generate(self, prompt_ids, n, max_new_tokens, sampling, *, seed, stop_ids,
                 backend="auto", reuse_prefix=False, room=None) -> Generation:
        import torch

        from . import explore   # looked up at call time, so tests can script the explorer

        device = self.device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        model, pool, note = self.model, {"backend": backend}, ""
        if reuse_prefix:
            model, note = self.decoder(
                self.pool_blocks(len(prompt_ids), n, max_new_tokens, room), backend)
            pool = {}
        eos = list(stop_ids) if len(stop_ids) > 1 else (stop_ids[0] if stop_ids else None)
        _synchronize(device)
        start = time.perf_counter()
        result = explore.explore(model, input_ids, [n], max_new_tokens, sampling,
                                 eos_token_id=eos, seed=seed, **pool)
        _synchronize(device)
        return Generation([list(map(int, s)) for s in result.sequences],
                          result.reused_prefix_tokens, time.perf_counter() - start, note)

    def kv_shared_prompt_tokens(self, prompt_tokens: int) -> int:
        return prompt_tokens   # every prompt token, whole block or not: the branches fork it

    def reuse_report(self, generation, shared_prefix, symmetric, reuse_prefix):
        if not reuse_prefix:
            return 0, "reuse_prefix_kv is off"
        reused = generation.reused_prefix_tokens
        if reused or generation.note:
            return reused, generation.note
        if not symmetric:
            return 0, "asymmetric set-up: two models, two caches"
        return 0, (f"the synthesizer prompt shares no whole {self.block_size}-token block with "
                   "a cached prompt")


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


def bind_vllm_cpu_threads(world_size: int) -> None:
    """vLLM's CPU build binds each rank's OpenMP threads to cores, and on a machine with one NUMA
    node it refuses more than one rank unless ``VLLM_CPU_OMP_THREADS_BIND`` lists each rank's
    cores. When that variable is unset and a multi-rank engine runs on the CPU, set it
    (:func:`cpu_threads_bind` over this process's cores) and say so in one stderr line."""
    if world_size <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    value = cpu_threads_bind(world_size, os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
    print(f"a2r: VLLM_CPU_OMP_THREADS_BIND={value} (the cores of each of vLLM's {world_size} CPU "
          f"ranks; set the variable to choose them yourself)", file=sys.stderr)


class VLLMEngine(Engine):
    """One vLLM engine over a ``save_pretrained`` directory.

    * prompts go in as token ids, outputs come back as token ids; vLLM's detokenizer is off.
    * ``n`` paths of one prompt are one request with ``SamplingParams(n=...)``: vLLM's prefix
      caching stores the prompt's full blocks once for all of them, and with ``A2R_VLLM=1`` (set
      here unless the environment says ``A2R_VLLM=0``) the A2R_TREE attention backend reads them
      once per decode step. Greedy (``temperature=0``) paths are identical, so they are sampled
      once (vLLM refuses ``n > 1`` without sampling) and repeated.
    * every field of :class:`~a2r.sampling.SamplingParams` goes to vLLM's ``SamplingParams``
      under its own name (vLLM's names: ``temperature``, ``top_p``, ``top_k``, ``min_p``).
    * ``tensor_parallel_size``, ``pipeline_parallel_size`` and ``gpu_memory_utilization`` go to
      the engine as given; each engine takes ``gpu_memory_utilization`` of the device for
      itself, so an asymmetric set-up (two engines) needs two fractions that fit together.
    * on vLLM's CPU build with several ranks, ``VLLM_CPU_OMP_THREADS_BIND`` is set for the user
      when unset (:func:`bind_vllm_cpu_threads`).

    Args:
        path: the model directory (``config.json``, weights, tokenizer).
        dtype: ``None`` (the checkpoint's) or a torch dtype.
        seed: the engine's seed (per-request seeds come with each :meth:`generate`).
        engine_kwargs: any other ``vllm.LLM`` argument (``max_model_len``, ``enforce_eager``...).
    """

    name = "vllm"

    def __init__(self, path: str | os.PathLike, *, dtype=None, seed: int | None = 0,
                 tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None,
                 gpu_memory_utilization: float | None = None, **engine_kwargs):
        from transformers import AutoConfig, GenerationConfig

        os.environ.setdefault("A2R_VLLM", "1")
        if os.environ["A2R_VLLM"] == "1":
            import a2r_kernels.vllm

            a2r_kernels.vllm.enable()   # also in this process, if vLLM loaded its plugins already
        from vllm import LLM

        self.path = Path(path)
        self.name_or_path = str(self.path)
        self.config = AutoConfig.from_pretrained(self.path)
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.path)
        except OSError:   # no generation_config.json
            self.generation_config = None
        options = {"tensor_parallel_size": tensor_parallel_size,
                   "pipeline_parallel_size": pipeline_parallel_size,
                   "gpu_memory_utilization": gpu_memory_utilization}
        options = {k: v for k, v in options.items() if v is not None}
        bind_vllm_cpu_threads((tensor_parallel_size or 1) * (pipeline_parallel_size or 1))
        self.llm = LLM(str(self.path), dtype=str(dtype).replace("torch.", "") if dtype else "auto",
                       seed=seed if seed is not None else 0, **options, **engine_kwargs)
        vllm_config = self.llm.llm_engine.vllm_config
        self.dtype = vllm_config.model_config.dtype
        self.block_size = vllm_config.cache_config.block_size   # prefix caching shares whole blocks
        archs = getattr(self.config, "architectures", None) or [type(self.config).__name__]
        self.architecture = f"{archs[0]} (vLLM)"

    def generate(self, prompt_ids, n, max_new_tokens, sampling, *, seed, stop_ids,
                 backend="auto", reuse_prefix=False, room=None) -> Generation:
        """``backend``, ``reuse_prefix`` and ``room`` are the tree engine's: vLLM's prefix
        caching always runs and vLLM sizes its own pool."""
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = sampling.temperature == 0
        params = VLLMSamplingParams(n=1 if greedy else n, **asdict(sampling),
                                    max_tokens=max_new_tokens, seed=seed,
                                    stop_token_ids=list(stop_ids), detokenize=False)
        start = time.perf_counter()
        (output,) = self.llm.generate([{"prompt_token_ids": list(map(int, prompt_ids))}], params,
                                      use_tqdm=False)
        sequences = [list(c.token_ids) for c in output.outputs]
        return Generation(sequences * n if greedy else sequences,
                          int(output.num_cached_tokens or 0), time.perf_counter() - start)

    def kv_shared_prompt_tokens(self, prompt_tokens: int) -> int:
        return prompt_tokens - prompt_tokens % self.block_size   # whole blocks (prefix caching)

    def reuse_report(self, generation, shared_prefix, symmetric, reuse_prefix):
        if not symmetric:
            return 0, "asymmetric set-up: two models, two caches"
        reused = min(generation.reused_prefix_tokens, shared_prefix)
        return reused, (f"vLLM prefix caching reused {reused} of the {shared_prefix} shared "
                        f"prefix tokens (whole {self.block_size}-token blocks)")


def load_vllm(path, role: str, device, dtype, *, options: dict, seed):
    """A :class:`~a2r.engine.VLLMEngine` + tokenizer from ``path`` (``device`` unused: vLLM
    places the engine itself)."""
    from transformers import AutoTokenizer

    from .config import ModelDirError, PipelineError
    from .models import check_model_dir, first_line, parse_dtype

    if not vllm_available():
        raise PipelineError("engine 'vllm' needs vLLM installed (pip install vllm)")
    directory = check_model_dir(path, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise ModelDirError(f"{role} model directory {directory} has no loadable tokenizer: "
                            f"{first_line(err)}") from err
    return VLLMEngine(directory, dtype=parse_dtype(dtype), seed=seed, **options), tokenizer
