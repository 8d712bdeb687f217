"""Shared vocabulary of the package, each name defined once: the integer rules every op checks
its arguments by, the backend names, the remasking modes and their kernel codes, the kernels'
limits, the sampling kernels' constants (Philox streams, seed range, clamp, base changes), the
default KV block size, end-of-sequence ids, the range check of token ids and the text config and
attention geometry of a model config.

Torch-free on purpose (imported by host-side bookkeeping and by the CLI alike). The values that
the compiled extension also knows (``MAX_HEAD_DIM``, ``WORK_INFO_COLUMNS``, ``REMASKING_CODES``)
are exported by ``a2r_kernels._C`` from ``csrc/ops.h``; tests/test_cuda.py holds the two equal.

An *int* here is a Python ``int``, a numpy integer or a 0-d integer array / tensor. ``bool`` is
never an int (``True`` is not sequence 1, block 1 or length 1), and neither is a float, even an
integral one (``2.0``): a float that reaches an id or a count is a bug upstream, so it raises
``ValueError`` naming the argument instead of being truncated.
"""

from __future__ import annotations

import numbers

INT32_MAX = 2 ** 31 - 1   # largest id / count the int32 plans and kernels index with

# ``backend=`` of every public op (see a2r_kernels.backend for what each one means).
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Tokens per KV block of a TreeKVCache / TreeDecoder when the caller names none.
DEFAULT_BLOCK_SIZE = 16

# ``remasking=`` of denoise_step, in the order of their kernel codes (csrc/ops.h a2r::Remasking,
# the REMASKING constexpr of a2r_kernels/triton/denoise.py): the code of a mode is its index.
REMASKING = ("low_confidence", "margin", "entropy", "random")
REMASKING_CODES = {name: code for code, name in enumerate(REMASKING)}

# Largest head_dim the attention kernels are compiled for (csrc/ops.h kMaxHeadDim; the Triton
# kernels hold a head_dim row of q, K and V per tile, and share the limit).
MAX_HEAD_DIM = 256

# Constants of the Gumbel-max sampling every backend of denoise_step / entropy_bound_step follows
# bit for bit (a2r_kernels/reference_denoise.py explains them): the bound that lets a draw skip
# logits that cannot win, the logits probed first, and the Philox counter word of each stream.
GUMBEL_BOUND = 17.0
TOPK_PROBE = 64
GUMBEL_STREAM = 0         # Philox counter word c2 of the Gumbel noise
RANDOM_SCORE_STREAM = 1   # ... of remasking="random"'s scores
RENOISE_STREAM = 2        # ... of entropy_bound_step's renoise token
SEED_BOUND = 2 ** 63 - 1  # a step's seed is drawn from [0, SEED_BOUND): a non-negative int64
# The finite clamp of a shifted logit x - max: exp(NEG_HUGE) is 0 and 0 * NEG_HUGE is 0, where a
# -inf shift would give 0 * -inf = NaN in p log p.
NEG_HUGE = -1e30

# Base changes of the kernels, which use exp2 / log2 (the references use exp / log).
LOG2E = 1.4426950408889634   # log2(e)
LN2 = 0.6931471805599453     # ln(2)

# One row of a TreeLayout's int32 ``work_info [num_work, WORK_INFO_COLUMNS]`` plan: the fields of
# one work item, in column order (a2r_kernels/layout.py explains each; csrc/ops.h kWorkInfoColumns).
WORK_FIELDS = ("q_start", "q_len", "page_start", "kv_start", "kv_end", "partial_start")
WORK_INFO_COLUMNS = len(WORK_FIELDS)


def as_int(value, name: str) -> int:
    """``value`` as a Python int; ``ValueError`` naming ``name`` for bools, floats, non-numbers."""
    if type(value) is int:   # the common case, first
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)    # numpy integers
    if getattr(value, "ndim", None) == 0 and hasattr(value, "tolist"):   # 0-d array / tensor
        item = value.tolist()
        if type(item) is int:   # integer dtypes only: bool / float items are rejected below
            return item
    raise ValueError(f"{name} must be an int, got {value!r}")


def positive_int(value, name: str) -> int:
    """``as_int(value, name)``, which must be ``> 0``."""
    result = as_int(value, name)
    if result <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return result


def non_negative_int(value, name: str) -> int:
    """``as_int(value, name)``, which must be ``>= 0``."""
    result = as_int(value, name)
    if result < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return result


