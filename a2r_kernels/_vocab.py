"""Shared vocabulary of the package: the integer rules every op checks its arguments by.

Torch-free on purpose (imported by host-side bookkeeping and by the CLI alike).

An *int* here is a Python ``int``, a numpy integer or a 0-d integer array / tensor. ``bool`` is
never an int (``True`` is not sequence 1, block 1 or length 1), and neither is a float, even an
integral one (``2.0``): a float that reaches an id or a count is a bug upstream, so it raises
``ValueError`` naming the argument instead of being truncated.
"""

from __future__ import annotations

import numbers

INT32_MAX = 2 ** 31 - 1   # largest id / count the int32 plans and kernels index with


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
