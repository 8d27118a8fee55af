"""The package's layers: no import cycle between its top-level packages, models/ below toy/ and train/,
no private name imported across packages, and train/ free of method and stage names."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import difflora

ROOT = Path(difflora.__file__).parent


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(top-level package -> top-level packages it imports, private names imported across packages)."""
    edges: dict[str, set[str]] = defaultdict(set)
    private: list[str] = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        module = list(rel.with_suffix("").parts)
        package = module[:-1]  # the package this file's relative imports start from
        top = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    target = base + (node.module.split(".") if node.module else [])
                    if not target:  # `from . import x` at the top: x is the package
                        target = [node.names[0].name]
                elif node.module and node.module.split(".")[0] == "difflora":
                    target = node.module.split(".")[1:] or [node.names[0].name]
                else:
                    continue
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "difflora"]
                if not targets:
                    continue
                target, names = targets[0], []
            else:
                continue
            if target and target[0] != top:
                edges[top].add(target[0])
                private += [f"{rel}: {'.'.join(target)}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    return edges, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_top_level_packages():
    edges, _ = _imports()
    assert {"models", "train", "toy", "methods", "network"} <= set(edges)  # the walk sees the package
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_models_import_neither_toy_nor_train():
    edges, _ = _imports()
    assert "network" in edges["models"]  # imports are found (models builds LoRA targets)
    assert not edges["models"] & {"toy", "train", "commands", "methods"}, edges["models"]


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_private_names_imported_across_packages():
    _, private = _imports()
    assert private == []


def test_train_names_no_method_or_stage():
    """The loop sizes, validates and runs methods only through their interface."""
    from difflora.methods import METHODS

    names = set(METHODS) | {"main", "difference", "per_pair_average"}  # stage names "before"/"after" are also data keys
    for path in (ROOT / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, f"{path.name} names {node.value!r}"
            if isinstance(node, ast.Attribute):
                assert node.attr not in names, f"{path.name} uses .{node.attr}"


def test_train_function_is_an_outline():
    tree = ast.parse((ROOT / "train" / "loop.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 80
