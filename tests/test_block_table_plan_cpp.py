"""The C++ planner of a2r_kernels._cpu (csrc/cpu/block_table_plan.cpp) against its numpy
reference: block_table_tree against block_table_nodes_numpy on random tables (shared prefixes,
block ids repeated at other positions and read to other lengths, empty rows, empty batches);
the incremental planner's C++ step (append_step, advance_tails) through
tests/test_incremental_plan.py, which runs every test on both paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from a2r_kernels.block_table_tree import (block_table_nodes, block_table_nodes_numpy,
                                          planner_extension)

ext = planner_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="a2r_kernels._cpu was not built")


def _random_batch(rng, repeated: bool):
    rows, width = int(rng.integers(0, 9)), int(rng.integers(1, 8))
    block_size = int(rng.choice([1, 3, 16]))
    # Few distinct ids when repeated: one id at several positions / lengths of the batch.
    ids = int(rng.integers(1, 6)) if repeated else rows * width + 1
    tables = (rng.integers(0, ids, (rows, width)) if repeated
              else rng.permutation(ids)[:rows * width].reshape(rows, width)).astype(np.int32)
    for i in range(1, rows):            # shared prefixes, as prefix caching makes them
        j, k = int(rng.integers(0, i)), int(rng.integers(0, width + 1))
        tables[i, :k] = tables[j, :k]
    lens = rng.integers(0, width * block_size + 1, rows).astype(np.int64)
    if rows and rng.random() < 0.3:
        lens[int(rng.integers(0, rows))] = 0           # an empty row
    if rows and rng.random() < 0.3:
        lens[:] = (lens // block_size) * block_size    # full last blocks
    return tables, lens, block_size


@pytest.mark.parametrize("repeated", [False, True])
def test_block_table_tree_equals_numpy(repeated):
    rng = np.random.default_rng(24 + repeated)
    for _ in range(500):
        tables, lens, block_size = _random_batch(rng, repeated)
        expected = block_table_nodes_numpy(tables, lens, block_size)
        got = ext.block_table_tree(tables, lens, block_size)
        assert tuple(got) == tuple(expected), (tables, lens, block_size)
        assert tuple(block_table_nodes(tables, lens, block_size)) == tuple(expected)


def test_block_table_tree_vllm_shape():
    """A 64 x 520 batch of groups sharing prompt blocks (the benchmark's shape)."""
    rng = np.random.default_rng(0)
    rows, width, block_size = 64, 520, 16
    ids = rng.permutation(rows * width).astype(np.int32)
    tables = ids[:rows * width].reshape(rows, width).copy()
    for first in range(0, rows, 16):
        tables[first:first + 16, :500] = tables[first, :500]
    lens = (width * block_size - np.arange(rows) % block_size).astype(np.int64)
    assert tuple(ext.block_table_tree(tables, lens, block_size)) == \
        tuple(block_table_nodes_numpy(tables, lens, block_size))


def test_block_table_tree_negative_id_goes_to_the_reference_error():
    tables = np.array([[1, 2], [1, -3]], dtype=np.int32)
    lens = np.array([20, 20], dtype=np.int64)
    assert tuple(ext.block_table_tree(tables, lens, 16)) == (1,)   # the row, for the error
    with pytest.raises(ValueError, match=r"block_tables\[1\] holds a negative block id"):
        block_table_nodes(tables, lens, 16)


def test_planner_arrays_are_checked():
    tables = np.zeros((2, 3), dtype=np.int32)
    with pytest.raises(ValueError, match="lens must be a C-contiguous int64"):
        ext.block_table_tree(tables, np.zeros(2, dtype=np.int32), 4)
    with pytest.raises(ValueError, match="tables must be a C-contiguous int32"):
        ext.block_table_tree(np.zeros((2, 6), dtype=np.int32)[:, ::2], np.zeros(2, np.int64), 4)
    with pytest.raises(ValueError, match="a block id outside in_use"):
        ext.mark_used_blocks(np.full((2, 3), 5, dtype=np.int32), np.full(2, 4, dtype=np.int64),
                             4, np.zeros(5, dtype=bool))
