"""The explorer's decode loop: the torch backend's decode plan against tree_decode_attention, the
host reads it makes (none per step without stop conditions, one with EOS), step t + 1 planned
while step t runs, and exploration below a parent sequence of a TreeDecoder.

Tiny random-init Qwen3 and Llama models (tests/_explore_helpers.py) saved and reloaded as a
user's checkpoint would be; references are the models' own ``generate``. Triton runs in its CPU
interpreter (TRITON_INTERPRET=1, set before anything imports triton).
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import a2r  # noqa: E402
import a2r_kernels as ak  # noqa: E402
import a2r_kernels.hf as akhf  # noqa: E402
from a2r.explore import explore, tree_blocks_needed  # noqa: E402
from a2r.sampling import sample_tokens  # noqa: E402
from _helpers import ForwardLog, HostReads  # noqa: E402

from _explore_helpers import _dense_next_logits, _generate, _prompt  # noqa: E402
from _explore_helpers import model, qwen3  # noqa: E402, F401 (fixtures, found by name)


# ---------------------------------------------------------------------------- torch decode plan
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree", ["fork", "two_levels", "duplicate_rows", "empty_root"])
def test_torch_decode_plan_equals_tree_decode_attention(dtype, tree):
    """The decoder's torch decode attention (the wrapper's torch backend: one SDPA over the
    step's tokens, masked, planned once per step) equals ak.tree_decode_attention's reference on
    trees with shared nodes at several depths, a node of no tokens, repeated rows, GQA 6/2 and
    odd lengths."""
    g = torch.Generator().manual_seed(3)
    cache = ak.TreeKVCache(1, 2, 8, 64, block_size=4, dtype=dtype)
    k = torch.randn(cache.k_pool.shape, generator=g).to(dtype)
    cache.k_pool.copy_(k)
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape, generator=g).to(dtype))
    root = cache.new_sequence()
    cache.reserve([root], 0 if tree == "empty_root" else 11)
    kids = cache.fork(root, 3)
    cache.reserve(kids, 5)
    seqs = kids
    if tree == "two_levels":
        grandkids = cache.fork(kids[1], 2)
        cache.reserve(grandkids, 3)
        seqs = [kids[0], kids[2]] + grandkids
    cache.reserve(seqs, 1)
    layout = cache.layout(seqs + ([seqs[0]] if tree == "duplicate_rows" else []))
    q = torch.randn(layout.num_seqs, 6, 8, generator=g).to(dtype)
    expected = ak.tree_decode_attention(q, cache.k[0], cache.v[0], layout, sm_scale=0.3,
                                        backend="torch")
    wrapper = ak.TreeAttentionWrapper(6, 2, 8, 4, max_seqs=8, max_nodes=16,
                                      max_blocks=cache.block_table_capacity, dtype=dtype,
                                      device="cpu", backend="torch")
    wrapper.plan(layout)
    got = wrapper.run(q, cache.k[0], cache.v[0], sm_scale=0.3)
    assert got.dtype == dtype and got.shape == expected.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- host syncs
# The decoder's code path: the transformers integration, its decode attention and the cache.
_DECODER_FILES = [module.__file__ for module in (
    akhf, akhf.attention, akhf.decoder, akhf.graphs, ak.wrapper, ak.torch_decode, ak.cache,
    ak.prefix_index)]


def _loop_reads(model, ids, n, max_new_tokens, **kwargs) -> tuple[int, int, list[list[int]]]:
    """Host reads the exploration (explore.py, sampling.py, the decoder's modules, cache.py)
    makes, its decode steps, and its sequences. The prompt's one read at prefill is among
    them."""
    import a2r.explore as explore_module
    import a2r.sampling as sampling_module

    with HostReads(explore_module.__file__, sampling_module.__file__, *_DECODER_FILES) as reads:
        res = explore(model, ids, [n], max_new_tokens, backend="torch", **kwargs)
    return reads.count, res.decode_steps, res.sequences


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_host_sync_per_step_without_stop_conditions(qwen3, temperature):
    """max_new_tokens only: the steps read nothing; the tokens come back in one read."""
    ids = _prompt(11, seed=4)
    count, steps, seqs = _loop_reads(qwen3, ids, 3, 9, temperature=temperature, seed=1,
                                     eos_token_id=[])
    assert steps == 8 and count == 2   # the prompt, then the level's tokens
    assert seqs == a2r.sample_parallel(qwen3, ids, 3, 9, temperature=temperature, seed=1,
                                       eos_token_id=[])
    if temperature == 0:
        assert seqs == [_generate(qwen3, ids, 9)] * 3


def test_one_host_read_per_step_with_eos(qwen3):
    ids = _prompt(11, seed=4)
    eos = _generate(qwen3, ids, 9)[4]   # the greedy path's 5th token: stops every branch there
    count, steps, seqs = _loop_reads(qwen3, ids, 3, 9, temperature=0, eos_token_id=eos)
    assert seqs == [_generate(qwen3, ids, 9)[:seqs[0].index(eos) + 1]] * 3
    assert count <= steps + 2   # the prompt, and at most one read per sampled token


def test_prefill_reads_the_prompt_once(model):
    """prefill brings the prompt to the host once (a sync on CUDA), both to match cached blocks
    and to key its own, with and without reuse."""
    dec = akhf.TreeDecoder(model, num_blocks=16, block_size=4, backend="torch")
    ids = _prompt(23, seed=5)
    for _ in range(2):   # fresh, then reusing the first prefill's 5 whole blocks
        with HostReads(*_DECODER_FILES) as reads:
            dec.prefill(ids)
        assert reads.count == 1
    assert dec.reused_tokens == 20


# ---------------------------------------------------------------------------- step t + 1 planned during step t
class _LoopLog:
    """Records, in order, the decode loop's plan_step / drop_from_step / run_step calls and its
    stop-read waits, checking the pool's accounting at every run_step."""

    def __init__(self, monkeypatch, prompt_len: int):
        import a2r.explore as explore_module

        self.events: list[str] = []
        self.prompt_len = prompt_len
        log = self

        def recorded(cls, name, check=None):
            original = getattr(cls, name)

            def method(self, *args, **kwargs):
                if check is not None:
                    check(self)
                log.events.append(name)
                return original(self, *args, **kwargs)
            monkeypatch.setattr(cls, name, method)

        recorded(akhf.TreeDecoder, "plan_step")
        recorded(akhf.TreeDecoder, "drop_from_step")
        recorded(akhf.TreeDecoder, "run_step", check=self.check_pool)
        recorded(explore_module._TokenReader, "wait")

    def check_pool(self, dec) -> None:
        """One level below a prompt: every planned branch holds the prompt, the tokens of the
        steps run so far and its reserved slot; the pool holds those and nothing else (the
        slots of the branches that finished went back)."""
        seqs = dec.planned_step
        step = self.events.count("run_step")
        bs = dec.cache.block_size
        assert [dec.length(s) for s in seqs] == [self.prompt_len + step + 1] * len(seqs)
        assert dec.cache.sequences == sorted(seqs)
        assert dec.cache.blocks_used() == (math.ceil(self.prompt_len / bs)
                                           + len(seqs) * math.ceil((step + 1) / bs))


def _expected_events(sequences: list[list[int]], stopped: list[bool], budget: int) -> list[str]:
    """The loop's calls for branches that ended as ``sequences``: per step, plan the next step
    (if there is one) for every live branch, then wait for the step's stop read, give the slots
    of the branches that stopped back, and run the next step for the others."""
    events = []
    for step in range(budget):
        live = [i for i, seq in enumerate(sequences) if len(seq) > step]
        if not live:
            break
        feed = step < budget - 1
        done = [i for i in live if len(sequences[i]) == step + 1 and stopped[i]]
        events += ["plan_step"] * feed + ["wait"] + ["drop_from_step"] * bool(feed and done)
        events += ["run_step"] * (feed and len(done) < len(live))
    return events


def test_next_step_is_planned_before_the_stop_read_is_waited_on(qwen3, monkeypatch):
    """Step t + 1's slots are reserved and its attention planned for every live branch before
    the loop waits for step t's tokens; the branches found finished then give their slots back
    (the pool's accounting stays exact), and the sampled branches are those of a run without
    stops, cut at their EOS."""
    ids, n, budget = _prompt(10, seed=31), 6, 12
    free = a2r.sample_parallel(qwen3, ids, n, budget, temperature=1.0, seed=4, eos_token_id=[])
    eos = free[0][3]
    dec = akhf.TreeDecoder(qwen3, 64, block_size=4, backend="torch")
    log = _LoopLog(monkeypatch, ids.shape[1])
    res = explore(dec, ids, [n], budget, temperature=1.0, seed=4, eos_token_id=eos)
    for full, cut in zip(free, res.sequences):
        assert cut == full[:full.index(eos) + 1 if eos in full else budget]
    assert 0 < sum(res.stopped) < n   # some branches stop early, some run to the budget
    assert log.events == _expected_events(res.sequences, res.stopped, budget)
    assert log.events.count("drop_from_step") >= 1
    assert dec.cache.sequences == [] and dec.cache.blocks_used() == 0


def test_without_stops_steps_are_planned_and_run_with_no_read(qwen3, monkeypatch):
    ids = _prompt(9, seed=32)
    log = _LoopLog(monkeypatch, ids.shape[1])
    res = explore(qwen3, ids, [3], 7, temperature=1.0, seed=2, eos_token_id=[], block_size=4,
                  backend="torch")
    assert log.events == ["plan_step", "run_step"] * 6 and res.decode_steps == 6


def test_a_pool_that_fits_only_after_the_stops_still_suffices(qwen3):
    """The next step is reserved before the stop read; when the pool cannot hold that for every
    branch but can for the ones still alive after it, the loop reserves again after the read
    instead of failing. Greedy branches all stop at one EOS at step t, where step t + 1 would
    start a block each: the pool that the branches' tokens need is enough (the loop's peak
    with an ample pool, which held those reserved slots for a moment, is larger)."""
    ids = _prompt(7, seed=33)
    free_run = _generate(qwen3, ids, 12)
    t = next(i for i in range(2, 12, 2) if free_run[i] not in free_run[:i])   # even: bs 2
    kwargs = dict(temperature=0, eos_token_id=free_run[t], block_size=2, backend="torch")
    n, budget = 3, t + 3
    ample = explore(qwen3, ids, [n], budget, **kwargs)
    assert ample.sequences == [free_run[:t + 1]] * n and all(ample.stopped)
    # The prompt, and each branch's t stored tokens (the EOS is never fed).
    needed = math.ceil(7 / 2) + n * math.ceil(t / 2)
    assert ample.peak_blocks_used == needed + n
    res = explore(qwen3, ids, [n], budget, num_blocks=needed, **kwargs)
    assert res.sequences == ample.sequences and res.peak_blocks_used == needed
    with pytest.raises(ak.CacheFullError):
        explore(qwen3, ids, [n], budget, num_blocks=needed - 1, **kwargs)


def test_plan_step_drop_and_cancel(qwen3):
    """TreeDecoder's two-phase step: plan_step reserves and plans (CacheFullError changes
    nothing), drop_from_step gives rows back and re-plans the rest, run_step runs it, and a
    planned sequence cannot be freed, forked or extended meanwhile."""
    ids = _prompt(7, seed=34)
    dec = akhf.TreeDecoder(qwen3, 4 + 3, block_size=2, backend="torch")
    root, _ = dec.prefill(ids)                  # 4 blocks
    kids = dec.fork(root, 3)
    dec.step(kids, torch.tensor([1, 2, 3]))     # the kids' own blocks: 3, each full after 2
    dec.step(kids, torch.tensor([4, 5, 6]))
    lengths, free = [dec.length(k) for k in kids], dec.cache.num_free_blocks
    assert free == 0
    with pytest.raises(ak.CacheFullError):      # each kid's next token needs a new block
        dec.plan_step(kids)
    assert [dec.length(k) for k in kids] == lengths and dec.cache.num_free_blocks == free
    with pytest.raises(ValueError, match="no decode step is planned"):
        dec.run_step(torch.tensor([7, 8, 9]))

    dec = akhf.TreeDecoder(qwen3, 4 + 6, block_size=2, backend="torch")
    root, _ = dec.prefill(ids)
    kids = dec.fork(root, 3)
    dec.step(kids, torch.tensor([1, 2, 3]))
    dec.step(kids, torch.tensor([4, 5, 6]))
    lengths, free = [dec.length(k) for k in kids], dec.cache.num_free_blocks
    dec.plan_step(kids)
    assert dec.cache.num_free_blocks == free - 3
    with pytest.raises(ValueError, match="already planned"):
        dec.plan_step(kids[:1])
    for touch in (lambda: dec.free(kids[1]), lambda: dec.fork(kids[1], 2),
                  lambda: dec.extend([kids[1]], torch.tensor([[1, 2]]))):
        with pytest.raises(ValueError, match="planned decode step"):
            touch()
    with pytest.raises(ValueError, match="not in the planned step"):
        dec.drop_from_step([root])
    dec.drop_from_step([kids[1]])
    assert dec.cache.num_free_blocks == free - 2 and dec.length(kids[1]) == lengths[1]
    with pytest.raises(ValueError, match="token_ids"):
        dec.run_step(torch.tensor([7, 8, 9]))      # two rows are planned now
    logits = dec.run_step(torch.tensor([7, 9]))
    prompt = ids[0].tolist()
    for row, (kid, tokens) in enumerate(((kids[0], [1, 4, 7]), (kids[2], [3, 6, 9]))):
        torch.testing.assert_close(logits[row], _dense_next_logits(qwen3, prompt + tokens),
                                   atol=1e-4, rtol=1e-4)
    dec.plan_step(kids)
    assert dec.planned_step == kids
    with pytest.raises(ValueError, match="planned decode step"):   # the caller's plan stays
        explore(dec, ids, [2], 3)
    assert dec.planned_step == kids
    dec.cancel_step()
    assert dec.planned_step is None
    assert [dec.length(k) for k in kids] == [lengths[0] + 1, lengths[1], lengths[2] + 1]
    assert dec.cache.num_free_blocks == free - 2
    dec.drop_from_step([])   # nothing planned, nothing to drop
    for kid in kids:
        dec.free(kid)
    dec.free(root)
    assert dec.cache.blocks_used() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_plan_run_and_sample_never_sync(qwen3):
    """On CUDA, planning a step (reserve, layout, wrapper plan, static buffers), dropping rows
    from it, running it (graph replay) and sampling issue no synchronising CUDA call, so the
    host can plan step t + 1 while step t runs. torch's sync debug mode raises on any."""
    model = qwen3.to("cuda")
    try:
        dec = akhf.TreeDecoder(model, 64, block_size=4)
        root, logits = dec.prefill(_prompt(11, seed=35).cuda())
        kids = dec.fork(root, 4)
        generator = torch.Generator(device="cuda").manual_seed(0)
        tokens = sample_tokens(logits.expand(4, -1), temperature=1.0, generator=generator)
        for _ in range(3):   # the first step of the bucket captures its graph (that syncs)
            logits = dec.step(kids, tokens)
            tokens = sample_tokens(logits, temperature=1.0, generator=generator)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                dec.plan_step(kids)
                logits = dec.run_step(tokens)
                tokens = sample_tokens(logits, temperature=1.0, generator=generator)
            dec.plan_step(kids)
            dec.drop_from_step([kids[3]])   # 3 rows: the same batch bucket, no new capture
            logits = dec.run_step(tokens[:3])
            tokens = sample_tokens(logits, temperature=1.0, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert tokens.shape == (3,)
    finally:
        qwen3.to("cpu")


# ---------------------------------------------------------------------------- parent sequences
@pytest.mark.parametrize("shared,block_size", [(1, 4), (9, 4), (8, 8), (13, 16)])
def test_explore_below_a_parent_equals_generate(model, shared, block_size):
    """Two prompts that share a prefix: the prefix is prefilled once as a parent, each prompt's
    rest is appended to a fork of it, and greedy branches equal generate on the whole prompt.
    Only the rest is forwarded; the pool holds exactly the parent + one exploration at a time."""
    first, second = _prompt(21, seed=shared), _prompt(17, seed=shared + 50)
    second[:, :shared] = first[:, :shared]
    parent_blocks = math.ceil(shared / block_size)
    need = max(tree_blocks_needed(21 - shared, [3], [8], block_size),
               tree_blocks_needed(17 - shared, [2], [8], block_size))
    dec = akhf.TreeDecoder(model, parent_blocks + need, block_size=block_size, backend="torch")
    parent, _ = dec.prefill(first[:, :shared])
    with ForwardLog(model) as log:
        res = explore(dec, first[:, shared:], [3], 8, parent=parent, keep_parent=True,
                      temperature=0, eos_token_id=[])
    assert res.sequences == [_generate(model, first, 8)] * 3
    assert log.shapes[0] == (1, 21 - shared) and all(t == 1 for _, t in log.shapes[1:])
    assert res.reused_prefix_tokens == shared and res.prompt_len == 21 - shared
    assert res.peak_blocks_used <= parent_blocks + need == res.num_blocks
    assert dec.cache.sequences == [parent] and dec.cache.blocks_used() == parent_blocks
    res = explore(dec, second[:, shared:], [2], 8, parent=parent, temperature=0,
                  eos_token_id=[])                  # keep_parent=False: freed
    assert res.sequences == [_generate(model, second, 8)] * 2
    assert dec.cache.sequences == [] and dec.cache.blocks_used() == 0


def test_explore_below_a_parent_samples_like_a_fresh_prefill(qwen3):
    ids = _prompt(19, seed=12)
    fresh = a2r.sample_parallel(qwen3, ids, 4, 9, temperature=1.0, seed=3, eos_token_id=[])
    dec = akhf.TreeDecoder(qwen3, 32, block_size=4, backend="torch")
    parent, _ = dec.prefill(ids[:, :7])
    res = explore(dec, ids[:, 7:], [4], 9, parent=parent, temperature=1.0, seed=3,
                  eos_token_id=[])
    assert res.sequences == fresh and len({tuple(s) for s in fresh}) > 1


@pytest.mark.parametrize("keep_parent", [True, False])
def test_explore_frees_its_sequences_when_the_pool_is_full(qwen3, keep_parent):
    ids = _prompt(15, seed=13)
    need = math.ceil(6 / 4) + tree_blocks_needed(9, [3], [10], 4)
    dec = akhf.TreeDecoder(qwen3, need - 1, block_size=4, backend="torch")
    parent, _ = dec.prefill(ids[:, :6])
    with pytest.raises(ak.CacheFullError):
        explore(dec, ids[:, 6:], [3], 10, parent=parent, keep_parent=keep_parent,
                temperature=0, eos_token_id=[])
    assert dec.cache.sequences == ([parent] if keep_parent else [])
    assert dec.cache.blocks_used() == (2 if keep_parent else 0)


def test_explore_in_a_decoder_bad_input(qwen3):
    ids = _prompt(6)
    dec = akhf.TreeDecoder(qwen3, 16, block_size=4, backend="torch")
    parent, _ = dec.prefill(ids)
    with pytest.raises(ValueError, match="parent needs a TreeDecoder"):
        explore(qwen3, ids, [2], 3, parent=parent)
    with pytest.raises(ValueError, match="keep_parent=True needs parent"):
        explore(dec, ids, [2], 3, keep_parent=True)
    # A decoder's pool, block size and backend are its own: giving one is an error, not ignored.
    for name, value in (("num_blocks", 64), ("block_size", 8), ("backend", "torch")):
        with pytest.raises(ValueError, match=f"{name} must not be given with a TreeDecoder"):
            explore(dec, ids, [2], 3, **{name: value})
        with pytest.raises(ValueError, match=f"{name} must not be given with a TreeDecoder"):
            a2r.sample_parallel(qwen3, ids, 2, 3, decoder=dec, **{name: value})
    with pytest.raises(ValueError, match="decoder must be an a2r_kernels.hf.TreeDecoder over model"):
        a2r.sample_parallel(torch.nn.Linear(2, 2), ids, 2, 3, decoder=dec)
    with pytest.raises(ValueError, match="decoder must be an a2r_kernels.hf.TreeDecoder over model"):
        a2r.sample_parallel(qwen3, ids, 2, 3, decoder=qwen3)
    with pytest.raises(ValueError, match="input_ids"):
        explore(dec, ids[:, :0], [2], 3, parent=parent, keep_parent=True)
    with pytest.raises(ValueError, match="widths"):
        explore(dec, ids, [2, 0], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        explore(dec, ids, [2, 2], [3])
    with pytest.raises(ValueError, match="max_new_tokens"):
        explore(dec, ids, [2, 2], [0, 3])
    assert dec.cache.sequences == [parent]
    dec.free(parent)
    with pytest.raises(ValueError, match="parent must be a live sequence of the decoder.*freed"):
        explore(dec, ids, [2], 3, parent=parent)
    assert dec.cache.blocks_used() == 0
