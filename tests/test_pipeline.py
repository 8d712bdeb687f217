"""a2r.A2RPipeline and a2r.demo.tiny on the embedded tiny models (CPU, small budgets).

The tiny models are random, so their texts are noise; what is checked is the plumbing: every
stage's outputs, token counts and prompts agree with each other and with independent
recomputation (tokenizer, model.generate, extraction functions), runs are reproducible, the KV
accounting matches the formula, and set-up errors are clear. A scripted explorer (sample_parallel
replaced by one that returns chosen texts) checks the baselines and grading end to end.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _helpers import ForwardLog  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import a2r  # noqa: E402
import a2r.explore  # noqa: E402
from a2r.extract import extract_answer_component, extract_final_answer, majority_vote  # noqa: E402
from a2r.sampling import SamplingParams  # noqa: E402
from a2r.pipeline import (A2RConfig, A2RPipeline, ModelDirError, PipelineError,  # noqa: E402
                          TokenizerMismatchError, UnsupportedArchitectureError, kv_bytes_per_token)
from a2r.demo.tiny import build_tiny_tokenizer, ensure_tiny_models, tiny_dir  # noqa: E402

# Small budgets: every run takes a second or two on a loaded 2-core CPU.
SMALL = dict(num_paths=3, max_new_tokens=5, synth_max_new_tokens=4, thinker_gen_length=8,
             thinker_block_length=8, thinker_steps=2, backend="torch")
QUESTION = "What is 12 * 7?"


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    # One home for the session (test_cli.py reuses it): the models are built once.
    home = tmp_path_factory.getbasetemp() / "a2r_home"
    ensure_tiny_models(home)
    return home


@pytest.fixture(scope="module")
def paths(tiny_home):
    return ensure_tiny_models(tiny_home)


@pytest.fixture(scope="module")
def pipeline(paths):
    return A2RPipeline.from_pretrained(paths.explorer, paths.synthesizer, paths.thinker,
                                       dtype="float32", config=A2RConfig(**SMALL))


@pytest.fixture(scope="module")
def symmetric(paths):
    return A2RPipeline.from_pretrained(paths.explorer, dtype="float32",
                                       config=A2RConfig(**SMALL))


@pytest.fixture(scope="module")
def result(pipeline):
    return pipeline.run(QUESTION)


# ------------------------------------------------------------------ the embedded models


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_models_are_the_same_files_every_build(tmp_path, tiny_home):
    ensure_tiny_models(tmp_path)
    first, second = _digests(tiny_dir(tiny_home)), _digests(tiny_dir(tmp_path))
    assert first == second
    assert {"explorer/model.safetensors", "synthesizer/model.safetensors",
            "thinker/model.safetensors", "explorer/tokenizer.json"} <= set(first)


def test_tiny_home_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("A2R_HOME", str(tmp_path / "h"))
    assert tiny_dir() == tmp_path / "h" / "tiny-v1"
    monkeypatch.delenv("A2R_HOME")
    assert tiny_dir() == Path.home() / ".cache" / "a2r" / "tiny-v1"


def test_ensure_rebuilds_an_interrupted_build(tmp_path):
    broken = tiny_dir(tmp_path) / "explorer"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{")           # half-written, no completion marker
    paths = ensure_tiny_models(tmp_path, thinker=False)
    assert paths.thinker is None
    assert AutoModelForCausalLM.from_pretrained(paths.explorer).config.model_type == "qwen3"


def test_tiny_tokenizer(paths):
    saved = AutoTokenizer.from_pretrained(paths.explorer)
    built = build_tiny_tokenizer()
    assert saved.get_vocab() == built.get_vocab()
    text = "Solve 3×4 − 2 = ?\n\\boxed{\\frac{1}{2}} </think> done."
    ids = saved(text, add_special_tokens=False)["input_ids"]
    assert saved.decode(ids) == text                         # lossless on its alphabet
    assert saved.convert_ids_to_tokens(saved("</think>", add_special_tokens=False)["input_ids"]) \
        == ["</think>"]
    assert saved("é", add_special_tokens=False)["input_ids"] == [saved.unk_token_id]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "unk_token_id"):
        assert getattr(saved, attr) is not None
    chat = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
    for role in ("explorer", "synthesizer", "thinker"):
        config = json.loads((getattr(paths, role) / "config.json").read_text())
        assert config["vocab_size"] >= len(saved)


def test_tiny_thinker_never_predicts_mask(paths, pipeline):
    mask = pipeline.thinker_tokenizer.mask_token_id
    assert pipeline.thinker.config.mask_token_id == mask
    ids = torch.randint(8, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 20:] = mask
    with torch.no_grad():
        logits = pipeline.thinker(ids).logits
    assert (logits.argmax(-1) != mask).all()


# ------------------------------------------------------------------ one real run, checked


def test_run_stages_are_consistent(pipeline, result):
    cfg = pipeline.config
    tok = pipeline.explorer_tokenizer
    assert result.mode == "asymmetric" and a2r.A2RPipeline is A2RPipeline
    e = result.explorer
    assert len(e.texts) == len(e.token_ids) == cfg.num_paths
    assert all(1 <= len(ids) <= cfg.max_new_tokens for ids in e.token_ids)
    assert e.generated_tokens == sum(len(ids) for ids in e.token_ids)
    assert e.prompt == pipeline.explorer_prompt(QUESTION) and QUESTION in e.prompt
    assert e.prompt_tokens == len(tok(e.prompt, add_special_tokens=False)["input_ids"])
    for ids, text in zip(e.token_ids, e.texts):
        body = ids[:-1] if ids[-1] == tok.eos_token_id else ids
        assert text == tok.decode(body, skip_special_tokens=True)
    assert result.references == [
        extract_answer_component(t, max_chars=cfg.answer_max_chars) for t in e.texts]
    assert result.explorer_answers == [extract_final_answer(t) for t in e.texts]
    assert result.pass_at_1_answer == result.explorer_answers[0]
    assert (result.cons_answer, result.cons_votes) == majority_vote(result.explorer_answers)

    t = result.thinker
    assert t is not None and len(t.token_ids[0]) <= cfg.thinker_gen_length
    assert t.prompt == pipeline.thinker_prompt(QUESTION, result.references)
    assert result.trace == t.texts[0]

    s = result.synthesizer
    assert s.prompt == pipeline.synthesizer_prompt(QUESTION, result.references, result.trace)
    for i, ref in enumerate(result.references, start=1):
        assert f"[{i}] {ref or '(no answer)'}" in s.prompt
    assert len(s.token_ids) == 1 and 1 <= len(s.token_ids[0]) <= cfg.synth_max_new_tokens
    assert result.final_answer == extract_final_answer(s.texts[0])
    assert all(stage.seconds >= 0 for stage in (e, t, s)) and result.seconds >= e.seconds


def test_kv_accounting(pipeline, result):
    # explorer: Qwen3, 2 layers, 2 kv heads, head_dim 16, fp32 -> 2 * 2 * 2 * 16 * 4 bytes/token
    assert kv_bytes_per_token(pipeline.explorer) == 512
    assert kv_bytes_per_token(pipeline.synthesizer) == 2 * 3 * 2 * 16 * 4
    kv = result.kv
    assert kv.bytes_per_token == 512 and kv.num_paths == 3 and not kv.symmetric
    assert kv.prompt_tokens == result.explorer.prompt_tokens
    assert kv.explorer_saved_bytes == result.explorer.prompt_tokens * 2 * 512
    assert result.kv_bytes_saved == kv.explorer_saved_bytes
    assert kv.synthesizer_shared_prefix_tokens == 0 and not kv.synthesizer_prefix_reused
    assert kv.reused_prefix_tokens == 0 and "asymmetric" in kv.reuse_note
    assert kv.synthesizer_prefill_tokens == result.synthesizer.prompt_tokens


def test_run_is_reproducible_and_seed_matters(pipeline, result):
    def strip_times(d):
        d = json.loads(json.dumps(d))
        d.pop("seconds")
        for stage in d["stages"].values():
            stage.pop("seconds")
        return d

    again = pipeline.run(QUESTION)
    # Same outputs; the KV accounting differs: the rerun's prompts reuse the first run's blocks.
    assert _outputs(again) == _outputs(result)
    assert again.kv.reused_prefix_tokens > result.kv.reused_prefix_tokens == 0
    assert strip_times(again.to_dict(True))["stages"] == strip_times(result.to_dict(True))["stages"]
    other = pipeline.run(QUESTION, seed=1)
    assert other.explorer.token_ids != result.explorer.token_ids


def test_greedy_explorer_equals_generate(pipeline):
    res = pipeline.run(QUESTION, temperature=0.0, num_paths=2, use_thinker=False)
    first, second = res.explorer.token_ids
    assert first == second
    ids = torch.tensor([pipeline.explorer_tokenizer(res.explorer.prompt,
                                                    add_special_tokens=False)["input_ids"]])
    out = pipeline.explorer.generate(ids, max_new_tokens=SMALL["max_new_tokens"], do_sample=False,
                                     attention_mask=torch.ones_like(ids))
    assert first == out[0, ids.shape[1]:].tolist()
    assert res.thinker is None and res.trace is None


def test_symmetric_mode_reuses_the_shared_prefix(symmetric):
    assert symmetric.symmetric and symmetric.synthesizer is symmetric.explorer
    res = symmetric.run(QUESTION)
    tok = symmetric.explorer_tokenizer
    explorer_ids = tok(res.explorer.prompt, add_special_tokens=False)["input_ids"]
    synth_ids = tok(res.synthesizer.prompt, add_special_tokens=False)["input_ids"]
    common = next(i for i, (a, b) in enumerate(zip(explorer_ids, synth_ids)) if a != b)
    question_tokens = len(tok(QUESTION, add_special_tokens=False)["input_ids"])
    assert res.mode == "symmetric" and res.kv.symmetric
    assert res.kv.synthesizer_shared_prefix_tokens == common > question_tokens
    assert res.kv.synthesizer_reusable_bytes == common * 512
    # Every whole block of the common prefix is reused (prefix reuse is per 16-token block).
    reused = common // 16 * 16
    assert res.kv.synthesizer_prefix_reused and res.kv.reuse_note == ""
    assert res.kv.reused_prefix_tokens == reused >= 16
    assert res.kv.synthesizer_prefill_tokens == len(synth_ids) - reused
    assert res.kv.synthesizer_saved_bytes == reused * 512
    assert res.kv_bytes_saved == res.kv.explorer_saved_bytes + reused * 512
    assert res.to_dict()["kv"]["reused_prefix_tokens"] == reused


def _outputs(result) -> dict:
    """Everything a run produced except timings and the KV accounting."""
    d = json.loads(json.dumps(result.to_dict(include_token_ids=True)))
    for key in ("seconds", "kv", "kv_bytes_saved"):
        d.pop(key)
    for stage in d["stages"].values():
        if stage:
            stage.pop("seconds")
    return d


def _run_logged(pipe, question, **overrides):
    with ForwardLog(pipe.explorer) as log:
        result = pipe.run(question, **overrides)
    return result, log


@pytest.mark.parametrize("question,with_thinker", [(QUESTION, False),
                                                   ("Half of 1, as a decimal?", True)])
def test_symmetric_reuse_equals_no_reuse_and_skips_the_prefix(symmetric, pipeline, question,
                                                              with_thinker):
    """Same outputs (explorer samples, references, trace, greedy synthesis) with and without
    reuse, and the synthesizer forwards only its prompt's tokens after the whole blocks it
    shares with the explorer's."""
    pipe = A2RPipeline(symmetric.explorer, symmetric.explorer_tokenizer,
                       thinker=pipeline.thinker if with_thinker else None,
                       thinker_tokenizer=pipeline.thinker_tokenizer, config=A2RConfig(**SMALL))
    reuse, log = _run_logged(pipe, question)
    plain, plain_log = _run_logged(pipe, question, reuse_prefix_kv=False)
    assert _outputs(reuse) == _outputs(plain)
    assert (reuse.thinker is not None) == with_thinker

    prefix = reuse.kv.reused_prefix_tokens
    explorer_len, synth_len = reuse.explorer.prompt_tokens, reuse.synthesizer.prompt_tokens
    assert prefix == reuse.kv.synthesizer_shared_prefix_tokens // 16 * 16 > 0
    # With reuse: the explorer's prompt, then the synthesizer's rest; without: both whole.
    assert log.prompt_forwards == [explorer_len, synth_len - prefix]
    assert plain_log.prompt_forwards == [explorer_len, synth_len]
    assert reuse.kv.synthesizer_prefill_tokens == synth_len - prefix
    assert log.tokens == plain_log.tokens - prefix                  # decode steps identical
    assert not plain.kv.synthesizer_prefix_reused and plain.kv.reused_prefix_tokens == 0
    assert plain.kv.reuse_note == "reuse_prefix_kv is off"
    assert plain.kv.synthesizer_prefill_tokens == synth_len
    assert plain.kv_bytes_saved == reuse.kv_bytes_saved - prefix * 512


