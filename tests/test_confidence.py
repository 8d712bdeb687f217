"""Confidence-aware exploration (issue 22): token / group confidence against plain torch, the
online stop in the explorer (blocks back in the step, survivors unchanged, one read per step),
the warm-up, the eval methods' helpers. Tiny random models of test_explore.py."""

import json
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import a2r  # noqa: E402
import a2r_kernels.hf as akhf  # noqa: E402
from a2r.confidence import (ConfidenceConfig, auroc, group_confidences,  # noqa: E402
                            lowest_group_confidence, stop_below, threshold_from_warmup,
                            token_confidence_from_logprobs, top_fraction, weighted_vote)
from a2r.confidence_tracker import WindowTracker, token_confidence  # noqa: E402
from a2r.explore import explore  # noqa: E402
from _explore_cases import CASES, RECORDED, run_case  # noqa: E402
from _helpers import ForwardLog, HostReads  # noqa: E402
from _explore_helpers import VOCAB, _build, _dense_next_logits, _prompt  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: _build(k, tmp_path_factory.mktemp(k)) for k in ("qwen3", "llama")}


def _plain_confidence(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The definition, literally: minus the mean of the k largest log-probabilities (fp64)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -torch.sort(logp, dim=-1, descending=True).values[..., :min(k, logits.shape[-1])].mean(-1)


def _plain_groups(confs: list[float], w: int) -> list[float]:
    if len(confs) < w:
        return [sum(confs) / len(confs)]
    return [sum(confs[t - w:t]) / w for t in range(w, len(confs) + 1)]


# ---------------------------------------------------------------------------- the math
@pytest.mark.parametrize("k", [1, 5, 36, 37, 50])   # V = 37: k = V - 1, V, > V
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_confidence_equals_the_definition(k, dtype):
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(7, 37, generator=g) * 4).to(dtype)
    logits[1, :] = 0.0                       # uniform: C = log V for any k
    logits[2, 3] = 60.0                      # one token takes all the mass
    logits[3, :5] = logits[3, 5]             # ties at the k-th value
    wide = torch.randn(7, 74, generator=g).to(dtype)[:, ::2]   # non-contiguous
    for rows in (logits, wide):
        tol = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(token_confidence(rows, k), _plain_confidence(rows.float(), k).float(),
                                   **tol)
    assert token_confidence(logits, k)[1].item() == pytest.approx(math.log(37), abs=1e-5)
    extreme = torch.tensor([[3e38, -3e38, 0.0, 1.0]], dtype=torch.float32)
    assert torch.isfinite(token_confidence(extreme, 2)).all()


def test_token_confidence_from_logprobs_takes_the_top_k():
    # vLLM adds the sampled token when it is outside the top k: it is not a candidate.
    assert token_confidence_from_logprobs([-0.1, -2.0, -3.0, -9.0], 3) == pytest.approx(5.1 / 3)
    assert token_confidence_from_logprobs([-9.0, -0.5], 5) == pytest.approx(4.75)


@pytest.mark.parametrize("length,window", [(1, 4), (3, 4), (4, 4), (5, 4), (11, 4), (9, 1), (6, 16)])
def test_group_confidence_window_edges(length, window):
    confs = np.random.default_rng(length * 31 + window).normal(3.0, 1.0, length).tolist()
    expected = _plain_groups(confs, window)
    np.testing.assert_allclose(group_confidences(confs, window), expected, rtol=1e-12)
    assert lowest_group_confidence(confs, window) == pytest.approx(min(expected), rel=1e-12)
    assert math.isnan(lowest_group_confidence([], window))


def test_window_tracker_equals_the_plain_running_window():
    """The device ring gives each step's confidence and flags a row exactly when its last w
    confidences (a full window) average below the threshold; rows dropped and forked keep their
    own windows."""
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, 23, generator=g) * 3 for _ in range(9)]
    w, k = 3, 4
    plain = [_plain_confidence(s, k).float() for s in steps]
    threshold = float(torch.stack(plain).mean())
    tracker = WindowTracker(ConfidenceConfig(window=w, top_k=k, threshold=threshold), torch.device("cpu"))
    tracker.fork([0, 0, 0, 0])
    history = [[] for _ in range(4)]
    for t, logits in enumerate(steps):
        conf, stop = tracker.step(logits)
        torch.testing.assert_close(conf, plain[t])
        for row in range(4):
            history[row].append(plain[t][row].item())
            window = history[row][-w:]
            expect = len(history[row]) >= w and sum(window) / w < stop_below(threshold)
            assert bool(stop[row]) == expect, (t, row)
    tracker.keep(torch.tensor([2, 0]))
    tracker.fork([1, 1, 0])
    assert torch.equal(tracker.ring[0], tracker.ring[1])
    packed = WindowTracker.pack(torch.tensor([5, 6]), torch.tensor([1.5, -2.25]), torch.tensor([True, False]))
    assert WindowTracker.unpack(packed.tolist()) == ([5, 6], [1.5, -2.25], [True, False])


