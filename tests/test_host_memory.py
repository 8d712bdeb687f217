"""Transparent huge pages for host KV pools (a2r_kernels.host_memory)."""

import sys
from pathlib import Path

import pytest
import torch

from a2r_kernels.host_memory import HUGE_PAGE_BYTES, advise_huge_pages, zeros_huge

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not set to 'never'")


def huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:   # a mapping's header: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@needs_thp
def test_zeros_huge_is_zeros_on_huge_pages():
    t = zeros_huge((5, 3 << 20), torch.float32, "cpu")   # 60 MiB, odd leading size
    assert t.shape == (5, 3 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    assert not t.any()
    assert huge_kib_at(t.data_ptr() + t.nbytes // 2) >= HUGE_PAGE_BYTES // 1024


@needs_thp
def test_cpu_tree_kv_cache_pools_are_on_huge_pages():
    import a2r_kernels as ak

    cache = ak.TreeKVCache(2, 8, 128, 300, block_size=16, dtype=torch.float32)   # 2 x 39 MB
    for pool in (cache.k_pool, cache.v_pool):
        assert not pool.any()
        assert huge_kib_at(pool.data_ptr() + pool.nbytes // 2) >= HUGE_PAGE_BYTES // 1024


def test_advise_leaves_small_and_empty_tensors_alone():
    assert advise_huge_pages(torch.zeros(1000)) is False        # no whole 2 MiB page inside
    assert advise_huge_pages(torch.zeros(0)) is False
    assert not zeros_huge((0, 4), torch.bfloat16, "cpu").numel()
