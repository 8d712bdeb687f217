"""Build a2r-kernels.

The Python packages (``a2r_kernels``, ``a2r``) always install. Two compiled extensions:

- ``a2r_kernels._cpu`` (csrc/cpu/, pybind11, OpenMP, no libtorch): the CPU tree attention, built
  by the host C++ compiler on every install (a compile error fails the install).
- ``a2r_kernels._C`` (csrc/, CUDA, pybind11 through CMake, no libtorch): built by default only
  where ``nvcc`` is found (on PATH, or under ``$CUDA_HOME``/``$CUDA_PATH``) *and* a GPU is visible
  (``/dev/nvidia<N>``, or ``nvidia-smi -L`` lists one): on a machine without a GPU the extension
  could not run, and its compile takes minutes. Then a compile error fails the install.

Environment:
    A2R_BUILD_CUDA=1      build _C even without a visible GPU (CI does, so the compile is
                          checked); fail when nvcc is missing
    A2R_BUILD_CUDA=0      skip _C (everything works without it: triton / cpu / torch backends)
    A2R_BUILD_CPU=0       skip _cpu (backend="auto" on CPU tensors then runs the torch reference)
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


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU: a ``/dev/nvidia<N>`` device node, or a GPU in
    ``nvidia-smi -L`` (torch is not needed, and not imported)."""
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def cuda_build_decision(flag: str, nvcc: str | None, has_gpu) -> tuple[bool, str]:
    """(build _C?, why) from ``A2R_BUILD_CUDA`` (``flag``), the nvcc found (or None) and
    ``has_gpu`` (a callable, asked only when the answer depends on it). Raises RuntimeError for
    ``A2R_BUILD_CUDA=1`` without nvcc, or a flag other than "", "0" and "1"."""
    flag = flag.strip()
    if flag == "0":
        return False, "A2R_BUILD_CUDA=0: building without the CUDA extension"
    if flag not in ("", "1"):
        raise RuntimeError(f"A2R_BUILD_CUDA must be 0 or 1 (or unset), got {flag!r}")
    if nvcc is None:
        if flag == "1":
            raise RuntimeError("A2R_BUILD_CUDA=1 but nvcc was not found on PATH or in "
                               "$CUDA_HOME/bin; install the CUDA toolkit or unset A2R_BUILD_CUDA")
        return False, ("nvcc not found, building without the CUDA extension (the triton, cpu "
                       "and torch backends still work)")
    if flag == "1":
        return True, "A2R_BUILD_CUDA=1: building the CUDA extension"
    if not has_gpu():
        return False, ("no GPU visible (no /dev/nvidia<N>, nvidia-smi lists none): building "
                       "without the CUDA extension, which could not run here; "
                       "A2R_BUILD_CUDA=1 builds it anyway")
    return True, "nvcc and a GPU found: building the CUDA extension"


def want_cuda_build() -> tuple[bool, str | None]:
    """(build the extension?, nvcc path), from the environment (see the module docstring)."""
    nvcc = find_nvcc()
    build, why = cuda_build_decision(os.environ.get("A2R_BUILD_CUDA", ""), nvcc, gpu_visible)
    print(f"a2r-kernels: {why}", file=sys.stderr)
    return build, (nvcc if build else None)


def want_cpu_build() -> bool:
    """Build a2r_kernels._cpu unless ``A2R_BUILD_CPU=0``."""
    flag = os.environ.get("A2R_BUILD_CPU", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"A2R_BUILD_CPU must be 0 or 1 (or unset), got {flag!r}")
    if flag == "0":
        print("a2r-kernels: A2R_BUILD_CPU=0: building without the CPU extension (backend='auto' "
              "on CPU tensors runs the torch reference)", file=sys.stderr)
    return flag != "0"


CPU_SOURCES = ["csrc/cpu/bindings_cpu.cpp", "csrc/cpu/tree_attention_cpu.cpp",
               "csrc/cpu/partials_baseline.cpp", "csrc/cpu/partials_avx2.cpp",
               "csrc/cpu/block_table_plan.cpp"]
# No -march / -mavx2: the baseline build targets what the compiler targets by default, and
# partials_avx2.cpp enables AVX2 + FMA + F16C for its own functions only (picked at run time).
# -ffp-contract=fast: a * b + c becomes an FMA where the target has one (ISO C++ mode turns it
# off by default in GCC).
CPU_COMPILE_ARGS = ["-std=c++17", "-O3", "-ffp-contract=fast", "-fvisibility=hidden",
                    "-Wno-psabi"]


class CpuExtension(Extension):
    """a2r_kernels._cpu: plain C++17 + OpenMP (when the compiler has it), no CUDA, no libtorch."""

    def __init__(self):
        import pybind11  # a build requirement (pyproject.toml)

        super().__init__("a2r_kernels._cpu", sources=CPU_SOURCES,
                         include_dirs=["csrc", pybind11.get_include()], language="c++",
                         extra_compile_args=list(CPU_COMPILE_ARGS))


def compiler_accepts(compiler, flag: str, tmp_dir: Path) -> bool:
    """Whether ``compiler`` compiles and links an OpenMP-using file with ``flag``."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    source = tmp_dir / "openmp_probe.cpp"
    source.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    try:
        objects = compiler.compile([str(source)], output_dir=str(tmp_dir), extra_postargs=[flag])
        compiler.link_executable(objects, "openmp_probe", output_dir=str(tmp_dir),
                                 extra_postargs=[flag])
    except Exception:  # distutils CompileError / LinkError
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configure and build csrc/ with CMake; the module lands where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if isinstance(ext, CpuExtension):
            return self.build_cpu_extension(ext)
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

    def build_cpu_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            raise RuntimeError("a2r_kernels._cpu needs GCC or Clang (vector extensions); set "
                               "A2R_BUILD_CPU=0 to install without it")
        if compiler_accepts(self.compiler, "-fopenmp", Path(self.build_temp) / "openmp_probe"):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            print("a2r-kernels: the C++ compiler has no OpenMP (-fopenmp): the CPU kernel runs "
                  "on one thread", file=sys.stderr)
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise RuntimeError(f"compiling a2r_kernels._cpu failed ({exc}); set A2R_BUILD_CPU=0 "
                               f"to install without it") from exc


ext_nvcc: str | None = None   # the nvcc CMakeBuild uses, resolved by main()


def main() -> None:
    global ext_nvcc
    build_cuda, ext_nvcc = want_cuda_build()
    ext_modules = [CMakeExtension("a2r_kernels._C", ROOT)] if build_cuda else []
    if want_cpu_build():
        ext_modules.append(CpuExtension())
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


if __name__ == "__main__":   # tests import this file for cuda_build_decision without building
    main()
