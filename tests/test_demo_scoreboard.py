"""``a2r demo``'s scoreboard (a2r.demo.scoreboard), the task's term-length mixes, and ``a2r eval``'s
cost and thinker figures, on the random tiny models (fast, CPU)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from a2r.cli import main  # noqa: E402
from a2r.demo import task  # noqa: E402
from a2r.demo.tiny import ensure_tiny_models  # noqa: E402
from a2r.eval import evaluate  # noqa: E402

FAST = ["-n", "2", "--max-new-tokens", "4", "--synth-max-new-tokens", "3",
        "--thinker-gen-length", "8", "--thinker-block-length", "8", "--thinker-steps", "2",
        "--backend", "torch"]
SCOREBOARD_METHODS = {"pass_at_1", "mean_at_1", "cons_at_n", "a2r", "synthesizer_alone",
                      "nar_ar", "ar_ar"}


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.getbasetemp() / "a2r_home"   # the other CLI tests' home
    ensure_tiny_models(home)
    return home


@pytest.fixture(autouse=True)
def a2r_home(tiny_home, monkeypatch):
    monkeypatch.setenv("A2R_HOME", str(tiny_home))


# ------------------------------------------------------------------ demo


def test_demo_json_is_a_scoreboard_with_a_worked_example(capsys):
    from a2r.demo.scoreboard import EXAMPLE_RULE, example_index, heldout_items

    assert main(["demo", *FAST, "--random-models", "--questions", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert "untrained" in payload["note"] and "noise" in payload["note"]
    assert payload["num_questions"] == 3 and payload["num_paths"] == 2
    assert set(payload["accuracy"]) == SCOREBOARD_METHODS
    assert set(payload["cost_per_question"]) == SCOREBOARD_METHODS
    assert set(payload["thinkers"]) == {"nar_ar", "ar_ar"}
    questions = [r["question"] for r in payload["per_question"]]
    assert questions == [q for q, _ in heldout_items(3)]
    assert payload["example_rule"] == EXAMPLE_RULE
    assert payload["example"] in payload["per_question"]
    records = payload["per_question"]
    assert payload["example"] == records[example_index(records)]


def test_demo_text_shows_the_scoreboard_then_one_example(capsys):
    from a2r.demo.scoreboard import EXAMPLE_RULE

    assert main(["demo", *FAST, "--random-models", "--questions", "2", "--no-thinker"]) == 0
    out = capsys.readouterr().out
    assert "Scoreboard: 2 held-out questions" in out
    for label in ("pass@1", "Cons@2", "synthesizer alone", "A2R"):
        assert label in out
    assert "these figures are noise" in out and "untrained" in out
    assert out.count("Worked example") == 1 and EXAMPLE_RULE in out
    assert "NAR->AR" not in out   # --no-thinker: no thinker rows


@pytest.mark.parametrize("omp", [None, "2"])
def test_demo_runs_on_one_thread_unless_omp_num_threads_says(monkeypatch, capsys, omp):
    """The tiny models gain nothing from a second thread and lose 4x when a core is busy
    (DEMO_THREADS); OMP_NUM_THREADS, when set, wins; the caller's count comes back after."""
    import torch

    from a2r.demo import scoreboard

    real, seen = scoreboard.scoreboard, []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(scoreboard, "scoreboard", spy)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", *FAST, "--random-models", "--questions", "1", "--no-thinker"]) == 0
        assert seen == [scoreboard.DEMO_THREADS if omp is None else 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_demo_questions_option_is_checked_before_any_model_runs(capsys):
    with pytest.raises(SystemExit) as exit_:   # argparse's usage error: one line, status 2
        main(["demo", "--questions", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("a2r: error:") and "--questions" in err[0]


def test_example_is_the_first_question_whose_paths_disagree_whatever_the_grades():
    from a2r.demo.scoreboard import example_index

    def record(answers, correct):
        return {"paths": [{"answer": a, "correct": c} for a, c in zip(answers, correct)]}

    records = [record(["5", "5"], [False, False]),       # agree (both wrong)
               record(["7", "8"], [False, False]),       # first disagreement, nothing right
               record(["9", "4"], [True, False])]
    assert example_index(records) == 1
    assert example_index([record(["5", None], [True, False])]) == 0
    assert example_index(records[:1]) == 0                # all agree: the first question


# ------------------------------------------------------------------ task mixes


def test_draw_problems_with_another_mix_of_term_lengths():
    uniform = task.draw_problems(300, seed=5)
    assert task.draw_problems(300, seed=5, digit_weights=None) == uniform
    mostly3 = task.draw_problems(300, task.MIX_HELDOUT_SEED, task.DIGIT_MIXES["mostly-3-digit"])
    digits = [len(str(t)) for p in mostly3 for t in p.terms]
    assert sum(d == 3 for d in digits) / len(digits) > 0.7
    assert {len(p.terms) for p in mostly3} == {3, 4, 5} and max(digits) == 3
    uniform_digits = [len(str(t)) for p in uniform for t in p.terms]
    assert sum(d == 3 for d in uniform_digits) / len(uniform_digits) < 0.45
    for bad in ((1, 1), (1, -1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="digit_weights"):
            task.draw_problems(3, 0, bad)
    assert task.MIX_HELDOUT_SEED not in range(task.TRAIN_SEED, task.TRAIN_SEED + 10)


def test_task_module_writes_a_mix_file(tmp_path):
    out = tmp_path / "mix.jsonl"
    assert task.main([str(out), "--count", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = task.draw_problems(5, task.MIX_HELDOUT_SEED, task.DIGIT_MIXES["mostly-3-digit"])
    assert rows == [p.to_dict() for p in expected]


# ------------------------------------------------------------------ eval cost


def _stage(name, prompt_tokens, paths, forwarded=None):
    from a2r.results import StageReport

    return StageReport(name, "", prompt_tokens, ["x"] * len(paths), [[0] * k for k in paths], 0.0,
                       forwarded_tokens=forwarded)


def test_method_costs_count_every_method_the_same_way():
    stages = {"explorer": _stage("explorer", 10, [4, 6]),
              "synthesizer": _stage("synthesizer", 30, [5]),
              "synthesizer_alone": _stage("synthesizer_alone", 12, [5]),
              "thinker": _stage("thinker", 40, [2], forwarded=3 * 48),
              "ar_thinker": _stage("ar_thinker", 40, [2]),
              "synthesizer_nar": _stage("synthesizer_nar", 33, [5]),
              "synthesizer_ar": _stage("synthesizer_ar", 33, [5])}
    params = {"explorer": 100, "synthesizer": 1000, "synthesizer_alone": 1000, "thinker": 50,
              "ar_thinker": 70, "synthesizer_nar": 1000, "synthesizer_ar": 1000}
    costs = evaluate.method_costs(stages, params)
    explorer_all = 100 * (10 + 4 + 6)          # the prompt once: the paths share it
    assert costs["pass_at_1"] == 100 * (10 + 4)
    assert costs["mean_at_1"] == 100 * (10 + 5)
    assert costs["cons_at_n"] == explorer_all
    assert costs["a2r"] == explorer_all + 1000 * (30 + 5)
    assert costs["synthesizer_alone"] == 1000 * (12 + 5)
    assert costs["nar_ar"] == explorer_all + 50 * 3 * 48 + 1000 * 38
    assert costs["ar_ar"] == explorer_all + 70 * 42 + 1000 * 38
    assert evaluate.method_costs(stages, {**params, "thinker": None})["nar_ar"] is None
    assert "token" in evaluate.COST_DEFINITION and "parameters" in evaluate.COST_DEFINITION


def test_diffusion_thinker_reports_the_positions_it_forwarded(tiny_home):
    from a2r.pipeline import A2RPipeline

    paths = ensure_tiny_models(tiny_home)
    pipe = A2RPipeline.from_pretrained(paths.explorer, paths.synthesizer, paths.thinker)
    result = pipe.run("What is 1 + 2?", num_paths=2, max_new_tokens=4, thinker_gen_length=8,
                      thinker_block_length=4, thinker_steps=6, backend="torch")
    thinker = result.thinker
    # No cache: each of the 6 denoising steps forwards the prompt and the whole 8-token canvas.
    assert thinker.processed_tokens == 6 * (thinker.prompt_tokens + 8)
    explorer = result.explorer
    assert explorer.processed_tokens == explorer.prompt_tokens + explorer.generated_tokens


def test_eval_reports_cost_and_each_thinkers_trace_accuracy_and_time(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in task.draw_problems(2, 1)))
    assert main(["eval", str(data), "--tiny", "--random-models", *FAST, "--no-progress",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cost = summary["cost_per_question"]
    assert set(cost) == SCOREBOARD_METHODS and all(v > 0 for v in cost.values())
    assert cost["cons_at_n"] < cost["a2r"] < cost["nar_ar"]
    assert summary["cost_definition"] == evaluate.COST_DEFINITION
    assert set(summary["parameters"]) >= {"explorer", "synthesizer", "thinker", "ar_thinker"}
    for method, stage in (("nar_ar", "thinker"), ("ar_ar", "ar_thinker")):
        entry = summary["thinkers"][method]
        assert entry["stage"] == stage and 0.0 <= entry["trace_accuracy"] <= 1.0
        assert entry["seconds_per_question"] == pytest.approx(summary["seconds"][stage] / 2)
    assert main(["eval", str(data), "--tiny", "--random-models", *FAST, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cost/q" in out and "token-parameters" in out
    assert "thinker trace accuracy" in out and "ar_thinker trace accuracy" in out