def test_threshold_vote_fraction_auroc():
    assert threshold_from_warmup([1.0, 3.0, float("nan")], 50) == 2.0
    assert threshold_from_warmup([1.0, 3.0], 90) == pytest.approx(2.8)
    assert weighted_vote(["7", "8", "8", None], [5.0, 2.0, 2.5, 9.0]) == "7"
    assert weighted_vote([None], [1.0]) is None
    assert top_fraction([0.1, 0.9, 0.5, 0.9], 0.5) == [1, 3]
    assert top_fraction([0.1, 0.9, 0.5], 0.01) == [1]
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40).tolist(), (rng.random(40) < 0.4).tolist()
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc([1, 2], [True, True]) is None


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(top_k=0), dict(warmup_paths=-1),
                                    dict(percentile=101), dict(threshold=float("nan")),
                                    dict(threshold=1.0, warmup_paths=2), dict(window=2.5)])
def test_bad_config_names_the_field(kwargs):
    with pytest.raises(ValueError, match="confidence."):
        ConfidenceConfig(**kwargs)


# ---------------------------------------------------------------------------- in the explorer
def test_off_by_default_and_tracking_leave_the_recorded_outputs_identical(models):
    recorded = json.loads(RECORDED.read_text())
    assert len(recorded) == len(CASES) == 20
    for case, expected in zip(CASES, recorded):
        assert run_case(models, case) == expected, case
        assert run_case(models, case, confidence=ConfidenceConfig(window=3)) == expected, case


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_explorer_confidence_equals_the_dense_logits(models, kind):
    """Greedy paths: each token's confidence is the definition applied to the logits of a plain
    full forward over prompt + path so far (top_k > V included), across levels too."""
    model, ids = models[kind], _prompt(11, seed=3)
    for top_k in (5, VOCAB + 40):
        res = explore(model, ids, [2, 2], [4, 5], temperature=0, eos_token_id=[],
                      confidence=ConfidenceConfig(window=3, top_k=top_k), backend="torch")
        path = res.sequences[0]
        assert res.sequences == [path] * 4
        # the leaves' rows may differ in the last float bits (batched tree attention)
        np.testing.assert_allclose(res.confidences, [res.confidences[0]] * 4, atol=1e-5)
        prefix = ids[0].tolist()
        expected = [_plain_confidence(_dense_next_logits(model, prefix + path[:t]), top_k).item()
                    for t in range(len(path))]
        np.testing.assert_allclose(res.confidences[0], expected, atol=2e-4)
        assert res.lowest_group_confidence[0] == pytest.approx(min(_plain_groups(expected, 3)),
                                                               abs=2e-4)
        assert res.stop_reasons == ["length"] * 4 and res.threshold is None


def _threshold_between(lowest: list[float]) -> tuple[float, int]:
    """A threshold that only the least confident path's window crosses, and that path."""
    order = sorted(range(len(lowest)), key=lowest.__getitem__)
    return (lowest[order[0]] + lowest[order[1]]) / 2, order[0]


