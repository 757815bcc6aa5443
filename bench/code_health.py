"""The code's shape, as a newcomer meets it: lines per package, import cycles, imports against the
layering, and the longest functions.

    python bench/code_health.py [--longest 10]

Layers run from the foundations up; a module may import its own layer or a lower one. An import of
a higher layer, or a cycle between modules, is printed and counted.
"""

import argparse
import ast
import collections
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "aletheia_hpc"

# Top-level part of the package -> layer (lower = more basic). A part missing here is an error, so a
# new package has to be placed on purpose.
LAYERS = {
    "(root)": 0, "files": 0, "provenance": 0, "names": 0, "layout": 0,
    "verified_cache": 1, "row": 1, "data": 1, "method": 1,
    "evaluation": 2,
    "config": 3,
    "models": 4, "campaign": 4,
    "worker": 5, "aggregate": 5,
    "cli": 6,
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import module" names a module when one exists by that name.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _is_module(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == PACKAGE.name}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "(root)"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
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
                    if len(component) > 1:
                        result.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def longest_functions(paths, count):
    sizes = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1,
                              f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"))
    return sorted(sizes, reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--longest", type=int, default=10, help="how many of the longest functions")
    args = parser.parse_args()

    paths = sorted(PACKAGE.rglob("*.py"))
    graph = {module_name(p): imported_modules(p, module_name(p)) for p in paths}
    unplaced = sorted({part(m) for m in graph} - LAYERS.keys())
    if unplaced:
        print(f"error: no layer for {', '.join(unplaced)}: add it to LAYERS in {__file__}")
        return 2

    lines = collections.Counter()
    for path in paths:
        lines[part(module_name(path))] += len(path.read_text().splitlines())
    bench_lines = sum(len(p.read_text().splitlines()) for p in PACKAGE.parent.glob("bench/*.py"))
    print("lines per package:")
    for name, n in sorted(lines.items(), key=lambda item: -item[1]):
        print(f"  {name:16s} {n:6d}")
    print(f"  {'(package total)':16s} {sum(lines.values()):6d}")
    print(f"  {'bench/':16s} {bench_lines:6d}")

    found_cycles = cycles(graph)
    print(f"import cycles: {len(found_cycles)}")
    for component in found_cycles:
        print("  " + " <-> ".join(component))

    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if b in graph and LAYERS[part(b)] > LAYERS[part(a)])
    print(f"imports of a higher layer: {len(upward)}")
    for a, b in upward:
        print(f"  {a} (layer {LAYERS[part(a)]}) -> {b} (layer {LAYERS[part(b)]})")

    print(f"longest functions:")
    for size, where in longest_functions(paths, args.longest):
        print(f"  {size:4d} {where}")
    return 1 if found_cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
