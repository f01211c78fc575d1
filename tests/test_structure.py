"""The package's shape, read from its source with `ast`: no import circle, and imports of the package
inside functions only where the import says why (a deferred optional dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "thinksafe"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The package module an import names (a name imported from a package may be a submodule)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in child.names] + [base]
            for name in names:
                target = resolve(name) if name.startswith("thinksafe") else None
                if target and target != module_name(path):
                    found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports(path):
            graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    assert circles(import_graph()) == []


def config_modules() -> list[str]:
    return [name for name in MODULES
            if name == "thinksafe.recipes" or name.endswith(".config") or ".config." in name]


def test_config_imports_no_stage():
    """Settings sit beside or below the stages they configure, never above them: a stage's config
    may import its own package's helpers, no other stage."""
    # the stages; the layers they share (engines, guards, registry, model loading) sit below every config
    stages = ("thinksafe.synthesize", "thinksafe.train", "thinksafe.evaluate", "thinksafe.pipeline",
              "thinksafe.merge", "thinksafe.report")
    configs = config_modules()
    assert {"thinksafe.recipes", "thinksafe.train.config", "thinksafe.synthesize.config",
            "thinksafe.evaluate.config"} <= set(configs)
    upward = []
    for name in configs:
        own = name.rpartition(".")[0]  # thinksafe.train for thinksafe.train.config
        for target, _, _ in imports(MODULES[name]):
            if target.startswith(stages) and not (own != "thinksafe" and target.startswith(own)):
                upward.append((name, target))
    assert upward == []


def test_registry_imports_no_stage():
    stages = ("thinksafe.synthesize", "thinksafe.train", "thinksafe.evaluate", "thinksafe.guards",
              "thinksafe.engines", "thinksafe.model_loading", "thinksafe.chat")
    upward = [(name, target) for name in MODULES if name.startswith("thinksafe.registry")
              for target, _, _ in imports(MODULES[name]) if target.startswith(stages)]
    assert upward == []


def test_package_imports_inside_functions_say_why():
    """An import of the package inside a function is there only to defer a heavy optional dependency
    (vllm, liger, ray, trl, ...) or a whole stage behind the CLI; the line (or the one above) says so
    with `# deferred:`."""
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, in_function in imports(path):
            if in_function and "deferred" not in lines[line - 1] + lines[line - 2]:
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert unexplained == []
