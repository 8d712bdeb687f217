"""The explorer: unmodified transformers models over the tree-shared cache, and a2r.sample_parallel.

Tiny random-init Qwen3 and Llama models with GQA (4 q heads, 2 kv heads) are saved with
save_pretrained and reloaded with from_pretrained, as a user's checkpoint would be. References are
the models' own ``generate`` and full (non-cached) forwards. Triton runs in its CPU interpreter
(TRITON_INTERPRET=1, set before anything imports triton).
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.logits_process import (TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)

import a2r  # noqa: E402
import a2r_kernels as ak  # noqa: E402
import a2r_kernels.hf as akhf  # noqa: E402
from a2r.explore import explore, tree_blocks_needed  # noqa: E402
from a2r.sampling import sample_tokens, warp_logits  # noqa: E402
from _helpers import ForwardLog  # noqa: E402

from _explore_helpers import TINY, VOCAB, _dense_next_logits, _generate, _prompt  # noqa: E402
from _explore_helpers import model, qwen3  # noqa: E402, F401 (fixtures, found by name)


# ---------------------------------------------------------------------------- greedy == generate
@pytest.mark.parametrize("prompt_len,block_size", [(1, 16), (17, 16), (21, 4), (16, 8)])
def test_greedy_branches_equal_generate(model, prompt_len, block_size):
    ids = _prompt(prompt_len, seed=prompt_len)
    expected = _generate(model, ids, 12)
    seqs = a2r.sample_parallel(model, ids, 3, 12, temperature=0, eos_token_id=[],
                               block_size=block_size)
    assert len(seqs) == 3
    assert all(s == expected for s in seqs), (seqs, expected)


def test_qwen2_greedy_equals_generate(tmp_path):
    """Qwen2 style (q/k/v biases, no q/k norms) through the same path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(7)
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="a2r_tree").eval()
    ids = _prompt(19, seed=19)
    expected = _generate(model, ids, 8)
    assert a2r.sample_parallel(model, ids, 2, 8, temperature=0, eos_token_id=[],
                               block_size=8) == [expected] * 2


def test_top_k_one_equals_greedy(qwen3):
    ids = _prompt(9, seed=3)
    expected = _generate(qwen3, ids, 10)
    seqs = a2r.sample_parallel(qwen3, ids, 4, 10, temperature=0.8, top_k=1, seed=5, eos_token_id=[])
    assert all(s == expected for s in seqs)


def test_zero_new_tokens(qwen3):
    assert a2r.sample_parallel(qwen3, _prompt(5), 2, 0) == [[], []]


# ---------------------------------------------------------------------------- cache correctness
def test_tree_logits_match_dense_forward(model):
    """Every branch's decode logits equal a full forward over prompt + its own tokens, through a
    fork of the prompt, a second-level fork, and a multi-token extend of a forked branch."""
    ids = _prompt(13, seed=7)
    prompt = ids[0].tolist()
    dec = akhf.TreeDecoder(model, num_blocks=64, block_size=4, backend="torch")
    root, logits = dec.prefill(ids)
    torch.testing.assert_close(logits[0], _dense_next_logits(model, prompt), atol=1e-4, rtol=1e-4)
    kids = dec.fork(root, 3)
    history = {k: list(prompt) for k in kids}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        toks = torch.randint(0, VOCAB, (len(kids),), generator=g)
        logits = dec.step(kids, toks)
        for k, t in zip(kids, toks.tolist()):
            history[k].append(t)
    for row, k in enumerate(kids):
        torch.testing.assert_close(logits[row], _dense_next_logits(model, history[k]),
                                   atol=1e-4, rtol=1e-4)
    # Second level: fork branch 1 into 2, extend one grandchild by 3 tokens (causal over its path),
    # step the other and branch 0 together in one batch.
    grand = dec.fork(kids[1], 2)
    history[grand[0]] = history[kids[1]] + [5, 6, 7]
    history[grand[1]] = history[kids[1]] + [9]
    history[kids[0]] = history[kids[0]] + [11]
    ext = dec.extend([grand[0]], torch.tensor([[5, 6, 7]]))
    torch.testing.assert_close(ext[0], _dense_next_logits(model, history[grand[0]]),
                               atol=1e-4, rtol=1e-4)
    step = dec.step([grand[1], kids[0]], torch.tensor([9, 11]))
    for row, seq in enumerate([grand[1], kids[0]]):
        torch.testing.assert_close(step[row], _dense_next_logits(model, history[seq]),
                                   atol=1e-4, rtol=1e-4)
    assert dec.length(grand[0]) == len(history[grand[0]])


