"""``benchmarks/gpu/gpu_session.sh verify``: the one-call GPU proof, checked on CPU by its dry run.

The device tool gives a session 15 minutes of device time in all (machine start included), so
``verify`` must finish in 8 minutes (480 s). Its steps are a table with a time budget each; the
dry run (``--dry-run --assume-gpu``) prints the plan on a simulated clock. These tests hold the
plan to the budget and to the required order, check that every pytest id and benchmark flag it
uses still exists, and check the verdict lines (``benchmarks/verdict.py``) on synthetic results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "gpu_session.sh"
VERIFY_LIMIT_S = 480   # issue 11: verify finishes in 8 minutes of wall time

# benchmarks/ is not a package: load verdict.py by path, leaving sys.path alone
_spec = importlib.util.spec_from_file_location("a2r_bench_verdict", ROOT / "benchmarks" / "verdict.py")
verdict = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)   # dataclasses need it
_spec.loader.exec_module(verdict)

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
    assert "--ops denoise --shapes 8x256x126464" in commands["bench-denoise"]
    assert "--ops entropy-bound" in commands["bench-entropy-bound"]   # issue 15: V=262144
    assert "--prompt-lens 8192 --ns 32" in commands["bench-explore"]
    assert "hf-generate" in commands["bench-explore"]
    assert "--tool memcheck" in commands["sanitize-memcheck"]
    assert "--tool racecheck" in commands["sanitize-racecheck"]


def test_a_budget_raised_past_the_limit_is_refused(tmp_path):
    """The check above must catch a step whose budget grows: the plan no longer fits, and the
    script refuses to start rather than overrun the device call."""
    copy = tmp_path / "benchmarks" / "gpu" / "gpu_session.sh"
    copy.parent.mkdir(parents=True)
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


CARRY = re.compile(r"^# carry: checkout ([\d.]+) MiB \+ \.whl ([\d.]+) MiB = ([\d.]+) MiB of the "
                   r"device tool's 64 MiB", re.M)


def test_dry_run_checks_what_the_device_call_carries(tmp_path):
    """The checkout plus .whl must fit in the device tool's 64 MiB; the dry run says how much
    travels, and refuses (exit 2) when it would not fit."""
    sizes = CARRY.search(dry_run(tmp_path).stdout)
    assert sizes is not None and float(sizes.group(3)) <= 64
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "gpu").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu" / "gpu_session.sh")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.whl/\n")   # as in the repository: wheels never committed
    (repo / ".whl").mkdir()
    with open(repo / ".whl" / "big-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(65 * 2**20)   # sparse: 65 MiB apparent size, no disk used
    result = dry_run(tmp_path, repo / "benchmarks" / "gpu" / "gpu_session.sh")
    assert result.returncode == 2
    sizes = CARRY.search(result.stdout)
    assert sizes is not None and float(sizes.group(2)) == 65.0 and float(sizes.group(1)) < 1
    assert "OVER the limit" in result.stdout and "=== [verify]" not in result.stdout


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
    assert {"tests/test_cuda.py", "tests/test_cuda_gpu.py", "tests/test_attention.py",
            "tests/test_paged_attention.py", "tests/test_denoise.py"} <= families
    if not torch.cuda.is_available():
        # KERNEL_BACKENDS holds "cuda" only with a GPU: the triton twin of such an id must collect.
        ids = sorted({i.replace("[cuda]", "[triton]") for i in ids})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", *ids], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, ("an id of VERIFY_TESTS in benchmarks/gpu/gpu_session.sh no longer "
                                    "collects: update it to the renamed test\n"
                                    + result.stdout[-3000:] + result.stderr[-3000:])
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert sorted(collected) == sorted(ids)


def test_verify_uses_only_flags_and_providers_the_scripts_have(tmp_path):
    """Each benchmarks/<script>.py call in the plan passes only options its argparse defines, and
    names only providers the script knows (a bench drops an unknown provider silently, and its
    target would then read MISSING on the GPU)."""
    plan = parse_plan(dry_run(tmp_path).stdout)
    flags = providers = 0
    for name, _, _, command in plan["ran"]:
        for script, args in re.findall(r"benchmarks/(\w+\.py)((?:\s+[^;&|]+)?)", command):
            source = (ROOT / "benchmarks" / script).read_text()
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", args):
                assert f'"{flag}"' in source, f"{name}: {script} has no {flag}"
                flags += 1
            named = re.search(r"--providers\s+((?:[^-\s][^\s]*\s*)+)", args)
            for provider in re.split(r"[,\s]+", named.group(1).strip()) if named else []:
                assert f'"{provider}"' in source, f"{name}: {script} has no provider {provider}"
                providers += 1
    assert flags >= 15 and providers >= 8


# A GPU machine faked on CPU: nvidia-smi and compute-sanitizer stand-ins on PATH, and PYTHON a
# wrapper that runs verdict.py for real, appends made-up rows to the result files for the bench
# scripts (no torch import: seconds matter in CI), and succeeds at once for everything else.
FAKE_NVIDIA_SMI = """#!/bin/bash
case "$*" in *compute_cap*) echo 9.0 ;; -L) echo "GPU 0: NVIDIA H200 (fake)" ;; esac
"""
FAKE_PYTHON = """#!/bin/bash
case "$1" in
  benchmarks/verdict.py) exec "$REAL_PYTHON" "$@" ;;
  benchmarks/bench_*.py) exec "$REAL_PYTHON" "$FAKE_BENCH" "$@" ;;
  -m) [[ "$*" == *--collect-only* ]] && cat "$FAKE_COLLECTED"; exit 0 ;;
  -c) [[ "$2" != "import flashinfer" || -n "$FAKE_FLASHINFER" ]] ;;
  *) exit 0 ;;