def test_a_stopped_branch_frees_its_blocks_in_that_step_and_the_others_are_unchanged(
        models, monkeypatch):
    model, ids, n, budget, w = models["qwen3"], _prompt(7, seed=12), 5, 14, 4
    kwargs = dict(temperature=1.0, seed=6, eos_token_id=[])
    full = explore(model, ids, [n], budget, confidence=ConfidenceConfig(window=w), block_size=1,
                   backend="torch", **kwargs)
    threshold, weak = _threshold_between(full.lowest_group_confidence)
    confs = full.confidences[weak]
    stop_at = next(t for t in range(w, budget + 1) if sum(confs[t - w:t]) / w < stop_below(threshold))
    assert stop_at < budget, "the weak path must stop before its budget for this test"

    import a2r.explore as explore_module
    free_at_wait, free_at_run = [], []
    for cls, name, log in ((explore_module._TokenReader, "wait", free_at_wait),
                           (akhf.TreeDecoder, "run_step", free_at_run)):
        original = getattr(cls, name)

        def wrapped(self, *args, _original=original, _log=log, **kw):
            _log.append(dec.cache.num_free_blocks)
            return _original(self, *args, **kw)
        monkeypatch.setattr(cls, name, wrapped)
    dec = akhf.TreeDecoder(model, 256, block_size=1, backend="torch")
    res = explore(dec, ids, [n], budget, confidence=ConfidenceConfig(window=w, threshold=threshold),
                  **kwargs)
    assert res.stop_reasons == ["confidence" if i == weak else "length" for i in range(n)]
    assert res.sequences[weak] == full.sequences[weak][:stop_at]
    assert [s for i, s in enumerate(res.sequences) if i != weak] == \
        [s for i, s in enumerate(full.sequences) if i != weak]
    # block_size 1: after step t's plan every branch holds t slots (t - 1 tokens fed + the
    # reserved one); in the step it stops, the weak branch's t slots are free before the run.
    prompt_blocks = ids.shape[1]
    for t, (at_wait, at_run) in enumerate(zip(free_at_wait, free_at_run), start=1):
        live = n if t < stop_at else n - 1
        assert at_wait == 256 - prompt_blocks - (n if t <= stop_at else n - 1) * t
        assert at_run == 256 - prompt_blocks - live * t, t
    assert free_at_run[stop_at - 1] - free_at_wait[stop_at - 1] == stop_at
    assert dec.cache.blocks_used() == 0


def test_online_stop_reads_once_per_step(models):
    model, ids = models["qwen3"], _prompt(9, seed=2)
    config = ConfidenceConfig(window=2, threshold=-1.0)   # never fires, but needs the reads
    import a2r.explore as explore_module
    with HostReads(explore_module.__file__, a2r.confidence_tracker.__file__) as reads:
        res = explore(model, ids, [3], 8, temperature=1.0, seed=1, eos_token_id=[],
                      confidence=config, backend="torch")
    assert reads.count == 8 and res.stop_reasons == ["length"] * 3   # one per step
    with HostReads(explore_module.__file__, a2r.confidence_tracker.__file__) as reads:
        explore(model, ids, [3], 8, temperature=1.0, seed=1, eos_token_id=[],
                confidence=ConfidenceConfig(window=2), backend="torch")
    assert reads.count == 1   # no stop can fire: the level's values in one read


def test_warmup_prefills_once_and_its_paths_are_prefixes_of_one_run(models):
    """With warm-up paths the prompt is forwarded once; path i draws the noise it draws in a
    run without the stop, so every path is a prefix of that run's path i (the warm-up ones
    whole), and the threshold is the percentile of the warm-up paths' lowest groups."""
    model, ids, n = models["llama"], _prompt(10, seed=21), 6
    kwargs = dict(temperature=1.0, seed=6, eos_token_id=[], backend="torch")
    full = a2r.sample_parallel(model, ids, n, 12, confidence=ConfidenceConfig(window=3), **kwargs)
    config = ConfidenceConfig(window=3, warmup_paths=2, percentile=100)
    with ForwardLog(model) as log:
        res = a2r.sample_parallel(model, ids, n, 12, confidence=config, **kwargs)
    assert log.prompt_forwards == [ids.shape[1]]
    assert res.warmup_paths == 2 and res.sequences[:2] == full.sequences[:2]
    assert res.threshold == pytest.approx(max(full.lowest_group_confidence[:2]))
    for i, (got, whole, reason) in enumerate(zip(res.sequences, full.sequences, res.stop_reasons)):
        confs = full.confidences[i]
        stop = next((t for t in range(3, 13)
                     if i >= 2 and sum(confs[t - 3:t]) / 3 < stop_below(res.threshold)), None)
        assert got == whole[:stop or 12] and reason == ("confidence" if stop else "length"), i
    assert "confidence" in res.stop_reasons


def test_paths_tied_with_the_threshold_go_on(models):
    """Greedy: every path is the same path, so every group confidence equals the warm-up's
    threshold up to float rounding (device fp32 ring against the host's float64 sums): none
    stops."""
    for kind in ("qwen3", "llama"):
        for window in (1, 2, 3, 5):
            res = a2r.sample_parallel(models[kind], _prompt(8, seed=window), 6, 12, temperature=0,
                                      eos_token_id=[], backend="torch",
                                      confidence=ConfidenceConfig(window=window, warmup_paths=1,
                                                                  percentile=100))
            assert res.stop_reasons == ["length"] * 6, (kind, window)
    assert stop_below(2.0) < 2.0 and stop_below(-2.0) < -2.0


