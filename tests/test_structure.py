"""The project's structural standards (issue 23 targets), checked statically with ``ast``.

- no import cycle among the modules of ``a2r_kernels`` and ``python/a2r`` (module-level and
  function-level imports, relative and absolute, ``TYPE_CHECKING`` blocks included);
- ``a2r_kernels`` never imports ``a2r`` (the layer below does not know the layer above);
- ``python/a2r`` reaches ``a2r_kernels`` only through public names: no ``_``-prefixed module or
  name, neither imported nor as an attribute of an imported ``a2r_kernels`` module nor as a
  module-name string (``importlib.import_module("a2r_kernels._cpu")``);
- no Python module over ``MAX_MODULE_LINES`` lines in the package, driver, benchmark and test
  trees; no function over ``MAX_FUNCTION_LINES`` lines in ``a2r_kernels`` or ``python/a2r``,
  ``@triton.jit`` kernels aside; ``pipeline.py`` and ``cli.py`` within their own budgets.

Nothing here imports torch or the packages: it reads source files. Each check is a function of a
source root, so the ``*_flags_*`` tests show it failing on a deliberately broken copy in
``tmp_path`` (the repository itself is never modified).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
# files with a tighter budget than MAX_MODULE_LINES (path relative to the repository root)
FILE_LINE_BUDGETS = {"python/a2r/pipeline.py": 450, "python/a2r/cli.py": 550}

# (import root, top-level package): ``a2r_kernels`` lives at the repository root, ``a2r`` under
# ``python/``.
PACKAGES = (("", "a2r_kernels"), ("python", "a2r"))
SIZE_CHECKED_TREES = ("a2r_kernels", "python/a2r", "benchmarks", "tests")
FUNCTION_CHECKED_TREES = ("a2r_kernels", "python/a2r")


# ---------------------------------------------------------------------------- module discovery


def _python_files(root: Path, tree: str) -> list[Path]:
    return sorted((root / tree).rglob("*.py")) if (root / tree).is_dir() else []


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages in ``PACKAGES``."""
    modules = {}
    for import_root, package in PACKAGES:
        base = root / import_root if import_root else root
        for path in _python_files(base, package):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


# ------------------------------------------------------------------------------------- imports


def _absolute_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imported_names(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """Every import in ``path``, anywhere in the file: ``(absolute module, imported name or
    None, line)``. ``import a.b`` gives ``("a.b", None)``; ``from a import b`` gives
    ``("a", "b")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_base(module, path, node)
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def _deepest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import sub`` points at ``pkg.sub``
    when that is a module, else at ``pkg``). Implicit parent-package imports are not edges."""
    modules = package_modules(root)
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for base, imported, _ in imported_names(name, path):
            target = None
            if imported is not None and f"{base}.{imported}" in modules:
                target = f"{base}.{imported}"
            else:
                target = _deepest_module(base, modules)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = import_graph(root)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports(root: Path) -> list[str]:
    """Imports of ``a2r`` from ``a2r_kernels`` modules."""
    bad = []
    for name, path in package_modules(root).items():
        if name.split(".")[0] != "a2r_kernels":
            continue
        for base, imported, line in imported_names(name, path):
            if base == "a2r" or base.startswith("a2r."):
                bad.append(f"{path.relative_to(root)}:{line}: imports {base}")
    return bad


# ----------------------------------------------------------------------------- private access


def _private_part(dotted: str) -> str | None:
    return next((p for p in dotted.split(".") if p.startswith("_")), None)


def _kernel_module_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to ``a2r_kernels`` or one of its modules by ``import``."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "a2r_kernels":
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "a2r_kernels":
                # ``from a2r_kernels import hf`` may bind a module: attributes on it count too
                aliases.update(a.asname or a.name for a in node.names if not a.name[0].isupper())
    return aliases


def private_kernel_uses(root: Path) -> list[str]:
    """Places where ``python/a2r`` reaches a ``_``-prefixed module or name of ``a2r_kernels``."""
    bad = []
    for name, path in package_modules(root).items():
        if name.split(".")[0] != "a2r":
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = f"{path.relative_to(root)}"
        for base, imported, line in imported_names(name, path):
            if base.split(".")[0] != "a2r_kernels":
                continue
            private = _private_part(base) or (imported if imported and imported[0] == "_" else None)
            if private:
                bad.append(f"{where}:{line}: imports {base}{'.' + imported if imported else ''}")
        aliases = _kernel_module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in aliases:
                    dotted = ".".join([inner.id, *reversed(chain)])
                    bad.append(f"{where}:{node.lineno}: uses {dotted}")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.startswith("a2r_kernels.") and " " not in node.value
                    and _private_part(node.value)):
                bad.append(f"{where}:{node.lineno}: names module {node.value!r}")
    return bad


