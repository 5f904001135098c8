"""The package's layers (README.md, "Package layout"): every module sits in one, and imports only its own layer or
the ones below it."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    # layer: the modules in it, bottom first
    "core": [
        "custom",
        "custom.atomic",
        "custom.blocks",
        "custom.errors",
        "custom.losses",
        "custom.metrics",
        "custom.networks",
        "custom.spatial",
        "custom.warp",
    ],
    "middle": [
        "custom.affine",
        "custom.data",
        "custom.data.demo",
        "custom.data.frames",
        "custom.data.oasis",
        "custom.data.pairs",
        "custom.data.synth",
        "custom.data.transforms",
        "custom.interop",
        "custom.methods",
        "custom.plots",
        "custom.refine",
    ],
    "glue": [
        "custom.cohort",
        "custom.inference",
        "custom.input_checks",
        "custom.one_line_errors",
        "custom.outputs",
        "custom.pretrained",
        "custom.runner",
        "custom.workflow",
    ],
    "tools": [
        "custom.accuracy",
        "custom.accuracy_3d",
        "custom.accuracy_report",
        "custom.accuracy_subjects",
        "custom.benchmark",
        "custom.export",
        "custom.peer_run",
        "custom.peers",
        "custom.pretrain",
        "custom.scale",
        "custom.study",
    ],
    "cli": ["custom.__main__", "custom.cli"],
}
LEVEL = {module: level for level, modules in enumerate(LAYERS.values()) for module in modules}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imported(path: Path):
    """The ``custom`` modules a file imports (anywhere in it, lazy imports included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "custom":
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "custom")


FILES = sorted((REPO / "custom").rglob("*.py"))


def test_every_module_has_a_layer():
    assert sorted(module_name(p) for p in FILES) == sorted(LEVEL)


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_module_imports_a_layer_above_its_own(path):
    name = module_name(path)
    above = [m for m in imported(path) if LEVEL[m] > LEVEL[name]]
    assert not above, f"{name} ({list(LAYERS)[LEVEL[name]]}) imports {above} from a layer above"


def test_readme_draws_the_layers():
    text = (REPO / "README.md").read_text()
    for layer, modules in LAYERS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| {layer} |")), "")
        assert row, f"README.md has no row for the {layer} layer"
        for module in modules:
            short = {"custom": "__init__", "custom.data": "data/__init__"}.get(module, module[7:].replace(".", "/"))
            assert short in row, f"{module} is missing from README's {layer} row"


def find_circle(graph):
    """A cycle of ``graph`` (module -> imported modules) as a list of modules, or ``[]``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


@pytest.mark.parametrize(
    "graph,circle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),  # a chain
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),  # two modules importing each other
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),  # a circle further down
    ],
)
def test_the_circle_finder(graph, circle):
    assert find_circle(graph) == circle


def test_no_import_circles():
    """No two modules import each other, directly or through others (lazy imports included)."""
    graph = {module_name(p): set(imported(p)) - {module_name(p)} for p in FILES}
    assert find_circle(graph) == []


MAX_BODY = 80
"""Lines of a class or function body at most, its docstring not counted (issue 28: classes a reviewer reads whole)."""


def long_bodies(source: str, limit: int = MAX_BODY):
    """``(name, lines)`` of every class or function of ``source`` whose body, after its docstring, is longer than
    ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            documented = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
            lines = node.end_lineno - (body[1] if documented else body[0]).lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


@pytest.mark.parametrize(
    "source,expected",
    [
        ("def f():\n    '''Doc.\n\n    More.\n    '''\n" + "    x = 1\n" * 80, []),  # 80 lines after the docstring
        ("def f():\n" + "    x = 1\n" * 81, [("f", 81)]),  # one too many
        ("class A:\n    '''Doc.'''\n\n" + "    x = 1\n" * 81, [("A", 81)]),  # a class: from its first statement
    ],
)
def test_long_bodies_are_found(source, expected):
    assert long_bodies(source) == expected


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_class_or_function_body_is_over_80_lines(path):
    assert not long_bodies(path.read_text()), f"{module_name(path)}: split {long_bodies(path.read_text())}"
