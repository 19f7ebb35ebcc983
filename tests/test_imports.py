"""The shape of the package: no import cycle among fastbp's modules, and no
module over 500 lines without a reason in its docstring.

Read from the sources with ``ast`` (nothing is imported), so a cycle that
works today only because of the order in which ``fastbp/__init__.py``
imports things, or because one side imports inside a function, is caught
all the same.

What counts as an edge A -> B: any ``import``/``from ... import`` in A that
names module B of the package, at module level or inside a function or
class (a function-level import is still a dependency: it hides the cycle
from the import system, not from the reader, and it is how the
``io <-> model`` cycle used to hide).  ``from . import x`` counts as an edge
to module ``x`` when ``x`` is a module.  Edges to a package's
``__init__.py`` do not count: importing any module of a package runs its
``__init__`` first, so a module cannot be imported before it, and a
function-level ``from . import __version__`` is a read of the package, not
an order between modules.
"""
import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastbp"
MAX_LINES = 500
#: a module over MAX_LINES says why on a line of its docstring starting so
SIZE_MARKER = re.compile(r"^Size: \S", re.MULTILINE)


def _modules(root=PACKAGE):
    """Dotted name -> path of every module of the package (not __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] != "__init__":
            out[".".join(parts)] = path
    return out


def _targets(node, name, modules):
    """Modules of the package that import statement ``node`` in module
    ``name`` names."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return {b for b in bases if b in modules}
    package = name.split(".")[:-1]
    if node.level:
        base = package[:len(package) - node.level + 1]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {base} if base in modules else set()
    for alias in node.names:  # from . import x, where x is a module
        if f"{base}.{alias.name}" in modules:
            found.add(f"{base}.{alias.name}")
    return found


def import_graph(root=PACKAGE):
    """Module -> set of the package's modules it imports (every level)."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, name, modules)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def oversized(root=PACKAGE):
    """(module, lines) of every module over MAX_LINES whose docstring has no
    'Size:' line saying why."""
    out = []
    for name, path in _modules(root).items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        doc = ast.get_docstring(ast.parse(text), clean=False) or ""
        if lines > MAX_LINES and not SIZE_MARKER.search(doc):
            out.append((name, lines))
    return out


def test_no_import_cycle_among_fastbp_modules():
    graph = import_graph()
    assert graph["fastbp.model"], "the graph is empty: the parser found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles(tmp_path):
    """The check can fail: module-level and function-level cycles are found."""
    pkg = tmp_path / "fastbp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from . import __init__\n")
    graph = import_graph(pkg)
    assert graph == {"fastbp.a": {"fastbp.b"}, "fastbp.b": {"fastbp.a"}, "fastbp.c": set()}
    assert find_cycle(graph) == ["fastbp.a", "fastbp.b", "fastbp.a"]
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_module_over_500_lines_without_a_reason():
    assert oversized() == [], (f"modules over {MAX_LINES} lines whose docstring has no "
                               "'Size: ...' line saying why")


def test_the_size_check_reads_the_docstring(tmp_path):
    pkg = tmp_path / "fastbp"
    pkg.mkdir()
    body = "x = 1\n" * MAX_LINES
    (pkg / "big.py").write_text('"""Big."""\n' + body)
    (pkg / "why.py").write_text('"""Big.\n\nSize: one table.\n"""\n' + body)
    (pkg / "late.py").write_text('"""Big."""\n# Size: not in the docstring\n' + body)
    assert sorted(name for name, _ in oversized(pkg)) == ["fastbp.big", "fastbp.late"]
