"""Which training code an artifact depends on, as a hash: part of every cache key.

A cached checkpoint or bench run is reused only when the code that decides it is unchanged. "The
code" is the artifact's entry modules and every module of the training code they import,
transitively, found statically (import statements, plus dotted module names written as strings:
lazy exports and factory paths). So a change to the ranker retrains rankers but reuses the
baselines and the two-towers, whose modules never import it. Comments, docstrings and formatting
do not count (the hash is of each file's syntax tree without docstrings); anything else does.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

from recstream.config import REPO_ROOT

#: The code whose changes change what a training run produces: data, splits, models, metrics, and
#: the trending feature the ranker learns from. Imports outside it (settings, contracts, the Kafka
#: and serving layers) are followed but not hashed.
TRAINING_CODE = (
    "recstream/data",
    "recstream/models",
    "recstream/eval",
    "recstream/training",
    "recstream/recommend/trending.py",
)
PACKAGE = "recstream"
HASHER = "recstream/models/code_hash.py"


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a dotted module name under `root` (a package's `__init__.py`), if any."""
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _named_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name of this package that the module imports or writes as a string."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(f"{PACKAGE}."):
            names.add(node.value.partition(":")[0])
    return {n for n in names if n == PACKAGE or n.startswith(f"{PACKAGE}.")}


def module_closure(entries: Iterable[str], root: Path = REPO_ROOT) -> list[Path]:
    """Source files of `entries` and of every module of this package they import, transitively
    (each parent package's `__init__.py` included, as Python runs it)."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            path = module_file(module, root)
            if path is None or module in seen:
                continue
            seen[module] = path
            todo.extend(
                _named_modules(ast.parse(path.read_text(), filename=str(path)), module, path.name == "__init__.py")
            )
    return sorted(set(seen.values()))


def _is_training_code(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).as_posix()
    # this module keys the caches; it decides nothing a model learns
    return rel != HASHER and any(rel == part or rel.startswith(f"{part}/") for part in TRAINING_CODE)


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _without_docstrings(tree: ast.Module) -> str:
    for node in ast.walk(tree):
        documented = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        if documented and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def training_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every source file of the training code."""
    files: set[Path] = set()
    for part in TRAINING_CODE:
        path = root / part
        files.update([path] if path.is_file() else path.rglob("*.py"))
    return sorted(p for p in files if _is_training_code(p, root))


def code_version(*entries: str, root: Path = REPO_ROOT) -> str:
    """Hash of the training code that `entries` (dotted module names) run: theirs and every training
    module they import. Without entries: all of the training code (the summary a bench records)."""
    if entries:
        files = [p for p in module_closure(entries, root) if _is_training_code(p, root)]
    else:
        files = training_files(root)
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode())
        h.update(_without_docstrings(ast.parse(path.read_text(), filename=str(path))).encode())
    return h.hexdigest()[:16]
