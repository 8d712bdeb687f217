"""A vLLM v1 attention backend: decode tokens through a2r_kernels' tree attention.

``A2R_VLLM=1`` in the environment turns it on in every vLLM process (the ``vllm.general_plugins``
entry point ``a2r_tree`` calls :func:`register`); then run vLLM as usual. On GPU it is also
selectable as vLLM's ``CUSTOM`` backend (``--attention-backend CUSTOM``) without the variable.

Per step and KV-cache group, the metadata builder splits the batch (vLLM reorders it, decodes
first, because the builder asks for ``reorder_batch_threshold = 1``):

* the first ``num_decodes`` requests have one query token each. Their tree is discovered from
  the block tables: rows holding the same physical block at the same position share it (vLLM's
  prefix caching gives the ``n > 1`` children of one prompt, and requests with a common system
  prompt, the same blocks). ``ak.TreeLayout.from_block_tables`` plans the step once for every
  layer; :func:`a2r_kernels.tree_decode_attention` then reads each shared block once per layer
  instead of once per request. A decode token sees its whole sequence (its own KV is written
  before attention runs), which is the causal mask of a one-token query.
* the other requests (prefills and prefill chunks, any query length) go to the platform's
  native backend, whose metadata builder and ``forward`` run over just those requests.

Both read the one KV cache in the native backend's layout, which this module views without a
copy (:data:`_KV_VIEWS`):

* ``CPU_ATTN`` (vLLM's CPU platform): a layer's cache is ``[num_blocks, num_kv_heads,
  block_size, 2 * head_size]``; each (block, kv head) holds a key tile then a value tile of
  ``block_size * head_size`` elements. Values are row-major ``[block_size, head_size]``; keys are
  stored transposed, ``[head_size, block_size]`` (vLLM's ``vec``/``vec16`` ISAs). As
  ``[num_blocks, block_size, num_kv_heads, head_size]`` views the key strides are
  ``(H*2*N*D, 1, 2*N*D, N)`` and the value strides ``(H*2*N*D, D, 2*N*D, 1)``. The key layout
  is checked once per ISA and dtype by writing a probe through vLLM's own cache-write op; an ISA
  that packs keys otherwise (AMX) raises ``NotImplementedError`` instead of reading garbage.
* ``FLASH_ATTN`` (CUDA): the cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
  logically with ``[K | V]`` per token; ``transpose(1, 2).split(head_size, -1)`` gives the
  ``[num_blocks, block_size, num_kv_heads, head_size]`` views (unit stride in ``head_size``).

On the CPU platform vLLM ignores the backend choice and always returns ``CPU_ATTN``'s class path
(``AttentionBackendEnum.CPU_ATTN.get_path()``); :func:`register` overrides that slot with this
backend, which resolves the native class from the enum's default path. On CUDA it registers
``CUSTOM`` always and, with ``A2R_VLLM=1``, the ``FLASH_ATTN`` slot.

Planning: :class:`~a2r_kernels.incremental_plan.DecodeStepPlanner` keeps the tree between
steps and reads vLLM's host copy of the block table (:func:`_host_twin`, no device read): a step
that only grows the requests costs O(requests) host work; a change of the batch's sharing
(requests joining, finishing, preempted, reordered) replans in O(table entries).

CUDA graphs: ``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``. On CUDA each step is planned
into the fixed buffers of a :class:`~a2r_kernels.TreeAttentionWrapper` (sized from
``max_num_seqs`` / the largest captured batch and the pool's block count) and ``forward`` runs
``wrapper.run``, whose launches depend only on those capacities, so a captured decode step
replays after any later plan. On the CPU (no graphs) the public op runs the step's layout.

Stats: :data:`stats` counts tree-attention calls, decode tokens, and the KV bytes every decode
step reads with sharing (each shared block once per layer) and without (what paged decode would
read); a DEBUG line per step and an INFO line at most every :data:`LOG_INTERVAL_S` seconds
report them through vLLM's logger (``vllm.a2r_tree``).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from .attention import tree_decode_attention
from .incremental_plan import DecodeStepPlanner
from .layout import TreeLayout
from .wrapper import TreeAttentionWrapper

__all__ = [
    "BACKEND_NAME",
    "ENV_FLAG",
    "A2RTreeBackend",
    "A2RTreeMetadata",
    "TreeAttentionStats",
    "enable",
    "register",
    "stats",
]

BACKEND_NAME = "A2R_TREE"
ENV_FLAG = "A2R_VLLM"
BACKEND_PATH = "a2r_kernels.vllm.A2RTreeBackend"
LOG_INTERVAL_S = 10.0   # at most one INFO line of KV-byte stats per this many seconds
# The native backend whose KV cache and prefill path we share, per vLLM platform.
NATIVE_BACKEND = {"cpu": AttentionBackendEnum.CPU_ATTN, "cuda": AttentionBackendEnum.FLASH_ATTN}
# kv_cache_dtype values whose cache holds q's dtype (no fp8 scales to apply).
_PLAIN_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")

logger = init_logger("vllm.a2r_tree")


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _flag_on() -> bool:
    value = os.environ.get(ENV_FLAG, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_FLAG} must be 0 or 1 (unset: 0), got {value!r}")
    return value == "1"


def _platform_name() -> str:
    from vllm.platforms import current_platform

    for name in NATIVE_BACKEND:
        if getattr(current_platform, f"is_{name}")():
            return name
    return type(current_platform).__name__


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it once in every process).

    Always registers this backend as ``CUSTOM`` and as its own enum member ``A2R_TREE`` (vLLM
    looks a backend up by ``get_name()``). With ``A2R_VLLM=1`` it also takes the slot of the
    platform's native backend (``NATIVE_BACKEND``), so vLLM picks it without any option.
    Idempotent.
    """
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if not _flag_on():
        return
    platform = _platform_name()
    if platform not in NATIVE_BACKEND:
        raise ValueError(f"{ENV_FLAG}=1: the {BACKEND_NAME} backend runs on vLLM's "
                         f"{sorted(NATIVE_BACKEND)} platforms, not {platform}")
    register_backend(NATIVE_BACKEND[platform], BACKEND_PATH)


