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


# ------------------------------------------------------------------ plug-ins: families, adapters, methods
# The toy world is an SD1 model, and its tiny builders (SD, SDXL, FLUX) build their text encoders from its
# vocabulary, so they sit in toy/ (models/ must not import toy/): the only code outside models/ that may name a
# family or import a family module.
_TOY_FAMILY_USERS = {"toy/base_model.py", "toy/train_base.py", "toy/tiny.py", "toy/tiny_sdxl.py", "toy/tiny_flux.py",
                     "toy/train_flow.py"}


def _sources(outside: str):
    """(path relative to the package, its AST) of every module outside the `outside` folder."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(outside + "/"):
            yield rel, ast.parse(path.read_text(encoding="utf-8"))


def _strings(node) -> list[str]:
    """The string constants a comparison operand or a startswith() argument stands for."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _tested_strings(tree) -> list[tuple[int, str]]:
    """(line, string) for every string compared (==, !=, in, not in) or prefix/suffix-tested in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(node.lineno, s) for s in _strings(operand)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and node.args):
            found += [(node.lineno, s) for s in _strings(node.args[0])]
    return found


def _violations(outside: str, names: set[str], allowed: set[str] = frozenset()) -> list[str]:
    return [f"{rel}:{line} tests {s!r}" for rel, tree in _sources(outside) if rel not in allowed
            for line, s in _tested_strings(tree) if s in names]


def test_the_string_finder_sees_comparisons_and_prefix_tests():
    tree = ast.parse('if a == "sdxl" or b in ("x", "flux"): pass\nv.startswith(("sd_v1", "y"))\nc = "sd2"')
    assert sorted(s for _, s in _tested_strings(tree)) == ["flux", "sd_v1", "sdxl", "x", "y"]


def test_no_family_name_is_compared_and_no_family_module_imported_outside_models():
    from difflora.models.registry import FAMILIES

    names = {n for p in FAMILIES for n in p.names} | {p.title for p in FAMILIES}
    assert _violations("models", names, _TOY_FAMILY_USERS) == []
    family_modules = {type(p).__module__ for p in FAMILIES}
    assert {"difflora.models.flux", "difflora.models.sd", "difflora.models.sdxl"} <= family_modules
    imports = []
    for rel, tree in _sources("models"):
        if rel in _TOY_FAMILY_USERS:
            continue
        package = ["difflora", *rel.split("/")[:-1]]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            imports += [f"{rel}: {t}" for t in targets if any(t == m or t.startswith(m + ".") for m in family_modules)]
    assert imports == []


def test_no_adapter_algorithm_is_tested_outside_network_adapters():
    from difflora.network.adapters import ADAPTERS, ALGO_NAMES

    # a family's LoRA name map reads the key names from the classes (LoRA.keys), never spells them
    names = set(ALGO_NAMES) | {k for cls in ADAPTERS.values() for k in (*cls.keys, *cls.markers)}
    assert _violations("network/adapters", names) == []


def test_no_method_name_is_tested_outside_methods_and_the_ui_describes_methods_from_their_modules():
    from difflora.methods import METHODS
    from difflora.ui import jobform

    assert _violations("methods", set(METHODS)) == []
    tables = [f"{rel}:{node.lineno}" for rel, tree in _sources("methods") if rel.startswith("ui/")
              for node in ast.walk(tree)
              if isinstance(node, ast.Dict) and len({s for k in node.keys for s in _strings(k)} & set(METHODS)) > 1]
    assert tables == []  # the UI keeps no table keyed by method names (descriptions, defaults): the modules say
    for name, cls in METHODS.items():
        assert cls.purpose and jobform.method_purpose(name) == cls.purpose


def test_families_are_never_probed_for_hooks():
    """Every hook is a declared method with a default: no hasattr/getattr on a model, no inspect.signature."""
    probes = []
    for rel, tree in _sources("ui"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr == "signature":
                probes.append(f"{rel}:{node.lineno} inspect.signature")
            if (isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and node.args
                    and "model" in ast.unparse(node.args[0]).split(".")[-1].lower()):
                probes.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert probes == []
