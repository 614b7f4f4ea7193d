"""Layering of `mllm`, read from the source (ast, nothing imported): lower layers own the constants, and no module
imports a layer above it. Bottom to top: constants; vocab; conversation; code cache, data; model; sampling; train;
evaluation bridges (lmms-eval, GenEval); the web demo (app). Every import counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

MLLM = Path(__file__).resolve().parents[1] / "mllm"

# module (or package prefix) -> the `mllm` modules it may import (None: any but the forbidden ones), forbidden prefixes
RULES = {
    "mllm.constants": (set(), ()),
    "mllm.vocab": ({"mllm.constants"}, ()),
    "mllm.conversation": ({"mllm.constants"}, ()),
    "mllm.sampling": (None, ("mllm.data", "mllm.train", "mllm.evaluation")),
    "mllm.data": (None, ("mllm.sampling", "mllm.train", "mllm.evaluation")),
    "mllm.app": (None, ("mllm.train", "mllm.data")),  # the web demo samples; it never trains
}


def module_name(path: Path) -> str:
    parts = path.relative_to(MLLM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mllm_imports(path: Path) -> set[str]:
    """Every `mllm` module `path` imports (`from mllm import x` counts as `mllm.x`)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found |= {base} if base != "mllm" else {f"mllm.{alias.name}" for alias in node.names}
    return {name for name in found if name == "mllm" or name.startswith("mllm.")}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = {module_name(p): mllm_imports(p) for p in sorted(MLLM.rglob("*.py"))}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_no_module_imports_a_layer_above_it(layer):
    allowed, forbidden = RULES[layer]
    checked = {name: imports for name, imports in MODULES.items() if within(name, layer)}
    assert checked, f"no module {layer} in {MLLM}: update RULES"
    for name, imports in checked.items():
        own = {i for i in imports if not within(i, layer)}  # a package's modules may import each other
        if allowed is not None:
            assert own <= allowed, f"{name} imports {sorted(own - allowed)}; it may import only {sorted(allowed)}"
        bad = sorted(i for i in own for prefix in forbidden if within(i, prefix))
        assert not bad, f"{name} imports {bad}, a layer above it"


def test_only_the_evaluation_bridges_import_themselves():
    outside = {name: sorted(i for i in imports if within(i, "mllm.evaluation"))
               for name, imports in MODULES.items() if not within(name, "mllm.evaluation")}  # fmt: skip
    assert not {name: bad for name, bad in outside.items() if bad}


def test_the_rules_see_real_imports():
    """The parser finds what the modules do import (guards the tests above against passing vacuously)."""
    assert MODULES["mllm.vocab"] == {"mllm.constants"}
    assert "mllm.conversation" in MODULES["mllm.sampling"]
    assert "mllm.sampling" in MODULES["mllm.evaluation.lmms_model"]
    assert "mllm.data.llava" in MODULES["mllm.data.mixture"]