def test_bad_online_requests(models):
    model, ids = models["qwen3"], _prompt(5)
    with pytest.raises(ValueError, match="one level"):
        explore(model, ids, [2, 2], 4, confidence=ConfidenceConfig(warmup_paths=1))
    with pytest.raises(ValueError, match="warmup_paths"):
        a2r.sample_parallel(model, ids, 2, 4, confidence=ConfidenceConfig(warmup_paths=2))
    with pytest.raises(ValueError, match="ConfidenceConfig"):
        a2r.sample_parallel(model, ids, 2, 4, confidence={"window": 4})


# ---------------------------------------------------------------------------- the engines
def test_tree_engine_and_pipeline_stage_carry_the_confidences(models):
    """TreeEngine.generate(confidence=) hands the explorer's confidences and stop reasons on
    (Generation -> StageReport), equal to explore's own."""
    from a2r.engine import TreeEngine
    from a2r.sampling import SamplingParams

    model, ids = models["qwen3"], _prompt(9, seed=4)
    config = ConfidenceConfig(window=3, top_k=7)
    sampling = SamplingParams(temperature=1.0)
    direct = explore(model, ids, [3], 6, sampling, seed=2, eos_token_id=[], confidence=config,
                     backend="torch")
    generation = TreeEngine(model).generate(ids[0].tolist(), 3, 6, sampling, seed=2, stop_ids=[],
                                            backend="torch", confidence=config)
    assert generation.sequences == direct.sequences
    assert generation.confidences == direct.confidences
    assert generation.stop_reasons == direct.stop_reasons == ["length"] * 3
    plain = TreeEngine(model).generate(ids[0].tolist(), 3, 6, sampling, seed=2, stop_ids=[],
                                       backend="torch")
    assert plain.sequences == direct.sequences and plain.confidences is None


def test_vllm_engine_refuses_the_online_stop():
    from a2r.engine import VLLMEngine
    from a2r.sampling import SamplingParams

    engine = object.__new__(VLLMEngine)   # no vLLM needed: refused before anything runs
    for config in (ConfidenceConfig(threshold=1.0), ConfidenceConfig(warmup_paths=1)):
        with pytest.raises(ValueError, match="online confidence stop .* not available with the "
                           "vLLM engine"):
            engine.generate([1, 2], 4, 5, SamplingParams(), seed=0, stop_ids=[],
                            confidence=config)


def test_vllm_engine_offline_confidence_from_logprobs(monkeypatch):
    """The vLLM engine asks for ``logprobs=top_k`` and scores each step from them (greedy: one
    sample, repeated), with vLLM's finish reasons as stop reasons. vLLM is stood in for."""
    import sys
    import types

    from a2r.engine import VLLMEngine
    from a2r.sampling import SamplingParams

    asked = {}
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kw: asked.update(kw) or kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)

    def step(*logprobs):
        return {i: types.SimpleNamespace(logprob=v) for i, v in enumerate(logprobs)}

    completion = types.SimpleNamespace(token_ids=[4, 9], finish_reason="stop",
                                       logprobs=[step(-0.5, -1.5, -7.0), step(-0.1, -3.0)])
    engine = object.__new__(VLLMEngine)
    engine.llm = types.SimpleNamespace(generate=lambda prompts, params, use_tqdm: [
        types.SimpleNamespace(outputs=[completion], num_cached_tokens=0)])
    generation = engine.generate([1, 2], 3, 5, SamplingParams(temperature=0), seed=0,
                                 stop_ids=[7], confidence=ConfidenceConfig(top_k=2))
    assert asked["logprobs"] == 2 and asked["n"] == 1
    assert generation.sequences == [[4, 9]] * 3 and generation.stop_reasons == ["eos"] * 3
    assert generation.confidences == [[pytest.approx(1.0), pytest.approx(1.55)]] * 3
    asked.clear()
    plain = engine.generate([1, 2], 3, 5, SamplingParams(temperature=0), seed=0, stop_ids=[7])
    assert "logprobs" not in asked and plain.confidences is None and plain.stop_reasons is None


