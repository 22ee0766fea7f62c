"""gpl_cli's modules import each other without cycles, and only downwards through the layers.

Function-level imports count too: they are how a cycle hides (it works until someone moves the
import to the top of the module). The graph is read from the source with `ast`, not by importing.
The cycle check leaves out imports under `if TYPE_CHECKING:` (they never run); the layer check
counts them (a type named from a higher layer is a dependency on it all the same).
"""

from __future__ import annotations

import ast
import pathlib

import gpl_cli

PACKAGE = pathlib.Path(gpl_cli.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str], type_checking: bool = False) -> set[str]:
    """The gpl_cli modules a module imports anywhere in its body; TYPE_CHECKING blocks only with `type_checking`."""
    found = set()
    skip = set() if type_checking else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test) for n in ast.walk(node)}
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from gpl_cli.embedding import engine` imports the module gpl_cli.embedding.engine, not only the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def parse(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the gpl_cli modules it imports; imports under `if TYPE_CHECKING:` only with `type_checking`."""
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(parse(f), module_name(f), f.name == "__init__.py", known, type_checking)
            for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    tree = ast.parse("import os\n\ndef f():\n    from gpl_cli.embedding import engine\n    from gpl_cli.pooling.ops import x\n")
    known = {"gpl_cli", "gpl_cli.embedding.engine", "gpl_cli.pooling.ops"}
    assert imported_modules(tree, "gpl_cli.cli", False, known) == {"gpl_cli.embedding.engine", "gpl_cli.pooling.ops"}


def test_no_import_cycles_in_gpl_cli():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in gpl_cli: " + "; ".join(" <-> ".join(c) for c in cycles)


# --- layers -----------------------------------------------------------------------------------------

# A module may import modules of its own layer or of lower ones, never of a higher one. A module's layer is
# that of the longest entry naming it or a package above it (gpl_cli.store.formats.npy: gpl_cli.store);
# "gpl_cli" itself is matched exactly, so a new top-level module must be given a layer here.
LAYERS = {
    "gpl_cli.cli": 5, "gpl_cli.__main__": 5,
    "gpl_cli.analysis": 4, "gpl_cli.report": 4, "gpl_cli.api": 4,
    "gpl_cli.embedding": 3, "gpl_cli.store": 3,
    "gpl_cli.models": 2, "gpl_cli.pooling": 2,
    "gpl_cli.errors": 1, "gpl_cli.defaults": 1, "gpl_cli.version": 1, "gpl_cli.atomic": 1, "gpl_cli": 1,
}
API = "gpl_cli.api"  # the public API is for users: only gpl_cli/__init__.py re-exports it
ENGINES = ("gpl_cli.embedding.local", "gpl_cli.embedding.ray")  # the two engines never import each other


def layer_of(module: str) -> int | None:
    if module == "gpl_cli":
        return LAYERS["gpl_cli"]
    owners = [prefix for prefix in LAYERS if prefix != "gpl_cli" and (module == prefix or module.startswith(prefix + "."))]
    return LAYERS[max(owners, key=len)] if owners else None


def without_lazy_api(tree: ast.Module, known: set[str]) -> set[str]:
    """What gpl_cli/__init__.py imports (TYPE_CHECKING blocks included), less the one exempt import: the api
    imported inside its module-level `__getattr__` (the lazy re-export). Anything else that function
    imports counts, and so does an import of the api anywhere else in the file."""
    lazy = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__getattr__"]
    rest = [n for n in tree.body if n not in lazy]

    def imports(body: list[ast.stmt]) -> set[str]:
        return imported_modules(ast.Module(body=body, type_ignores=[]), "gpl_cli", True, known, type_checking=True)

    return imports(rest) | (imports(lazy) - {API})


def layer_graph() -> dict[str, set[str]]:
    """The import graph the layer rule applies to: TYPE_CHECKING imports included, the lazy api import left out."""
    graph = import_graph(type_checking=True)
    graph["gpl_cli"] = without_lazy_api(parse(PACKAGE / "__init__.py"), set(graph))
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the layer rule and its extra rules, as `importer -> imported (layer a -> b)`."""
    found = [f"{m} has no layer: add it to LAYERS in tests/meta/test_imports.py" for m in sorted(graph) if layer_of(m) is None]
    for importer in sorted(graph):
        for imported in sorted(graph[importer]):
            a, b = layer_of(importer), layer_of(imported)
            if a is None or b is None:
                continue
            edge = f"{importer} -> {imported} (layer {a} -> {b})"
            if b > a:
                found.append(edge)
            elif imported == API and importer != "gpl_cli":
                found.append(f"{edge}: the public API is for users; import what it wraps instead")
            elif importer in ENGINES and imported in ENGINES:
                found.append(f"{edge}: the two engines never import each other")
    return found


def test_layer_of_matches_whole_package_names_and_flags_modules_without_a_layer():
    assert layer_of("gpl_cli.store.formats.npy") == 3 and layer_of("gpl_cli.cli") == 5 and layer_of("gpl_cli") == 1
    assert layer_of("gpl_cli.newthing") is None and layer_of("gpl_cli.clients") is None  # a prefix of names, not text
    assert layer_violations({"gpl_cli.newthing": set()}) == [
        "gpl_cli.newthing has no layer: add it to LAYERS in tests/meta/test_imports.py"]


def test_the_layer_checker_catches_planted_violations():
    graph = {
        "gpl_cli.cli": {"gpl_cli.analysis.compare", "gpl_cli.errors"},  # downwards: fine
        "gpl_cli.analysis.compare": {"gpl_cli.report.plots", "gpl_cli.embedding.job"},  # same layer and lower: fine
        "gpl_cli.models.heads": {"gpl_cli.store.sink", "gpl_cli.pooling.ops"},  # 2 -> 3: a violation
        "gpl_cli.errors": {"gpl_cli.cli"},  # 1 -> 5
        "gpl_cli.report.html": {"gpl_cli.api"},  # same layer, but the API is for users
        "gpl_cli.embedding.local": {"gpl_cli.embedding.ray", "gpl_cli.embedding.engine"},
        "gpl_cli.embedding.ray": {"gpl_cli.embedding.local"},
        "gpl_cli": {"gpl_cli.api"},  # what is left after without_lazy_api: an eager import
    }
    assert layer_violations(graph) == [
        "gpl_cli -> gpl_cli.api (layer 1 -> 4)",
        "gpl_cli.embedding.local -> gpl_cli.embedding.ray (layer 3 -> 3): the two engines never import each other",
        "gpl_cli.embedding.ray -> gpl_cli.embedding.local (layer 3 -> 3): the two engines never import each other",
        "gpl_cli.errors -> gpl_cli.cli (layer 1 -> 5)",
        "gpl_cli.models.heads -> gpl_cli.store.sink (layer 2 -> 3)",
        "gpl_cli.report.html -> gpl_cli.api (layer 4 -> 4): the public API is for users; import what it wraps instead",
    ]


def test_type_checking_imports_count_for_layers_and_only_the_lazy_api_import_is_exempt():
    known = {"gpl_cli", "gpl_cli.api", "gpl_cli.version", "gpl_cli.cli", "gpl_cli.models.heads"}
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gpl_cli.models.heads import Head\n"
    tree = ast.parse(guarded)
    assert imported_modules(tree, "gpl_cli.pooling.ops", False, known) == set()
    assert imported_modules(tree, "gpl_cli.pooling.ops", False, known, type_checking=True) == {"gpl_cli.models.heads"}
    lazy = ("from gpl_cli.version import __version__\n\n"
            "def __getattr__(name):\n    from gpl_cli import api\n\n    return getattr(api, name)\n")
    assert without_lazy_api(ast.parse(lazy), known) == {"gpl_cli.version"}
    # The api imported anywhere else in the file, or anything else imported by __getattr__, still counts.
    assert without_lazy_api(ast.parse("import gpl_cli.api\n" + lazy), known) == {"gpl_cli.version", "gpl_cli.api"}
    assert without_lazy_api(ast.parse("if TYPE_CHECKING:\n    from gpl_cli.api import embed\n" + lazy), known) == {
        "gpl_cli.version", "gpl_cli.api"}
    sneaky = lazy.replace("from gpl_cli import api", "from gpl_cli import api, cli")
    assert without_lazy_api(ast.parse(sneaky), known) == {"gpl_cli.version", "gpl_cli.cli"}


def test_modules_import_only_their_own_layer_or_lower():
    violations = layer_violations(layer_graph())
    print("\n".join(violations))
    assert not violations, f"{len(violations)} imports against the layers:\n" + "\n".join(violations)
