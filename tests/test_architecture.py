"""Guard rails of the layout (DESIGN.md "Processes", "Habits"): the product packages import each
other without a cycle and only downwards; nothing of the product imports the test or benchmark
fixtures; benchmarks are modules of the `bench` package that never edit sys.path, never import from
tests and never shadow a package. (The torch-free imports of the task process and the client
package are tests/test_lean_task.py's.)"""
import ast
import os

import pytest

from testkit.imports import PRODUCT, REPO, cycles, graph, modules

# What each product package may import, beyond itself (the processes stand on the wire).
ALLOWED = {
    "ipc": set(),
    "kernels": set(),
    "tasklets": {"ipc"},
    "fmplexd": {"ipc", "kernels"},
    "fmplex": {"ipc", "fmplexd", "tasklets", "kernels"},
    "cluster": {"ipc", "fmplex"},      # drives each host's fmplexd as an operator would
}
FIXTURES = ("testkit", "tests", "bench")


def test_the_product_packages_have_no_import_cycle():
    assert cycles(graph(PRODUCT)) == []


def test_a_cycle_is_seen(tmp_path):
    """The check can fail: two modules that import each other (one inside a function) are one."""
    pkg = tmp_path / "loop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loop import b\n")
    (pkg / "b.py").write_text("def f():\n    from loop.a import x\n")
    assert cycles(graph(["loop"], str(tmp_path))) == [["loop.a", "loop.b"]]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_stands_below_it(package):
    edges = graph(PRODUCT)
    wrong = sorted(f"{m} -> {t}" for m, targets in edges.items() if m.split(".")[0] == package
                   for t in targets if t.split(".")[0] not in ALLOWED[package] | {package})
    assert wrong == []


def _imports(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(node.module or "")
    return out


def test_no_product_module_imports_test_or_benchmark_fixtures():
    wrong = sorted(f"{m} imports {name}" for m, path in modules(PRODUCT).items()
                   for name in _imports(path) if name.split(".")[0] in FIXTURES)
    assert wrong == []


def _edits_sys_path(path: str) -> bool:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
               and n.value.id == "sys" for n in ast.walk(tree))


def test_benchmarks_are_a_package_that_edits_no_sys_path_and_imports_no_tests():
    bench = modules(["bench"])
    assert "bench" in bench                                  # bench/__init__.py: a package
    assert [m for m, p in bench.items() if _edits_sys_path(p)] == []
    assert sorted(f"{m} imports {n}" for m, p in bench.items() for n in _imports(p)
                  if n.split(".")[0] == "tests") == []
    top = {m.split(".")[1] for m in bench if m != "bench"}
    assert top.isdisjoint(set(PRODUCT) | set(FIXTURES)), top & (set(PRODUCT) | set(FIXTURES))


def test_the_sys_path_check_can_fail(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import sys\nsys.path.insert(0, 'x')\n")
    assert _edits_sys_path(str(path))


def test_every_benchmark_runs_as_a_module():
    """Each bench/NAME.py with a main is runnable as `python -m bench.NAME` (its imports resolve
    from the repository root alone)."""
    for name in sorted(os.listdir(os.path.join(REPO, "bench"))):
        if not name.endswith(".py") or name in ("__init__.py", "common.py", "workload.py"):
            continue
        with open(os.path.join(REPO, "bench", name)) as f:
            text = f.read()
        assert 'if __name__ == "__main__":' in text, name
        assert f"python -m bench.{name[:-3]}" in text, f"{name}: its docstring gives its command"
