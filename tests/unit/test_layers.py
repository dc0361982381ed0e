"""The layers, read from the code's own imports: which folder may import which, and no
import circles. Every .py under supervisor/genworker is parsed; imports inside functions
count (a lazy import is still a dependency), those under `if TYPE_CHECKING:` do not."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "supervisor"
PACKAGE = "genworker"


@dataclass(frozen=True)
class Source:
    module: str  # genworker.node.feeder; a package's __init__ is the package itself
    text: str = field(repr=False)
    where: str  # the file named in failure messages
    is_package: bool = False


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module imported, resolved (relative imports, `from m import sub`)
    where: str
    line: int

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.importer} imports {self.target}"


@dataclass(frozen=True)
class Rule:
    """Modules under any of `importers` (minus `allowed`) never import under `forbidden`."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def broken_by(self, imp: Import) -> bool:
        return (
            _under(imp.importer, self.importers)
            and not _under(imp.importer, self.allowed)
            and _under(imp.target, self.forbidden)
        )


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


DATABASE = ("genworker.queue", "psycopg", "psycopg_pool")
RULES = (
    Rule("worker/ never touches the database", ("genworker.worker",), DATABASE),
    Rule("api/ never touches the database", ("genworker.api",), DATABASE),
    Rule(
        "queue/ never reaches up to the node, the workers, the API client or ops",
        ("genworker.queue",),
        ("genworker.node", "genworker.worker", "genworker.api", "genworker.ops"),
    ),
    Rule("node/ never imports the command line", ("genworker.node",), ("genworker.cli",)),
    Rule("ops/ reads the node through Protocols only", ("genworker.ops",), ("genworker.node",)),
    Rule(
        "only cli/ starts the demo",
        ("genworker",),
        ("genworker.demo",),
        allowed=("genworker.cli", "genworker.demo"),
    ),
    Rule(
        "only cli/ starts the simulated API",
        ("genworker",),
        ("genworker.sim",),
        allowed=("genworker.cli", "genworker.sim"),
    ),
)


# --- reading the imports ---------------------------------------------------------------


def package_sources(root: Path = SOURCE_ROOT) -> list[Source]:
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        where = str(path.relative_to(root.parent))
        found.append(Source(".".join(parts), path.read_text(), where, is_package))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth, skipping the bodies of `if TYPE_CHECKING:`."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    elif isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.orelse:
            yield from _import_nodes(stmt)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _import_nodes(child)


def _base_of(source: Source, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = source.module if source.is_package else source.module.rpartition(".")[0]
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def imports_of(source: Source, modules: Iterable[str]) -> list[Import]:
    """The imports of one source; `from genworker.x import y` is genworker.x.y when that
    is a module, else genworker.x."""
    known = set(modules)
    found = []
    for node in _import_nodes(ast.parse(source.text, source.where)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _base_of(source, node)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for target in dict.fromkeys(targets):
            found.append(Import(source.module, target, source.where, node.lineno))
    return found


def all_imports(sources: Iterable[Source]) -> list[Import]:
    sources = list(sources)
    modules = {s.module for s in sources}
    return [imp for s in sources for imp in imports_of(s, modules)]


# --- the checks ------------------------------------------------------------------------


def layer_violations(rule: Rule, imports: Iterable[Import]) -> list[Import]:
    return [imp for imp in imports if rule.broken_by(imp)]


def _strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of one node without a self-edge omitted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))
    return components


def import_circles(sources: Iterable[Source]) -> list[list[Import]]:
    """Each circle as the imports between its modules."""
    sources = list(sources)
    modules = {s.module for s in sources}
    imports = [imp for imp in all_imports(sources) if imp.target in modules]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.importer].add(imp.target)
    circles = []
    for component in sorted(_strongly_connected(graph)):
        members = set(component)
        circles.append([i for i in imports if i.importer in members and i.target in members])
    return circles


def _describe_circle(edges: list[Import]) -> str:
    modules = sorted({e.importer for e in edges})
    return "circle " + " <-> ".join(modules) + ":\n" + "\n".join(f"    {e}" for e in edges)


# --- the package as it is --------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> list[Source]:
    return package_sources()