esac
"""
FAKE_BENCH = """
import argparse, json, os, sys
def write_results(path, rows):
    old = json.load(open(path)) if os.path.exists(path) else []
    json.dump(old + rows, open(path, "w"))
script = os.path.basename(sys.argv[1])
p = argparse.ArgumentParser()
for flag in ("--P", "--N", "--S", "--heads", "--providers", "--out", "--shapes", "--rep", "--ops"):
    p.add_argument(flag)
p.add_argument("--prompt-lens"); p.add_argument("--ns")
args, _ = p.parse_known_args(sys.argv[2:])
dev = dict(device="NVIDIA H200", copy_gbps=4000.0, dtype="bfloat16")
if script == "bench_tree_attention.py":
    hq, hkv = map(int, args.heads.split("/"))
    shape = dict(P=int(args.P), N=int(args.N), S=int(args.S), Hq=hq, Hkv=hkv, D=128)
    rows = [dict(dev, provider=name, **shape, median_us=10.0, gbps=3000.0, speedup_vs_paged=9.0)
            for name in args.providers.split(",")]
    write_results(f"benchmarks/results/{args.out or 'tree_attention'}.json", rows)
elif script == "bench_denoise.py" and args.ops == "entropy-bound":
    rows = [dict(dev, op="entropy-bound", provider="a2r-eb-step", B=8, L=256, V=262144,
                 logits=kind, median_us=5.0, gbps=3000.0, **{"speedup_vs_hf-eb-sampler": 7.0})
            for kind in ("flat", "lm-like")]
    write_results("benchmarks/results/entropy_bound.json", rows)
elif script == "bench_denoise.py":
    b, l, v = map(int, args.shapes.split("x"))
    rows = [dict(dev, provider="a2r-denoise", B=b, L=l, V=v, masked_fraction=1.0, median_us=5.0,
                 gbps=3200.0, **{"speedup_vs_llada-torch": 6.0})]
    write_results("benchmarks/results/denoise.json", rows)
else:
    rows = [dict(dev, provider="a2r-explore", P=int(args.prompt_lens), n=int(args.ns),
                 new_tokens=256, median_s=1.0, speedup_vs_hf=2.0)]
    write_results("benchmarks/results/explore.json", rows)
