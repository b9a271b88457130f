"""The import graph follows the data: bucket -> pipeline -> shard set -> stream -> swav -> checkpoints.

swav_io (storage, retries, errors, logging, storage flags) is below everything; shards (the shard-set
contract and its stream) above it; the sharding pipeline above that; training and the application on top.
A module may import its own package or a lower one, never a higher one; no module takes another module's
private (underscore) names; and no two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["swav_io", "shards", "pipeline", "swav"]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in sorted((REPO / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, name or '', line) for every import of our packages, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LAYERS:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from swav import checkpoint` names a module; `from swav.x import y` names a thing in swav.x.
                found.append((sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] in LAYERS]
    return found


MODULES = _modules()
GRAPH = {m: _imports(p, MODULES) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_import_points_down_or_sideways():
    upward = [f"{m} (line {line}) imports {target}" for m, edges in GRAPH.items() for target, _, line in edges
              if _layer(target) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_a_module_boundary():
    private = [f"{m} (line {line}) takes {target}.{name}" for m, edges in GRAPH.items()
               for target, name, line in edges if name.startswith("_") and name != "__version__" and target != m]
    assert not private, "\n".join(private)


def _cycle(edges: dict[str, list[str]]) -> list[str]:
    """One import cycle as a path that ends where it starts, or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_module_graph_has_no_cycle():
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    assert not _cycle(edges), "import cycle: " + " -> ".join(_cycle(edges))


def test_the_checker_sees_what_it_is_meant_to_catch(tmp_path):
    """The three rules above fail on a planted violation (a test that cannot fail is a defect)."""
    fake = {"shards.a": tmp_path / "a.py", "shards.b": tmp_path / "b.py"}
    fake["shards.a"].write_text("from shards.b import _hidden\nfrom swav.train import pretrain\n")
    fake["shards.b"].write_text("def f():\n    from shards import a\n")
    a, b = _imports(fake["shards.a"], fake), _imports(fake["shards.b"], fake)
    assert ("shards.b", "_hidden", 1) in a and ("swav.train", "pretrain", 2) in a
    assert _layer("swav.train") > _layer("shards.a")
    assert b == [("shards.a", "", 2)]
    assert _cycle({"shards.a": ["shards.b"], "shards.b": ["shards.c"], "shards.c": ["shards.a"]}) == \
        ["shards.a", "shards.b", "shards.c", "shards.a"]
    assert _cycle({"shards.a": ["shards.b"], "shards.b": []}) == []


def test_the_tree_is_lint_clean():
    """ruff, configured in pyproject.toml, finds nothing (the same check as `make lint`)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    r = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