# --------------------------------------------------------------------------------------- sizes


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def oversized_modules(root: Path) -> list[str]:
    bad = []
    for tree in SIZE_CHECKED_TREES:
        for path in _python_files(root, tree):
            relative = path.relative_to(root).as_posix()
            limit = FILE_LINE_BUDGETS.get(relative, MAX_MODULE_LINES)
            lines = _line_count(path)
            if lines > limit:
                bad.append(f"{relative}: {lines} lines (limit {limit})")
    return bad


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@triton.jit`` (or ``@jit`` / ``@triton.jit(...)``), possibly under autotune/heuristics."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        dotted = ast.unparse(target)
        if dotted in ("triton.jit", "jit"):
            return True
    return False


def long_functions(root: Path) -> list[str]:
    """Functions (methods and nested functions included) of more than ``MAX_FUNCTION_LINES``
    lines, counted from ``def`` to the last line of the body."""
    bad = []
    for tree in FUNCTION_CHECKED_TREES:
        for path in _python_files(root, tree):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and not _is_triton_kernel(node):
                    where = path.relative_to(root).as_posix()
                    bad.append(f"{where}:{node.lineno}: {node.name} is {lines} lines")
    return bad


# ------------------------------------------------------------------------------ the repository


def test_repository_is_found():
    modules = package_modules(REPO)
    assert {"a2r_kernels", "a2r_kernels.layout", "a2r", "a2r.pipeline"} <= set(modules)
    assert import_graph(REPO)["a2r.pipeline"], "the import graph found no edges"


def test_no_import_cycles():
    assert import_cycles(REPO) == []


def test_kernels_do_not_import_the_driver():
    assert upward_imports(REPO) == []


def test_driver_uses_only_public_kernel_names():
    assert private_kernel_uses(REPO) == []


def test_module_sizes():
    assert oversized_modules(REPO) == []


def test_function_sizes():
    assert long_functions(REPO) == []


# ---------------------------------------------- each check fails on a deliberately broken copy


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _tree(tmp_path: Path, **extra: str) -> Path:
    """A minimal well-formed copy of the two packages, plus ``extra`` (path -> source)."""
    files = {
        "a2r_kernels/__init__.py": "",
        "a2r_kernels/vocab.py": "BLOCK = 16\n",
        "a2r_kernels/layout.py": "from .vocab import BLOCK\n",
        "a2r_kernels/triton/__init__.py": "",
        "python/a2r/__init__.py": "",
        "python/a2r/pipeline.py": "from a2r_kernels.layout import BLOCK\nimport a2r_kernels\n",
    }
    files.update(extra)
    return _write(tmp_path, files)


def test_clean_copy_passes(tmp_path):
    root = _tree(tmp_path)
    assert import_graph(root)["a2r_kernels.layout"] == {"a2r_kernels.vocab"}
    assert import_graph(root)["a2r.pipeline"] == {"a2r_kernels.layout", "a2r_kernels"}
    assert import_cycles(root) == upward_imports(root) == private_kernel_uses(root) == []
    assert oversized_modules(root) == long_functions(root) == []


@pytest.mark.parametrize("vocab_source", [
    "from .layout import BLOCK as _B\nBLOCK = 16\n",               # module level, relative
    "BLOCK = 16\ndef f():\n    import a2r_kernels.layout\n",       # function level, absolute
    "BLOCK = 16\ndef f():\n    from a2r_kernels import layout\n",  # submodule via from-import
    "BLOCK = 16\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import layout\n",
])
def test_cycle_check_flags_a_cycle(tmp_path, vocab_source):
    root = _tree(tmp_path)
    (root / "a2r_kernels/vocab.py").write_text(vocab_source)
    assert import_cycles(root) == [["a2r_kernels.layout", "a2r_kernels.vocab"]]


def test_cycle_check_flags_a_three_module_cycle_in_the_driver(tmp_path):
    root = _tree(tmp_path, **{
        "python/a2r/cli.py": "from . import config\n",
        "python/a2r/config.py": "from .pipeline import X\n",
        "python/a2r/sub/__init__.py": "",
        "python/a2r/sub/deep.py": "from ..pipeline import X\n",   # level-2 relative: no cycle
    })
    (root / "python/a2r/pipeline.py").write_text("def run():\n    from a2r.cli import main\n")
    assert import_cycles(root) == [["a2r.cli", "a2r.config", "a2r.pipeline"]]
    assert "a2r.pipeline" in import_graph(root)["a2r.sub.deep"]