def enable() -> None:
    """Turn the backend on for vLLM engines made after this call, in this process and in the
    processes it starts (sets ``A2R_VLLM=1``, then :func:`register`)."""
    os.environ[ENV_FLAG] = "1"
    register()


@functools.cache
def _native_backend() -> type[AttentionBackend]:
    """The platform's own backend class, from the enum's default path (not the override)."""
    platform = _platform_name()
    if platform not in NATIVE_BACKEND:
        raise ValueError(f"the {BACKEND_NAME} backend runs on vLLM's {sorted(NATIVE_BACKEND)} "
                         f"platforms, not {platform}")
    return resolve_obj_by_qualname(NATIVE_BACKEND[platform].value)


# --------------------------------------------------------------------------------------------
# KV-cache views: the native layout as [num_blocks, block_size, num_kv_heads, head_size]
# --------------------------------------------------------------------------------------------


def _cpu_kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``CPU_ATTN``'s ``[B, H, N, 2D]`` cache as key and value views ``[B, N, H, D]`` (no copy):
    per (block, head) a transposed key tile ``[D, N]`` then a value tile ``[N, D]``."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    tiles = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    keys = tiles[:, :, :block_size].view(num_blocks, num_kv_heads, head_size, block_size)
    return keys.permute(0, 3, 1, 2), tiles[:, :, block_size:].permute(0, 2, 1, 3)