def test_runs_reuse_the_prompts_of_earlier_runs(symmetric):
    """A second run of the same question (e.g. ``a2r eval`` repeating an instruction) prefills
    only what follows the whole blocks the first run's prompts left cached; same outputs."""
    pipe = A2RPipeline(symmetric.explorer, symmetric.explorer_tokenizer, config=A2RConfig(**SMALL))
    first, first_log = _run_logged(pipe, QUESTION)
    second, log = _run_logged(pipe, QUESTION)
    assert _outputs(second) == _outputs(first)
    explorer_len, synth_len = first.explorer.prompt_tokens, first.synthesizer.prompt_tokens
    assert first_log.prompt_forwards[0] == explorer_len
    assert log.prompt_forwards == [explorer_len - (explorer_len - 1) // 16 * 16,
                                   synth_len - (synth_len - 1) // 16 * 16]
    assert second.kv.reused_prefix_tokens == (synth_len - 1) // 16 * 16


class _Reworded(A2RPipeline):
    """Synthesizer prompts that defeat the shared prefix in one of two ways."""

    def __init__(self, base, how):
        super().__init__(base.explorer, base.explorer_tokenizer, config=A2RConfig(**SMALL))
        self.how = how

    def synthesizer_prompt(self, question, references, trace=None):
        prompt = super().synthesizer_prompt(question, references, trace)
        real = any(ref not in ("", "0") for ref in references)     # not a placeholder rendering
        if self.how == "no_common_prefix":          # plain text: not even the chat turn is shared
            return "References first. " + prompt
        if self.how == "longer" and real:           # far longer than the pool estimate
            return prompt.replace("Reference answers:", "Reference answers:" + " pad" * 150)
        return prompt


@pytest.mark.parametrize("how,note", [
    ("no_common_prefix", "shares no whole 16-token block with a cached prompt"),
    ("longer", "a larger pool was built and cached prompts recomputed"),
])
def test_symmetric_reuse_falls_back_or_grows_and_says_so(symmetric, how, note):
    pipe = _Reworded(symmetric, how)
    reuse, log = _run_logged(pipe, QUESTION)
    plain = pipe.run(QUESTION, reuse_prefix_kv=False)
    assert _outputs(reuse) == _outputs(plain)
    kv = reuse.kv
    assert note in kv.reuse_note
    synth_len = reuse.synthesizer.prompt_tokens
    # The synthesizer prefilled its whole prompt: nothing cached matches, or the pool it needed
    # is a new one.
    assert not kv.synthesizer_prefix_reused and kv.reused_prefix_tokens == 0
    assert log.prompt_forwards[-1] == synth_len == kv.synthesizer_prefill_tokens
    assert reuse.kv_bytes_saved == kv.explorer_saved_bytes
    if how == "no_common_prefix":
        assert kv.synthesizer_shared_prefix_tokens == 0
        assert log.prompt_forwards == [reuse.explorer.prompt_tokens, synth_len]


def test_answer_cap_applies(pipeline):
    res = pipeline.run(QUESTION, answer_max_chars=3, use_thinker=False)
    assert all(len(ref) <= 3 for ref in res.references)
    assert all(f"[{i}] {ref or '(no answer)'}" in res.synthesizer.prompt
               for i, ref in enumerate(res.references, start=1))


def test_result_json_round_trip(result):
    d = json.loads(json.dumps(result.to_dict(include_token_ids=True)))
    assert d["stages"]["explorer"]["token_ids"] == result.explorer.token_ids
    assert d["kv_bytes_saved"] == result.kv_bytes_saved
    assert "token_ids" not in result.to_dict()["stages"]["explorer"]


# ------------------------------------------------------------------ scripted explorer


def scripted_result(sequences, input_ids):
    """An ExploreResult holding ``sequences`` (what a scripted explorer returns)."""
    from a2r.explore import ExploreResult

    return ExploreResult(sequences=sequences, prompt_len=input_ids.shape[1], num_blocks=0,
                         block_size=16, peak_blocks_used=0, peak_kv_bytes=0, decode_steps=0)


class ScriptedSampler:
    """Stands in for a2r.explore.explore (what the tree engine calls): returns chosen texts
    (tokenized) and records calls."""

    def __init__(self, tokenizer, explorer_texts, synthesizer_text):
        self.tokenizer = tokenizer
        self.scripts = [explorer_texts, [synthesizer_text]]
        self.calls = []

    def __call__(self, model, input_ids, widths, max_new_tokens, sampling, **kwargs):
        (n,) = widths
        self.calls.append(dict(n=n, max_new_tokens=max_new_tokens, prompt=input_ids,
                               sampling=sampling, **kwargs))
        texts = self.scripts[len(self.calls) - 1]
        assert len(texts) == n
        eos = self.tokenizer.eos_token_id
        return scripted_result([self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
                                for t in texts], input_ids)


def test_scripted_baselines_and_grading(pipeline, monkeypatch):
    tok = pipeline.explorer_tokenizer
    explorer_texts = [
        "<think>12*7 = 84</think> The answer is \\boxed{84}.",
        "<think>hmm</think> 12 * 7 = 74",
        "<think>long</think> I think it is \\boxed{84.0}",
        "<think>no idea",
    ]
    sampler = ScriptedSampler(tok, explorer_texts, "<think>refs agree</think> \\boxed{84}")
    monkeypatch.setattr(a2r.explore, "explore", sampler)
    res = pipeline.run(QUESTION, num_paths=4, temperature=0.7, seed=5)

    assert [c["n"] for c in sampler.calls] == [4, 1]
    assert sampler.calls[0]["sampling"].temperature == 0.7 and sampler.calls[0]["seed"] == 5
    assert sampler.calls[1]["sampling"].temperature == 0.0             # greedy synthesizer
    assert sampler.calls[0]["eos_token_id"] == tok.eos_token_id
    assert res.explorer.texts == explorer_texts                         # eos cut, text decoded
    assert res.references == ["The answer is \\boxed{84}.", "12 * 7 = 74",
                              "I think it is \\boxed{84.0}", "<think>no idea"]
    assert res.explorer_answers == ["84", "74", "84.0", None]
    assert (res.pass_at_1_answer, res.cons_answer, res.cons_votes) == ("84", "84", 2)
    assert res.final_answer == "84"
    assert res.grade("84") == {"pass_at_1": True, "mean_at_1": 0.5, "cons_at_n": True, "a2r": True}
    assert res.grade("74") == {"pass_at_1": False, "mean_at_1": 0.25, "cons_at_n": False,
                               "a2r": False}
    assert "[2] 12 * 7 = 74" in res.synthesizer.prompt
    assert res.thinker is not None and res.trace in res.synthesizer.prompt


def test_scripted_tie_goes_to_the_earliest_answer(pipeline, monkeypatch):
    sampler = ScriptedSampler(pipeline.explorer_tokenizer,
                              ["\\boxed{3}", "\\boxed{4}", "\\boxed{4}", "\\boxed{3}"], "5")
    monkeypatch.setattr(a2r.explore, "explore", sampler)
    res = pipeline.run(QUESTION, num_paths=4, use_thinker=False)
    assert (res.cons_answer, res.cons_votes, res.final_answer) == ("3", 2, "5")
    assert "Reasoning trace" not in res.synthesizer.prompt


# ------------------------------------------------------------------ set-up errors


def test_symmetric_needs_identical_tokenizers(pipeline):
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatchError, match="identical tokenizers"):
        A2RPipeline(pipeline.explorer, pipeline.explorer_tokenizer, pipeline.explorer, other)
    with pytest.warns(UserWarning, match="different vocabularies"):
        A2RPipeline(pipeline.explorer, pipeline.explorer_tokenizer, pipeline.synthesizer, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # same vocabulary: no warning
        A2RPipeline(pipeline.explorer, pipeline.explorer_tokenizer, pipeline.synthesizer,
                    build_tiny_tokenizer())


def test_from_pretrained_errors(tmp_path, paths):
    with pytest.raises(ModelDirError, match="explorer model directory not found"):
        A2RPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelDirError, match="no config.json"):
        A2RPipeline.from_pretrained(tmp_path)
    with pytest.raises(ModelDirError, match="thinker model directory not found"):
        A2RPipeline.from_pretrained(paths.explorer, thinker=tmp_path / "nope")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitectureError, match="not a decoder-only causal LM"):
        A2RPipeline.from_pretrained(bert)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(UnsupportedArchitectureError, match="does not know"):
        A2RPipeline.from_pretrained(unknown)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((paths.explorer / name).read_bytes())
    with pytest.raises(ModelDirError, match="no loadable weights"):
        A2RPipeline.from_pretrained(no_weights)
    with pytest.raises(ValueError, match="dtype"):
        A2RPipeline.from_pretrained(paths.explorer, dtype="int8")


