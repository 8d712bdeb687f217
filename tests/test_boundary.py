"""The package boundary: no tuning or test seams in production modules."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from a2r_kernels.triton import attention as triton_attention  # noqa: E402


def test_no_tuning_globals_or_test_harness_in_the_package():
    """Tile configs are launcher arguments, not a mutable module global; the AOT compile harness
    (private Triton APIs) lives in tests/, not in a2r_kernels."""
    assert not hasattr(triton_attention, "TILE_OVERRIDE")
    assert importlib.util.find_spec("a2r_kernels.triton._aot") is None


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tile_is_an_argument_of_the_launcher(head_dim):
    table = triton_attention._tile_config(64, head_dim, False)
    assert triton_attention._tile_config(64, head_dim, False, (32, 4)) == (64, 32, 4)
    assert triton_attention._tile_config(64, head_dim, False) == table   # nothing left behind
    # Only 64-row fp16 / bf16 tiles take it; fp32 dots and small tiles keep the table's.
    assert triton_attention._tile_config(64, head_dim, True, (32, 4)) == \
        triton_attention._tile_config(64, head_dim, True)
    assert triton_attention._tile_config(8, head_dim, False, (32, 4)) == \
        triton_attention._tile_config(8, head_dim, False)
