"""Build a2r-kernels.

The Python packages (``a2r_kernels``, ``a2r``) always install. The CUDA extension
``a2r_kernels._C`` (csrc/, pybind11, no libtorch) is built through CMake when ``nvcc`` is found
(on PATH, or under ``$CUDA_HOME``/``$CUDA_PATH``); then a compile error fails the install.

Environment:
    A2R_BUILD_CUDA=0      skip the extension (everything works without it: triton / torch backends)
    A2R_BUILD_CUDA=1      require it (fail when nvcc is missing)
    A2R_CUDA_ARCHS="80;90"  CUDA architectures, CMake syntax (default "80;90"; "90a" only for a
                          Hopper-only path)
    A2R_BUILD_JOBS=N      parallel compile jobs (default: number of CPUs)
    A2R_CMAKE_ARGS="..."  extra arguments for the CMake configure step
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def want_cuda_build() -> tuple[bool, str | None]:
    """(build the extension?, nvcc path). Raises when A2R_BUILD_CUDA=1 but nvcc is missing."""
    flag = os.environ.get("A2R_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, None
    nvcc = find_nvcc()
    if nvcc is None:
        if flag == "1":
            raise RuntimeError("A2R_BUILD_CUDA=1 but nvcc was not found on PATH or in "
                               "$CUDA_HOME/bin; install the CUDA toolkit or unset A2R_BUILD_CUDA")
        print("a2r-kernels: nvcc not found, building without the CUDA extension "
              "(the triton and torch backends still work)", file=sys.stderr)
        return False, None
    return True, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configure and build csrc/ with CMake; the module lands where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building a2r_kernels._C needs cmake >= 3.18 on PATH "
                               "(or set A2R_BUILD_CUDA=0 to skip the CUDA extension)")
        import pybind11  # a build requirement (pyproject.toml)

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        output_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("A2R_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).strip() or DEFAULT_CUDA_ARCHS
        nvcc = ext_nvcc  # resolved at setup() time
        configure = [
            cmake, "-S", str(ext.source_dir), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DA2R_CUDA_ARCHS={archs}",
            f"-DA2R_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("A2R_CMAKE_ARGS", ""))
        jobs = os.environ.get("A2R_BUILD_JOBS") or str(os.cpu_count() or 2)
        print(f"a2r-kernels: building a2r_kernels._C for CUDA archs {archs!r} with {nvcc}",
              file=sys.stderr)
        # check_call: a compile error fails the install (never a silently missing extension).
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])
        built = sorted(output_dir.glob("_C.*"))
        if not built:
            raise RuntimeError(f"CMake finished but no _C module was written to {output_dir}")


build_cuda, ext_nvcc = want_cuda_build()
ext_modules = [CMakeExtension("a2r_kernels._C", ROOT)] if build_cuda else []

setup(
    name="a2r-kernels",
    version="0.1.0",
    description="Tree-shared KV cache + tree decode attention and masked denoising kernels for "
                "A2R parallel reasoning",
    python_requires=">=3.10",
    packages=find_packages(include=["a2r_kernels", "a2r_kernels.*"])
    + ["a2r"] + [f"a2r.{name}" for name in find_packages("python/a2r")],
    package_dir={"a2r": "python/a2r"},
    # The trained embedded models (python -m a2r.demo.train): weights, tokenizers, the training
    # report and the held-out file ship inside the package (the recorded evals: docs/results).
    package_data={"a2r.demo": ["trained/*.json", "trained/*.jsonl", "trained/*/*.json",
                               "trained/*/*.jinja", "trained/*/*.safetensors"]},
    # A range that any recent torch satisfies: an existing torch is never replaced.
    install_requires=["torch>=2.5", "numpy", "transformers>=5.0", "math-verify>=0.7"],
    extras_require={
        "triton": ["triton>=3.2"],
        # The DiffusionGemma thinker (a2r.thinker.gemma) needs transformers >= 5.19; its classes
        # are imported lazily, so older releases work for everything else (its tests skip).
        "diffusion-gemma": ["transformers>=5.19"],
        "test": ["pytest", "hypothesis", "triton>=3.2", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["a2r = a2r.cli:main"],
        # vLLM calls it in every process; A2R_VLLM=1 turns the A2R_TREE backend on.
        "vllm.general_plugins": ["a2r_tree = a2r_kernels.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
