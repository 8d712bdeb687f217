"""Tests of the diffusion thinker loop ``a2r.diffusion_generate`` on a tiny bidirectional model.

The model is built from a LlamaConfig with fixed seeds, saved with ``save_pretrained`` and loaded
back with ``load_diffusion_model`` (no hub). Every test runs on the CPU in well under a minute.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a2r_kernels as ak
from a2r.thinker import masked as diffusion_mod
from a2r.thinker import (DiffusionResult, diffusion_generate, get_num_transfer_tokens)
from a2r.thinker.models import (A2R_ATTENTION, build_tiny_diffusion_model, load_diffusion_model)

VOCAB = 53          # odd on purpose
MASK_ID = 52
PAD_ID = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("tiny_diffusion")
    build_tiny_diffusion_model(VOCAB, MASK_ID, seed=3, num_layers=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_diffusion_model(model_dir)


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_diffusion_1l")
    build_tiny_diffusion_model(VOCAB, MASK_ID, seed=5, num_layers=1).save_pretrained(path)
    return load_diffusion_model(str(path))


def random_prompt(length, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, MASK_ID, (batch, length), generator=g)


class ForwardCounter:
    """Counts model forward calls and records the input_ids shape of each."""

    def __init__(self, model):
        self.shapes = []
        self.position_ids = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.shapes.append(tuple(ids.shape))
        self.position_ids.append(kwargs.get("position_ids"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture
def step_log(monkeypatch):
    """Wraps ak.denoise_step as the loop sees it; records each call's inputs and results."""
    calls = []
    real = ak.denoise_step

    def recording(logits, tokens, mask_id, **kwargs):
        before = tokens.clone()
        res = real(logits, tokens, mask_id, **kwargs)
        calls.append(types.SimpleNamespace(logits=logits.detach().clone(), before=before,
                                           after=tokens.clone(), res=res, kwargs=kwargs))
        return res

    monkeypatch.setattr(diffusion_mod.ak, "denoise_step", recording)
    return calls


def check_invariants(result: DiffusionResult, prompt, gen_length):
    tokens = result.tokens
    assert tokens.shape == (prompt.shape[0], prompt.shape[1] + gen_length)
    assert not bool((tokens == MASK_ID).any()), "a [MASK] survived"
    assert torch.equal(tokens[:, :prompt.shape[1]], prompt), "the prompt changed"
    assert result.num_forward_calls == sum(result.steps_per_block)


