"""The DiffusionGemma thinker loop (a2r.thinker.gemma) on a tiny model built from a config,
against transformers' own DiffusionGemma generate. Skips on a transformers without DiffusionGemma.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r  # noqa: E402
import a2r_kernels as ak  # noqa: E402
from a2r.thinker import gemma as diffusion_gemma  # noqa: E402

pytestmark = pytest.mark.skipif(not diffusion_gemma.diffusion_gemma_available(),
                                reason="this transformers has no DiffusionGemma")

VOCAB, CANVAS = 101, 8
# Temperatures this small make every step's distribution one-hot to fp32: the sample is the
# argmax and every entropy is 0, so all positions are accepted and no renoise draw matters.
GREEDY_LIKE = dict(t_min=1e-6, t_max=2e-6, entropy_bound=0.1)


@pytest.fixture(scope="module")
def model():
    return diffusion_gemma.build_tiny_diffusion_gemma(VOCAB, canvas_length=CANVAS, seed=0)


def _prompt(batch=2, length=5, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class _CountEncoder:
    """Counts encoder forwards and the batch of each (a forward pre-hook)."""

    def __init__(self, model):
        self.batches = []
        self.handle = model.model.encoder.register_forward_pre_hook(
            lambda module, args, kwargs: self.batches.append(int(kwargs["input_ids"].shape[0])),
            with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_tiny_model_is_small(model):
    assert diffusion_gemma.is_diffusion_gemma(model)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert model.config.text_config.num_experts == 2


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_like_matches_transformers_generate(model, batch):
    """Same starting canvas (the generator's first draw) and one-hot steps: our loop (our step,
    our stopping test on its entropies) gives transformers' generate tokens and stops at the
    same step count."""
    ids = _prompt(batch)
    opts = dict(max_denoising_steps=6, **GREEDY_LIKE)
    result = diffusion_gemma.diffusion_gemma_generate(
        model, ids, gen_length=CANVAS, generator=torch.Generator().manual_seed(7),
        return_details=True, **opts)
    canvas0 = torch.randint(0, VOCAB, (batch, CANVAS), generator=torch.Generator().manual_seed(7))
    expected = model.generate(ids, decoder_input_ids=canvas0, max_new_tokens=CANVAS, **opts)
    assert torch.equal(result.tokens, expected.sequences)
    assert 1 <= result.steps_per_block[0] < 6        # the stopping rule ended the block early
    assert result.sequences == expected.sequences[:, ids.shape[1]:].tolist()


def test_seeded_runs_are_deterministic_and_batches_work(model):
    ids = _prompt(2)
    runs = [a2r.diffusion_generate(model, ids, gen_length=2 * CANVAS - 3, return_details=True,
                                   generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].tokens.shape == (2, ids.shape[1] + 2 * CANVAS - 3)
    assert [len(s) for s in runs[0].sequences] == [2 * CANVAS - 3] * 2   # no EOS configured
    assert bool(((runs[0].tokens >= 0) & (runs[0].tokens < VOCAB)).all())
    assert runs[0].encoder_forward_calls == 2 and len(runs[0].steps_per_block) == 2
    other = a2r.diffusion_generate(model, ids, gen_length=2 * CANVAS - 3,
                                   generator=torch.Generator().manual_seed(4))
    assert other != runs[0].sequences


def test_triton_backend_gives_the_same_tokens(model):
    ids = _prompt(2)
    kwargs = dict(gen_length=CANVAS, max_denoising_steps=3, return_details=True)
    torch_run = diffusion_gemma.diffusion_gemma_generate(
        model, ids, backend="torch", generator=torch.Generator().manual_seed(5), **kwargs)
    triton_run = diffusion_gemma.diffusion_gemma_generate(
        model, ids, backend="triton", generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(torch_run.tokens, triton_run.tokens)


def test_traces_share_one_encoder_pass(model):
    """N traces: the prompt is encoded once (batch 1), each later canvas once for all traces;
    the traces equal a batch of N copies of the prompt run with the same generator."""
    ids = _prompt(1)
    num_traces = 3
    with _CountEncoder(model) as counter:
        traces = a2r.diffusion_generate(model, ids, gen_length=2 * CANVAS, num_traces=num_traces,
                                        generator=torch.Generator().manual_seed(9),
                                        return_details=True)
    assert counter.batches == [1, num_traces]
    assert traces.encoder_forward_calls == 2
    with _CountEncoder(model) as counter:
        copies = a2r.diffusion_generate(model, ids.repeat(num_traces, 1), gen_length=2 * CANVAS,
                                        generator=torch.Generator().manual_seed(9),
                                        return_details=True)
    assert counter.batches == [num_traces, num_traces]
    assert torch.equal(traces.tokens, copies.tokens)
    assert len({tuple(s) for s in traces.sequences}) == num_traces   # independent traces


def test_traces_of_a_batch_are_row_major(model):
    ids = _prompt(2)
    result = diffusion_gemma.diffusion_gemma_generate(
        model, ids, gen_length=CANVAS, num_traces=2, max_denoising_steps=2,
        generator=torch.Generator().manual_seed(2), return_details=True)
    assert result.tokens.shape == (4, ids.shape[1] + CANVAS)
    assert torch.equal(result.tokens[:, :ids.shape[1]], ids.repeat_interleave(2, dim=0))


def test_eos_ends_rows_and_pads_after_it(model):
    """With every token an EOS candidate, a row ends at its first EOS: sequences are trimmed
    there and later canvases are skipped once every row has finished."""
    ids = _prompt(2)
    probe = diffusion_gemma.diffusion_gemma_generate(
        model, ids, gen_length=CANVAS, generator=torch.Generator().manual_seed(6),
        return_details=True, max_denoising_steps=2)
    eos = [int(probe.tokens[0, ids.shape[1] + 2]), int(probe.tokens[1, ids.shape[1] + 1])]
    result = diffusion_gemma.diffusion_gemma_generate(
        model, ids, gen_length=3 * CANVAS, eos_token_id=eos, pad_token_id=0,
        generator=torch.Generator().manual_seed(6), return_details=True, max_denoising_steps=2)
    assert result.steps_per_block[1:] == [0, 0]
    for row, seq in enumerate(result.sequences):
        assert seq[-1] in eos and all(t not in eos for t in seq[:-1])
        tail = result.tokens[row, ids.shape[1] + len(seq):]
        assert bool((tail == 0).all())


def test_generation_config_defaults_and_loading(model, tmp_path):
    """load_diffusion_model detects DiffusionGemma from config.json, and the checkpoint's
    generation_config.json sets the loop's defaults (here max_denoising_steps and no stopping)."""
    model.generation_config.max_denoising_steps = 3
    model.generation_config.stability_threshold = None
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.max_denoising_steps = None
        model.generation_config.stability_threshold = None
    loaded = a2r.thinker.load_diffusion_model(str(tmp_path))
    assert diffusion_gemma.is_diffusion_gemma(loaded)
    result = a2r.diffusion_generate(loaded, _prompt(1), gen_length=2 * CANVAS,
                                    generator=torch.Generator().manual_seed(1),
                                    return_details=True)
    assert result.steps_per_block == [3, 3]
    overridden = diffusion_gemma.diffusion_gemma_generate(
        loaded, _prompt(1), gen_length=CANVAS, max_denoising_steps=2, return_details=True)
    assert overridden.steps_per_block == [2]
    with pytest.raises(ValueError, match="mask_id"):
        a2r.thinker.load_diffusion_model(str(tmp_path), mask_id=5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(block_length=16), "block_length"), (dict(steps=8), "steps"),
    (dict(threshold=0.9), "threshold"), (dict(temperature=0.5), "temperature"),
    (dict(remasking="margin"), "remasking"), (dict(cache="prefix"), "cache"),
    (dict(mask_id=3), "mask_id"), (dict(num_traces=0), "num_traces"),
    (dict(gen_length=0), "gen_length"), (dict(generator=5), "generator"),
])
def test_bad_options_raise_before_any_forward(model, kwargs, name):
    with _CountEncoder(model) as counter:
        with pytest.raises(ValueError, match=name):
            a2r.diffusion_generate(model, _prompt(1), **{"gen_length": CANVAS, **kwargs})
    assert counter.batches == []


