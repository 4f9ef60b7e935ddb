"""Size and structure of the package, read from its source: lines per module, the longest functions,
``raise`` statements, function-local imports and import cycles (issue 27's measures).

Pure Python (``ast``), so it can read any checkout: ``--root`` names one (default: this one). Writes
``benchmarks/results/code_metrics.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules one import statement loads (a ``from pkg import sub`` counts ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


class ModuleReader(ast.NodeVisitor):
    """Collects one module's imports (module level and function-local), functions and raises."""

    def __init__(self) -> None:
        self.depth = 0
        self.top_imports: list[ast.Import | ast.ImportFrom] = []
        self.local_imports: list[ast.Import | ast.ImportFrom] = []
        self.functions: list[tuple[str, int]] = []
        self.raises = 0
        self.scope: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node):
            self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.functions.append((".".join(self.scope), node.end_lineno - node.lineno + 1))
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_Raise(self, node: ast.Raise) -> None:
        self.raises += 1
        self.generic_visit(node)

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        (self.local_imports if self.depth else self.top_imports).append(node)

    visit_Import = visit_ImportFrom = _import


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
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
            visit(node)
    return found


def measure(root: Path, package: str = "implicit_hf") -> dict:
    files = sorted((root / package).rglob("*.py"))
    readers: dict[str, tuple[ModuleReader, bool]] = {}
    lines: dict[str, int] = {}
    for path in files:
        name = module_name(path, root)
        reader = ModuleReader()
        reader.visit(ast.parse(path.read_text(), filename=str(path)))
        readers[name] = (reader, path.name == "__init__.py")
        lines[name] = len(path.read_text().splitlines())
    known = set(readers)
    top_graph: dict[str, set[str]] = {}
    all_graph: dict[str, set[str]] = {}
    for name, (reader, is_package) in readers.items():
        # an import of a submodule also runs its parents' __init__; those edges are not the module's choice
        def edges(nodes, name=name, is_package=is_package):
            targets = set().union(*(imported_modules(n, name, is_package, known) for n in nodes)) if nodes else set()
            return {t for t in targets if t != name and not name.startswith(t + ".")}

        top_graph[name] = edges(reader.top_imports)
        all_graph[name] = top_graph[name] | edges(reader.local_imports)
    functions = sorted(
        ((f"{name}:{func}", length) for name, (reader, _) in readers.items() for func, length in reader.functions),
        key=lambda item: -item[1],
    )
    local_imports = {name: len(reader.local_imports) for name, (reader, _) in readers.items() if reader.local_imports}
    return {
        "total_lines": sum(lines.values()),
        "modules": len(lines),
        "lines_per_module": dict(sorted(lines.items(), key=lambda item: -item[1])),
        "longest_functions": dict(functions[:15]),
        "raise_statements": sum(reader.raises for reader, _ in readers.values()),
        "function_local_imports": sum(local_imports.values()),
        "function_local_imports_per_module": dict(sorted(local_imports.items(), key=lambda item: -item[1])),
        "import_cycles_module_level": cycles(top_graph),
        "import_cycles_including_local_imports": cycles(all_graph),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE, help="the checkout to read")
    parser.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "code_metrics.json")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {"commit": commit, **measure(args.root)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    summary = {k: record[k] for k in ("commit", "total_lines", "raise_statements", "function_local_imports")}
    print(json.dumps(summary), "cycles:", record["import_cycles_including_local_imports"])


if __name__ == "__main__":
    main()
