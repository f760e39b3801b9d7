"""Every edit of a model happens in :mod:`flowkern.hf`: an AST scan of every other module of the package for the
three ways code edits a model -- assigning a ``forward``, setting (or deleting) attributes on model modules, and
registering hooks -- at any depth (function bodies included). The training lab (``tools/demo_model``) is outside
the package and free to hook the model it trains.

"Model modules" are recognised by name: the object whose attribute is set is an expression with a part named like a
model's piece (``model``, ``layer``, ``owner``, ``tower``, ``self.model``, ...); a ``forward`` and a hook are flagged
whatever they are set on. The scan is checked on snippets written the ways the code once did it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowkern"
ALLOWED = PACKAGE / "hf"

HOOK_METHODS = frozenset({
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook", "register_state_dict_pre_hook",
    "register_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_load_state_dict_post_hook",
    "register_module_forward_hook", "register_module_forward_pre_hook", "register_module_full_backward_hook",
    "register_module_full_backward_pre_hook", "register_module_backward_hook",
    "register_module_buffer_registration_hook", "register_module_module_registration_hook",
    "register_module_parameter_registration_hook",
})
"""Module hooks (``Module.register_*`` and the global ``torch.nn.modules.module.register_module_*``); a tensor's
``register_hook`` (a gradient hook on an activation) does not edit the model."""

MODEL_WORDS = frozenset({"model", "models", "module", "modules", "layer", "layers", "owner", "tower", "encoder",
                         "decoder", "attn", "attention", "mlp", "projector", "lm", "block", "blocks", "submodule",
                         "child", "children", "embeddings", "embed", "vision", "language", "net", "site", "sites"})
"""Words of a name (split at ``_``) that mark an object as (a piece of) a model."""


def _names(node: ast.AST) -> list[str]:
    """The identifiers an object expression is built from: ``self.model.layers[0]`` -> self, model, layers."""
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.append(sub.attr)
    return out


def _model_like(node: ast.AST) -> bool:
    words = {w for name in _names(node) for w in re.split(r"_+", name.lower()) if w}
    return bool(words & MODEL_WORDS)


def _attribute_targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    if isinstance(node, ast.Delete):
        return node.targets
    return []


def _flatten(targets: list[ast.AST]) -> list[ast.AST]:
    out = []
    for t in targets:
        out += _flatten(list(t.elts)) if isinstance(t, ast.Tuple | ast.List) else [t]
    return out


def model_edits(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """``(line, what)`` of every model edit in ``source``: ``"forward"`` (a forward assigned or deleted),
    ``"attribute"`` (an attribute set or deleted on a model-like object), or the hook method's name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        for target in _flatten(_attribute_targets(node)):
            if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                    and target.value.attr == "__dict__" and _model_like(target.value.value):
                found.append((node.lineno, "attribute"))  # model.__dict__["forward"] = ...
            if not isinstance(target, ast.Attribute):
                continue
            if target.attr == "forward":
                found.append((node.lineno, "forward"))
            elif _model_like(target.value):
                found.append((node.lineno, "attribute"))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in HOOK_METHODS:
            found.append((node.lineno, name))
        elif name in ("setattr", "delattr", "__setattr__", "__delattr__") and node.args:
            bound = name.startswith("__") and isinstance(func, ast.Attribute) and len(node.args) < (
                3 if name == "__setattr__" else 2)  # m.__setattr__(name, value), not object.__setattr__(m, ...)
            args = [func.value, *node.args] if bound else node.args  # type: ignore[union-attr]
            obj, attr = args[0], args[1] if len(args) > 1 else None
            if isinstance(attr, ast.Constant) and attr.value == "forward":
                found.append((node.lineno, "forward"))
            elif _model_like(obj):
                found.append((node.lineno, "attribute"))
    return sorted(set(found))


def _package_edits() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if ALLOWED in path.parents:
            continue
        edits = model_edits(path.read_text(encoding="utf-8"), str(path))
        if edits:
            out[path.relative_to(ROOT).as_posix()] = edits
    return out


def test_no_model_edit_outside_hf():
    bad = _package_edits()
    assert not bad, f"model edits outside flowkern/hf/ (move them into flowkern/hf/, e.g. a listener): {bad}"


@pytest.mark.parametrize("code, expected", [
    ("layer.forward = make_stub(i, layer, layer.forward)", [(1, "forward")]),
    ("for l in ls:\n    l.forward = f", [(2, "forward")]),
    ("def f(layer):\n    del layer.forward", [(2, "forward")]),
    ("setattr(block, 'forward', stub)", [(1, "forward")]),
    ("object.__setattr__(m, 'forward', stub)", [(1, "forward")]),
    ("module.__setattr__('x', 1)", [(1, "attribute")]),
    ("def active(owner, name, memo):\n    setattr(owner, name, memo)", [(2, "attribute")]),
    ("delattr(owner, name)", [(1, "attribute")]),
    ("self.model.config.flag = True", [(1, "attribute")]),
    ("model.language_model.layers[0].x = 1", [(1, "attribute")]),
    ("vision_tower.__dict__['forward'] = f", [(1, "attribute")]),
    ("h = self.model.register_forward_pre_hook(pre, with_kwargs=True)", [(1, "register_forward_pre_hook")]),
    ("hs = [self.layers[i].register_forward_hook(f) for i in ks]", [(1, "register_forward_hook")]),
    ("m.register_full_backward_hook(g)", [(1, "register_full_backward_hook")]),
    ("from torch.nn.modules.module import register_module_forward_hook\nregister_module_forward_hook(f)",
     [(2, "register_module_forward_hook")]),
    # not model edits: the object's own attributes, a namespace, a tensor's gradient hook, reading a forward
    ("self.model = model\nself.layers = []\nself.share.kv[i] = kv", []),
    ("setattr(args, dest, value)\nconfig.x = 1\nfig.dpi = 2", []),
    ("a.register_hook(lambda g: g)\nf = layer.forward\nout = model.forward(x)", []),
])
def test_the_scan_sees_each_kind_of_edit(code, expected):
    assert model_edits(code) == expected


def test_the_scan_catches_the_sweep_as_it_was():
    """The prefix share and image memo as the sweep once wrote them outside ``hf/`` are caught."""
    code = '''
class PrefixShare:
    def _watch(self):
        handles = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                   self.model.register_forward_hook(post, with_kwargs=True, always_call=True)]
    def capture(self):
        handles = [self.layers[i].register_forward_hook(make_hook(i), with_kwargs=True) for i in layers]
    def replay(self):
        for i in range(depth):
            layer = self.layers[i]
            layer.forward = make_stub(i, layer, layer.forward)
        for layer, had, prev in saved:
            if had:
                layer.forward = prev
            else:
                del layer.forward
class ImageCache:
    def active(self):
        owner, name = self.where
        setattr(owner, name, memo)
        delattr(owner, name)
'''
    assert [what for _, what in model_edits(code)] == [
        "register_forward_pre_hook", "register_forward_hook", "register_forward_hook", "forward", "forward", "forward",
        "attribute", "attribute"]
