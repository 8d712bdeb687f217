"""README.md as a newcomer reads it: its Python blocks run as they stand, its set-up commands are
the ones CI runs, the demo needs nothing from the test extra, and the contract it points to is in
the repository."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SET_UP = README[README.index("## Set up on a fresh machine"):README.index("## API tour")]
# Modules only the `test` extra installs; the demo must not need any of them.
TEST_EXTRA_MODULES = ("pytest", "hypothesis", "triton", "matplotlib")


def blocks(text, language):
    return [body for lang, body in FENCED.findall(text) if lang == language]


def run_python(code, tmp_path, *, timeout=600, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("index", range(len(blocks(README, "python"))))
def test_readme_python_block_runs(index, tmp_path):
    code = blocks(README, "python")[index]
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr}"


def test_readme_has_the_python_blocks():
    # The API tour (kernels) and the explorer / thinker tour (a2r).
    assert len(blocks(README, "python")) >= 2


def test_plain_import_reaches_the_submodules(tmp_path):
    proc = run_python("import a2r\n"
                      "print(a2r.explore.explore.__name__,\n"
                      "      a2r.thinker.build_tiny_diffusion_model.__name__)\n"
                      "try:\n"
                      "    a2r.no_such_module\n"
                      "except AttributeError as err:\n"
                      "    print(err)\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["explore build_tiny_diffusion_model",
                                        "module 'a2r' has no attribute 'no_such_module'"]


def test_ci_runs_the_readme_test_command():
    test_command, = [b.strip() for b in blocks(SET_UP, "bash") if "pytest" in b]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_demo_command_installs_what_the_demo_needs_only(tmp_path_factory):
    demo_command, = [b.strip() for b in blocks(SET_UP, "bash") if "a2r demo" in b]
    assert "[test]" not in demo_command and "pip install -e . " in demo_command
    assert "A2R_BUILD_CUDA=0" in SET_UP
    # ... and the demo runs with every module of the test extra unimportable.
    blocker = ("import sys\n"
               f"for name in {TEST_EXTRA_MODULES!r}:\n"
               "    sys.modules[name] = None      # import raises ImportError\n"
               "from a2r.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "demo", "-n", "2", "--max-new-tokens", "4",
         "--synth-max-new-tokens", "3", "--thinker-gen-length", "8", "--thinker-block-length",
         "8", "--thinker-steps", "2", "--json"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1",
             # Same home as test_cli.py: the models are built once per session.
             "A2R_HOME": str(tmp_path_factory.getbasetemp() / "a2r_home")})
    assert proc.returncode == 0, proc.stderr


def test_contract_is_in_the_repository():
    assert "shared/API.md" not in README
    assert "docs/API.md" in README and (ROOT / "docs" / "API.md").is_file()


def test_readme_states_the_bf16_caveat():
    greedy = README[README.index("`temperature=0` reproduces"):][:400]
    assert "bf16" in greedy and "fp32" in greedy
