"""The package's layers, checked from the source: core (record, qmodel, registry, packing, errors, ...) <- methods
and evaluator <- targets (the target table and its backends: Core ML, MLX, Core AI) <- app (CLI, planner, pipelines).
Every import counts, including the lazy ones
inside functions, because a lazy import is still a dependency of the design. A new ``macq.X`` module is core
unless listed in APP; a new method goes under ``macq/quantizers`` and a new backend in its own package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("macq", "converters", "mlx_backend", "coreai_backend")
LAYERS = {"core": 0, "methods": 1, "backends": 2, "app": 3}
APP = {"macq.cli", "macq.plan", "macq.pipeline", "macq.evaluate", "macq.exporting", "macq.benchmark", "macq.preflight", "macq.options",
       "macq.studies", "macq.runs", "macq.report"}
APP_PACKAGES = ("macq.baselines",)  # reference-library runners: they quantize, evaluate and write runs
METHODS = ("macq.quantizers", "macq.eval", "macq.analysis", "macq.streaming")


def layer_of(module: str) -> str:
    if module in APP or module.startswith(APP_PACKAGES):
        return "app"
    if module.split(".")[0] in ("converters", "mlx_backend", "coreai_backend") or module == "macq.targets":
        return "backends"
    if module.startswith(METHODS) and module != "macq.evaluate":
        return "methods"
    return "core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from pkg import sub`` resolves to ``pkg.sub``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:      # ``import macq.quantizers.gptq`` -> that module
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def test_no_upward_imports():
    bad = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in sorted(graph().items()) for d in sorted(deps)
           if LAYERS[layer_of(d)] > LAYERS[layer_of(m)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    """Package ``__init__`` re-exports are edges from a package to its own children and are left out."""
    g = {m: {d for d in deps if not (m + ".").startswith(d + ".") and not d.startswith(m + ".")}
         for m, deps in graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for d in sorted(g.get(node, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[node] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_checker_sees_upward_and_lazy_imports(tmp_path):
    """The checker itself: a lazy import inside a function and a relative import are both found."""
    pkg = tmp_path / "macq"
    (pkg / "quantizers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "quantizers" / "__init__.py").write_text("")
    (pkg / "qmodel.py").write_text("def f():\n    from macq.quantizers import gptq\n")
    (pkg / "quantizers" / "gptq.py").write_text("from ..qmodel import f\n")
    global ROOT
    old = ROOT
    ROOT = tmp_path
    try:
        mods = {module_name(p): p for p in pkg.rglob("*.py")}
        assert imports_of(pkg / "qmodel.py", mods) == {"macq.quantizers.gptq"}
        assert imports_of(pkg / "quantizers" / "gptq.py", mods) == {"macq.qmodel"}
    finally:
        ROOT = old
    assert LAYERS[layer_of("macq.quantizers.gptq")] > LAYERS[layer_of("macq.qmodel")]