def test_upward_import_check_flags_the_kernels_importing_the_driver(tmp_path):
    root = _tree(tmp_path, **{"a2r_kernels/vllm.py": "def f():\n    from a2r.config import C\n"})
    assert upward_imports(root) == ["a2r_kernels/vllm.py:2: imports a2r.config"]


@pytest.mark.parametrize("source, expected", [
    ("from a2r_kernels._cpu_ops import run\n", "imports a2r_kernels._cpu_ops.run"),
    ("import a2r_kernels._cpu\n", "imports a2r_kernels._cpu"),
    ("from a2r_kernels import _cpu\n", "imports a2r_kernels._cpu"),
    ("from a2r_kernels.vocab import _SECRET\n", "imports a2r_kernels.vocab._SECRET"),
    ("import a2r_kernels.layout as L\nL._plan()\n", "uses L._plan"),
    ("from a2r_kernels import hf\nhf._Context\n", "uses hf._Context"),
    ("import a2r_kernels\na2r_kernels.layout._plan\n", "uses a2r_kernels.layout._plan"),
    ("import importlib\nimportlib.import_module('a2r_kernels._cuda_ops')\n",
     "names module 'a2r_kernels._cuda_ops'"),
])
def test_private_use_check_flags_each_form(tmp_path, source, expected):
    root = _tree(tmp_path, **{"python/a2r/engine.py": source})
    found = private_kernel_uses(root)
    assert len(found) == 1 and found[0].startswith("python/a2r/engine.py:")
    assert found[0].endswith(expected)


def test_private_use_check_allows_dunders_and_the_kernels_own_privates(tmp_path):
    root = _tree(tmp_path, **{
        "python/a2r/engine.py": "import a2r_kernels\nv = a2r_kernels.__version__\nx._private\n",
        "a2r_kernels/wrapper.py": "from ._cpu_ops import run\nfrom . import _cpu\n",
    })
    assert private_kernel_uses(root) == []


def test_size_check_flags_a_long_module_in_each_tree(tmp_path):
    long_text = "x = 1\n" * (MAX_MODULE_LINES + 1)
    root = _tree(tmp_path, **{"benchmarks/bench_x.py": long_text, "tests/test_x.py": long_text,
                              "a2r_kernels/big.py": "x = 1\n" * MAX_MODULE_LINES})
    assert oversized_modules(root) == [
        f"benchmarks/bench_x.py: {MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES})",
        f"tests/test_x.py: {MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES})",
    ]


@pytest.mark.parametrize("relative", sorted(FILE_LINE_BUDGETS))
def test_size_check_flags_pipeline_and_cli_over_their_budgets(tmp_path, relative):
    limit = FILE_LINE_BUDGETS[relative]
    root = _tree(tmp_path)
    _write(root, {relative: "x = 1\n" * limit})
    assert oversized_modules(root) == []
    _write(root, {relative: "x = 1\n" * (limit + 1)})
    assert oversized_modules(root) == [f"{relative}: {limit + 1} lines (limit {limit})"]


def _function(name: str, body_lines: int, decorator: str = "", indent: str = "") -> str:
    head = f"{indent}{decorator}\n" if decorator else ""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{head}{indent}def {name}():\n{body}"


def test_function_check_flags_long_functions_methods_and_nested_ones(tmp_path):
    limit = MAX_FUNCTION_LINES
    kernels = ("import triton\n"
               + _function("at_limit", limit - 1)
               + _function("too_long", limit)
               + "class Plan:\n" + _function("method", limit, indent="    ")
               + _function("_kernel", 3 * limit, decorator="@triton.jit")
               + _function("_tuned", 3 * limit, decorator="@triton.jit(do_not_specialize=['n'])"))
    driver = "def outer():\n" + _function("inner", limit, indent="    ")
    root = _tree(tmp_path, **{"a2r_kernels/triton/k.py": kernels, "python/a2r/engine.py": driver,
                              "benchmarks/bench_long.py": _function("main", 2 * limit)})
    found = long_functions(root)
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        f"inner is {limit + 1} lines", f"method is {limit + 1} lines",
        f"outer is {limit + 2} lines", f"too_long is {limit + 1} lines",
    ]
