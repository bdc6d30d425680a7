"""Model versions in the Triton repository: atomic publish, promote, rollback, and Triton reloads.

Layout (what Triton reads, plus one state file it ignores):

    model_repo/ranker/config.pbtxt     our `version_policy: { specific { versions: [...] } }` line
    model_repo/ranker/<v>/             ranker.safetensors + meta.json + model.py, one per version
    model_repo/ranker/registry.json    {"live": v, "previous": p, "history": [...]}

Publish is atomic: the version is written into a hidden staging folder in the same directory
(`.staging-*`, not a number, so Triton ignores it) and renamed to `<v>` in one `os.rename`; a
reader sees either no version or a complete one, never half a model.

Serving rule: Triton answers an unversioned request with the highest *loaded* version. We keep the
served set = {previous, live} with live > previous (new versions always get a higher number), so
unversioned traffic goes to live while the previous version stays loaded for an instant rollback.
A rollback serves {previous} only, which unloads the bad version. Changing the set = rewriting the
version_policy in config.pbtxt (atomically) and asking Triton to `load_model` again: Triton loads
the new set while the old versions keep answering, then swaps, so no request fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recstream.atomic import atomic_publish_dir, atomic_write_text
from recstream.contracts.models import RANKER, REGISTRY_STATE_FILE
from recstream.models.export import MODEL_PY
from recstream.models.export.common import policy_serves, set_version_policy
from recstream.models.repository import versions

log = logging.getLogger(__name__)

STATE_FILE = REGISTRY_STATE_FILE
#: Held while the live pointer is read and rewritten: the trainer and `models promote|rollback`
#: (another process) change it.
LOCK_FILE = ".registry.lock"


class LiveChanged(RuntimeError):
    """The live version is no longer the one a candidate was trained from and gated against."""


class ModelRegistry:
    """Versions of one model in a Triton repository, with live/previous pointers."""

    def __init__(self, model_repo: Path, name: str = RANKER) -> None:
        self.model_repo = Path(model_repo)
        self.name = name
        self.model_dir = self.model_repo / name

    # ---- state -----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.model_dir / STATE_FILE

    def state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        # No registry yet (a repository `make train` exported to): Triton's default policy serves
        # the newest version, and served the one before it until the newest appeared, so that one
        # is the rollback target (a first `models promote` recorded none and unloaded it).
        vs = self.versions()
        return {"live": vs[-1] if vs else None, "previous": vs[-2] if len(vs) > 1 else None, "history": []}

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2))

    def versions(self) -> list[int]:
        return versions(self.model_repo, self.name)

    @property
    def live(self) -> int | None:
        return self.state()["live"]

    @property
    def previous(self) -> int | None:
        return self.state()["previous"]

    def served(self) -> list[int]:
        st = self.state()
        if not self.state_path.is_file():  # no registry yet: what the config's policy serves
            config = self.model_dir / "config.pbtxt"
            return policy_serves(config.read_text() if config.is_file() else "", self.versions())
        return sorted(v for v in (st["previous"], st["live"]) if v is not None)

    # ---- publish -----------------------------------------------------------------------------------
    def publish(self, ranker: Any, metrics: dict[str, float] | None = None) -> int:
        """Write a new version folder atomically; returns its number. Does not make it live."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        v = max(self.versions(), default=0) + 1
        ranker.meta.extra["version"] = v
        if metrics:
            ranker.meta.metrics.update({k: float(x) for k, x in metrics.items()})

        def fill(staging: Path) -> None:
            ranker.save(staging)
            (staging / "model.py").write_text(MODEL_PY)

        atomic_publish_dir(self.model_dir / str(v), fill)  # fails if v exists
        log.info("published %s v%d", self.name, v)
        return v

    # ---- live pointer --------------------------------------------------------------------------
    def _apply(self, live: int, previous: int | None, event: str, reason: str) -> None:
        st = self.state()
        st.update(live=live, previous=previous)
        st.setdefault("history", []).append(
            {"event": event, "live": live, "previous": previous, "reason": reason, "ts": time.time()}
        )
        config = self.model_dir / "config.pbtxt"
        if config.is_file():
            served = sorted(v for v in (previous, live) if v is not None)
            atomic_write_text(config, set_version_policy(config.read_text(), served))
        self._save_state(st)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with (self.model_dir / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def promote(self, version: int, reason: str = "", parent: int | None = None) -> None:
        """Make `version` live; the current live becomes the rollback target. `parent`: the live
        version the candidate was trained from; LiveChanged when live is another one by now (a
        rollback during the round must not be undone by its promotion)."""
        with self._locked():
            if version not in self.versions():
                raise FileNotFoundError(f"{self.name} v{version} does not exist")
            cur = self.live
            if parent is not None and cur != parent:
                raise LiveChanged(f"{self.name} live is v{cur}, not v{parent} the candidate was trained from")
            if cur is not None and version <= cur and cur in self.versions() and version != cur:
                raise ValueError(f"promote needs a version newer than live v{cur}; use rollback for older ones")
            self._apply(version, cur if cur != version else self.previous, "promote", reason)

    def revert(self, live: int | None, previous: int | None, reason: str) -> None:
        """Back to a live/previous pair read before a promotion that did not take (Triton could not
        load the new version); nothing, when there was no live version yet."""
        if live is not None:
            with self._locked():
                self._apply(live, previous, "revert", reason)

    def rollback(self, reason: str = "manual") -> int:
        """Serve the previous version only (the bad one is unloaded); returns the version now live."""
        with self._locked():
            st = self.state()
            if st["previous"] is None:
                raise RuntimeError(f"{self.name}: no previous version to roll back to")
            self._apply(st["previous"], None, "rollback", reason)
            return int(st["previous"])

    def init_live(self) -> int:
        """Adopt the newest existing version as live (first start of the service)."""
        st = self.state()
        if st.get("live") is None or not self.state_path.is_file():
            vs = self.versions()
            if not vs:
                raise FileNotFoundError(f"no versions of {self.name} under {self.model_repo}")
            # the version before the newest stays the rollback target (what Triton served until
            # the newest appeared): the trainer's first start used to unload it
            self._apply(vs[-1], st.get("previous"), "init", "newest existing version")
        return int(self.live)  # type: ignore[arg-type]

    def prune(self, keep: int = 5) -> list[int]:
        """Delete the oldest version folders beyond `keep`, never a served one."""
        served = set(self.served())
        old = [v for v in self.versions() if v not in served][: max(0, len(self.versions()) - keep)]
        for v in old:
            shutil.rmtree(self.model_dir / str(v), ignore_errors=True)
        return old


class TritonModelControl:
    """Model-control calls for one model on a Triton started with --model-control-mode=explicit."""

    def __init__(self, url: str, model: str = RANKER, timeout_s: float = 120.0) -> None:
        import tritonclient.http as httpclient

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.client = httpclient.InferenceServerClient(url=url, network_timeout=timeout_s, connection_timeout=10)

    def reload(self) -> None:
        """Re-read config.pbtxt and the version folders; blocks until the new set is loaded."""
        self.client.load_model(self.model)

    def loaded_versions(self) -> list[int]:
        index = self.client.get_model_repository_index()
        return sorted(
            int(m["version"])
            for m in index
            if m.get("name") == self.model and m.get("state") == "READY" and str(m.get("version", "")).isdigit()
        )

    def wait_live(self, version: int, timeout_s: float = 60.0) -> float:
        """Block until `version` is ready; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.client.is_model_ready(self.model, str(version)):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"{self.model} v{version} not ready after {timeout_s}s")

    def close(self) -> None:
        self.client.close()
