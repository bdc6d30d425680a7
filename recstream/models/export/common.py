"""What every exported model shares: how its model.py finds this package, config.pbtxt parameters,
and where a new version goes."""

from __future__ import annotations

import re
from pathlib import Path

from recstream.config import REPO_ROOT
from recstream.models.repository import versions

ROOT_PARAM = """\
# This repository lives outside the checkout: model.py imports recstream from here.
parameters: {{
  key: "recstream_root"
  value: {{ string_value: "{root}" }}
}}
"""

# How every generated model.py finds this package: the python-backend stub runs its own interpreter.
IMPORT_RECSTREAM = """\
def _import_recstream(params: dict, module: str):
    \"\"\"`module` from PYTHONPATH, else from the first checkout found: the `recstream_root` parameter,
    RECSTREAM_REPO_ROOT (set by infra/triton_env.py), the checkout this file sits in
    (model_repo/<model>/<v>/model.py -> parents[3]).\"\"\"
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        here = Path(__file__).resolve()
        roots = [
            params.get("recstream_root", ""),
            os.environ.get("RECSTREAM_REPO_ROOT", ""),
            str(here.parents[3]) if len(here.parents) > 3 else "",
        ]
        for root in roots:
            if root and (Path(root) / "recstream" / "__init__.py").is_file():
                sys.path.insert(0, root)
                break
        return importlib.import_module(module)
"""


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def config_params(params: dict[str, str]) -> str:
    """config.pbtxt `parameters` entries a client reads with get_model_config."""
    return "".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params.items())


def set_config_param(config: Path, key: str, value: str) -> None:
    """Set (or add) one string `parameters` entry of a config.pbtxt, keeping the rest as written."""

    text = config.read_text()
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    entry = config_params({key: escaped})
    quoted = r'"(?:[^"\\]|\\.)*"'
    pattern = re.compile(
        r'parameters: \{\s*key: "' + re.escape(key) + r'"\s*value: \{\s*string_value: ' + quoted + r"\s*\}\s*\}\n?"
    )
    config.write_text(pattern.sub(lambda _: entry, text) if pattern.search(text) else text.rstrip("\n") + "\n" + entry)


def repo_extras(model_dir: Path, params: dict[str, str]) -> str:
    """config.pbtxt's trailing `parameters`: `params`, plus `recstream_root` for a repository outside
    this checkout (so its model.py finds the code)."""
    return config_params(params) + ("" if inside(model_dir, REPO_ROOT) else ROOT_PARAM.format(root=REPO_ROOT))


def next_version_dir(model_repo: Path, name: str, version: int | None) -> tuple[Path, int]:
    """`model_repo/name/<v>`: `version`, or one past the newest there (Triton serves the latest)."""
    model_dir = Path(model_repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    v = version if version is not None else (max(versions(model_repo, name), default=0) + 1)
    return model_dir / str(v), v


#: A version_policy block (one nesting level, as Triton writes it) and the comment lines right above it.
_POLICY_RE = re.compile(
    r"^(?:[ \t]*#[^\n]*\n)*[ \t]*version_policy\s*:?\s*\{(?:[^{}]|\{[^{}]*\})*\}[ \t]*\n?", re.MULTILINE
)


def set_version_policy(config_text: str, served: list[int]) -> str:
    """config.pbtxt text with exactly one `version_policy: { specific { versions: [...] } }`."""
    body = _POLICY_RE.sub("", config_text).rstrip("\n")
    vs = ", ".join(str(v) for v in sorted(served))
    return (
        f"{body}\n\n# Managed by recstream.continual.registry: live + previous version stay loaded.\n"
        f"version_policy: {{ specific {{ versions: [ {vs} ] }} }}\n"
    )


def policy_serves(config_text: str, on_disk: list[int]) -> list[int]:
    """The versions a config.pbtxt's version_policy has Triton serve out of those on disk: `latest
    N` the newest N (Triton's default: the newest one), `specific` the listed ones, `all` all."""
    block = _POLICY_RE.search(config_text)
    text = block.group(0) if block else ""
    if "specific" in text:
        listed = re.search(r"versions\s*:\s*\[([^\]]*)\]", text)
        wanted = {int(v) for v in re.findall(r"\d+", listed.group(1))} if listed else set()
        return sorted(v for v in on_disk if v in wanted)
    if re.search(r"\ball\b", text):
        return sorted(on_disk)
    latest = re.search(r"num_versions\s*:\s*(\d+)", text)
    return sorted(on_disk)[-(int(latest.group(1)) if latest else 1) :]


def keep_version_policy(new_config: str, old_config: str) -> str:
    """`new_config` with `old_config`'s version_policy block (and its comment), if it has one."""
    old = _POLICY_RE.search(old_config)
    if old is None:
        return new_config
    body = _POLICY_RE.sub("", new_config).rstrip("\n")
    policy = old.group(0).strip("\n")
    return f"{body}\n\n{policy}\n"