def test_pool_narrower_than_the_model(qwen3):
    """TreeDecoder(dtype=bfloat16) under an fp32 model: K/V are stored in bf16 and decode runs
    (q is cast to the pool's dtype), close to the fp32 pool and to a dense forward."""
    ids = _prompt(10, seed=3)
    tokens = [torch.tensor([5, 9, 2]), torch.tensor([7, 7, 1])]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        dec = akhf.TreeDecoder(qwen3, 16, block_size=4, backend="torch", dtype=dtype)
        assert dec.cache.dtype == dtype
        root, _ = dec.prefill(ids)
        kids = dec.fork(root, 3)
        for step_tokens in tokens:
            logits[dtype] = dec.step(kids, step_tokens)
    assert logits[torch.bfloat16].dtype == torch.float32
    dense = _dense_next_logits(qwen3, ids[0].tolist() + [9, 7])
    torch.testing.assert_close(logits[torch.float32][1], dense, atol=1e-4, rtol=1e-4)
    # bf16 K/V: a relative rounding of 2^-8 per element, far below the logits' spread.
    scale = dense.abs().max().item()
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32],
                               atol=0.05 * scale, rtol=0)


def test_failed_forward_gives_its_tokens_back(qwen3):
    """A forward that raises after its slots were reserved (e.g. out of memory) leaves the
    sequences and the pool as before: a retry decodes as if the failure never happened."""
    ids = _prompt(7, seed=4)
    dec = akhf.TreeDecoder(qwen3, 16, block_size=2, backend="torch")
    root, _ = dec.prefill(ids)
    kids = dec.fork(root, 2)
    for t in ([1, 2], [3, 4]):   # each kid now fills one block: the next token needs a new one
        dec.step(kids, torch.tensor(t))
    lengths, free = [dec.length(k) for k in kids], dec.cache.num_free_blocks

    def fail(module, args):
        raise RuntimeError("simulated out of memory")

    for failing in (lambda: dec.step(kids, torch.tensor([5, 6])),
                    lambda: dec.extend(kids, torch.tensor([[5, 6, 7], [8, 9, 10]]))):
        handle = qwen3.model.layers[-1].register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                failing()
        finally:
            handle.remove()
        assert [dec.length(k) for k in kids] == lengths
        assert dec.cache.num_free_blocks == free
    retry = dec.step(kids, torch.tensor([5, 6]))
    for row in range(2):
        expected = _dense_next_logits(qwen3, ids[0].tolist() + [1 + row, 3 + row, 5 + row])
        torch.testing.assert_close(retry[row], expected, atol=1e-4, rtol=1e-4)


def test_triton_backend_equals_generate(qwen3):
    ids = _prompt(11, seed=11)
    expected = _generate(qwen3, ids, 6)
    seqs = a2r.sample_parallel(qwen3, ids, 3, 6, temperature=0, eos_token_id=[], block_size=4,
                               backend="triton")
    assert all(s == expected for s in seqs)


# ---------------------------------------------------------------------------- sampling
def test_seeded_sampling_reproducible_and_branches_differ(model):
    ids = _prompt(17, seed=2)
    a = a2r.sample_parallel(model, ids, 4, 10, temperature=1.0, seed=123, eos_token_id=[])
    b = a2r.sample_parallel(model, ids, 4, 10, temperature=1.0, seed=123, eos_token_id=[])
    c = a2r.sample_parallel(model, ids, 4, 10, temperature=1.0, seed=124, eos_token_id=[])
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) == 4, a
    assert all(len(s) == 10 for s in a)
    assert all(0 <= t < VOCAB for s in a for t in s)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.5, 7, 0.6), (1.0, 1000, 0.999)])
