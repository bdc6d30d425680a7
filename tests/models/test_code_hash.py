"""The cache keys' code part: which training code an artifact runs, and when it changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_quality import MODELS, RANKING_CODE
from recstream.config import REPO_ROOT
from recstream.models.code_hash import code_version, module_closure


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A small `recstream` tree: entry imports helper (inside a function) and the settings, helper
    names a lazy module by string and imports a module outside the training folders, unrelated is
    imported by nobody."""
    files = {
        "recstream/__init__.py": "",
        "recstream/config.py": "LIMIT = 3\n",
        "recstream/models/__init__.py": "",
        "recstream/models/entry.py": (
            '"""Entry."""\nfrom recstream.config import LIMIT\n\n\ndef fit():\n'
            "    from recstream.models import helper\n    return helper.scale() * LIMIT\n"
        ),
        "recstream/models/helper.py": (
            'from recstream.contracts.text import title\n\nLAZY = {"thing": "recstream.models.lazy"}\n\n\n'
            "def scale():\n    return 2\n"
        ),
        "recstream/contracts/__init__.py": "",
        "recstream/contracts/text.py": "def title(t):\n    return t.title()\n",
        "recstream/models/lazy.py": "def thing():\n    return 1\n",
        "recstream/models/unrelated.py": "def other():\n    return 0\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_the_closure_follows_nested_imports_and_module_names_written_as_strings(package: Path) -> None:
    names = {p.relative_to(package).as_posix() for p in module_closure(["recstream.models.entry"], package)}
    assert "recstream/models/helper.py" in names  # imported inside a function
    assert "recstream/models/lazy.py" in names  # named by a string (lazy export, factory path)
    assert "recstream/contracts/text.py" in names  # outside the training folders, still code it runs
    assert "recstream/config.py" in names  # followed ...
    assert "recstream/models/unrelated.py" not in names


def test_a_module_that_is_not_there_is_refused(package: Path) -> None:
    with pytest.raises(ValueError, match=r"recstream\.models\.entyr"):
        code_version("recstream.models.entyr", root=package)


def test_the_key_changes_with_the_code_an_entry_runs_and_only_with_it(package: Path) -> None:
    models = package / "recstream" / "models"
    before = code_version("recstream.models.entry", root=package)
    _edit(models / "unrelated.py", "return 0", "return 5")
    _edit(package / "recstream" / "config.py", "3", "4")  # ... but settings are not training code
    assert code_version("recstream.models.entry", root=package) == before
    changed = before
    for path, old, new in (
        (models / "lazy.py", "return 1", "return 7"),
        (models / "helper.py", "return 2", "return 2.5"),
        (package / "recstream" / "contracts" / "text.py", "t.title()", "t.upper()"),
    ):
        _edit(path, old, new)
        assert code_version("recstream.models.entry", root=package) != changed, path.name
        changed = code_version("recstream.models.entry", root=package)


def test_comments_docstrings_and_formatting_leave_the_key_alone(package: Path) -> None:
    entry = package / "recstream" / "models" / "entry.py"
    before = code_version("recstream.models.entry", root=package)
    _edit(entry, '"""Entry."""', '"""Entry, now documented at length."""\n# and a comment')
    _edit(entry, "return helper.scale() * LIMIT", "return (helper.scale()\n            * LIMIT)  # why")
    assert code_version("recstream.models.entry", root=package) == before
    _edit(entry, "* LIMIT", "+ LIMIT")
    assert code_version("recstream.models.entry", root=package) != before


def test_a_ranker_change_reruns_the_served_rows_but_not_the_baselines() -> None:
    def closure(spec_name: str) -> set[str]:
        spec = next(s for s in MODELS if s.name == spec_name)
        entries = [spec.target().partition(":")[0], *RANKING_CODE]
        return {p.relative_to(REPO_ROOT).as_posix() for p in module_closure(entries)}

    assert "recstream/models/ranker.py" in closure("served")
    assert "recstream/training/two_tower.py" in closure("served")
    for baseline in ("sasrec-id", "item-knn", "popularity"):
        assert "recstream/models/ranker.py" not in closure(baseline)
        assert "recstream/eval/baselines.py" in closure(baseline)
    two_tower = {p.relative_to(REPO_ROOT).as_posix() for p in module_closure(["recstream.training.two_tower"])}
    assert "recstream/models/ranker.py" not in two_tower
