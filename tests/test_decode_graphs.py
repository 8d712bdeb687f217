"""TreeDecoder.step through fixed buffers padded to batch buckets (and CUDA graphs on CUDA).

The reference is the causal extend of one token per sequence, ``TreeDecoder.extend(seqs,
ids[:, None])`` (each path gathered from the pool, no wrapper), in a second decoder over the same
model. Tiny random-init Qwen3 with GQA (4 q heads, 2 kv heads);
Triton runs in its CPU interpreter (TRITON_INTERPRET=1).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import a2r_kernels.hf as akhf  # noqa: E402
from a2r_kernels.backend import cpu_extension  # noqa: E402

# The compiled CPU kernel, where it was built.
CPU = pytest.param("cpu", marks=pytest.mark.skipif(cpu_extension() is None,
                                                   reason="a2r_kernels._cpu not built"))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=160, max_position_embeddings=512,
            initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _model(device="cpu"):
    torch.manual_seed(1234)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval().to(device)
    model.set_attn_implementation(akhf.ATTN_IMPLEMENTATION)
    return model


@pytest.fixture(scope="module")
def qwen3():
    return _model()


def _run(dec, batch: int, steps: int, padded: bool, finish_every: int = 2):
    """Prefill a prompt, fork ``batch`` branches and decode greedily for ``steps`` steps; every
    ``finish_every`` steps the last live branch finishes (freed), so the batch shrinks across
    buckets. Returns every step's logits and the K/V of every branch that was ever live."""
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 19), generator=gen)
    root, logits = dec.prefill(prompt.to(dec.device))
    live = dec.fork(root, batch)
    # Distinct first tokens, so every row differs.
    ids = torch.randint(0, TINY["vocab_size"], (batch,), generator=gen).to(dec.device)
    history, kv = [], {}
    for t in range(steps):
        logits = dec.step(live, ids) if padded else dec.extend(live, ids[:, None])
        history.append(logits)
        for seq in live:
            kv[seq] = dec.cache.gather(1, seq)
        ids = logits.argmax(-1)
        if t % finish_every == finish_every - 1 and len(live) > 1:
            dec.free(live.pop())
            ids = ids[:-1]
    return history, kv


@pytest.mark.parametrize("backend,batch", [("torch", 3), ("torch", 7), ("torch", 36), ("triton", 3),
                                           pytest.param("cpu", 7, marks=CPU.marks)])
def test_padded_step_equals_unpadded_step(qwen3, backend, batch):
    steps = 2 * batch   # shrinks to one branch: 7 live (bucket 8) -> 4, 2, 1; 36 (bucket 48) -> 32, 16, ...
    blocks = 64 * (1 + batch // 8)
    padded = akhf.TreeDecoder(qwen3, blocks, block_size=4, backend=backend, cuda_graphs=False)
    plain = akhf.TreeDecoder(qwen3, blocks, block_size=4, backend=backend, cuda_graphs=False)
    got, got_kv = _run(padded, batch, steps, padded=True)
    want, want_kv = _run(plain, batch, steps, padded=False)
    assert padded.runner.capacity == akhf.batch_bucket(batch) > batch
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert got_kv.keys() == want_kv.keys()
    for seq in got_kv:   # padding rows wrote nothing into any branch's slots
        torch.testing.assert_close(got_kv[seq], want_kv[seq], rtol=1e-5, atol=1e-5)
    assert padded.forwarded_tokens == plain.forwarded_tokens


def test_batch_bucket():
    assert [akhf.batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 48, 100)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 32, 48, 48, 112]


def test_cuda_graphs_argument(qwen3):
    assert akhf.TreeDecoder(qwen3, 8).cuda_graphs is False   # default off CUDA
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        akhf.TreeDecoder(qwen3, 8, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        akhf.TreeDecoder(qwen3, 8, cuda_graphs="yes")


def test_step_rejects_bad_input(qwen3):
    dec = akhf.TreeDecoder(qwen3, 8)
    root, _ = dec.prefill(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="token_ids must be int64"):
        dec.step([root], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="seqs must name at least one sequence"):
        dec.step([], torch.zeros(0, dtype=torch.int64))
    assert dec.length(root) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_equals_eager(backend):
    """64 steps of seeded sampling, 12 branches finishing one by one (buckets 16 -> 1): the
    replayed graphs give the same tokens and the same logits as the eager padded step."""
    if backend == "cuda":
        pytest.importorskip("a2r_kernels._C")
    model = _model("cuda")
    prompt = torch.randint(0, TINY["vocab_size"], (1, 37), generator=torch.Generator().manual_seed(0))
    runs = {}
    for graphs in (True, False):
        dec = akhf.TreeDecoder(model, 512, block_size=16, backend=backend, cuda_graphs=graphs)
        root, logits = dec.prefill(prompt.cuda())
        live = dec.fork(root, 12)
        gen = torch.Generator("cuda").manual_seed(7)
        ids = torch.multinomial(logits.softmax(-1).expand(12, -1), 1, generator=gen)[:, 0]
        tokens, history = [], []
        for t in range(64):
            logits = dec.step(live, ids)
            history.append(logits)
            ids = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            tokens.append(ids.tolist())
            if t % 5 == 4 and len(live) > 1:
                dec.free(live.pop())
                ids = ids[:-1]
        runs[graphs] = tokens, history, dec
    assert runs[True][0] == runs[False][0]
    for g, e in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert sorted(runs[True][2].runner.graphs) == [1, 2, 4, 8, 16]   # 12 live -> 1


@pytest.mark.parametrize("backend", ["torch", "triton", CPU])
def test_step_after_a_cancelled_step_and_an_extend(qwen3, backend):
    """Issue 20 item 1: plan_step, cancel_step, extend by one token in the other order (so the
    two branches swap the blocks the cancelled step had reserved), then plan_step / run_step.
    The torch backend's plan must not advance from the cancelled step's slots: every logit
    equals the model's over the full token sequence."""
    dec = akhf.TreeDecoder(qwen3, 32, block_size=4, backend=backend, cuda_graphs=False)
    prompt = [5, 9, 2, 7, 1, 3, 8]
    root, _ = dec.prefill(torch.tensor(prompt))
    a, b = dec.fork(root, 2)
    tokens = {a: list(prompt), b: list(prompt)}
    for t in range(4):
        dec.step([a, b], torch.tensor([11 + t, 12 + t]))
        tokens[a].append(11 + t)
        tokens[b].append(12 + t)
    dec.plan_step([a, b])
    dec.cancel_step()
    dec.extend([b, a], torch.tensor([[21], [22]]))
    tokens[b].append(21)
    tokens[a].append(22)
    for step in range(3):   # the step after the extend, then two plain ones
        dec.plan_step([a, b])
        logits = dec.run_step(torch.tensor([31 + step, 41 + step]))
        tokens[a].append(31 + step)
        tokens[b].append(41 + step)
        for row, seq in enumerate((a, b)):
            with torch.no_grad():
                want = qwen3(torch.tensor([tokens[seq]])).logits[0, -1].float()
            torch.testing.assert_close(logits[row], want, rtol=1e-4, atol=1e-4)