@pytest.mark.parametrize("overrides, match", [
    (dict(num_paths=0), "num_paths"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(thinker_gen_length=12, thinker_block_length=8), "multiple of thinker_block_length"),
    (dict(thinker_gen_length=16, thinker_block_length=8, thinker_steps=3), "thinker_steps"),
    (dict(no_such_field=1), "unknown A2RConfig fields"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(thinker_threshold=1.5), "thinker_threshold"),
    (dict(thinker_block_length=0), "thinker_block_length"),
    (dict(thinker_remasking="lowest"), "thinker_remasking"),
    (dict(thinker_cache="full"), "thinker_cache"),
    (dict(answer_mode="middle"), "answer_mode"),
    (dict(backend="cudnn"), "backend"),
])
def test_run_rejects_bad_config_before_running(pipeline, overrides, match, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the explorer ran despite bad input")

    monkeypatch.setattr(a2r.explore, "explore", must_not_run)
    with pytest.raises(ValueError, match=match):
        pipeline.run(QUESTION, **overrides)
    with pytest.raises(ValueError, match="question"):
        pipeline.run("   ")


def test_config_fields_are_documented_defaults():
    cfg = A2RConfig()
    cfg.validate()
    assert dataclasses.asdict(cfg)["num_paths"] == 4
    with pytest.raises(PipelineError):
        A2RConfig(sampling=SamplingParams(temperature=-1)).validate()


# ------------------------------------------------------------------ prompts built once


def test_each_prompt_is_rendered_and_encoded_once_per_question(paths, monkeypatch):
    """One run (symmetric, with a thinker): the up-front length check, the explorer's pool
    sizing and the stages ask for the same prompts; each distinct one is rendered once and
    tokenised once."""
    pipe = A2RPipeline.from_pretrained(paths.explorer, None, paths.thinker, dtype="float32",
                                       config=A2RConfig(**SMALL))
    rendered, encoded = [], []
    classes = {type(pipe.explorer_tokenizer), type(pipe.thinker_tokenizer)}
    for cls in classes:
        call, template = cls.__call__, cls.apply_chat_template

        def counting_call(self, text, *args, _call=call, **kwargs):
            encoded.append((id(self), text))
            return _call(self, text, *args, **kwargs)

        def counting_template(self, conversation, *args, _template=template, **kwargs):
            rendered.append((id(self), conversation[0]["content"]))
            return _template(self, conversation, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counting_call)
        monkeypatch.setattr(cls, "apply_chat_template", counting_template)
    result = pipe.run(QUESTION)
    assert result.thinker is not None and rendered and encoded
    repeated = {text: n for text, n in Counter(encoded).items() if n > 1}
    assert not repeated, repeated
    repeated = {text: n for text, n in Counter(rendered).items() if n > 1}
    assert not repeated, repeated
    # explorer; thinker and synthesizer with empty references (the check), then with the paths'
    assert len(encoded) == 5
