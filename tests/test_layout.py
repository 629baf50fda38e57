"""The layout shows the pipeline: no import circle between the project's modules (imports inside
functions count too), and each stage's package says what it holds."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules that `path` imports, resolved to the deepest module that exists."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) - {module_name(p)} - {module_name(p).rpartition(".")[0]}
            for p in files}


def test_no_import_circles():
    g = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):                                    # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    assert cycles == [], f"import circles: {cycles}"


def test_the_server_is_grouped_by_stage():
    stages = {p.name for p in (ROOT / "server").iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert stages == {"federation", "condense", "distill", "audit"}
    for stage in stages:
        doc = ast.get_docstring(ast.parse((ROOT / "server" / stage / "__init__.py").read_text()))
        assert doc and doc.startswith("Stage"), stage
    loose = {p.stem for p in (ROOT / "server").glob("*.py")} - {"__init__"}
    assert loose == {"cli", "options", "pipeline"}, "on top of the stages: the CLI, its options, the pipeline"