def test_warp_logits_matches_transformers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    logits = torch.randn(6, 37, generator=g) * 3
    logits[0, :4] = logits[0, 4]                 # ties at the k-th value are kept by both
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    before = logits.clone()
    torch.testing.assert_close(warp_logits(logits, temperature, top_k, top_p), expected)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.7, 5, 0.9, 0.3),
                                                           (1.3, 0, 1.0, 1.0)])
def test_min_p_matches_transformers(temperature, top_k, top_p, min_p):
    """min-p after temperature, top-k and top-p, as transformers' warpers chain them."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(5, 41, generator=torch.Generator().manual_seed(7)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    expected = MinPLogitsWarper(min_p)(None, expected)
    warped = warp_logits(logits, temperature, top_k, top_p, min_p)
    torch.testing.assert_close(warped, expected)
    assert (warped.isinf().sum(-1) > warp_logits(logits, temperature, top_k, top_p)
            .isinf().sum(-1)).any()   # min-p removed tokens the others kept


def test_min_p_flows_through_sample_parallel(qwen3):
    """SamplingParams.min_p reaches the explorer's sampler: min_p=1 keeps only the most likely
    token, so sampling at any temperature is greedy."""
    from a2r.sampling import SamplingParams

    ids = torch.tensor([[1, 5, 9, 2, 7]])
    sample_parallel = a2r.sample_parallel
    greedy = sample_parallel(qwen3, ids, 3, 6, temperature=0, eos_token_id=[])
    for sampling in (SamplingParams(temperature=1.5, min_p=1.0),):
        assert sample_parallel(qwen3, ids, 3, 6, sampling, seed=0, eos_token_id=[]) == greedy
    hot = sample_parallel(qwen3, ids, 3, 6, temperature=1.5, seed=0, eos_token_id=[])
    assert hot != greedy   # without min-p the same draws leave the greedy path
    with pytest.raises(ValueError, match="min_p"):
        sample_parallel(qwen3, ids, 1, 2, min_p=1.5)
    with pytest.raises(ValueError, match="not both"):
        sample_parallel(qwen3, ids, 1, 2, SamplingParams(), temperature=0)
    with pytest.raises(TypeError, match="min_q"):
        sample_parallel(qwen3, ids, 1, 2, min_q=0.5)


def test_sample_tokens_draws_from_the_warped_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5]]).expand(40000, -1)
    probs = torch.softmax(warp_logits(logits[:1], 0.8, 4, 0.9), dim=-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits, temperature=0.8, top_k=4, top_p=0.9, generator=g)
    freq = torch.bincount(draws, minlength=7).float() / draws.numel()
    assert (freq[probs == 0] == 0).all()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)   # 40k draws: std < 0.0025
    assert torch.equal(sample_tokens(logits[:3], temperature=0), logits[:3].argmax(-1))


# ---------------------------------------------------------------------------- stopping
def test_eos_truncates_like_generate(model):
    ids = _prompt(17, seed=4)
    free_run = _generate(model, ids, 16)
    # An eos id greedy really produces, first at a position > 0, so truncation is visible.
    pos = next(i for i in range(3, 16) if free_run[i] not in free_run[:i])
    eos = free_run[pos]
    expected = _generate(model, ids, 16, eos_token_id=eos)
    assert expected == free_run[:pos + 1]
    assert a2r.sample_parallel(model, ids, 2, 16, temperature=0, eos_token_id=eos) == [expected] * 2
    # several eos ids, and the model's generation_config as the default
    never = next(t for t in range(VOCAB) if t not in free_run)
    assert a2r.sample_parallel(model, ids, 2, 16, temperature=0,
                               eos_token_id=[never, eos]) == [expected] * 2
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [never, eos]
    try:
        assert a2r.sample_parallel(model, ids, 1, 16, temperature=0) == [expected]
    finally:
        model.generation_config.eos_token_id = saved


def test_sampled_branches_stop_at_eos_independently(qwen3):
    ids = _prompt(6, seed=8)
    free = a2r.sample_parallel(qwen3, ids, 6, 12, temperature=1.0, seed=9, eos_token_id=[])
    eos = free[0][4]
    got = a2r.sample_parallel(qwen3, ids, 6, 12, temperature=1.0, seed=9, eos_token_id=eos)
    for full, cut in zip(free, got):   # same seed: same draws until a branch stops
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:stop]
    assert len(got[0]) == 5


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {chars[i % len(chars)] * (1 + i // len(chars)): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one char each
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stop_strings_like_generate(qwen3):
    tokenizer = _char_tokenizer()
    ids = _prompt(9, seed=0)
    free_run = _generate(qwen3, ids, 20)
    text = tokenizer.decode(free_run)
    # A stop string that starts inside one token and ends inside a later one.
    first = len(tokenizer.decode(free_run[:5]))
    stop = text[first - 1:first + 2]
    expected = _generate(qwen3, ids, 20, stop_strings=[stop], tokenizer=tokenizer)
    assert len(expected) < 20
    got = a2r.sample_parallel(qwen3, ids, 2, 20, temperature=0, eos_token_id=[],
                              stop_strings=[stop], tokenizer=tokenizer)
    assert got == [expected] * 2


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize("prompt_len,block_size", [(17, 4), (16, 8), (1, 16)])
def test_blocks_used_formula(qwen3, prompt_len, block_size):
    """blocks used = ceil(P / bs) + sum over branches ceil(S_i / bs): the prompt is stored once."""
    dec = akhf.TreeDecoder(qwen3, num_blocks=200, block_size=block_size, backend="torch")
    root, _ = dec.prefill(_prompt(prompt_len))
    assert dec.cache.blocks_used() == math.ceil(prompt_len / block_size)
    kids = dec.fork(root, 4)
    stored = {k: 0 for k in kids}
    live = list(kids)
    for step in range(11):
        live = [k for i, k in enumerate(kids) if step < (3, 11, 7, 0)[i]]   # S_i = 3, 11, 7, 0
        if live:
            dec.step(live, torch.zeros(len(live), dtype=torch.long))
            for k in live:
                stored[k] += 1
    expected = math.ceil(prompt_len / block_size) + sum(math.ceil(s / block_size) for s in stored.values())
    assert dec.cache.blocks_used() == expected
    assert dec.peak_kv_bytes == expected * dec.bytes_per_block
    for k in kids:
        dec.free(k)
    dec.free(root)
    assert dec.cache.blocks_used() == 0


def test_default_pool_is_exact_and_peak_matches_formula(qwen3):
    ids = _prompt(21)
    res = explore(qwen3, ids, [5], 14, temperature=1.0, seed=0, eos_token_id=[], block_size=4)
    expected = math.ceil(21 / 4) + 5 * math.ceil(13 / 4)
    assert res.num_blocks == expected == tree_blocks_needed(21, [5], [14], 4)
    assert res.peak_blocks_used == expected
    assert res.decode_steps == 13
    with pytest.raises(ak.CacheFullError):
        explore(qwen3, ids, [5], 14, temperature=1.0, seed=0, eos_token_id=[], block_size=4,
                num_blocks=expected - 1)


# ---------------------------------------------------------------------------- multi-level
def test_multilevel_greedy_leaves_equal_generate(model):
    ids = _prompt(10, seed=5)
    expected = _generate(model, ids, 9)
    leaves = explore(model, ids, [2, 3], [4, 5], temperature=0, eos_token_id=[],
                     block_size=4).sequences
    assert leaves == [expected] * 6


def test_multilevel_sampled_tree_structure(qwen3):
    ids = _prompt(10, seed=6)
    res = explore(qwen3, ids, [2, 3], [4, 5], temperature=1.0, seed=1, eos_token_id=[], block_size=4)
    leaves = res.sequences
    assert len(leaves) == 6 and all(len(s) == 9 for s in leaves)
    for parent in range(2):
        group = leaves[3 * parent:3 * parent + 3]
        assert len({tuple(s[:4]) for s in group}) == 1          # shared first level
        assert len({tuple(s[4:]) for s in group}) == 3          # distinct second level
    assert leaves[0][:4] != leaves[3][:4]
    assert res.peak_blocks_used == tree_blocks_needed(10, [2, 3], [4, 5], 4) == res.num_blocks


def test_every_branch_stopping_before_the_last_level_returns_them_as_leaves(model):
    """Greedy branches all stop at level 0 (EOS = the first greedy token): no level 1 runs."""
    ids = _prompt(10, seed=5)
    first = _generate(model, ids, 1)[0]
    res = explore(model, ids, [2, 2], [3, 3], temperature=0, eos_token_id=first, block_size=4)
    assert res.sequences == [[first]] * 2 and res.stopped == [True, True]
    assert res.decode_steps == 0
    # A stop at the second token of level 0: one decode step, still two leaves.
    second = _generate(model, ids, 2)[1]
    assert second != first   # else the stop would fire at the first token again
    res = explore(model, ids, [2, 2], [3, 3], temperature=0, eos_token_id=second, block_size=4)
    assert res.sequences == [[first, second]] * 2 and res.decode_steps == 1


# ---------------------------------------------------------------------------- prefix reuse
def test_prefill_reuses_cached_blocks_and_matches_a_fresh_prefill(model):
    """A prompt sharing 80 of 110 tokens with a live one forwards and stores only its other 30;
    a just-freed prompt re-prefilled takes at most one new block; logits equal a fresh prefill's
    and greedy decoding from the reused prompt equals generate."""
    bs = 16
    first = _prompt(110, seed=21)
    second = torch.cat([first[:, :80], _prompt(30, seed=22)], dim=1)
    dec = akhf.TreeDecoder(model, num_blocks=24, block_size=bs, backend="torch")
    a, _ = dec.prefill(first)
    free = dec.cache.num_free_blocks
    with ForwardLog(model) as log:
        b, logits = dec.prefill(second)
    assert log.shapes == [(1, 30)] and dec.reused_tokens == 80
    assert free - dec.cache.num_free_blocks == math.ceil(30 / bs)
    fresh = akhf.TreeDecoder(model, num_blocks=24, block_size=bs, backend="torch")
    torch.testing.assert_close(logits, fresh.prefill(second)[1], atol=1e-5, rtol=1e-5)
    dec.free(a)
    dec.free(b)
    assert dec.cache.blocks_used() == 0
    with ForwardLog(model) as log:
        c, logits = dec.prefill(first)
    # 6 cached blocks reused (no eviction: 24 - 9 blocks were never keyed), one new block.
    assert log.shapes == [(1, 110 - 96)] and dec.cache.blocks_used() == 7
    torch.testing.assert_close(logits, fresh.prefill(first)[1], atol=1e-5, rtol=1e-5)
    dec.free(c)
    res = explore(dec, first, [2], 6, temperature=0, eos_token_id=[])
    assert res.sequences == [_generate(model, first, 6)] * 2


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises(qwen3):
    ids = _prompt(5)
    with pytest.raises(ValueError, match="input_ids"):
        a2r.sample_parallel(qwen3, ids[0], 2, 4)
    with pytest.raises(ValueError, match="input_ids"):
        a2r.sample_parallel(qwen3, torch.cat([ids, ids]), 2, 4)
    with pytest.raises(ValueError, match="n must"):
        a2r.sample_parallel(qwen3, ids, 0, 4)
    with pytest.raises(ValueError, match="temperature"):
        a2r.sample_parallel(qwen3, ids, 2, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        a2r.sample_parallel(qwen3, ids, 2, 4, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        a2r.sample_parallel(qwen3, ids, 2, 4, top_k=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        a2r.sample_parallel(qwen3, ids, 2, 4, stop_strings=["x"])
    with pytest.raises(ak.BackendUnavailable):
        a2r.sample_parallel(qwen3, ids, 2, 4, backend="cuda")
    dec = akhf.TreeDecoder(qwen3, num_blocks=8, block_size=4, backend="torch")
    with pytest.raises(ValueError, match="token_ids"):
        dec.step([dec.new_sequence()], torch.zeros(2, dtype=torch.long))


def test_token_ids_outside_the_vocabulary_raise_value_error(qwen3):
    """An id outside [0, VOCAB) is a ValueError naming the argument (not torch's IndexError from
    the embedding), raised before anything changes: no sequence, token or planned step left."""
    dec = akhf.TreeDecoder(qwen3, num_blocks=16, block_size=4, backend="torch")
    assert dec.vocab_size == VOCAB
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\)"):
            dec.prefill(torch.tensor([5, bad, 2]))
    assert dec.cache.blocks_used() == 0
    root, _ = dec.prefill(torch.tensor([5, 9, 2, 7, 1]))
    seq = dec.fork(root, 1)[0]
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        dec.prefill(torch.tensor([[3, VOCAB + 7]]), seq=seq)
    with pytest.raises(ValueError, match="token_ids must be token ids"):
        dec.extend([seq], torch.tensor([[3, VOCAB]]))
    with pytest.raises(ValueError, match="token_ids must be token ids"):
        dec.step([seq], torch.tensor([VOCAB]))
    assert dec.length(seq) == 5 and dec.planned_step is None
    dec.plan_step([seq])
    with pytest.raises(ValueError, match="token_ids must be token ids"):
        dec.run_step(torch.tensor([[-3]]))
    assert dec.planned_step == [seq]          # the plan stays: run it with valid tokens
    dec.run_step(torch.tensor([4]))
    assert dec.length(seq) == 6
    ids = _prompt(5)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        a2r.sample_parallel(qwen3, torch.cat([ids, torch.tensor([[VOCAB]])], dim=1), 2, 4)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        explore(dec, torch.tensor([[1, -2]]), [2], 3, parent=seq, keep_parent=True)
    assert dec.length(seq) == 6               # the parent is untouched, still alive
    with pytest.raises(ValueError, match="device must be a torch device"):
        ak.TreeLayout.from_paths([[0]], [[0]], [3], 4, device="bogus")
    with pytest.raises(ValueError, match="device must be a torch device"):
        ak.TreeLayout.from_block_tables([[0]], [3], 4, device="bogus")


def test_model_stays_usable_with_generate(qwen3):
    """Outside a TreeDecoder forward, 'a2r_tree' is transformers' SDPA attention (padding included)."""
    ids = _prompt(8, seed=9)
    ours = _generate(qwen3, ids, 6)
    qwen3.config._attn_implementation = "sdpa"
    try:
        assert _generate(qwen3, ids, 6) == ours
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
        sdpa_padded = _generate(qwen3, padded, 6, attention_mask=mask)
    finally:
        qwen3.config._attn_implementation = akhf.ATTN_IMPLEMENTATION
    assert _generate(qwen3, padded, 6, attention_mask=mask) == sdpa_padded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stop_reads_through_the_pinned_buffer(qwen3):
    """On CUDA the per-step stop check reads the tokens through _TokenReader's pinned buffer:
    greedy branches with an EOS still equal generate's, cut at the EOS."""
    model = qwen3.to("cuda")
    try:
        ids = _prompt(11, seed=4).cuda()
        expected = _generate(model, ids, 9)
        eos = expected[4]
        seqs = a2r.sample_parallel(model, ids, 3, 9, temperature=0, eos_token_id=eos)
        assert seqs == [expected[:expected.index(eos) + 1]] * 3
    finally:
        qwen3.to("cpu")
