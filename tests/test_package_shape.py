"""The shape of the package: no import cycle among the fastcl modules, each library module importable on its own,
and no function in the loss library longer than a screen."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastcl
import fastcl.kernels

PACKAGE_ROOT = Path(fastcl.__file__).parent
KERNELS_ROOT = Path(fastcl.kernels.__path__[0])
# The loss library: fastcl/ without the application (train/, examples/) and the paper code.
APPLICATION = ("fastcl.train", "fastcl.examples")
PAPER_CODE = ("fastcl.models", "fastcl.evaluation")
COMPILED_MODULES = ("fastcl._C",)  # the ahead-of-time build of the gather ops: no Python source, imports nothing
MAX_FUNCTION_LINES = 60  # statements of one function (signature and docstring not counted); jit kernels excepted


def _modules() -> dict:
    """``{module name: source path}`` of every fastcl module (``kernels/`` is installed as ``fastcl.kernels``)."""
    found = {}
    for root, package in ((PACKAGE_ROOT, "fastcl"), (KERNELS_ROOT, "fastcl.kernels")):
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).with_suffix("")
            if package == "fastcl" and relative.parts[0] == "kernels":  # (a checkout's link to kernels/)
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return dict(found, **{name: None for name in COMPILED_MODULES})


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _executed_nodes(tree):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (imports for annotations only, never
    executed)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path, modules: dict) -> set:
    """The fastcl modules ``name`` imports, at the top level and inside functions (explicit imports only: the
    packages above an imported module are not counted; annotation-only imports under ``TYPE_CHECKING`` neither)."""
    tree = ast.parse(path.read_text())
    package = name if _is_package(path) else name.rpartition(".")[0]
    targets = set()
    for node in _executed_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict:
    modules = _modules()
    return {name: set() if path is None else _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _library_modules() -> list:
    return sorted(m for m in _modules() if not _in(m, APPLICATION + PAPER_CODE) and m not in COMPILED_MODULES)


def _in(module: str, packages: tuple) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_import_graph_is_acyclic():
    graph = _graph()
    assert "fastcl.ops.dispatch" in graph and "fastcl.kernels.launch" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_layers_import_downwards():
    """The public API imports the dispatcher, the dispatcher the backends, the backends the row math; the kernels
    import only the row math of the op."""
    graph = _graph()
    assert "fastcl.ops.dispatch" in graph["fastcl.functional"] and "fastcl.ops.dispatch" in graph["fastcl.distributed"]
    assert graph["fastcl.ops.problem"] == set()
    for kernel_module in ("fastcl.kernels.jit", "fastcl.kernels.tiling", "fastcl.kernels.launch"):
        assert {m for m in graph[kernel_module] if m.startswith("fastcl.ops")} <= {"fastcl.ops.problem"}
    for backend in ("fastcl.ops.reference", "fastcl.ops.chunked.passes", "fastcl.ops.chunked.autograd"):
        assert not graph[backend] & {"fastcl.ops.dispatch", "fastcl.ops.custom_ops", "fastcl.functional"}
    assert not graph["fastcl.ops.triton"] & {"fastcl.ops.dispatch", "fastcl.ops.custom_ops"}
    assert "fastcl.functional" not in graph["fastcl._layout"] | graph["fastcl.distributed"]


def test_no_library_module_imports_the_application():
    """The loss library and the paper code (models, evaluation) never import ``fastcl.train`` or the examples."""
    graph = _graph()
    offenders = {
        name: sorted(t for t in targets if _in(t, APPLICATION))
        for name, targets in graph.items()
        if not _in(name, APPLICATION) and any(_in(t, APPLICATION) for t in targets)
    }
    assert "fastcl.train.pretrain" in graph and "fastcl.evaluation.lle" in graph
    assert not offenders, offenders


def test_each_library_module_imports_alone():
    """Every loss-library module imported first in a fresh interpreter (an import cycle would fail for some
    order)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for name in _library_modules()
    }
    failed = {}
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            failed[name] = output.decode()[-2000:]
    assert not failed, failed


def _is_jit_kernel(node) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def _body_lines(node) -> int:
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1 if body else 0


@pytest.mark.parametrize("module", _library_modules())
def test_no_function_in_the_loss_library_is_longer_than_a_screen(module):
    tree = ast.parse(_modules()[module].read_text())
    long = {
        node.name: _body_lines(node)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_jit_kernel(node)
        if _body_lines(node) > MAX_FUNCTION_LINES
    }
    assert not long, long
