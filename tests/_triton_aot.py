"""Ahead-of-time compilation of our Triton kernels for a GPU target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python body with numpy; it never
lowers it, so it cannot see compile-only errors (a non-constexpr global read inside a kernel,
a ``tl.dot`` shape or dtype the target has no instruction for, a loop-carried value whose type
changes between iterations, ...). This module drives the real compiler instead:
Triton AST -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (``ptxas``, bundled with Triton) for a
:class:`triton.backends.compiler.GPUTarget` such as ``GPUTarget("cuda", 90, 32)``. No driver and
no device are needed.

To compile exactly what a real launch would compile, the launchers themselves are run
(:func:`capture_launches`): every ``@triton.jit`` kernel of the kernel module is temporarily
replaced by a recorder, the launcher is called with representative tensors (CPU tensors; only
their dtype, strides and pointer alignment matter), and each recorded ``kernel[grid](*args,
**kwargs)`` is then specialised the way ``JITFunction.run`` specialises it (ints equal to 1 become
constexprs, pointers and ints divisible by 16 get ``tt.divisibility`` hints, ``do_not_specialize``
is honoured) and compiled for the target (:func:`compile_launch`). The block sizes, warps and
constexprs therefore come from the launchers' own tables (``_tile_config``, ``denoise_config``);
nothing here restates them.

``TRITON_INTERPRET`` must be off when ``triton`` is first imported in the process (see
:func:`compile_blocker`): the interpreter replaces Triton's own standard library, not only our
kernels. Tests therefore compile in a fresh subprocess (``tests/test_triton_compile.py``).

A test tool (tests/test_triton_compile.py, benchmarks/sass_report.py), kept out of the package. It uses two private
helpers of ``triton.runtime.jit`` (the binder and ``_pack_args``), checked on Triton 3.9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

# Per-block limits of the targets we build for (CUDA C Programming Guide, "Compute capabilities"):
# opt-in shared memory per block, registers per thread and 32-bit registers per SM (which bounds
# registers x threads of one block).
TARGET_LIMITS = {
    80: {"max_shared": 163 * 1024, "max_regs_per_thread": 255, "regs_per_sm": 65536},
    90: {"max_shared": 227 * 1024, "max_regs_per_thread": 255, "regs_per_sm": 65536},
}


@contextlib.contextmanager
def compiler_mode() -> Iterator[None]:
    """``TRITON_INTERPRET`` off for the block, restored afterwards.

    The launchers read it to pick interpreter-only variants (``FP32_DOT`` for bf16, the
    unsplit ``denoise_config``), and Triton's code generator reads it (``constexpr_function``
    results stay unwrapped under the interpreter).
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def compile_blocker() -> str | None:
    """None when this process can compile Triton kernels, else the reason it cannot.

    ``TRITON_INTERPRET=1`` at ``import triton`` time makes every ``@triton.jit`` function of
    Triton's own standard library (``tl.max``, ``tl.sum``, ``tl.cdiv``, ...) an
    ``InterpretedFunction`` for the life of the process, and those cannot be lowered. Such a
    process (a pytest run that imported an interpreter test module first) must compile in a
    fresh subprocess without ``TRITON_INTERPRET``.
    """
    import triton.language.standard as standard

    if not isinstance(standard.max, JITFunction):
        return ("triton was imported with TRITON_INTERPRET=1 in this process: its standard "
                "library is interpreter-only; compile in a fresh process without TRITON_INTERPRET")
    return None


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call."""

    kernel: JITFunction
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def constexprs(self) -> dict[str, Any]:
        """The launch's constexpr arguments by name (as passed, before specialisation)."""
        bound = self.kernel.signature.bind_partial(*self.args, **{
            k: v for k, v in self.kwargs.items() if k in self.kernel.arg_names})
        return {p.name: bound.arguments[p.name] for p in self.kernel.params
                if p.is_constexpr and p.name in bound.arguments}


class _Recorder:
    def __init__(self, kernel: JITFunction, launches: list[Launch]) -> None:
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, grid, args, dict(kwargs)))
        return record


