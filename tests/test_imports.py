"""The package's import graph: no cycle (counting imports inside functions too, since a lazy
import only hides a cycle), no module loading a result through a trainer, and the rendering
helpers below every stage."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "specmatch"
TRAINERS = {"specmatch.autoencoder.train", "specmatch.diffusion.train"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in it (`from . import x` resolves to the
    submodule x where there is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
                elif target in modules:
                    out.add(target)
    return out - {name}


def graph() -> nx.DiGraph:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for f in files:
        g.add_edges_from((_module_name(f), m) for m in _imports(f, modules))
    return g


def _package_edges(g: nx.DiGraph) -> nx.DiGraph:
    """Edges between the modules proper (a package's __init__ only re-exports or documents)."""
    inits = {m for m in g if (PKG.parent / m.replace(".", "/") / "__init__.py").is_file()}
    return g.subgraph(set(g) - inits)


def test_the_graph_sees_real_imports():
    g = graph()
    assert g.has_edge("specmatch.diffusion.sample", "specmatch.diffusion.artifact")
    assert g.has_edge("specmatch.diffusion.sample", "specmatch.autoencoder.artifact")
    assert g.has_edge("specmatch.report.figures", "specmatch.render.figures")
    assert g.has_edge("specmatch.diffusion.train", "specmatch.alignment.align")  # an import inside a function


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(_package_edges(graph())))
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_only_the_cli_imports_a_trainer(trainer):
    users = sorted(set(graph().predecessors(trainer)) - {"specmatch.cli"})
    assert not users, f"{users} import {trainer}: load results through the artifact modules"


def test_stages_do_not_import_the_report():
    g = graph()
    users = sorted(m for m in g if not m.startswith("specmatch.report") and m != "specmatch.cli"
                   and any(d.startswith("specmatch.report") for d in g.successors(m)))
    assert not users, f"{users} import specmatch.report (the top-level aggregator); use specmatch.render"


# The layers of the package, lowest first. A module may import from its own unit (a top-level
# module or subpackage) and from units of lower layers, never from a higher layer or from
# another unit of its own layer (peers stay independent: the trainers of autoencoders and the
# alignment targets know nothing of each other). docs/architecture.md draws the same picture.
LAYERS = [
    {"specmatch", "specmatch.errors"},
    {"specmatch.runtime"},
    {"specmatch.config", "specmatch.render", "specmatch.spectral"},
    {"specmatch.resources"},
    {"specmatch.data"},
    {"specmatch.metrics"},
    {"specmatch.autoencoder", "specmatch.alignment"},
    {"specmatch.diffusion"},
    {"specmatch.grid"},
    {"specmatch.report"},
    {"specmatch.ops"},
    {"specmatch.stages"},
    {"specmatch.cli"},
]


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_violations(g: nx.DiGraph, layers: list[set[str]]) -> list[str]:
    rank = {unit: i for i, units in enumerate(layers) for unit in units}
    out = []
    for a, b in g.edges():
        ua, ub = _unit(a), _unit(b)
        if ua == ub:
            continue
        if ua not in rank or ub not in rank:
            out.append(f"{a} -> {b}: {ua if ua not in rank else ub} is in no layer of LAYERS")
        elif rank[ua] < rank[ub]:
            out.append(f"{a} -> {b}: layer {rank[ua]} imports from the higher layer {rank[ub]}")
        elif rank[ua] == rank[ub] and ua != "specmatch":
            out.append(f"{a} -> {b}: {ua} and {ub} are peers of layer {rank[ua]}")
    return sorted(out)


def test_layer_check_finds_an_upward_and_a_sideways_import():
    g = nx.DiGraph([("specmatch.metrics.fid", "specmatch.diffusion.sample"),
                    ("specmatch.alignment.align", "specmatch.autoencoder.model"),
                    ("specmatch.diffusion.train", "specmatch.metrics.fid")])
    found = layer_violations(g, LAYERS)
    assert len(found) == 2, found
    assert "higher layer" in found[1] and "peers" in found[0], found


def test_no_import_from_a_lower_layer_to_a_higher_one():
    violations = layer_violations(graph(), LAYERS)
    assert not violations, "\n".join(violations)
