"""Import rules of the package layout (docs/architecture.md): the algorithm packages never
depend on lowbit's own model classes, recipes, command lines or the pipeline glue, and no
private name is imported from another package."""

import ast
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).resolve().parent
CORE = ("ptq", "quant", "nn", "graph", "cost")
FORBIDDEN = ("lowbit.models", "lowbit.qat.recipes", "lowbit.cli", "lowbit.qat.cli",
             "lowbit.search.cli", "lowbit.pipeline", "lowbit.demo")


def _imports(path: Path):
    """(absolute module, imported names) of every import in ``path``."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]


def _files():
    return sorted(ROOT.rglob("*.py"))


def test_core_packages_import_no_models_recipes_or_clis():
    bad = []
    for path in _files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in CORE and rel.name != "prepare.py":
            continue
        for mod, _ in _imports(path):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{rel}: {mod}")
    assert not bad, bad


def test_no_private_name_is_imported_across_packages():
    bad = []
    for path in _files():
        rel = path.relative_to(ROOT.parent).with_suffix("")
        importer = ".".join(rel.parts[:-1])
        for mod, names in _imports(path):
            if not mod.startswith("lowbit"):
                continue
            source_pkg = mod if (ROOT.parent / mod.replace(".", "/")).is_dir() else (
                mod.rpartition(".")[0])
            for name in names:
                if name.startswith("_") and not name.startswith("__") and (
                        source_pkg != importer):
                    bad.append(f"{rel}: {mod}.{name}")
    assert not bad, bad
