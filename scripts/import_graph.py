"""The project's own import graph (stdlib only): cycles, library modules importing actors,
function-level imports of project modules, and the longest file.

    python scripts/import_graph.py [ROOT]
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

# Entry points allowed to import actors (they assemble the pipeline); edit as drivers change.
DRIVERS = {"pipeline.build", "pipeline.graph", "pipeline.sweep", "pipeline.train_sae"}
# Function-level imports of project modules allowed, with the reason (the only ones).
DEFERRED = {("pipeline.build", "pipeline.graph"): "the build driver takes the output's lease before torch, "
            "transformers and Ray load (~8 s): a second driver on the same output is refused in seconds",
            ("pipeline.sweep", "pipeline.graph"): "a sweep checks every build's config (a bad --vary value is "
            "refused naming the key) before torch, transformers and Ray load"}

PACKAGES = ("pipeline", "actors")


@dataclass
class Import:
    src: str
    dst: str
    lineno: int
    scope: str  # "module", "function", or "main" (under `if __name__ == "__main__":`)
    comment: str


@dataclass
class Report:
    modules: list[str]
    edges: set[tuple[str, str]]  # module-level only (not function bodies, not __main__ blocks)
    cycles: list[list[str]]
    hidden_cycles: list[list[str]]  # cycles once function-level imports count too (hidden in functions)
    actors_from_library: list[tuple[str, str, int]]
    function_level: list[tuple[str, str, int, str]]
    longest_file: tuple[str, int]
    imports: list[Import] = field(default_factory=list, repr=False)  # every project import found

    @property
    def cycle_count(self) -> int:
        return len(self.cycles)


def project_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the project packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def line_comments(source: str) -> dict[int, str]:
    """Line number -> text of the comment on that line (without '#')."""
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return comments


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def is_main_guard(test: ast.expr) -> bool:
    """`__name__ == "__main__"`: its body runs only when the file is executed, never on import."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def import_statements(tree: ast.AST):
    """Yield (node, scope) for every import, skipping `if TYPE_CHECKING:` bodies."""
    stack = [(tree, "module")]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, scope
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            children = [(child, scope) for child in node.orelse]
        elif isinstance(node, ast.If) and scope == "module" and is_main_guard(node.test):
            children = [(child, "main") for child in node.body] + [(child, scope) for child in node.orelse]
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                scope = "function"
            children = [(child, scope) for child in ast.iter_child_nodes(node)]
        stack.extend(reversed(children))


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """Project modules an import statement in `module` refers to."""
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            parts = alias.name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            found += [next((p for p in prefixes if p in modules), None)]
        return [m for m in found if m]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found += [submodule if submodule in modules else base if base in modules else None]
    return [m for m in found if m]


def strongly_connected(nodes: list[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's SCCs (iterative)."""
    successors = {n: sorted(d for s, d in edges if s == n) for n in nodes}
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(successors[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(successors[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def analyze(root: Path) -> Report:
    root = Path(root)
    files = project_files(root)
    modules = set(files)
    imports, longest = [], ("", -1)
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        relpath = path.relative_to(root).as_posix()
        line_count = len(source.splitlines())
        if line_count > longest[1]:
            longest = (relpath, line_count)
        comments = line_comments(source)
        tree = ast.parse(source, filename=str(path))
        for node, scope in import_statements(tree):
            comment = comments.get(node.lineno) or comments.get(node.end_lineno, "")
            for dst in dict.fromkeys(targets(node, module, path.name == "__init__.py", modules)):
                imports.append(Import(module, dst, node.lineno, scope, comment))

    edges = {(i.src, i.dst) for i in imports if i.scope == "module"}
    by_line = lambda record: (record[0], record[2], record[1])  # noqa: E731
    def cycles_of(graph: set[tuple[str, str]]) -> list[list[str]]:
        return sorted(c for c in strongly_connected(sorted(modules), graph) if len(c) > 1 or (c[0], c[0]) in graph)

    cycles = cycles_of(edges)
    hidden = cycles_of(edges | {(i.src, i.dst) for i in imports if i.scope == "function" and i.src != i.dst})
    in_package = lambda name, package: name == package or name.startswith(package + ".")  # noqa: E731
    return Report(
        modules=sorted(modules),
        edges=edges,
        cycles=cycles,
        hidden_cycles=hidden,
        actors_from_library=sorted(
            (
                (i.src, i.dst, i.lineno)
                for i in imports
                if in_package(i.src, "pipeline") and i.src not in DRIVERS and in_package(i.dst, "actors")
            ),
            key=by_line,
        ),
        function_level=sorted(
            ((i.src, i.dst, i.lineno, i.comment) for i in imports
             if i.scope == "function" and (i.src, i.dst) not in DEFERRED), key=by_line
        ),
        longest_file=longest,
        imports=imports,
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    report = analyze(root)
    print(f"{len(report.modules)} modules, {len(report.edges)} module-level edges under {root}")
    print(f"\nModule-level import cycles: {report.cycle_count}")
    for cycle in report.cycles:
        print(f"  [{len(cycle)}] " + ", ".join(cycle))
    print(f"\nImport cycles once function-level imports count too: {len(report.hidden_cycles)}")
    for cycle in report.hidden_cycles:
        print(f"  [{len(cycle)}] " + ", ".join(cycle))
    print(f"\nLibrary (non-driver pipeline) modules importing actors: {len(report.actors_from_library)}")
    for src, dst, lineno in report.actors_from_library:
        print(f"  {src}:{lineno} -> {dst}")
    print(f"\nFunction-level imports of project modules: {len(report.function_level)}")
    for src, dst, lineno, reason in report.function_level:
        print(f"  {src}:{lineno} -> {dst}" + (f"  # {reason}" if reason else ""))
    path, line_count = report.longest_file
    print(f"\nLongest file: {path} ({line_count} lines)")


if __name__ == "__main__":
    main()
