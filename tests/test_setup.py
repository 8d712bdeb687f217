"""setup.py's build decisions (issue 20 item 13), without running a compile: the CUDA extension
is built by default only where a GPU is visible; A2R_BUILD_CUDA=1 forces it (CI sets it, so the
compile is still checked), A2R_BUILD_CUDA=0 skips it; the CPU extension is always built unless
A2R_BUILD_CPU=0."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="a2r_setup")   # main() does not run


def _never_asked():
    raise AssertionError("the GPU probe must not run when the answer does not depend on it")


@pytest.mark.parametrize("flag, nvcc, gpu, build", [
    ("", "/usr/bin/nvcc", True, True),          # a GPU machine with the toolkit: build
    ("", "/usr/bin/nvcc", False, False),        # nvcc but no GPU (this CI box): skip
    ("", None, True, False),                    # a GPU without the toolkit: skip
    ("1", "/usr/bin/nvcc", False, True),        # forced (CI): build without a GPU
    (" 1 ", "/usr/bin/nvcc", True, True),
    ("0", "/usr/bin/nvcc", True, False),        # opted out
    ("0", None, False, False),
])
def test_cuda_build_decision(flag, nvcc, gpu, build):
    asks = flag.strip() == "" and nvcc is not None
    got, why = SETUP["cuda_build_decision"](flag, nvcc, (lambda: gpu) if asks else _never_asked)
    assert got is build and why
    if not build and nvcc and flag.strip() != "0":
        assert "no GPU visible" in why and "A2R_BUILD_CUDA=1" in why


def test_cuda_build_decision_errors():
    decide = SETUP["cuda_build_decision"]
    with pytest.raises(RuntimeError, match="A2R_BUILD_CUDA=1 but nvcc was not found"):
        decide("1", None, _never_asked)
    with pytest.raises(RuntimeError, match="A2R_BUILD_CUDA must be 0 or 1"):
        decide("yes", "/usr/bin/nvcc", _never_asked)


def test_gpu_probe_reads_device_nodes_and_nvidia_smi(monkeypatch, tmp_path):
    """No /dev/nvidia<N> and no nvidia-smi: no GPU (torch is never asked)."""
    monkeypatch.setattr(SETUP["shutil"], "which", lambda name: None)
    monkeypatch.setattr(SETUP["Path"], "glob", lambda self, pattern: iter(()))
    assert SETUP["gpu_visible"]() is False
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-x)'\n")
    smi.chmod(0o755)
    monkeypatch.setattr(SETUP["shutil"], "which", lambda name: str(smi))
    assert SETUP["gpu_visible"]() is True


def test_cpu_build_flag(monkeypatch):
    for flag, want in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv("A2R_BUILD_CPU", flag)
        assert SETUP["want_cpu_build"]() is want
    monkeypatch.setenv("A2R_BUILD_CPU", "no")
    with pytest.raises(RuntimeError, match="A2R_BUILD_CPU must be 0 or 1"):
        SETUP["want_cpu_build"]()


def test_cpu_build_has_no_march_native():
    """The shipped CPU build never targets the build machine: no -march / -mavx flags."""
    assert not any(arg.startswith(("-march", "-mavx", "-mtune", "-mfma"))
                   for arg in SETUP["CPU_COMPILE_ARGS"])
    assert sorted(SETUP["CPU_SOURCES"]) == sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))


def test_ci_forces_the_cuda_build_before_the_readme_test_command():
    """CI has no GPU: it exports A2R_BUILD_CUDA=1 before running README's test command (which
    test_readme holds to be a line of .ci/run), so _C is still compiled and tested there."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    force = lines.index("export A2R_BUILD_CUDA=1")
    test_line = next(i for i, line in enumerate(lines) if "python -m pytest -q tests" in line)
    assert force < test_line
