"""The package's import graph, read from the source (an AST scan, nothing imported): the floors of the house
(docs/architecture.md) import only downward, no two modules import each other (typing-only imports under
``if TYPE_CHECKING:`` excepted), and no module outgrows ~550 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowkern"

# Floors, bottom up: a module may import its own floor and the floors below, never one above. The longest
# prefix decides a module's floor.
FLOORS: dict[str, int] = {
    "flowkern._C": 0,  # the compiled C++ kernels (csrc/)
    "flowkern._io": 0,
    "flowkern._images": 0,  # decoding one image fully (PIL only): the input checks of hf.inputs and the task tables
    "flowkern.outdir": 0,  # the output-folder owner (lock, kind, probe)
    "flowkern._version": 0,
    "flowkern._opcheck": 0,
    "flowkern.reference": 0,
    "flowkern.kernels": 0,
    "flowkern.eval.tasks": 0,  # pure task scoring: no torch
    "flowkern.plan": 1,
    "flowkern.scorers": 1,  # the scorer protocol and the built-in criteria (pure; flowkern.plan records them)
    "flowkern.keymaps": 1,
    "flowkern.merge": 1,  # merging removed image tokens into kept ones (pure tensors)
    "flowkern.viz_compare": 1,  # the figures of flowkern compare
    "flowkern.viz": 1,
    "flowkern.viz_flow": 1,
    "flowkern.ops": 2,
    "flowkern.hf": 3,
    "flowkern.flops": 3,  # estimated FLOPs of an answer, from the language model's config (read through the adapter)
    "flowkern.identity": 3,  # the settings identity of a result (resolves device and dtype with flowkern.hf)
    "flowkern.listener": 3,  # the session's listener protocol (the attach bracket is Session.of + add)
    "flowkern.timer": 3,  # a listener
    "flowkern.trace": 4,
    "flowkern.prune": 4,
    "flowkern.knockout": 4,
    "flowkern.cam": 4,
    "flowkern.gradcam": 4,
    "flowkern.lens": 4,
    "flowkern.shapes": 5,
    "flowkern.eval": 6,
    "flowkern.demo": 7,
    "flowkern.cli": 8,
    "flowkern.lmms_plugin": 9,
    "flowkern": 10,  # the package face (flowkern/__init__.py)
}
MAX_LINES = 560


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EXTENSIONS = {"flowkern._C"}  # compiled modules: imported, never scanned


def floor(module: str) -> int:
    best = max((prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")), key=len)
    return FLOORS[best]


def _typing_only(tree: ast.Module) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[int, str]]:
    """``(line, target)`` for every flowkern module that ``module`` imports at run time, at any depth."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _typing_only(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, path.name == "__init__.py")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES.keys() | EXTENSIONS else base
                     for a in node.names]
        else:
            continue
        for name in names:
            # `import flowkern.hf.compat as c` -> the module itself; `from flowkern.x import name` -> flowkern.x
            while name and name not in MODULES and name not in EXTENSIONS:
                name = name.rpartition(".")[0]
            if name.startswith("flowkern") and name != module:
                found.append((node.lineno, name))
    return found


GRAPH = {m: sorted({t for _, t in imports(m) if t in MODULES}) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_downward(module):
    # a package's face may re-export its own submodules
    up = [(line, t) for line, t in imports(module)
          if floor(t) > floor(module) and not (MODULES[module].name == "__init__.py" and t.startswith(module + "."))]
    assert not up, f"{module} (floor {floor(module)}) imports a higher floor: " + ", ".join(
        f"line {line}: {t} (floor {floor(t)})" for line, t in up)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it"


def test_the_scan_sees_what_it_must(tmp_path, monkeypatch):
    """The checks above can fail: an upward import in a function body, a relative import, a circle, and a
    typing-only import that must not count."""
    fake = {"flowkern.ops": tmp_path / "ops.py", "flowkern.trace": tmp_path / "trace.py"}
    fake["flowkern.ops"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flowkern.prune import Pruning\n"
        "def f():\n    from flowkern.trace import trace\n")
    fake["flowkern.trace"].write_text("from . import ops\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {**fake, "flowkern.prune": tmp_path / "ops.py"})
    assert imports("flowkern.ops") == [(5, "flowkern.trace")]
    assert imports("flowkern.trace") == [(1, "flowkern.ops")]
    monkeypatch.setattr(sys.modules[__name__], "GRAPH", {"flowkern.ops": ["flowkern.trace"],
                                                       "flowkern.trace": ["flowkern.ops"]})
    assert _cycles() == [["flowkern.ops", "flowkern.trace"]]
    assert floor("flowkern.trace") > floor("flowkern.ops")


def test_import_flowkern_stays_light():
    """``import flowkern`` loads neither transformers nor flowkern.hf (the AOT kernel checks import flowkern in
    environments without transformers); they come with the first model a listener attaches to."""
    import subprocess

    code = "import sys, flowkern; print(sorted(m for m in ('transformers', 'flowkern.hf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