def _flash_kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``FLASH_ATTN``'s cache (logical ``[B, H, N, 2D]``, ``[K | V]`` per token) as views
    ``[B, N, H, D]``."""
    keys, values = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return keys, values


_KV_VIEWS = {"CPU_ATTN": _cpu_kv_views, "FLASH_ATTN": _flash_kv_views}


@functools.cache
def _check_cpu_key_layout(isa: str, dtype: torch.dtype, num_kv_heads: int, block_size: int,
                          head_size: int) -> None:
    """Write two tokens through vLLM's CPU cache-write op into a scratch cache and read them
    back through :func:`_cpu_kv_views`; raise when this ISA stores the cache otherwise."""
    from vllm import _custom_ops as ops

    scratch = torch.zeros(2, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    tiles = scratch.view(2, num_kv_heads, 2 * block_size, head_size)
    key_tiles, value_tiles = tiles.chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(2, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.tensor([1, 2 * block_size - 1], dtype=torch.int64)
    ops.cpu_attn_reshape_and_cache(k, v, key_tiles, value_tiles, slots, isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    keys, values = _cpu_kv_views(scratch, head_size)
    blocks, offsets = slots // block_size, slots % block_size
    if not (torch.equal(keys[blocks, offsets], k) and torch.equal(values[blocks, offsets], v)):
        raise NotImplementedError(
            f"{BACKEND_NAME}: vLLM's CPU attention ISA {isa!r} ({dtype}, block_size "
            f"{block_size}, head_size {head_size}) does not store keys as [head_size, "
            f"block_size] tiles, so a2r_kernels cannot read its KV cache; unset {ENV_FLAG}")


# --------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------


@dataclass
class TreeAttentionStats:
    """Counters of this process since start (or :meth:`reset`).

    ``kv_bytes_shared``: K and V bytes the decode steps read through tree attention, every
    block read by several requests counted once per layer. ``kv_bytes_unshared``: what paged
    decode would read (every request its whole sequence). Both summed over layers and steps.
    """

    decode_steps: int = 0           # builder steps with at least one decode request
    mixed_steps: int = 0            # ... and at least one prefill request
    decode_tokens: int = 0
    tree_attention_calls: int = 0   # one per layer per decode step
    prefill_tokens: int = 0         # tokens handed to the native backend
    kv_bytes_shared: int = 0
    kv_bytes_unshared: int = 0
    plan_ns: int = 0                # host time of the decode plans (DecodeStepPlanner.plan)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


stats = TreeAttentionStats()
_last_info_log = [0.0]


def _format_bytes(n: int) -> str:
    scaled = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if scaled < 1024 or unit == "GiB":
            return f"{scaled:.1f} {unit}" if unit != "B" else f"{n} B"
        scaled /= 1024
    return f"{n} B"   # unreachable


def _record_decode_step(num_decodes: int, shared: int, unshared: int) -> None:
    stats.decode_steps += 1
    stats.decode_tokens += num_decodes
    stats.kv_bytes_shared += shared
    stats.kv_bytes_unshared += unshared
    logger.debug("%s step: %d decode requests read %s of KV (paged decode: %s)", BACKEND_NAME,
                 num_decodes, _format_bytes(shared), _format_bytes(unshared))
    now = time.monotonic()
    if now - _last_info_log[0] >= LOG_INTERVAL_S:
        _last_info_log[0] = now
        ratio = stats.kv_bytes_unshared / max(stats.kv_bytes_shared, 1)
        logger.info("%s: %d decode steps, %d tokens; KV read %s with tree sharing vs %s paged "
                    "(%.2fx less)", BACKEND_NAME, stats.decode_steps, stats.decode_tokens,
                    _format_bytes(stats.kv_bytes_shared), _format_bytes(stats.kv_bytes_unshared),
                    ratio)


# --------------------------------------------------------------------------------------------
# Metadata and its builder
# --------------------------------------------------------------------------------------------


@dataclass
class A2RTreeMetadata:
    """One step's attention metadata for the layers of one KV-cache group.

    Tokens ``[0, num_decode_tokens)`` belong to the ``num_decodes`` decode requests (one each),
    planned by ``decode_layout``; tokens ``[num_decode_tokens, num_actual_tokens)`` to the
    prefill requests, described by ``prefill`` (the native backend's metadata, or None). On
    CUDA the decode step runs through ``wrapper`` (fixed buffers, graph-safe), already planned.
    """

    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    decode_layout: TreeLayout | None
    prefill: Any | None
    wrapper: TreeAttentionWrapper | None = None   # CUDA: the step planned into its buffers


# Per-request and per-token fields of CommonAttentionMetadata that a request slice must cut
# (the fields CommonAttentionMetadata.unpadded slices, plus the per-token ones).
_PER_REQUEST_FIELDS = ("seq_lens", "block_table_tensor", "seq_lens_cpu_upper_bound",
                       "is_prefilling", "req_idx", "encoder_seq_lens", "encoder_seq_lens_cpu",
                       "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound",
                       "rswa_prefix_lens", "replayssm_decode_base_cpu")
_PER_TOKEN_FIELDS = ("slot_mapping", "positions")


def _requests_from(common: CommonAttentionMetadata, first_request: int,
                   first_token: int) -> CommonAttentionMetadata:
    """The metadata of requests ``[first_request, num_reqs)``, whose tokens start at
    ``first_token``."""
    changes: dict[str, Any] = {
        "query_start_loc": common.query_start_loc[first_request:] - first_token,
        "query_start_loc_cpu": common.query_start_loc_cpu[first_request:] - first_token,
        "num_reqs": common.num_reqs - first_request,
        "num_actual_tokens": common.num_actual_tokens - first_token,
        "_num_computed_tokens_cache": None,
        "_token_to_req_indices_cache": None,
    }
    for name in _PER_REQUEST_FIELDS:
        value = getattr(common, name)
        if value is not None:
            changes[name] = value[first_request:]
    for name in _PER_TOKEN_FIELDS:
        value = getattr(common, name)
        if value is not None:
            changes[name] = value[first_token:]
    if isinstance(common.causal, torch.Tensor):
        changes["causal"] = common.causal[first_request:]
    return common.replace(**changes)


def _host_twin(table: torch.Tensor) -> torch.Tensor:
    """The host copy vLLM keeps of its block table ``table`` (a row prefix of a
    ``CpuGpuBuffer``'s ``.gpu``), read without a device-to-host copy: on the CPU platform the
    table itself (vLLM points ``.gpu`` at ``.cpu``); on CUDA the buffer's pinned ``.cpu``,
    found once per buffer (:data:`_HOST_TWINS`)."""
    if table.device.type == "cpu":
        return table
    key = (table.data_ptr(), table.device.index)
    twin = _HOST_TWINS.get(key)
    if twin is None:
        from vllm.v1.utils import CpuGpuBuffer

        # Once per buffer (the block tables live as long as the model runner): the buffer
        # whose device tensor starts where the batch's table does.
        for obj in gc.get_objects():
            if isinstance(obj, CpuGpuBuffer) and obj.gpu.data_ptr() == table.data_ptr() \
                    and obj.gpu.device == table.device and obj.cpu.shape == obj.gpu.shape:
                twin = _HOST_TWINS[key] = obj.cpu
                break
        else:
            raise RuntimeError(f"{BACKEND_NAME}: no host copy of vLLM's block table found; "
                               f"the plan would need a device-to-host read every step")
    return twin[:table.shape[0]]


_HOST_TWINS: dict[tuple[int, int | None], torch.Tensor] = {}


class _TreeBuilderMixin:
    """Put in front of the native metadata builder (see :func:`_builder_cls`)."""

    # Graph-safe for batches of single-token decodes: on CUDA every decode step runs through
    # the fixed buffers of a TreeAttentionWrapper (launch grids from its capacities).
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes (query length 1) first: the split below is a prefix of the batch.
        self._init_reorder_batch_threshold(1)
        self._tree_block_size = kv_cache_spec.block_size
        self._tree_num_layers = len(layer_names)
        dtype = kv_cache_spec.dtype
        self._tree_token_bytes = (2 * kv_cache_spec.num_kv_heads * kv_cache_spec.head_size
                                  * torch.empty((), dtype=dtype).element_size())
        wrapper_shape = None
        if torch.device(device).type == "cuda":
            model = vllm_config.model_config
            max_seqs = max(vllm_config.scheduler_config.max_num_seqs,
                           vllm_config.compilation_config.max_cudagraph_capture_size or 0)
            wrapper_shape = (model.get_num_attention_heads(vllm_config.parallel_config),
                             kv_cache_spec.num_kv_heads, kv_cache_spec.head_size,
                             model.dtype, max_seqs, vllm_config.cache_config.num_gpu_blocks)
        self._tree_planner = DecodeStepPlanner(self._tree_block_size, device, wrapper_shape)
        logger.info_once(
            "Using %s attention backend (a2r_kernels.vllm): decode tokens through a2r_kernels "
            "tree attention with sharing from the block tables, prefill through %s",
            BACKEND_NAME, _native_backend().get_name())

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> A2RTreeMetadata:
        common = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = \
            split_decodes_and_prefills(common, decode_threshold=1)
        if num_decode_tokens != num_decodes:
            raise RuntimeError(f"{BACKEND_NAME}: {num_decodes} decode requests hold "
                               f"{num_decode_tokens} tokens; expected one each")
        prefill = None
        if num_prefills:
            prefill = super().build(common_prefix_len,
                                    _requests_from(common, num_decodes, num_decode_tokens),
                                    fast_build)
            stats.prefill_tokens += num_prefill_tokens
        layout = None
        if num_decodes:
            # Exact outside speculative decoding, which this backend does not run (one token
            # per decode request, checked above).
            seq_lens = common.seq_lens_cpu_upper_bound
            if seq_lens is None:
                seq_lens = _host_twin(common.seq_lens)
            table = common.block_table_tensor[:num_decodes]
            start = time.perf_counter_ns()
            layout = self._tree_planner.plan(_host_twin(table), table, seq_lens[:num_decodes])
            stats.plan_ns += time.perf_counter_ns() - start
            shared, unshared = self._tree_planner.planner.kv_tokens()
            scale = self._tree_token_bytes * self._tree_num_layers
            _record_decode_step(num_decodes, shared * scale, unshared * scale)
            stats.mixed_steps += num_prefills > 0
        return A2RTreeMetadata(num_actual_tokens=common.num_actual_tokens,
                               num_decodes=num_decodes, num_decode_tokens=num_decode_tokens,
                               decode_layout=layout, prefill=prefill,
                               wrapper=self._tree_planner.wrapper if layout is not None else None)


# --------------------------------------------------------------------------------------------
# The attention implementation
# --------------------------------------------------------------------------------------------


class _TreeImplMixin:
    """Put in front of the native attention implementation (see :func:`_impl_cls`): decode
    tokens through tree attention, the rest through the native ``forward``."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **kwargs):
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "sinks": kwargs.get("sinks") is not None,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype not in _PLAIN_KV_CACHE_DTYPES,
            f"attn_type={attn_type!r}": attn_type != AttentionType.DECODER,
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise ValueError(f"{BACKEND_NAME} runs decoder full attention only; this layer has "
                             f"{', '.join(bad)} (unset {ENV_FLAG} or choose another backend)")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, **kwargs)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: A2RTreeMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """``query`` ``[num_tokens, num_heads, head_size]``; ``output`` alike, written in place;
        ``kv_cache`` the native layout (module docstring). The current tokens' KV is already in
        the cache (vLLM calls ``do_kv_cache_update`` first)."""
        if attn_metadata is None:   # profiling / warm-up run
            return super().forward(layer, query, key, value, kv_cache, None, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: fused output quantization")
        meta = attn_metadata
        decode_tokens = meta.num_decode_tokens
        if meta.decode_layout is not None:
            keys, values = self._kv_views(layer, kv_cache)
            if meta.wrapper is not None:   # CUDA: the planned fixed buffers (graph-safe)
                meta.wrapper.run(query[:decode_tokens], keys, values, sm_scale=self.scale,
                                 out=output[:decode_tokens])
            else:
                tree_decode_attention(query[:decode_tokens], keys, values, meta.decode_layout,
                                      sm_scale=self.scale, out=output[:decode_tokens])
            stats.tree_attention_calls += 1
        if meta.prefill is not None:
            end = meta.num_actual_tokens
            super().forward(layer, query[decode_tokens:end], key[decode_tokens:end],
                            value[decode_tokens:end], kv_cache, meta.prefill,
                            output[decode_tokens:end])
        return output

    def _kv_views(self, layer, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        native = _native_backend().get_name()
        if native == "CPU_ATTN":   # the CPU builder sets each layer's ISA at start-up
            _check_cpu_key_layout(layer.isa, kv_cache.dtype, kv_cache.shape[1],
                                  kv_cache.shape[2], self.head_size)
        return _KV_VIEWS[native](kv_cache, self.head_size)


@functools.cache
def _impl_cls() -> type:
    native = _native_backend().get_impl_cls()
    return type("A2RTreeImpl", (_TreeImplMixin, native), {"__module__": __name__})


@functools.cache
def _builder_cls() -> type:
    native = _native_backend().get_builder_cls()
    return type("A2RTreeMetadataBuilder", (_TreeBuilderMixin, native), {"__module__": __name__})


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class A2RTreeBackend(AttentionBackend):
    """vLLM attention backend ``A2R_TREE``: the platform's native backend (``NATIVE_BACKEND``)
    with decode tokens through :func:`a2r_kernels.tree_decode_attention`.

    Capabilities are the native backend's, minus what the tree decode path does not do
    (sliding window, ALiBi, soft-capping, sinks, fp8 KV, MLA, non-decoder attention, context
    parallelism, batch invariance).
    """

    forward_includes_kv_cache_update = False   # the native impl's do_kv_cache_update writes KV
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type:
        return _impl_cls()

    @staticmethod
    def get_builder_cls() -> type:
        return _builder_cls()

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return _native_backend().get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return _native_backend().get_supported_head_sizes()

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return _native_backend().supports_head_size(head_size)

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        return _native_backend().supports_dtype(dtype)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return (kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes) \
            and _native_backend().supports_kv_cache_dtype(kv_cache_dtype)

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return _native_backend().supports_block_size(block_size)

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return _native_backend().get_preferred_block_size(default_block_size)

    @classmethod
    def customize_spec(cls, spec):
        return _native_backend().customize_spec(spec)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return _native_backend().supported_kv_cache_layouts()

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return _native_backend().supports_compute_capability(capability)

    @classmethod
    def supports_combination(cls, *args, **kwargs) -> str | None:
        return _native_backend().supports_combination(*args, **kwargs)

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False