def capture_launches(module: types.ModuleType, launcher: Callable, *args, **kwargs) -> list[Launch]:
    """Call ``launcher(*args, **kwargs)`` with every ``JITFunction`` global of ``module`` recording
    its launches instead of running them; return the launches in order.

    ``launcher`` is a function of ``module`` (e.g. ``attention.tree_attention_partials``) and
    looks its kernels up as module globals. Launch parameters that read ``TRITON_INTERPRET`` (the
    launchers pick interpreter-only variants by it) see it off. The globals are restored on exit.
    """
    kernels = {name: value for name, value in vars(module).items()
               if isinstance(value, JITFunction)}
    if not kernels:
        raise ValueError(f"module {module.__name__} holds no JITFunction (it was imported with "
                         "TRITON_INTERPRET=1; see compile_blocker)")
    launches: list[Launch] = []
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(kernel, launches))
        with compiler_mode():
            launcher(*args, **kwargs)
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def _specialize(launch: Launch, backend) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    # JITFunction.run adds these before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, target: GPUTarget):
    """Compile ``launch`` for ``target`` without a device; returns Triton's ``CompiledKernel``.

    ``.asm`` holds every stage (``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``) and
    ``.metadata`` the compiler's metadata (``shared`` bytes, ``num_warps``, ...). Compile errors
    propagate unchanged (``triton.compiler.errors.CompilationError``, ``PTXASError``, ...).
    Compiled kernels land in Triton's usual on-disk cache (``TRITON_CACHE_DIR``).
    """
    blocker = compile_blocker()
    if blocker is not None:
        raise RuntimeError(blocker)
    backend = make_backend(target)
    with compiler_mode():
        signature, constexprs, attrs, options = _specialize(launch, backend)
        source = ASTSource(launch.kernel, signature, constexprs, attrs)
        return triton.compile(source, target=target, options=options.__dict__)


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """``ptxas -v`` figures of one compiled kernel (per thread unless said otherwise)."""

    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int      # Triton's metadata (dynamic shared memory the launch requests)
    num_warps: int


def resource_usage(compiled) -> ResourceUsage:
    """Registers, spills and stack of ``compiled`` from ``ptxas -v`` on its PTX (the ptxas and
    register-allocation level of Triton's cubin stage, without ``-lineinfo``), shared memory from
    its metadata. Triton itself reads registers and spills only when it loads a cubin on a GPU."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = compiled.metadata.target.arch
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(compiled.asm["ptx"])
        result = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             str(ptx_path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"cannot find {pattern!r} in ptxas -v output:\n{log}")
        return int(match.group(1))

    return ResourceUsage(
        registers=number(r"Used (\d+) registers"),
        spill_store_bytes=number(r"(\d+) bytes spill stores"),
        spill_load_bytes=number(r"(\d+) bytes spill loads"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
    )


@dataclasses.dataclass(frozen=True)
class LoopCounts:
    """SASS instructions of one loop body (a backward branch and everything it jumps over)."""

    start: int                    # byte address of the loop head
    end: int                      # byte address of the backward branch
    instructions: int
    by_opcode: dict[str, int]     # opcode without modifiers ("MUFU", "FFMA", "HGMMA", ...)
    full_opcodes: tuple[str, ...] = ()   # each instruction's opcode with modifiers, in order

    def contains(self, other: "LoopCounts") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def sass_loops(compiled) -> list[LoopCounts]:
    """Loop bodies of ``compiled``'s cubin (see :func:`parse_sass_loops`), disassembled with the
    ``cuobjdump`` bundled with Triton."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    return parse_sass_loops(sass)


def parse_sass_loops(sass: str) -> list[LoopCounts]:
    """Loop bodies of one function's ``cuobjdump -sass`` listing, by their backward branches.

    A loop is the span from a backward ``BRA`` target to the branch. Static counts: a lower bound
    on issued instructions per iteration (predicated-off instructions are counted; nothing is
    timed). Opcodes lose their modifiers (``LDG.E.EF.128`` counts as ``LDG``).
    """
    lines = [(int(m.group(1), 16), m.group(2))
             for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, instruction in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", instruction)
        if target is None or int(target.group(1), 16) >= address:
            continue
        start = int(target.group(1), 16)
        opcodes: dict[str, int] = {}
        body = [text for where, text in lines if start <= where <= address]
        for text in body:
            opcode = _opcode(text).split(".")[0]
            opcodes[opcode] = opcodes.get(opcode, 0) + 1
        loops.append(LoopCounts(start, address, len(body), dict(sorted(opcodes.items())),
                                tuple(_opcode(text) for text in body)))
    return loops


def _opcode(instruction: str) -> str:
    """The opcode with its modifiers (``LDG.E.EF.128``), without the predicate."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


@triton.jit
def _probe_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def probe(target: GPUTarget) -> str | None:
    """None when a trivial kernel compiles to a cubin for ``target`` here, else why it does not
    (no CUDA backend in this Triton build, no ptxas, an interpreter-mode process, ...)."""
    reason = compile_blocker()
    if reason is not None:
        return reason
    if not isinstance(_probe_copy_kernel, JITFunction):
        return "tests/_triton_aot.py was imported with TRITON_INTERPRET=1"
    try:
        backend = make_backend(target)
        with compiler_mode():
            source = ASTSource(_probe_copy_kernel, {"src_ptr": "*fp32", "dst_ptr": "*fp32",
                                                    "n": "i32", "BLOCK": "constexpr"},
                               {"BLOCK": 128})
            compiled = triton.compile(source, target=target,
                                      options=backend.parse_options({"num_warps": 4}).__dict__)
        if not compiled.asm.get(backend.binary_ext):
            return f"no {backend.binary_ext} produced for {target}"
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"{type(exc).__name__}: {exc}"
    return None
