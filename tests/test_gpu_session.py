"""``benchmarks/gpu_session.sh verify``: the one-call GPU proof, checked on CPU by its dry run.

The device tool gives a session 15 minutes of device time in all (machine start included), so
``verify`` must finish in 8 minutes (480 s). Its steps are a table with a time budget each; the
dry run (``--dry-run --assume-gpu``) prints the plan on a simulated clock. These tests hold the
plan to the budget and to the required order, check that every pytest id and benchmark flag it
uses still exists, and check the verdict lines (``benchmarks/verdict.py``) on synthetic results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
VERIFY_LIMIT_S = 480   # issue 11: verify finishes in 8 minutes of wall time

sys.path.insert(0, str(ROOT / "benchmarks"))
import verdict  # noqa: E402

PLAN_ROW = re.compile(r"^#   (\S+)\s+(\d+)s\s+(\d+) ->\s+(\d+)\s+(must|spare|extra)\s+(\S+)$")
PLAN_TOTAL = re.compile(r"^# verify plan total: (\d+)s of steps \+ (\d+)s reserve = (\d+)s (<=|>) "
                        r"(\d+)s budget")
STEP_LINE = re.compile(r"^=== \[verify\] (\S+) \(limit (\d+)s, at t=(\d+)s\): (.*)$")
SIMULATED_TOTAL = re.compile(r"^# total (\d+)s \(simulated\) of (\d+)s budget")


def dry_run(tmp_path: Path, script: Path = SCRIPT, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("A2R_SESSION_BUDGET_S", "OUT")}
    env["OUT"] = str(tmp_path / "out")
    return subprocess.run(["bash", str(script), "--dry-run", "--assume-gpu", *args, "verify"],
                          capture_output=True, text=True, env=env, timeout=60)


def parse_plan(stdout: str) -> dict:
    lines = stdout.splitlines()
    rows = [m.groups() for m in map(PLAN_ROW.match, lines) if m]
    totals = [m.groups() for m in map(PLAN_TOTAL.match, lines) if m]
    steps = [m.groups() for m in map(STEP_LINE.match, lines) if m]
    simulated = [m.groups() for m in map(SIMULATED_TOTAL.match, lines) if m]
    assert rows and len(totals) == 1, stdout
    steps_s, reserve_s, planned_s, _, budget_s = totals[0]
    return dict(names=[r[0] for r in rows], budgets=[int(r[1]) for r in rows],
                starts=[int(r[2]) for r in rows], steps_s=int(steps_s), reserve_s=int(reserve_s),
                planned_s=int(planned_s), budget_s=int(budget_s),
                ran=[(s[0], int(s[1]), int(s[2]), s[3]) for s in steps],
                simulated_s=int(simulated[0][0]) if simulated else None)


def test_verify_plan_fits_in_8_minutes_in_the_required_order(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = parse_plan(result.stdout)
    # the printed total is the sum of the printed budgets, and it fits with the reserve
    assert plan["steps_s"] == sum(plan["budgets"])
    assert plan["planned_s"] == plan["steps_s"] + plan["reserve_s"]
    assert plan["planned_s"] <= VERIFY_LIMIT_S, result.stdout
    assert plan["budget_s"] <= VERIFY_LIMIT_S
    assert all(b > 0 for b in plan["budgets"])
    # the simulated clock: each step starts where the last one's budget ended
    assert plan["starts"] == [sum(plan["budgets"][:i]) for i in range(len(plan["budgets"]))]
    assert plan["simulated_s"] is not None and plan["simulated_s"] <= VERIFY_LIMIT_S
    # every planned step ran in the dry run, in the plan's order, within its budget
    assert [s[0] for s in plan["ran"]] == plan["names"]
    assert all(limit >= budget for (_, limit, _, _), budget in zip(plan["ran"], plan["budgets"]))
    # the order: build, GPU tests, memcheck then racecheck, the benchmarks, the verdict
    names = plan["names"]
    order = ["build", "pytest", "sanitize-memcheck", "sanitize-racecheck", "bench-tree-P8k-N64",
             "bench-tree-P1k-N4", "bench-denoise", "bench-explore", "verdict"]
    assert [n for n in names if n in order] == order
    assert names[-1] == "verdict"
    assert names.index("bench-tree-flashinfer") > names.index("bench-tree-P1k-N4")
    # the headline rows are the targets' shapes and baselines
    commands = {name: cmd for name, _, _, cmd in plan["ran"]}
    assert "A2R_CUDA_ARCHS=90 " in commands["build"]   # sm_90 only
    assert "--P 8192 --N 64 --S 128 --heads 32/8" in commands["bench-tree-P8k-N64"]
    assert "--P 1024 --N 4 --S 128 --heads 8/1" in commands["bench-tree-P1k-N4"]
    for name in ("bench-tree-P8k-N64", "bench-tree-P1k-N4"):
        assert "a2r-tree,a2r-paged,a2r-cuda" in commands[name]
    assert "flashinfer-cascade" in commands["bench-tree-flashinfer"]
    assert "--shapes 8x256x126464" in commands["bench-denoise"]
    assert "--prompt-lens 8192 --ns 32" in commands["bench-explore"]
    assert "hf-generate" in commands["bench-explore"]
    assert "--tool memcheck" in commands["sanitize-memcheck"]
    assert "--tool racecheck" in commands["sanitize-racecheck"]


def test_a_budget_raised_past_the_limit_is_refused(tmp_path):
    """The check above must catch a step whose budget grows: the plan no longer fits, and the
    script refuses to start rather than overrun the device call."""
    copy = tmp_path / "benchmarks" / "gpu_session.sh"
    copy.parent.mkdir()
    text = SCRIPT.read_text()
    raised, count = re.subn(r"(plan_step pytest\s+)\d+", r"\g<1>400", text)
    assert count == 1
    copy.write_text(raised)
    result = dry_run(tmp_path, copy)
    assert result.returncode == 2
    plan = parse_plan(result.stdout)
    assert plan["planned_s"] > VERIFY_LIMIT_S
    assert "DOES NOT FIT, nothing run" in result.stdout
    assert plan["ran"] == []
    # so does a budget given on the command line that the plan cannot fit in
    result = dry_run(tmp_path, SCRIPT, "--budget", "300")
    assert result.returncode == 2 and "DOES NOT FIT" in result.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the no-GPU path")
def test_verify_without_a_gpu_runs_nothing(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", str(SCRIPT), "verify"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2
    assert "verify needs a CUDA GPU" in result.stdout
    assert "=== [verify]" not in result.stdout


def test_verify_pytest_selection_is_collected():
    """Every id in VERIFY_TESTS still names a test (a renamed test or parameter would make the
    GPU call's pytest step end in 'not found')."""
    ids = subprocess.run(["bash", str(SCRIPT), "--list-tests"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert len(ids) >= 20 and len(set(ids)) == len(ids)
    families = {i.split("::")[0] for i in ids}
    assert families == {"tests/test_cuda.py", "tests/test_attention.py", "tests/test_denoise.py"}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", *ids], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert sorted(collected) == sorted(ids)


def test_verify_uses_only_flags_the_scripts_have(tmp_path):
    """Each benchmarks/<script>.py call in the plan passes only options its argparse defines."""
    plan = parse_plan(dry_run(tmp_path).stdout)
    checked = 0
    for name, _, _, command in plan["ran"]:
        for call in re.findall(r"benchmarks/(\w+\.py)((?:\s+[^;&|]+)?)", command):
            script, args = call
            source = (ROOT / "benchmarks" / script).read_text()
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", args):
                assert f'"{flag}"' in source, f"{name}: {script} has no {flag}"
                checked += 1
    assert checked >= 15


# ------------------------------------------------------------------------------- verdict.py
ROW_8K = dict(device="NVIDIA H200", provider="a2r-tree", P=8192, N=64, S=128, Hq=32, Hkv=8,
              D=128, dtype="bfloat16", median_us=100.0, gbps=3500.0, copy_gbps=4300.0,
              speedup_vs_paged=9.5)


def write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows))


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_verdict_pass_fail_and_missing(tmp_path, capsys):
    slow = dict(ROW_8K, provider="a2r-cuda", gbps=1000.0)
    write(tmp_path / "results", "tree_attention", [ROW_8K, slow])
    assert verdict.main(["--results", str(tmp_path / "results")]) == 0
    out = lines_of(capsys)
    assert "PASS    #2 a2r-tree copy_fraction at P=8k N=64 S=128 32/8: 0.814 (target >= 0.7)" \
        " [NVIDIA H200]" in out
    assert any(line.startswith("PASS    #2 a2r-tree speedup_vs_paged at P=8k") for line in out)
    assert any(line.startswith("FAIL    #6 a2r-cuda copy_fraction at P=8k N=64 S=128 32/8: 0.233")
               for line in out)
    # no 1k row, no denoise or explore file: MISSING, never PASS
    assert any(line.startswith("MISSING #2 a2r-tree speedup_vs_paged at P=1k") for line in out)
    assert any(line.startswith("MISSING #4 a2r-explore speedup_vs_hf") for line in out)
    assert out[-1] == f"verdict: 1 FAIL, {len(verdict.TARGETS) - 3} MISSING, 2 PASS"


def test_verdict_ignores_rows_that_were_there_before_the_run(tmp_path, capsys):
    """The committed result files travel to the device: their rows are not this run's."""
    old_denoise = dict(device="NVIDIA H200", provider="a2r-denoise", B=8, L=256, V=126464,
                       dtype="bfloat16", masked_fraction=1.0, median_us=150.0, gbps=3500.0,
                       copy_gbps=4300.0, **{"speedup_vs_llada-torch": 20.0})
    write(tmp_path / "before", "tree_attention", [ROW_8K])
    write(tmp_path / "before", "denoise", [old_denoise])
    remeasured = dict(ROW_8K, gbps=2000.0, median_us=170.0, speedup_vs_paged=5.0)
    write(tmp_path / "results", "tree_attention", [remeasured])
    write(tmp_path / "results", "denoise", [old_denoise])
    verdict.main(["--results", str(tmp_path / "results"), "--baseline", str(tmp_path / "before")])
    out = lines_of(capsys)
    assert any(line.startswith("FAIL    #2 a2r-tree copy_fraction at P=8k N=64 S=128 32/8: 0.465")
               for line in out)
    assert any(line.startswith("MISSING #3 a2r-denoise copy_fraction") for line in out)
    assert not any(line.startswith("PASS") for line in out)


def test_verdict_device_filter_info_rows_and_unreadable_files(tmp_path, capsys):
    other = dict(ROW_8K, device="NVIDIA H100 80GB HBM3")
    cascade = dict(ROW_8K, provider="flashinfer-cascade", speedup_vs_paged=3.25)
    write(tmp_path / "results", "tree_attention", [other])
    write(tmp_path / "results", "tree_attention_flashinfer", [cascade])
    verdict.main(["--results", str(tmp_path / "results"), "--device", "NVIDIA H200"])
    out = lines_of(capsys)
    assert any(line.startswith("MISSING #2 a2r-tree copy_fraction at P=8k") for line in out)
    assert "INFO    #2 flashinfer-cascade speedup_vs_paged at P=8k N=64 S=128 32/8: 3.25" \
        " [NVIDIA H200]" in out
    (tmp_path / "results" / "denoise.json").write_text("{not json")
    assert verdict.main(["--results", str(tmp_path / "results")]) == 2
    assert "verdict.py: error:" in capsys.readouterr().err