def test_method_costs_of_the_deepconf_methods_only_when_graded():
    """deepconf_offline costs Cons@N's, a2r_conf that plus its synthesizer, deepconf_online its
    own explorer run; a run without them records no cost for them."""
    from a2r.eval.evaluate import method_costs
    from a2r.results import StageReport

    def stage(name, prompt_tokens, paths):
        return StageReport(name, "", prompt_tokens, [""] * len(paths), [[0] * k for k in paths], 0.0)

    stages = {"explorer": stage("explorer", 10, [4, 6]), "synthesizer": stage("synthesizer", 30, [5]),
              "synthesizer_alone": stage("synthesizer_alone", 12, [3])}
    parameters = {"explorer": 2, "synthesizer": 3, "synthesizer_alone": 3}
    base = ["pass_at_1", "mean_at_1", "cons_at_n", "a2r", "synthesizer_alone"]
    assert set(method_costs(stages, parameters, base)) == set(base)
    stages.update(explorer_online=stage("explorer_online", 10, [4, 2]),
                  synthesizer_conf=stage("synthesizer_conf", 20, [5]))
    parameters.update(explorer_online=2, synthesizer_conf=3)
    costs = method_costs(stages, parameters, base + ["deepconf_offline", "deepconf_online", "a2r_conf"])
    assert costs["deepconf_offline"] == costs["cons_at_n"] == 2 * 20
    assert costs["deepconf_online"] == 2 * 16
    assert costs["a2r_conf"] == 2 * 20 + 3 * 25 and costs["a2r"] == 2 * 20 + 3 * 35


def test_readme_table_matches_the_recorded_deepconf_eval():
    from a2r.demo.train import results_dir

    recorded = json.loads((results_dir() / "eval_deepconf_n8.json").read_text())
    readme = (results_dir().parents[1] / "README.md").read_text()
    assert recorded["command"] in readme
    count = recorded["num_questions"]
    for method in ("cons_at_n", "deepconf_offline", "deepconf_online", "a2r", "a2r_conf"):
        row = (f"| `{method}` | {100 * recorded['accuracy'][method]:.1f} | "
               f"{recorded['tokens_by_method'][method] / count:.1f} |")
        assert row in readme, row
    share = recorded["tokens_by_method"]["deepconf_online"] / recorded["tokens_by_method"]["cons_at_n"]
    assert f"{100 * share:.1f}%" in readme
    assert f"{recorded['confidence']['auroc_lowest_group']:.3f}" in readme


HELDOUT = os.path.join(os.path.dirname(__file__), "..", "python", "a2r", "demo", "trained",
                       "heldout.jsonl")


@pytest.mark.parametrize("argv,message", [
    (["--deepconf-window", "8"], "--deepconf-window needs --deepconf"),
    (["--deepconf", "-n", "4", "--deepconf-warmup", "4"], "--deepconf-warmup must be in [0, N - 1]"),
    (["--deepconf", "--deepconf-eta", "0"], "eta must be in (0, 1]"),
    (["--deepconf", "--engine", "vllm"], "not available with --engine vllm"),
])
def test_eval_deepconf_option_errors(argv, message, capsys):
    from a2r.cli import main

    assert main(["eval", HELDOUT, "--tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("a2r: error:") and message in err[0], err


def test_eval_deepconf_methods_and_tokens(tmp_path, capsys):
    from a2r.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", HELDOUT, "--tiny", "--limit", "2", "-n", "4", "--max-new-tokens", "40",
                 "--no-thinker", "--backend", "torch", "--deepconf", "--deepconf-window", "4",
                 "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for method in ("deepconf_offline", "deepconf_online", "a2r_conf", "cons_at_n", "a2r"):
        assert method in summary["accuracy"] and method in summary["tokens_by_method"]
    records = json.loads(out.read_text())["per_question"]
    online = sum(sum(r["confidence"]["online"]["path_tokens"]) for r in records)
    assert summary["tokens_by_method"]["deepconf_online"] == online
    assert summary["tokens_by_method"]["cons_at_n"] == sum(sum(r["path_tokens"]) for r in records)
    assert online <= summary["tokens_by_method"]["cons_at_n"]
    cost = summary["cost_per_question"]
    assert cost["deepconf_offline"] == cost["cons_at_n"] and cost["deepconf_online"] <= cost["cons_at_n"]
    for r in records:   # the online paths are prefixes of the full run's (shared noise rows)
        assert all(o <= f for o, f in zip(r["confidence"]["online"]["path_tokens"], r["path_tokens"]))
        assert r["confidence"]["online"]["path_tokens"][:2] == r["path_tokens"][:2]