def test_the_scan_sees_the_whole_package(sources: list[Source]) -> None:
    modules = {s.module for s in sources}
    assert {"genworker", "genworker.queue.store", "genworker.node.feeder"} <= modules
    assert {"genworker.worker.process", "genworker.cli.main"} <= modules
    imports = all_imports(sources)
    assert any(
        i.importer == "genworker.node.feeder" and _under(i.target, DATABASE) for i in imports
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_no_layer_reaches_where_it_must_not(rule: Rule, sources: list[Source]) -> None:
    bad = layer_violations(rule, all_imports(sources))
    assert not bad, f"{rule.name}:\n" + "\n".join(f"  {imp}" for imp in bad)


def test_no_module_of_the_package_imports_itself_back(sources: list[Source]) -> None:
    circles = import_circles(sources)
    assert not circles, f"{len(circles)} import circle(s):\n" + "\n".join(
        _describe_circle(c) for c in circles
    )


# --- the checker can fail ---------------------------------------------------------------


def _fake(module: str, text: str, is_package: bool = False) -> Source:
    return Source(module, text, f"fake/{module.replace('.', '/')}.py", is_package)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_reports_an_import_that_breaks_it(rule: Rule) -> None:
    for importer in rule.importers:
        for target in rule.forbidden:
            fake = _fake(f"{importer}.fake", f"import os\n\n\ndef later():\n    import {target}\n")
            bad = layer_violations(rule, all_imports([fake]))
            assert [str(i) for i in bad] == [
                f"fake/{importer.replace('.', '/')}/fake.py:5: {importer}.fake imports {target}"
            ]
    for importer in rule.allowed:
        fake = _fake(f"{importer}.fake", f"import {rule.forbidden[0]}\n")
        assert not layer_violations(rule, all_imports([fake]))


def test_imports_are_resolved_the_way_python_runs_them() -> None:
    worker = _fake(
        "genworker.worker.loop",
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from .. import model\n"  # a module
        "from ..queue import Client\n"  # a name in a package's __init__
        "from genworker.queue import store\n"  # a module of a package
        "if TYPE_CHECKING:\n"
        "    from genworker.node import feeder\n"
        "else:\n"
        "    import psycopg_pool\n",
    )
    others = [
        _fake("genworker.model", ""),
        _fake("genworker.queue", "", is_package=True),
        _fake("genworker.queue.store", "from . import sql\n"),
        _fake("genworker.node.feeder", ""),
    ]
    found = {(i.importer, i.target, i.line) for i in all_imports([worker, *others])}
    assert found == {
        ("genworker.worker.loop", "__future__", 1),
        ("genworker.worker.loop", "typing", 2),
        ("genworker.worker.loop", "genworker.model", 3),
        ("genworker.worker.loop", "genworker.queue", 4),
        ("genworker.worker.loop", "genworker.queue.store", 5),
        ("genworker.worker.loop", "psycopg_pool", 9),
        ("genworker.queue.store", "genworker.queue", 1),  # sql is no module here
    }


def test_a_circle_is_reported_with_each_import_in_it() -> None:
    fakes = [
        _fake("genworker.node.arbiter", "from genworker.node import signals\n"),
        _fake("genworker.node.signals", "def f():\n    from genworker.node.arbiter import A\n"),
        _fake("genworker.node", "from genworker.node import arbiter\n", is_package=True),
        _fake("genworker.model", "import genworker.model\n"),
        _fake("genworker.errors", "from genworker import model\n"),
    ]
    circles = import_circles(fakes)
    assert [[str(i) for i in c] for c in circles] == [
        ["fake/genworker/model.py:1: genworker.model imports genworker.model"],
        [
            "fake/genworker/node/arbiter.py:1: genworker.node.arbiter imports "
            "genworker.node.signals",
            "fake/genworker/node/signals.py:2: genworker.node.signals imports "
            "genworker.node.arbiter",
        ],
    ]
    assert "<->" in _describe_circle(circles[1])


def test_a_package_without_circles_passes() -> None:
    fakes = [
        _fake("genworker", "from genworker import model\n", is_package=True),
        _fake("genworker.model", "import enum\n"),
        _fake("genworker.node", "", is_package=True),
        _fake("genworker.node.feeder", "from genworker.node import arbiter\n"),
        _fake("genworker.node.arbiter", "from .. import model\n"),
    ]
    assert import_circles(fakes) == []
