"""The training module (smoke configuration) and the committed trained models' recorded results."""

import json
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from a2r.cli import main  # noqa: E402
from a2r.demo import task  # noqa: E402
from a2r.demo.tiny import trained_models, trained_models_dir  # noqa: E402
from a2r.demo.train import results_dir  # noqa: E402

TRAINED = trained_models_dir()
RESULTS = results_dir()
README = RESULTS.parents[1] / "README.md"


# ------------------------------------------------------------------ task


def test_task_questions_and_worked_answers():
    problems = task.draw_problems(500, seed=3)
    assert problems == task.draw_problems(500, seed=3)          # deterministic
    assert problems != task.draw_problems(500, seed=4)
    for p in problems:
        assert task.MIN_TERMS <= len(p.terms) <= task.MAX_TERMS
        assert all(0 <= t < 10 ** task.MAX_DIGITS for t in p.terms)
        assert p.gold == str(sum(p.terms))
    assert {len(p.terms) for p in problems} == {3, 4, 5}
    assert {len(str(t)) for p in problems for t in p.terms} == {1, 2, 3}
    assert task.Problem((347, 85, 912, 6)).question == "What is 347 + 85 + 912 + 6?"
    assert task.reversed_digits(85) == "5800" and task.reversed_digits(1350) == "0531"
    assert task.worked_answer((347, 85, 912, 6)) == (
        "7430+5800=2340\n2340+2190=4431\n4431+6000=0531\n\\boxed{1350}")
    with pytest.raises(ValueError, match="terms"):
        task.worked_answer([5])


def test_heldout_file_is_drawn_with_the_heldout_seed():
    rows = [json.loads(line) for line in (TRAINED / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) >= 200
    assert rows == [p.to_dict() for p in task.draw_problems(len(rows), task.HELDOUT_SEED)]
    assert task.HELDOUT_SEED != task.TRAIN_SEED
    train_questions = {p.question for seed in range(task.TRAIN_SEED, task.TRAIN_SEED + 3)
                       for p in task.draw_problems(2000, seed)}
    overlap = sum(r["question"] in train_questions for r in rows)
    assert overlap <= len(rows) // 20   # the same question can be drawn twice by chance, rarely


# ------------------------------------------------------------------ training module


def test_smoke_training_builds_loadable_deterministic_models(tmp_path):
    from transformers import AutoModelForCausalLM

    from a2r.pipeline import A2RPipeline
    from a2r.demo.train import SMOKE, train_all

    report = train_all(tmp_path / "a", SMOKE, log=None)
    assert set(report["loss"]) == {"explorer", "synthesizer", "thinker", "ar_thinker",
                                   "synthesizer_large"}
    pipe = A2RPipeline.from_pretrained(tmp_path / "a" / "explorer", tmp_path / "a" / "synthesizer",
                                       tmp_path / "a" / "thinker")
    result = pipe.run("What is 1 + 2 + 3?", num_paths=2, max_new_tokens=4, thinker_gen_length=8,
                      thinker_block_length=8, thinker_steps=8, backend="torch")
    assert len(result.explorer.texts) == 2
    assert pipe.thinker_tokenizer.mask_token == "<|mask|>"
    from a2r.thinker.models import is_causal_prompt_model
    assert is_causal_prompt_model(pipe.thinker)   # saved in its config: prefix-causal
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "ar_thinker")
    large = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "synthesizer_large")
    assert large.config.num_hidden_layers == SMOKE.large.layers > SMOKE.layers
    # Deterministic: a second run writes the same weights, byte for byte.
    train_all(tmp_path / "b", SMOKE, log=None)
    for name in ("explorer", "synthesizer", "thinker", "ar_thinker", "synthesizer_large"):
        assert ((tmp_path / "a" / name / "model.safetensors").read_bytes()
                == (tmp_path / "b" / name / "model.safetensors").read_bytes()), name


def test_small_jobs_yield_the_cores_to_the_large_synthesizer(tmp_path, monkeypatch):
    """In the forked workers the larger synthesizer (the critical path) keeps the caller's
    priority and the other jobs run BACKGROUND_NICENESS lower. Each job's "loss" here is the
    niceness its worker trained at."""
    from dataclasses import replace

    from a2r.demo import train

    monkeypatch.setattr(train, "_train", lambda *args, **job: float(os.nice(0)))
    report = train.train_all(tmp_path / "m", replace(train.SMOKE, workers=2), log=None)
    base = os.nice(0)
    assert report["loss"]["synthesizer_large"] == base
    background = min(base + train.BACKGROUND_NICENESS, 19)
    assert background > base
    for name in ("synthesizer", "thinker", "ar_thinker"):
        assert report["loss"][name] == background, name


