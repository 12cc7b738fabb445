"""The package's shape: no import circle, dependencies pointing one way, modules of one idea.

Read with `ast` (nothing is imported), so a violation fails here even when it would work at run time.
Every import counts, also one inside a function (a lazy import still ties the two modules together)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mst_hf"
LEAVES = {"mst_hf.schedule", "mst_hf.topology", "mst_hf.masks", "mst_hf.attention.patterns"}
TOP = ("mst_hf.trainer", "mst_hf.arguments", "mst_hf.reporting", "mst_hf.integrations")  # nothing depends on these


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the mst_hf modules an ``import`` statement reaches."""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("mst_hf"):
        return []
    found = []
    for alias in node.names:  # `from . import attention` names a module; `from .x import y` names x
        candidate = f"{target}.{alias.name}"
        found.append(candidate if candidate in MODULES else target)
    return found


def _imports() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                edges.update(_resolve(module, node))
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("mst_hf"))
        graph[module] = {e for e in edges if e in MODULES and e != module}
    return graph


GRAPH = _imports()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    # package __init__ files re-export their children: the arrows from a child to its own package door are the
    # circle to look for, so they stay in the graph
    assert _cycle(GRAPH) is None, f"import circle: {' -> '.join(_cycle(GRAPH))}"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_nothing_from_the_package(leaf):
    if leaf not in MODULES:
        pytest.fail(f"{leaf} is part of the intended layout but does not exist")
    assert GRAPH[leaf] == set(), f"{leaf} imports {sorted(GRAPH[leaf])}"


def test_schedule_is_torch_free():
    tree = ast.parse(MODULES["mst_hf.schedule"].read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert "torch" not in names and "transformers" not in names


def test_nothing_inside_the_library_imports_the_trainer_the_example_helpers_or_integrations():
    offenders = sorted(
        (module, dep) for module, deps in GRAPH.items() for dep in deps
        if dep.startswith(TOP) and module != "mst_hf" and not module.startswith(TOP)
    )
    assert offenders == []


def test_implementations_and_kernels_stay_below_the_controller():
    low = [m for m in MODULES if m.startswith(("mst_hf.attention", "mst_hf.kernels", "mst_hf.io"))]
    high = ("mst_hf.controller", "mst_hf.trainer")
    offenders = sorted((m, d) for m in low for d in GRAPH[m] if d.startswith(high))
    assert offenders == []


def test_attention_implementations_never_import_each_other():
    impls = [m for m in MODULES if m.startswith("mst_hf.attention.impl.")]
    assert impls, "mst_hf.attention.impl holds the implementations"

    def family(name):
        return ".".join(name.split(".")[:4])  # mst_hf.attention.impl.<backend>

    shared = "mst_hf.attention.impl.common"  # helpers every backend may use (not an implementation)
    offenders = sorted((m, d) for m in impls for d in GRAPH[m]
                       if d.startswith("mst_hf.attention.impl.") and family(d) not in (family(m), shared))
    assert offenders == []


def test_modules_hold_one_idea_each():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


# --------------------------------------------------------------------------- research tooling (study/, tools/)

REPO = ROOT.parent
TOOLING = sorted(p for folder in ("study", "tools") for p in (REPO / folder).rglob("*.py"))
BENCH_MODULES = {p.stem for p in (REPO / "bench").glob("*.py")}


def _imported_names(path: pathlib.Path) -> list[str]:
    """Every absolute module and name an import statement of ``path`` reaches (``from a.b import c``: a.b.c)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_research_tooling_uses_only_public_library_names():
    assert TOOLING, "study/ and tools/ hold the research tooling"
    offenders = sorted((str(p.relative_to(REPO)), name) for p in TOOLING for name in _imported_names(p)
                       if name.startswith("mst_hf") and any(part.startswith("_") for part in name.split(".")))
    assert offenders == []


def test_research_tooling_never_imports_the_benchmarks():
    offenders = sorted((str(p.relative_to(REPO)), name) for p in TOOLING for name in _imported_names(p)
                       if name.split(".")[0] in BENCH_MODULES | {"bench"})
    assert offenders == []


def test_research_tooling_modules_hold_one_idea_each():
    tables = {"tools/corpus/sources.py"}  # the pinned archives and their reference counts: one table of data
    long = {name: n for p in TOOLING if (name := str(p.relative_to(REPO))) not in tables
            and (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


# --------------------------------------------------------------------------- one policy, one place
ALLOCATION_PRIMITIVES = {"allocate", "erdos_renyi_densities", "uniform_densities", "ALLOCATIONS"}
ALLOWED_TO_ALLOCATE = {"mst_hf.allocation", "mst_hf.topology"}


def _primitive_uses(module: str) -> list[str]:
    """Where ``module`` reaches topology's allocation primitives: a call, an attribute read, or an import."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Name) and node.id in ALLOCATION_PRIMITIVES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in ALLOCATION_PRIMITIVES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in ALLOCATION_PRIMITIVES]
    return found


def test_only_the_allocation_module_splits_the_sparsity_over_layers():
    # per-layer densities (the head cap included) come from mst_hf.allocation.layer_densities and nowhere else
    offenders = {m: uses for m in MODULES if m not in ALLOWED_TO_ALLOCATE and (uses := _primitive_uses(m))}
    assert offenders == {}


def test_the_allocation_module_sits_on_topology_alone():
    assert GRAPH["mst_hf.allocation"] == {"mst_hf.topology"}


# --------------------------------------------------------------------------- docs/api.md's layering is the real one
PACKAGES = ("mst_hf.attention", "mst_hf.kernels", "mst_hf.io", "mst_hf.integrations", "mst_hf.metrics")


def _unit(module: str) -> str | None:
    """The unit of the docs' table a module belongs to (a package counts as one, attention.patterns apart)."""
    if module == "mst_hf":
        return None
    if module == "mst_hf.attention.patterns":
        return "attention.patterns"
    package = next((p for p in PACKAGES if module == p or module.startswith(p + ".")), module)
    return package.removeprefix("mst_hf.")


def _documented_tiers() -> dict[str, int]:
    text = (ROOT.parent / "docs" / "api.md").read_text(encoding="utf-8")
    block = text.split("## Package layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    tiers, current = {}, None
    for line in block.strip().splitlines()[1:]:  # the first line is the header
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2:
            continue
        current = int(cells[0]) if cells[0] else current
        for name in cells[1].split():
            assert name not in tiers, f"{name} is listed twice in docs/api.md's layering"
            tiers[name] = current
    return tiers


def test_docs_layering_lists_every_unit_and_every_import_goes_down():
    tiers = _documented_tiers()
    units = {u for m in MODULES if (u := _unit(m))}
    assert units == set(tiers), f"missing: {sorted(units - set(tiers))}, unknown: {sorted(set(tiers) - units)}"
    upward = sorted((a, b) for a, deps in GRAPH.items() for b in deps
                    if (ua := _unit(a)) and (ub := _unit(b)) and ua != ub and tiers[ub] >= tiers[ua])
    assert upward == []