# ---------------------------------------------------------------------------------- schedule
def test_num_transfer_schedule_matches_llada():
    masked = torch.tensor([0, 1, 7, 8, 13, 32])
    for steps in (1, 3, 4, 8, 13):
        got = get_num_transfer_tokens(masked, steps)
        # LLaDA's loop, written out.
        want = torch.zeros(len(masked), steps, dtype=torch.int64) + (masked // steps)[:, None]
        for b in range(len(masked)):
            want[b, :int(masked[b] % steps)] += 1
        assert torch.equal(got, want)
        assert torch.equal(got.sum(1), masked)


# ---------------------------------------------------------------------------------- fixed mode
@pytest.mark.parametrize("prompt_len,gen_length,block_length,steps", [
    (7, 24, 8, 12),     # 3 blocks x 4 steps, 2 tokens per step
    (5, 15, 5, 9),      # 3 blocks x 3 steps, schedule 2,2,1
    (1, 7, 7, 7),       # one block, one token per step
    (3, 6, 3, 2),       # 2 blocks x 1 step: a whole block per step
])
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_fixed_mode_calls_and_schedule(model, step_log, prompt_len, gen_length, block_length,
                                       steps, cache):
    prompt = random_prompt(prompt_len, seed=prompt_len)
    with ForwardCounter(model) as counter:
        res = diffusion_generate(model, prompt, gen_length=gen_length, block_length=block_length,
                                 steps=steps, cache=cache, return_details=True)
    num_blocks = gen_length // block_length
    assert len(counter.shapes) == steps == res.num_forward_calls
    assert res.steps_per_block == [steps // num_blocks] * num_blocks
    check_invariants(res, prompt, gen_length)
    assert [len(s) for s in res.sequences] == [gen_length]
    assert res.sequences[0] == res.tokens[0, prompt_len:].tolist()
    # Every step committed exactly LLaDA's schedule, inside the active block only.
    schedule = get_num_transfer_tokens(torch.tensor([block_length]), steps // num_blocks)[0]
    assert len(step_log) == steps
    for i, call in enumerate(step_log):
        assert call.logits.shape == (1, block_length, VOCAB)
        assert int(call.res.transferred.sum()) == int(schedule[i % len(schedule)])
    # Prefix mode forwards the block and the suffix only, after each block's first step.
    total = prompt_len + gen_length
    per_block = steps // num_blocks
    for i, shape in enumerate(counter.shapes):
        block, step = divmod(i, per_block)
        full = cache == "none" or step == 0
        assert shape == (1, total if full else total - prompt_len - block * block_length)


def test_zero_commit_steps_are_skipped(model):
    # block_length 3 < steps per block 5: LLaDA's schedule is 1,1,1,0,0; the 0-steps change
    # nothing, so they cost no forward.
    res = diffusion_generate(model, random_prompt(4, 1), gen_length=6, block_length=3, steps=10,
                             return_details=True)
    assert res.steps_per_block == [3, 3]
    check_invariants(res, random_prompt(4, 1), 6)


# ---------------------------------------------------------------------------------- threshold
@pytest.mark.parametrize("threshold", [0.05, 0.5, 1.0])
def test_threshold_mode(model, step_log, threshold):
    prompt = random_prompt(6, 2, batch=2)
    block_length = 5
    res = diffusion_generate(model, prompt, gen_length=15, block_length=block_length,
                             threshold=threshold, return_details=True)
    check_invariants(res, prompt, 15)
    assert all(1 <= s <= block_length for s in res.steps_per_block)
    for call in step_log:
        assert call.kwargs["threshold"] == threshold and call.kwargs["num_transfer"] is None
        still_masked = (call.before == MASK_ID).any(1)
        committed = call.res.transferred.sum(1)
        assert bool((committed[still_masked] >= 1).all()), "a step committed nothing"
        conf = call.res.confidence
        # Everything at or above the threshold was committed.
        assert bool((call.res.transferred | ~(conf >= threshold)).all())
    if threshold == 1.0:   # softmax never reaches 1 here: exactly one token per step
        assert res.steps_per_block == [block_length] * 3


# ---------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_left_padded_batch_matches_batch_one(model, cache):
    rows = [random_prompt(n, 10 + n)[0].tolist() for n in (5, 9, 1)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, cache=cache)
    alone = [diffusion_generate(model, torch.tensor([r]), **kwargs)[0] for r in rows]
    # Ragged lists: padded here.
    assert diffusion_generate(model, rows, pad_token_id=PAD_ID, **kwargs) == alone
    # A padded tensor + mask, with a pad id that is a real token (it must be masked out).
    width = max(map(len, rows))
    padded = torch.tensor([[7] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with ForwardCounter(model) as counter:
        assert diffusion_generate(model, padded, attention_mask=mask, **kwargs) == alone
    # Positions count real tokens only. (RoPE is shift-invariant, so a wrong constant offset
    # per row would not show in the tokens: check the ids the model got.)
    want = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long),
                                   torch.arange(len(r) + 12)]) for r in rows])
    assert torch.equal(counter.position_ids[0], want)
    if cache == "prefix":   # an extend step: the positions of the block and the suffix
        assert torch.equal(counter.position_ids[1], want[:, width:])
    # Control: the same tensor without its mask decodes differently (so the mask is honoured).
    assert diffusion_generate(model, padded, **kwargs) != alone


def test_batch_padding_with_cfg_and_threshold(model):
    rows = [random_prompt(n, 20 + n)[0].tolist() for n in (2, 6)]
    kwargs = dict(gen_length=8, block_length=4, threshold=0.3, cfg_scale=0.5, cache="prefix")
    alone = [diffusion_generate(model, [r], **kwargs)[0] for r in rows]
    assert diffusion_generate(model, rows, **kwargs) == alone


# ---------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_exact_for_one_layer_model(one_layer_model):
    # Layer 0's K/V depend on token and position only, so the cache holds exact values.
    prompt = random_prompt(9, 4, batch=2)
    kwargs = dict(gen_length=20, block_length=5, steps=20, return_details=True)
    exact = diffusion_generate(one_layer_model, prompt, cache="none", **kwargs)
    cached = diffusion_generate(one_layer_model, prompt, cache="prefix", **kwargs)
    assert torch.equal(exact.tokens, cached.tokens)
    assert cached.num_forward_calls == exact.num_forward_calls == 20