def test_deepen_starts_as_the_model_it_deepens():
    """The larger synthesizer's added layers start as the identity: same logits as the explorer,
    on a prompt of odd length (fails if the added layers are left at their random init)."""
    import torch
    from transformers import AutoModelForCausalLM

    from a2r.demo.train_large import deepen

    explorer = AutoModelForCausalLM.from_pretrained(TRAINED / "explorer").eval()
    deep = deepen(explorer, 5).eval()
    assert deep.config.num_hidden_layers == 5
    ids = torch.randint(0, explorer.config.vocab_size, (2, 37),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deep(ids).logits, explorer(ids).logits, rtol=0, atol=1e-5)
    assert deep.lm_head.weight.data_ptr() == deep.model.embed_tokens.weight.data_ptr()   # tied
    with pytest.raises(ValueError, match="layers"):
        deepen(explorer, 1)


# ------------------------------------------------------------------ committed models


def test_committed_models_are_small_safetensors():
    paths = trained_models()
    total = 0
    for name in ("explorer", "synthesizer", "thinker", "ar_thinker"):
        directory = getattr(paths, name)
        assert (directory / "model.safetensors").is_file()
        assert not list(directory.glob("*.bin"))
        total += sum(f.stat().st_size for f in directory.iterdir())
    assert total <= 20 * 2 ** 20


def test_committed_models_were_trained_with_the_default_config():
    """train_report.json is the run of FULL, the config ``python -m a2r.demo.train`` trains (fails
    when the defaults change and the committed weights are not retrained)."""
    from dataclasses import asdict

    from a2r.demo.train import FULL

    report = json.loads((TRAINED / "train_report.json").read_text())
    assert report["config"] == json.loads(json.dumps(asdict(FULL)))
    assert "explorer_from" not in report


def _recorded(name):
    return json.loads((RESULTS / name).read_text())


def test_committed_models_reproduce_the_recorded_subset_exactly(tmp_path, capsys):
    """The CI-sized slice of the held-out eval: same command, same numbers, every record."""
    recorded = _recorded("eval_subset.json")
    out = tmp_path / "subset.json"
    argv = ["eval", str(TRAINED / "heldout.jsonl"), *recorded["argv"], "--out", str(out),
            "--plot", str(tmp_path / "acc.png"), "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] == recorded["accuracy"]
    assert summary["accuracy_by_n"] == recorded["accuracy_by_n"]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["answers"] for r in records] == recorded["answers"]


def test_readme_table_matches_the_recorded_heldout_eval():
    recorded = _recorded("eval_heldout.json")
    text = README.read_text()
    assert recorded["command"] in text
    for method, value in recorded["accuracy"].items():
        assert f"| `{method}` | {100 * value:.1f} |" in text, method
    for k, row in recorded["accuracy_by_n"].items():
        cells = " | ".join(f"{100 * row[m]:.1f}" for m in ("mean_at_1", "cons_at_n", "a2r"))
        assert re.search(rf"\| N = {k} \| {re.escape(cells)} \|", text), k
    from a2r.demo.train import targets_line
    assert targets_line(recorded) in text
    # The accuracy-against-N sweep up to N = 8 (a second recorded eval, -n 8).
    sweep = _recorded("eval_n8.json")
    assert list(sweep["accuracy_by_n"]) == ["1", "2", "4", "8"]
    assert sweep["command"] in text
    a2r = " / ".join(f"{100 * row['a2r']:.1f}" for row in sweep["accuracy_by_n"].values())
    assert f"A2R {a2r}%" in text


def test_demo_and_tiny_use_the_trained_models(capsys):
    fast = ["-n", "2", "--max-new-tokens", "4", "--synth-max-new-tokens", "3", "--backend",
            "torch", "--json"]
    assert main(["demo", *fast, "--questions", "2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["models"]["trained"] is True
    assert "python -m a2r.demo.train" in payload["note"]
    assert payload["models"]["explorer"]["path"] == str(TRAINED / "explorer")
    heldout = (TRAINED / "heldout.jsonl").read_text().splitlines()[:2]
    assert [r["question"] for r in payload["per_question"]] == [json.loads(x)["question"]
                                                                for x in heldout]
    # --random-models is a choice among the embedded models: without --tiny it is an error.
    assert main(["run", "--random-models", "--explorer", str(TRAINED / "explorer"), "q"]) == 2
    assert "--random-models needs --tiny" in capsys.readouterr().err
