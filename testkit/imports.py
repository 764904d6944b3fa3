"""The import graph of the repository's packages, read from the source (ast; imports inside
functions count too), for the architecture tests and for anyone who wants the figures:

    python -m testkit.imports [PACKAGE ...]      modules, edges, cycles, largest fan-in, lines

An edge A -> B means module A imports module B (or a name from it): each imported dotted name
points at the deepest module of the packages it names (`from pkg import name` is pkg.name when
that is a module, else pkg).
"""
from __future__ import annotations

import ast
import collections
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = ("fmplex", "fmplexd", "tasklets", "ipc", "kernels", "cluster")


def modules(packages, root: str = REPO) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file under the packages."""
    out = {}
    for pkg in packages:
        for d, dirs, files in os.walk(os.path.join(root, pkg)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imported_names(path: str, module: str) -> list[str]:
    """Every dotted name the file imports (absolute; relative imports resolved)."""
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [f"{base}.{a.name}" if base else a.name for a in node.names]
    return out


def graph(packages=PRODUCT, root: str = REPO) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports."""
    mods = modules(packages, root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name in imported_names(path, m):
            target = name
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def fan_in(edges: dict[str, set[str]]) -> collections.Counter:
    return collections.Counter(t for targets in edges.values() for t in targets)


def main(argv: list[str]) -> int:
    packages = argv or list(PRODUCT)
    edges = graph(packages)
    print(f"modules {len(edges)}, import edges {sum(len(t) for t in edges.values())}")
    found = cycles(edges)
    print(f"cycles {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    print("largest fan-in: " + ", ".join(f"{m} {n}" for m, n in fan_in(edges).most_common(6)))
    for pkg in packages + ["bench", "tests", "testkit"]:
        files = [p for p in modules([pkg]).values()]
        lines = sum(sum(1 for _ in open(p)) for p in files)
        print(f"{pkg:10s} files {len(files):3d}  lines {lines:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
