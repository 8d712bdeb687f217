"""Transparent huge pages for the host KV pools the CPU tree attention reads.

Per KV head, a decode step reads the ``D``-element row of every token. In our pool
``[blocks, block_size, Hkv, D]`` one head's rows of consecutive tokens lie ``Hkv * D`` elements
apart: at ``Hkv * D * itemsize >= 4 KiB`` each token's row sits on its own 4 KiB page, so one
pass over a 4k-token prompt touches thousands of pages for its keys and as many for its values,
far more than the data TLB maps, and the kernel's loads and prefetches wait on page walks. Backed
by 2 MiB pages the same pool needs 512 times fewer translations.

Linux only. Elsewhere, for device tensors, or where the kernel refuses (transparent huge pages
set to ``never``, no huge page free), these calls leave the memory as it is and return False:
the page size changes, the contents and addresses never do.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20   # x86-64 and arm64 (4 KiB base pages) PMD-sized transparent pages
MADV_HUGEPAGE = 14          # <linux/mman.h>: back the range with huge pages as it faults in


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """``madvise(MADV_HUGEPAGE)`` over the 2 MiB pages that lie wholly inside ``tensor``'s storage
    (a host tensor, contiguous or not: its whole untyped storage). Returns True when the kernel
    accepted the advice for a non-empty range. It takes effect on pages not yet faulted in, so
    call it before the memory is first written (:func:`zeros_huge`)."""
    if sys.platform != "linux" or tensor.device.type != "cpu":
        return False
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    end = start + storage.nbytes()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if last <= first:
        return False
    return _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                          MADV_HUGEPAGE) == 0


def zeros_huge(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``; on the host, advised to huge pages
    before it is zeroed (so the zeroing faults it in as 2 MiB pages where the OS has them)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(tensor)
    return tensor.zero_()
