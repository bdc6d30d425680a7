"""The environment the tritonserver binary from the nvidia-pytriton wheel needs (no Docker, no GPU).

We run the bundled binary ourselves (infra.triton_server), replicating what pytriton does to make
it work from a wheel:

* the python backend expects ``triton_python_backend_stub`` next to ``libtriton_python.so``; the
  wheel keeps one stub per Python version elsewhere, so we assemble a backend directory under
  ``run_dir/backends/python`` with the stub matching *this* interpreter (pytriton copies too);
* ``nvidia_pytriton.libs`` (bundled shared libraries) goes on LD_LIBRARY_PATH;
* the stub links ``libpython3.11.so.1.0``: the interpreter's own LIBDIR must come first on
  LD_LIBRARY_PATH, otherwise the system (Debian 3.11.2) libpython is picked up and the venv's stdlib
  fails with ``undefined symbol: _PyModule_Add``;
* the venv's ``bin`` goes first on PATH so the embedded interpreter resolves the venv's prefix and
  site-packages (torch, transformers);
* the stub runs its embedded interpreter *isolated* (``sys.flags.isolated == 1``: PYTHONPATH is
  ignored, although ``os.environ`` is inherited). So we export ``RECSTREAM_REPO_ROOT`` and
  ``model.py`` puts that on ``sys.path`` itself before ``import recstream`` (falling back to the repo
  root computed from its own location when the repository is the one inside this checkout).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time; the message carries the log tail."""


def pytriton_dist_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` (binary, backends, per-version stubs)."""
    import pytriton  # local import: only the launcher needs the package

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def pytriton_libs_dir() -> Path:
    """Bundled shared libraries (auditwheel layout: sibling of the package)."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def tritonserver_binary() -> Path:
    return pytriton_dist_dir() / "bin" / "tritonserver"


def _stub_for_this_python() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_dist_dir() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton has no python backend stub for Python {version}: {stub}")
    return stub


def prepare_backend_dir(run_dir: Path) -> Path:
    """Assemble ``run_dir/backends/python`` = bundled python backend + the stub for this interpreter.

    Copies (about 10 MB) rather than symlinks so that the layout is exactly what the backend expects
    and a later upgrade of the wheel cannot change a running server underneath it.
    """
    src = pytriton_dist_dir() / "backends" / "python"
    dst = run_dir / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    files = {p.name: p for p in src.iterdir() if p.is_file()}
    files["triton_python_backend_stub"] = _stub_for_this_python()
    for name, path in files.items():
        target = dst / name
        st = path.stat()
        if target.is_file() and target.stat().st_size == st.st_size and target.stat().st_mtime >= st.st_mtime:
            continue
        shutil.copy2(path, target)
    return run_dir / "backends"


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its python-backend stubs (see module docstring for why)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    ld = [p for p in (libdir, str(pytriton_libs_dir())) if p]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = venv_bin + (":" + env["PATH"] if env.get("PATH") else "")
    # Read by model_repo/*/<version>/model.py; PYTHONPATH would be ignored by the isolated stub.
    env.setdefault("RECSTREAM_REPO_ROOT", str(REPO_ROOT))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