def test_bad_generation_overrides_raise(model):
    with pytest.raises(ValueError, match="entropy_bound"):
        diffusion_gemma.diffusion_gemma_generate(model, _prompt(1), gen_length=CANVAS,
                                                 entropy_bound=-1.0)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        diffusion_gemma.diffusion_gemma_generate(model, _prompt(1), gen_length=CANVAS,
                                                 max_denoising_steps=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_backend_unavailable_before_any_forward(model):
    with _CountEncoder(model) as counter:
        with pytest.raises(ak.BackendUnavailable):
            a2r.diffusion_generate(model, _prompt(1), gen_length=CANVAS, backend="cuda")
    assert counter.batches == []


def test_temperature_schedule_and_self_conditioning(model, monkeypatch):
    """Each step hands our step the decoder logits through transformers' own
    LinearTemperatureScheduleLogitsProcessor (steps counted down N..1), and the next decoder
    pass gets those processed logits as self-conditioning (none at the first step)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor)
    num_steps, t_min, t_max = 4, 0.5, 1.5
    raw, processed, conditioning = [], [], []
    forward = model.forward

    def spy_forward(*args, **kwargs):
        conditioning.append(kwargs.get("self_conditioning_logits"))
        out = forward(*args, **kwargs)
        raw.append(out.logits.clone())
        return out

    real_step = ak.entropy_bound_step

    def spy_step(logits, canvas, bound, **kwargs):
        processed.append(logits.clone())
        return real_step(logits, canvas, bound, **kwargs)

    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(diffusion_gemma.ak, "entropy_bound_step", spy_step)
    diffusion_gemma.diffusion_gemma_generate(
        model, _prompt(2), gen_length=CANVAS, max_denoising_steps=num_steps, t_min=t_min,
        t_max=t_max, stability_threshold=0, confidence_threshold=1e-9,
        generator=torch.Generator().manual_seed(3))
    schedule = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, num_steps)
    assert len(raw) == len(processed) == num_steps
    assert conditioning[0] is None
    for i, step in enumerate(range(num_steps, 0, -1)):
        torch.testing.assert_close(processed[i], schedule(None, raw[i], cur_step=step))
        if i:
            torch.testing.assert_close(conditioning[i], processed[i - 1])


def test_cli_run_with_a_diffusion_gemma_thinker_and_traces(tmp_path, tmp_path_factory, capsys):
    """`a2r run --thinker DIR` detects DiffusionGemma from config.json; --thinker-traces 2 gives
    two traces from one encoder pass over the prompt, both handed to the synthesizer."""
    import json

    from transformers import AutoTokenizer

    from a2r.cli import main
    from a2r.demo.tiny import _model_vocab_size, ensure_tiny_models

    paths = ensure_tiny_models(tmp_path_factory.getbasetemp() / "a2r_home")
    tokenizer = AutoTokenizer.from_pretrained(paths.explorer)
    thinker = diffusion_gemma.build_tiny_diffusion_gemma(_model_vocab_size(tokenizer),
                                                         canvas_length=CANVAS, seed=1)
    thinker.generation_config.max_denoising_steps = 2
    thinker.save_pretrained(tmp_path / "dgemma")
    tokenizer.save_pretrained(tmp_path / "dgemma")
    code = main(["run", "--explorer", str(paths.explorer), "--synthesizer", str(paths.synthesizer),
                 "--thinker", str(tmp_path / "dgemma"), "--thinker-traces", "2",
                 "--thinker-gen-length", "32", "-n", "2", "--max-new-tokens", "4",
                 "--synth-max-new-tokens", "3", "--backend", "torch", "--json", "What is 2+2?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    assert payload["models"]["thinker"]["arch"] == "DiffusionGemmaForBlockDiffusion"
    thinker_stage = payload["stages"]["thinker"]
    assert len(thinker_stage["texts"]) == 2
    prompt = payload["stages"]["synthesizer"]["prompt"]
    assert "Trace 1:" in prompt and "Trace 2:" in prompt
    assert payload["trace"].startswith("Trace 1:")


def test_pipeline_refuses_masked_diffusion_knobs_for_a_diffusion_gemma_thinker(model):
    from a2r.pipeline import A2RConfig, A2RPipeline, PipelineError
    from a2r.demo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    explorer = diffusion_gemma.build_tiny_diffusion_gemma(VOCAB)   # never runs here
    pipe = A2RPipeline(explorer, tokenizer, thinker=model, thinker_tokenizer=tokenizer,
                       config=A2RConfig(thinker_steps=8))
    with pytest.raises(PipelineError, match="thinker_steps"):
        pipe.check_question("What is 2+2?")
    pipe.check_question("What is 2+2?", thinker_steps=A2RConfig().thinker_steps)


def test_left_padded_batch_matches_transformers_generate(model):
    """A ragged batch (left padding through attention_mask) over two canvases: the same tokens
    as transformers' generate given the same starting canvases, greedy-like."""
    ids = _prompt(2, 6, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    opts = dict(max_denoising_steps=3, **GREEDY_LIKE)
    result = diffusion_gemma.diffusion_gemma_generate(
        model, ids, attention_mask=mask, gen_length=CANVAS,
        generator=torch.Generator().manual_seed(12), return_details=True, **opts)
    canvas0 = torch.randint(0, VOCAB, (2, CANVAS), generator=torch.Generator().manual_seed(12))
    expected = model.generate(ids, attention_mask=mask, decoder_input_ids=canvas0,
                              max_new_tokens=CANVAS, **opts)
    assert torch.equal(result.tokens, expected.sequences)
    unpadded = diffusion_gemma.diffusion_gemma_generate(
        model, ids, gen_length=CANVAS, generator=torch.Generator().manual_seed(12), **opts)
    assert unpadded[1] != result.sequences[1]      # the mask matters for the padded row


def test_a_transformers_without_diffusion_gemma(monkeypatch, tmp_path, model):
    """What an older transformers sees: nothing is a DiffusionGemma, and loading a DiffusionGemma
    checkpoint says which transformers it needs (ValueError, before reading any weights)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma"}))
    monkeypatch.setattr(diffusion_gemma, "_model_class", lambda: None)
    assert not diffusion_gemma.diffusion_gemma_available()
    assert not diffusion_gemma.is_diffusion_gemma(model)
    with pytest.raises(ValueError, match="transformers >= 5.19"):
        a2r.thinker.load_diffusion_model(str(tmp_path))


def test_pipeline_counts_whole_canvases_against_the_position_limit(model):
    """A thinker_gen_length that fits but whose canvases do not is refused before any model
    runs (DiffusionGemma generates whole canvases)."""
    from a2r.pipeline import A2RConfig, A2RPipeline, PromptTooLongError
    from a2r.demo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    limit = model.config.text_config.max_position_embeddings
    pipe = A2RPipeline(model, tokenizer, thinker=model, thinker_tokenizer=tokenizer,
                       config=A2RConfig(thinker_gen_length=32, thinker_block_length=32))
    question = "What is 2+2?"
    no_references = [""] * pipe.config.num_paths
    prompt_tokens = len(tokenizer(pipe.thinker_prompt(question, no_references),
                                 add_special_tokens=not tokenizer.chat_template)["input_ids"])
    gen_length = limit - prompt_tokens - 1            # fits as tokens, not as whole canvases
    assert gen_length % CANVAS
    with pytest.raises(PromptTooLongError, match="the thinker prompt"):
        pipe.check_question(question, thinker_gen_length=gen_length,
                            thinker_block_length=gen_length)
    pipe.check_question(question, thinker_gen_length=gen_length - CANVAS,      # whole canvases fit
                        thinker_block_length=gen_length - CANVAS, thinker_traces=1,
                        max_new_tokens=1, synth_max_new_tokens=1, answer_max_chars=1)
