"""Helpers shared by the TreeKVCache tests: a small cache, per-token values, appends and
read-back checks against a plain-Python model of each sequence's tokens.
"""

import torch

import a2r_kernels as ak


HEADS, DIM = 2, 3   # odd, small: the pool is tiny and every element is checked


def make_cache(num_blocks=16, block_size=4, num_layers=2, dtype=torch.float32, device="cpu"):
    return ak.TreeKVCache(num_layers, HEADS, DIM, num_blocks, block_size=block_size, dtype=dtype,
                          device=device)


def token_kv(values, dtype=torch.float32, device="cpu"):
    """K and V rows ``[T, HEADS, DIM]`` that encode one value per token (V = -K)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    grid = torch.arange(HEADS * DIM, dtype=torch.float32).view(1, HEADS, DIM) / 8
    k = (values.view(-1, 1, 1) + grid).to(dtype=dtype, device=device)
    return k, -k


def append(cache, seqs, values_per_seq, model=None):
    """reserve + write one token block per seq; ``values_per_seq[i]`` lists seq i's new values."""
    num_tokens = len(values_per_seq[0]) if values_per_seq else 0
    slots = cache.reserve(seqs, num_tokens=num_tokens)
    flat = [v for vals in values_per_seq for v in vals]
    for layer in range(cache.num_layers):
        k, v = token_kv([x + 1000 * layer for x in flat], cache.dtype, cache.device)
        cache.write(layer, slots, k, v)
    if model is not None:
        for seq, vals in zip(seqs, values_per_seq):
            model[seq] = model[seq] + list(vals)
    return slots


def assert_reads_back(cache, seq, expected_values):
    assert cache.length(seq) == len(expected_values)
    for layer in range(cache.num_layers):
        k, v = cache.gather(layer, seq)
        exp_k, exp_v = token_kv([x + 1000 * layer for x in expected_values], cache.dtype,
                                cache.device)
        assert k.dtype == cache.dtype and k.shape == (len(expected_values), HEADS, DIM)
        torch.testing.assert_close(k, exp_k, rtol=0, atol=0)
        torch.testing.assert_close(v, exp_v, rtol=0, atol=0)
