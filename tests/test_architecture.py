"""The house's import layers (pyproject.toml, [tool.importlinter]) hold, and cover every package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from recstream.config import REPO_ROOT

PYPROJECT = REPO_ROOT / "pyproject.toml"


def _lint(config: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(config), "--no-cache"],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": str(lint.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _contracts() -> dict[str, dict]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_import_contracts_are_kept() -> None:
    result = _lint(PYPROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_library_package_sits_in_a_layer() -> None:
    """A new part of recstream/ must be placed in the layers, or the contract cannot guard it."""
    layered = {
        name.strip() for layer in _contracts()["layers"]["layers"] for name in layer.replace(":", "|").split("|")
    }
    parts = {
        f"recstream.{p.stem if p.is_file() else p.name}"
        for p in (REPO_ROOT / "recstream").iterdir()
        if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.stem != "__init__")
    }
    assert parts - layered == set(), f"add these to [tool.importlinter] layers: {sorted(parts - layered)}"


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """The checker sees this code base: inverting two layers that import each other one way fails."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["recstream", "streams"]\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "inverted"\n'
        'type = "layers"\n'
        'layers = ["recstream.contracts", "streams"]\n'
    )
    result = _lint(config)
    assert result.returncode != 0
    assert "streams" in result.stdout and "BROKEN" in result.stdout


def test_every_stream_module_sits_in_a_streams_layer() -> None:
    layered = {
        name.strip()
        for layer in _contracts()["streams-layers"]["layers"]
        for name in layer.replace(":", "|").split("|")
    }
    modules = {f"streams.{p.stem}" for p in (REPO_ROOT / "streams").glob("*.py") if p.stem != "__init__"}
    assert modules - layered == set(), f"add these to the streams-layers contract: {sorted(modules - layered)}"


def test_the_readme_processor_table_is_the_registry() -> None:
    """The README lists exactly the registered processors (regenerate: `python -m streams.registry`)."""
    from streams.registry import processor_table

    assert processor_table() in (REPO_ROOT / "README.md").read_text(), "README's processor table is stale"