def test_prefix_cache_under_autocast(one_layer_model):
    """Under autocast the forward's K/V (bf16 / fp32 mixed) differ from the weights' dtype (the
    pool's): they are cast into the pool and back, and the cache stays exact for one layer."""
    prompt = random_prompt(9, 4, batch=2)
    kwargs = dict(gen_length=10, block_length=5, steps=10, return_details=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = diffusion_generate(one_layer_model, prompt, cache="none", **kwargs)
        cached = diffusion_generate(one_layer_model, prompt, cache="prefix", **kwargs)
    assert torch.equal(exact.tokens, cached.tokens)


def test_prefix_cache_first_step_of_each_block_is_exact(model, step_log):
    prompt = random_prompt(8, 5)
    kwargs = dict(gen_length=12, block_length=6, steps=6)
    diffusion_generate(model, prompt, cache="none", **kwargs)
    exact_calls = list(step_log)
    step_log.clear()
    res = diffusion_generate(model, prompt, cache="prefix", return_details=True, **kwargs)
    check_invariants(res, prompt, 12)
    # Block 0, step 0: same state, full forward in both modes -> same logits and commits.
    torch.testing.assert_close(step_log[0].logits, exact_calls[0].logits)
    assert torch.equal(step_log[0].after, exact_calls[0].after)
    # One step per block: every forward is a full one, so the modes agree everywhere.
    one_step = dict(gen_length=12, block_length=6, steps=2)
    assert diffusion_generate(model, prompt, cache="prefix", **one_step) == \
        diffusion_generate(model, prompt, cache="none", **one_step)


def test_prefix_cache_extend_step_matches_manual_attention(model, step_log):
    """The extend step's logits equal a full forward whose prefix K/V are frozen by hand."""
    from a2r.thinker import PrefixKV
    prompt = random_prompt(5, 6)
    diffusion_generate(model, prompt, gen_length=8, block_length=8, steps=2, cache="prefix")
    assert len(step_log) == 2
    # Recompute step 2 by hand: capture the prefix K/V of the step-1 state, then extend.
    state0 = torch.cat([prompt, step_log[0].before], 1)
    state1 = torch.cat([prompt, step_log[1].before], 1)
    cfg = model.config
    prefix = PrefixKV(1, cfg.num_hidden_layers, cfg.num_key_value_heads,
                      cfg.hidden_size // cfg.num_attention_heads, 5, torch.float32,
                      torch.device("cpu"))
    prefix.start_block(5)
    model(state0, a2r_prefix=prefix, use_cache=False)
    prefix.mode = "extend"
    logits = model(state1[:, 5:], a2r_prefix=prefix, use_cache=False,
                   position_ids=torch.arange(5, 13)[None]).logits
    logits[..., MASK_ID] = float("-inf")
    torch.testing.assert_close(step_log[1].logits, logits)
    # And they differ from the exact step (prefix K/V are stale in a 2-layer model).
    exact = model(state1, use_cache=False).logits[:, 5:]
    assert not torch.allclose(exact, logits, atol=1e-4)


# ---------------------------------------------------------------------------------- cfg
def test_cfg_formula_and_batched_pass(model, step_log):
    prompt = random_prompt(6, 7)
    scale = 1.5
    with ForwardCounter(model) as counter:
        res = diffusion_generate(model, prompt, gen_length=8, block_length=4, steps=4,
                                 cfg_scale=scale, return_details=True)
    check_invariants(res, prompt, 8)
    assert counter.shapes == [(2, 14)] * 4          # cond + uncond in one call per step
    x = torch.cat([prompt, torch.full((1, 8), MASK_ID)], 1)
    un_x = x.clone()
    un_x[:, :6] = MASK_ID
    cond = model(x, use_cache=False).logits[:, 6:10]
    uncond = model(un_x, use_cache=False).logits[:, 6:10]
    want = uncond + (scale + 1) * (cond - uncond)
    want[..., MASK_ID] = float("-inf")         # [MASK] is never a prediction
    torch.testing.assert_close(step_log[0].logits, want)
    assert res.sequences != diffusion_generate(model, prompt, gen_length=8, block_length=4, steps=4)


# ---------------------------------------------------------------------------------- EOS
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_eos_trims_and_stops_early(model, cache):
    prompt = random_prompt(5, 8, batch=2)
    kwargs = dict(gen_length=24, block_length=6, steps=12, cache=cache, return_details=True)
    free = diffusion_generate(model, prompt, **kwargs)
    # An EOS id that occurs in row 0's free-running output, not at its first position.
    row0 = free.sequences[0]
    eos = next(t for t in row0[2:] if t not in row0[:2])
    res = diffusion_generate(model, prompt, eos_token_id=[eos, VOCAB + 100], **kwargs)
    check_invariants(res, prompt, 24)
    for free_row, row in zip(free.sequences, res.sequences):
        want = free_row[:free_row.index(eos) + 1] if eos in free_row else free_row
        assert row == want            # tokens up to the first EOS are never affected
    # After a finished row's first EOS, masked positions were filled with EOS.
    gen = res.tokens[0, 5:]
    first = res.sequences[0].index(eos)
    assert bool(((gen[first:] == eos) | (gen[first:] == free.tokens[0, 5 + first:])).all())
    assert res.num_forward_calls <= free.num_forward_calls


def test_eos_all_rows_finished_stops(model):
    prompt = random_prompt(4, 9)
    free = diffusion_generate(model, prompt, gen_length=16, block_length=4, steps=8,
                              return_details=True)
    eos = free.sequences[0][0]     # the very first generated token
    res = diffusion_generate(model, prompt, gen_length=16, block_length=4, steps=8,
                             eos_token_id=eos, return_details=True)
    assert res.sequences == [[eos]]
    assert res.steps_per_block[1:] == [0, 0, 0]    # later blocks never ran
    assert res.num_forward_calls == res.steps_per_block[0] <= 2


# ---------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
def test_seeded_sampling_is_reproducible(model, remasking):
    prompt = random_prompt(5, 11)
    kwargs = dict(gen_length=10, block_length=5, steps=4, temperature=0.8, remasking=remasking)
    a = diffusion_generate(model, prompt, generator=torch.Generator().manual_seed(123), **kwargs)
    b = diffusion_generate(model, prompt, generator=torch.Generator().manual_seed(123), **kwargs)
    assert a == b
    others = [diffusion_generate(model, prompt, generator=torch.Generator().manual_seed(s),
                                 **kwargs) for s in (1, 2, 3)]
    assert any(o != a for o in others), "the generator does not reach the sampler"


def test_triton_backend_matches_torch(model):
    pytest.importorskip("triton")
    prompt = random_prompt(4, 12)
    kwargs = dict(gen_length=6, block_length=3, steps=4)
    assert diffusion_generate(model, prompt, backend="triton", **kwargs) == \
        diffusion_generate(model, prompt, backend="torch", **kwargs)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(prompt_len=st.integers(0, 6), num_blocks=st.integers(1, 3),
       block_length=st.integers(1, 5), steps_per_block=st.integers(1, 6),
       cache=st.sampled_from(["none", "prefix"]))
def test_invariants_property(model, prompt_len, num_blocks, block_length, steps_per_block, cache):
    prompt = random_prompt(prompt_len, prompt_len + 100)
    gen_length = num_blocks * block_length
    res = diffusion_generate(model, prompt, gen_length=gen_length, block_length=block_length,
                             steps=num_blocks * steps_per_block, cache=cache,
                             return_details=True)
    check_invariants(res, prompt, gen_length)
    assert res.steps_per_block == [min(block_length, steps_per_block)] * num_blocks


# ---------------------------------------------------------------------------------- models
def test_tiny_model_is_bidirectional_and_seeded(model_dir, model):
    assert model.config._attn_implementation == A2R_ATTENTION
    assert model.config.mask_token_id == MASK_ID and model.config.is_causal is False
    rebuilt = build_tiny_diffusion_model(VOCAB, MASK_ID, seed=3, num_layers=2)
    for (name, p), q in zip(model.named_parameters(), rebuilt.parameters()):
        assert torch.equal(p, q), name
    # Changing the last token changes the first position's logits: no causal mask.
    x = random_prompt(6, 13)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % MASK_ID
    assert not torch.allclose(model(x).logits[0, 0], model(y).logits[0, 0])
    assert load_diffusion_model(model_dir, mask_id=7).config.mask_token_id == 7


def test_load_without_mask_id_raises(tmp_path, model):
    build_tiny_diffusion_model(11, 10).save_pretrained(tmp_path)
    import json
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["mask_token_id"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mask_id"):
        load_diffusion_model(str(tmp_path))
    with pytest.raises(ValueError, match="path"):
        load_diffusion_model(str(tmp_path / "missing"))


class _RemoteStyleModel(torch.nn.Module):
    """Mimics a LLaDA remote-code model: forward(input_ids, attention_mask=None) -> .logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = types.SimpleNamespace(mask_token_id=MASK_ID, vocab_size=VOCAB,
                                            model_type="llada", _attn_implementation="eager")

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids, attention_mask=attention_mask).logits
        return types.SimpleNamespace(logits=logits)


_RemoteStyleModel.__module__ = "transformers_modules.fake_llada.modeling_llada"


def test_remote_code_model_exact_mode(model):
    remote = _RemoteStyleModel(model)
    prompt = random_prompt(5, 14)
    kwargs = dict(gen_length=8, block_length=4, steps=4)
    want = diffusion_generate(model, prompt, **kwargs)
    assert diffusion_generate(remote, prompt, **kwargs) == want
    with pytest.raises(ValueError, match="cache='prefix'"):
        diffusion_generate(remote, prompt, cache="prefix", **kwargs)


def test_causal_transformers_model_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, mask_token_id=10))
    with pytest.raises(ValueError, match="causal"):
        diffusion_generate(causal, torch.tensor([[1, 2]]), gen_length=4, block_length=4, steps=4)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4), "gen_length"),
    (dict(gen_length=12, block_length=4, steps=4), "steps"),
    (dict(gen_length=0), "gen_length"),
    (dict(block_length=0), "block_length"),
    (dict(steps=0), "steps"),
    (dict(cache="dual"), "cache"),
    (dict(remasking="topk"), "remasking"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(mask_id=VOCAB), "mask_id"),
    (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0, 1]])), "left-padded"),
    (dict(eos_token_id=[1.5]), "eos_token_id"),
    (dict(gen_length=4096, block_length=4096, steps=1), "max_position_embeddings"),
    (dict(backend="cuda_graphs"), "backend"),
])
def test_bad_input_raises_value_error(model, kwargs, match):
    base = dict(gen_length=8, block_length=4, steps=4)
    with pytest.raises(ValueError, match=match):
        diffusion_generate(model, random_prompt(5, 15), **{**base, **kwargs})


@pytest.mark.parametrize("prompt,match", [
    (torch.ones(1, 2, 3, dtype=torch.long), "prompt_ids"),
    (torch.ones(0, 3, dtype=torch.long), "prompt_ids"),
    (torch.ones(1, 3), "prompt_ids"),
    ([], "prompt_ids"),
    ([["a"]], "prompt_ids"),
])
def test_bad_prompt_raises(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        diffusion_generate(model, prompt, gen_length=4, block_length=4, steps=4)


def test_missing_mask_id_and_unavailable_backend(model_dir):
    m = load_diffusion_model(model_dir)
    m.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_id"):
        diffusion_generate(m, random_prompt(3, 16), gen_length=4, block_length=4, steps=4)
    if not torch.cuda.is_available():
        with pytest.raises(ak.BackendUnavailable):
            diffusion_generate(m, random_prompt(3, 16), gen_length=4, block_length=4, steps=4,
                               mask_id=MASK_ID, backend="cuda")


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_bfloat16_model(model_dir, cache):
    m = load_diffusion_model(model_dir, dtype=torch.bfloat16)
    prompt = random_prompt(3, 17, batch=2)
    res = diffusion_generate(m, prompt, gen_length=8, block_length=4, steps=4, cache=cache,
                             return_details=True)
    check_invariants(res, prompt, 8)


def test_mask_token_is_never_committed(model_dir):
    # A model that puts nearly all its mass on [MASK]: the loop must still unmask everything.
    m = load_diffusion_model(model_dir)
    prompt = random_prompt(4, 18)
    x = torch.cat([prompt, torch.full((1, 8), MASK_ID)], 1)
    with torch.no_grad():   # point the [MASK] output row along the mean final hidden state
        hidden = m.model(x).last_hidden_state[0]
        m.get_output_embeddings().weight[MASK_ID] = 100.0 * hidden.mean(0)
        assert int((m(x).logits.argmax(-1) == MASK_ID).sum()) >= 6    # the trap is armed
    for kwargs in (dict(steps=4), dict(threshold=0.5)):
        res = diffusion_generate(m, prompt, gen_length=8, block_length=4, return_details=True,
                                 **kwargs)
        check_invariants(res, prompt, 8)


# ---------------------------------------------------------------------------------- host syncs
class _CountLoopSyncs:
    """Counts device -> host reads (``item``, ``tolist``, ``cpu``, ``bool``) made by the loop's
    own code in a2r/diffusion.py (reads inside ak.denoise_step are of host tensors there)."""

    METHODS = ("item", "tolist", "cpu", "__bool__")

    def __init__(self, monkeypatch):
        import sys

        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename == diffusion_mod.__file__:
                    self.count += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("eos", [False, True])
def test_fixed_schedule_syncs_once_per_block(model, monkeypatch, eos):
    prompt = random_prompt(5, 21, batch=2)
    kwargs = dict(gen_length=12, block_length=4, steps=12, return_details=True,
                  eos_token_id=[VOCAB + 7] if eos else None)
    counter = _CountLoopSyncs(monkeypatch)
    res = diffusion_generate(model, prompt, **kwargs)
    assert res.steps_per_block == [4, 4, 4]
    # one per block, plus the padding check at the start and the final read of the tokens
    assert counter.count <= 3 + 2


def test_threshold_mode_syncs_once_per_step(model, monkeypatch):
    prompt = random_prompt(5, 22)
    counter = _CountLoopSyncs(monkeypatch)
    res = diffusion_generate(model, prompt, gen_length=8, block_length=4, threshold=0.9,
                             eos_token_id=[VOCAB + 7], return_details=True)
    assert counter.count <= res.num_forward_calls + 2


# ---------------------------------------------------------------------------------- prefix-causal
@pytest.fixture(scope="module")
def causal_prompt_model(tmp_path_factory):
    """The 2-layer test model with CAUSAL_PROMPT set, saved and loaded back (the flag is config)."""
    from a2r.thinker.models import CAUSAL_PROMPT

    model = build_tiny_diffusion_model(VOCAB, MASK_ID, seed=3, num_layers=2)
    setattr(model.config, CAUSAL_PROMPT, True)
    path = tmp_path_factory.mktemp("tiny_diffusion_causal_prompt")
    model.save_pretrained(path)
    return load_diffusion_model(str(path))


def test_causal_prompt_rows_ignore_the_canvas_and_match_a_causal_model(causal_prompt_model):
    from a2r.thinker.models import is_causal_prompt_model

    model = causal_prompt_model
    assert is_causal_prompt_model(model)
    prompt = random_prompt(7, 11)
    a = torch.cat([prompt, torch.full((1, 5), MASK_ID)], 1)
    b = torch.cat([prompt, random_prompt(5, 12)], 1)
    with torch.no_grad():
        la = model(a, a2r_prompt_len=7).logits
        lb = model(b, a2r_prompt_len=7).logits
        full = model(a).logits   # no prompt length: fully bidirectional
        model.config._attn_implementation = "sdpa"     # the same weights, causal
        model.config.is_causal = True
        try:
            causal = model(prompt).logits
        finally:
            model.config._attn_implementation = A2R_ATTENTION
            model.config.is_causal = False
    torch.testing.assert_close(la[:, :7], lb[:, :7], rtol=0, atol=0)   # prompt rows: canvas-blind
    torch.testing.assert_close(la[:, :7], causal, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 7:], lb[:, 7:])                    # canvas rows see the canvas
    assert not torch.allclose(la[:, :7], full[:, :7])                  # the flag changes the prompt


def test_causal_prompt_prefix_cache_is_exact_for_one_block(causal_prompt_model):
    """Its prompt K/V do not depend on the canvas: the prefix cache of one block is exact at any
    depth (for the fully bidirectional model it is exact only with one layer)."""
    prompt = random_prompt(9, 4, batch=2)
    kwargs = dict(gen_length=10, block_length=10, steps=10, return_details=True)
    exact = diffusion_generate(causal_prompt_model, prompt, cache="none", **kwargs)
    cached = diffusion_generate(causal_prompt_model, prompt, cache="prefix", **kwargs)
    assert torch.equal(exact.tokens, cached.tokens)


def test_causal_prompt_mask_needs_a_full_forward():
    from a2r.thinker.models import _with_causal_prompt

    with pytest.raises(ValueError, match="a2r_prompt_len"):
        _with_causal_prompt(None, 3, 4, 9, 'cpu')
    mask = _with_causal_prompt(None, torch.tensor([2, 0]), 4, 4, 'cpu')
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                    [True, True, True, True], [True, True, True, True]]
    assert bool(mask[1].all())
