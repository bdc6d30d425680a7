"""Which code an artifact depends on, as a hash: part of every cache key.

A cached checkpoint or bench run is reused only when the code that decides it is unchanged. "The
code" is the artifact's entry modules and every module of this package they import, transitively,
found statically (import statements, also inside functions, plus dotted module names written as
strings: lazy exports and factory paths). So a change to the ranker retrains rankers but reuses the
baselines and the two-towers, whose modules never import it. Comments, docstrings and formatting
do not count (the hash is of each file's syntax tree without docstrings); anything else does.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from recstream.config import REPO_ROOT

#: The training code as a whole (data, splits, models, metrics, the trending feature): what the
#: summary hash a bench records covers (`code_version()` without entries).
TRAINING_CODE = (
    "recstream/data",
    "recstream/models",
    "recstream/eval",
    "recstream/training",
    "recstream/recommend/trending.py",
)
PACKAGE = "recstream"
#: Followed but never hashed: the settings (read at run time by the services; training code takes
#: only REPO_ROOT from it, and its field descriptions change with every README edit) and this module,
#: which keys the caches and decides nothing a model learns.
NOT_HASHED = ("recstream/config.py", "recstream/models/code_hash.py")


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


def _imported_file(module: str) -> Path | None:
    """The file of a module imported under a name that is not its path (a test module, a script)."""
    file = getattr(sys.modules.get(module), "__file__", None)
    return Path(file) if file and Path(file).is_file() else None


def _label(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def _imports_of(path: Path, module: str, root: Path) -> set[str]:
    if _label(path, root) in NOT_HASHED:  # a leaf: what the settings import is not what training runs
        return set()
    return _named_modules(ast.parse(path.read_text(), filename=str(path)), module, path.name == "__init__.py")


def module_closure(entries: Iterable[str], root: Path = REPO_ROOT) -> list[Path]:
    """Source files of `entries` and of every module of this package they import, transitively
    (each parent package's `__init__.py` included, as Python runs it)."""
    seen: dict[str, Path] = {}
    todo: list[str] = []
    for entry in entries:
        path = module_file(entry, root) or _imported_file(entry)
        if path is None:
            raise ValueError(f"no source file for module {entry!r}: cannot key a cache on its code")
        seen[entry] = path
        todo.extend(_imports_of(path, entry, root))
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            path = module_file(module, root)
            if path is None or module in seen:
                continue
            seen[module] = path
            todo.extend(_imports_of(path, module, root))
    return sorted(set(seen.values()))


def _hashed(path: Path, root: Path) -> bool:
    return _label(path, root) not in NOT_HASHED


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
    return sorted(p for p in files if _hashed(p, root))


def code_version(*entries: str, root: Path = REPO_ROOT) -> str:
    """Hash of the code that `entries` (dotted module names) run: theirs and every module of this
    package they import. Without entries: all of the training code (the summary a bench records)."""
    files = [p for p in module_closure(entries, root) if _hashed(p, root)] if entries else training_files(root)
    h = hashlib.sha256()
    for path in files:
        h.update(_label(path, root).encode())
        h.update(_without_docstrings(ast.parse(path.read_text(), filename=str(path))).encode())
    return h.hexdigest()[:16]


def function_version(*functions: Callable[..., object]) -> str:
    """Hash of some functions' own code (not their modules'), for code outside the package that
    decides a cached result, such as a bench's fit-and-rank step."""
    h = hashlib.sha256()
    for fn in functions:
        h.update(_without_docstrings(ast.parse(textwrap.dedent(inspect.getsource(fn)))).encode())
    return h.hexdigest()[:16]