def int_list(values, name: str, *, low: int | None = None, high: int | None = None) -> list[int]:
    """``values`` (a sequence of ints, or a 1-D integer array / tensor) as a list of Python ints,
    each in ``[low, high]`` where given. ``ValueError`` naming ``name`` (and the index of the first
    bad element) for anything else: ``None``, a string, a bool or float element, a float or bool
    tensor, a tensor that is not 1-D."""
    if hasattr(values, "tolist") and hasattr(values, "ndim"):   # numpy array / torch tensor
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()   # Python ints for integer dtypes; floats / bools stay rejected
    elif isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    result = list(values)
    if not set(map(type, result)) <= {int}:   # C-level scan: tables hold thousands of ids
        result = [_element(v, name, i) for i, v in enumerate(result)]
    if result and low is not None and min(result) < low:
        i, bad = next((i, v) for i, v in enumerate(result) if v < low)
        raise ValueError(f"{name}[{i}] must be >= {low}, got {bad}")
    if result and high is not None and max(result) > high:
        i, bad = next((i, v) for i, v in enumerate(result) if v > high)
        raise ValueError(f"{name}[{i}] must be <= {high}, got {bad}")
    return result


def _element(value, name: str, index: int) -> int:
    try:
        return as_int(value, f"{name}[{index}]")
    except ValueError:
        raise ValueError(f"{name} must be a sequence of ints, but {name}[{index}] is "
                         f"{value!r}") from None


def eos_ids(value, name: str = "eos_token_id") -> list[int]:
    """The end-of-sequence ids a generation stops at, from an ``eos_token_id`` setting.

    One meaning everywhere: a row stops at (and keeps) the first token that is one of the ids;
    an empty result means no EOS, the row runs to its length limit. ``None`` and ``[]`` -> ``[]``;
    an int -> ``[it]``; a sequence or 1-D integer array / tensor -> its ids in order, duplicates
    dropped. Every id must be ``>= 0``; bools, floats and strings raise ``ValueError`` naming
    ``name``. (Whether ``None`` first falls back to a model's configured ids is the caller's
    choice: ``sample_parallel`` reads the model's generation config, ``diffusion_generate`` not.)
    """
    if value is None:
        return []
    if getattr(value, "ndim", None) == 0 or isinstance(value, (numbers.Integral, float, str)):
        ids = [as_int(value, name)]
    else:
        ids = int_list(value, name)
    if ids and min(ids) < 0:
        raise ValueError(f"{name} must hold ids >= 0, got {value!r}")
    return list(dict.fromkeys(ids))


def check_token_ids(token_ids, vocab_size: int, name: str = "token_ids", *,
                    sync: bool = True) -> None:
    """``ValueError`` naming ``name`` unless every id of ``token_ids`` is in ``[0, vocab_size)``
    (the rows of the model's input embedding: an id outside them is an ``IndexError`` deep in the
    forward on the CPU, a device-side assert on CUDA).

    ``token_ids``: a (nested) sequence of ints, or an integer tensor / array of any shape
    (compared elementwise, so torch and numpy both work without this module importing either).
    Cost: one pass over the ids. Host values (lists, CPU tensors, numpy arrays) are read in
    place; a tensor on an accelerator needs its verdict read back, one host sync, so with
    ``sync=False`` it is not checked: the decode loop (``TreeDecoder.run_step``) plans step
    t + 1 while step t runs and must not wait, and its tokens come from sampling the model's own
    logits. Prompts are checked once, where they are read to the host anyway.
    """
    if hasattr(token_ids, "ndim") and hasattr(token_ids, "any"):   # tensor / array
        device = getattr(token_ids, "device", "cpu")
        if getattr(device, "type", device) != "cpu" and not sync:
            return
        if not bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
            return
        low, high = int(token_ids.min()), int(token_ids.max())
    else:
        flat = list(token_ids)
        while flat and not isinstance(flat[0], numbers.Integral):   # nested rows
            flat = [value for row in flat for value in row]
        if not flat or (min(flat) >= 0 and max(flat) < vocab_size):
            return
        low, high = min(flat), max(flat)
    raise ValueError(f"{name} must be token ids in [0, {vocab_size}) (the model's vocabulary), "
                     f"got ids from {low} to {high}")


def attention_geometry(config) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of a transformers text config.

    A config without ``num_key_value_heads`` (or with it ``None``) has one kv head per query head
    (multi-head attention, as transformers' attention modules assume); a config without
    ``head_dim`` (or with it ``None``) has ``hidden_size // num_attention_heads``.
    """
    num_heads = positive_int(config.num_attention_heads, "config.num_attention_heads")
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return (num_heads, positive_int(num_kv_heads, "config.num_key_value_heads"),
            positive_int(head_dim, "config.head_dim"))


def text_config(config):
    """The text part of a transformers config (``config.get_text_config()`` for a multimodal
    one), else ``config`` itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config