"""


@pytest.mark.parametrize("wheel", [True, False], ids=["flashinfer-carried", "no-wheel"])
def test_verify_live_path_on_a_faked_gpu(tmp_path, wheel):
    """The live runner, not the dry run: steps run in order, each result file reaches
    $OUT/results/ when its step ends, committed rows are not judged, the summary ends with the
    verdict, the FlashInfer step (an `extra`) gets the seconds the others saved, and $OUT stays
    within what the device tool returns (8 files, 2 folders down). One test id does not collect
    there: the others still run, and the pytest step says which one is missing. Without the
    carried wheel, the wheels and FlashInfer steps are skipped and nothing else changes."""
    repo, fake = tmp_path / "repo", tmp_path / "bin"
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    old_cuda_row = dict(device="NVIDIA H200", provider="a2r-cuda", B=8, L=256, V=126464,
                        dtype="bfloat16", masked_fraction=1.0, median_us=1.0, gbps=3900.0,
                        copy_gbps=4000.0)
    write(repo / "benchmarks" / "results", "denoise", [old_cuda_row])
    if wheel:
        (repo / ".whl").mkdir()
        (repo / ".whl" / "flashinfer_python-0.0-py3-none-any.whl").write_text("")
    fake.mkdir()
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("compute-sanitizer", "#!/bin/bash\n"),
                       ("cuobjdump", "#!/bin/bash\n"), ("python-fake", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "fake_bench.py").write_text(FAKE_BENCH)
    ids = subprocess.run(["bash", str(SCRIPT), "--list-tests"], capture_output=True, text=True,
                         check=True).stdout.split()
    (tmp_path / "collected.txt").write_text("\n".join(ids[1:]) + "\n12 tests collected\n")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out),
               TMPDIR=str(tmp_path), PYTHON=str(fake / "python-fake"),
               REAL_PYTHON=sys.executable, FAKE_BENCH=str(tmp_path / "fake_bench.py"),
               FAKE_COLLECTED=str(tmp_path / "collected.txt"),
               FAKE_FLASHINFER="1" if wheel else "")
    env.pop("A2R_SESSION_BUDGET_S", None)
    result = subprocess.run(["bash", str(repo / "benchmarks" / "gpu" / "gpu_session.sh"), "verify"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"verify: {len(ids) - 1} of {len(ids)} test ids collected" in result.stdout
    assert f"verify: not collected:\n{ids[0]}\n" in result.stdout
    status = {step: st for st, step in re.findall(r"^(\S+)\s+\d+s / \d+\s+(\S+)",
                                                  (out / "summary.txt").read_text(), re.M)}
    plan = parse_plan(dry_run(tmp_path / "dry").stdout)
    assert status.pop("pytest") == "FAIL(1)"
    skipped = {"wheels": "SKIPPED", "bench-tree-flashinfer": "SKIPPED"} if not wheel else {}
    assert status == {name: skipped.get(name, "ok") for name in plan["names"] if name != "pytest"}
    started = re.findall(r"^=== \[verify\] (\S+) \(limit (\d+)s", result.stdout, re.M)
    assert [name for name, _ in started] == [n for n in plan["names"] if n not in skipped]
    limits = dict(started)
    budgets = dict(zip(plan["names"], plan["budgets"]))
    assert int(limits["pytest"]) == budgets["pytest"]
    if wheel:
        assert int(limits["bench-tree-flashinfer"]) > 3 * budgets["bench-tree-flashinfer"]
    copied = sorted(p.name for p in (out / "results").iterdir())
    assert copied == ["denoise.json", "entropy_bound.json", "explore.json",
                      "tree_attention.json"] + ["tree_attention_flashinfer.json"] * wheel
    assert result.stdout.count("-> " + str(out / "results")) == 5 + wheel  # both tree steps copy
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    summary = (out / "summary.txt").read_text().splitlines()
    verdicts = [l for l in summary if re.match(r"(PASS|FAIL|INFO|MISSING) ", l)]
    assert len(verdicts) == len(verdict.TARGETS)
    assert summary.index(verdicts[0]) > max(i for i, l in enumerate(summary) if " verdict " in l)
    assert any(l.startswith("PASS    #2 a2r-tree speedup_vs_paged at P=1k N=4 S=128 8/1: 9")
               for l in verdicts)
    assert any(l.startswith("FAIL    #4 a2r-explore speedup_vs_hf at P=8k n=32 256 new: 2")
               for l in verdicts)
    # the committed a2r-cuda denoise row came with the checkout: not this run's
    assert any(l.startswith("MISSING #6 a2r-cuda copy_fraction at B=8 L=256 V=126464")
               for l in verdicts)
    assert any(l.startswith("INFO    #2 flashinfer-cascade") for l in verdicts) == wheel
    assert any(l.startswith("PASS    #15 a2r-eb-step speedup_vs_hf-eb-sampler at B=8 L=256 "
                            "V=262144 lm-like: 7") for l in verdicts)
    assert summary[-1].startswith("# total ")


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
