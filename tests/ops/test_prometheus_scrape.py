"""Every Grafana dashboard panel returns live data from a REAL Prometheus scraping the running stack.

Debian's `prometheus` binary (installed by `make prometheus`; this test installs nothing) scrapes
the gateway, the stream worker and the continual trainer (`python -m services.trainer run`, fed by
the training examples the worker's feedback joiner derives from this traffic) on 127.0.0.1 every
second. The test drives real traffic through the gateway: searches, recommendations, impressions
and clicks, a malformed message (a dead letter), a request with a wrong key, and a real Triton
outage (tritonserver paused with SIGSTOP for a few seconds, so calls time out and answers
degrade). Then every panel query, and every recording rule, must return a finite value.

The rendered panels (Prometheus query_range data, plotted with matplotlib since Grafana cannot run
here) are saved to artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_stack import LiveStack

from recstream.client import EventProducer
from recstream.config import REPO_ROOT
from services.gateway.schemas import GatewayResult
from streams.process import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

DASHBOARDS = sorted((REPO_ROOT / "infra" / "grafana" / "dashboards").glob("*.json"))
RULES = REPO_ROOT / "infra" / "prometheus" / "rules.yml"
RECORDED = (
    "recstream:ctr_by_model_version:ratio_rate5m",
    "recstream:ctr_by_arm:ratio_rate5m",
    "recstream:request_e2e_seconds:p99_1m",
)
ARTIFACTS = REPO_ROOT / "artifacts"
# Users and the category each one clicks: a learnable signal, so the trainer's round can pass its gate.
FAVOURITE = {"p0": "Sci-Fi", "p1": "Horror", "p2": "Comedy", "p3": "Romance", "p4": "Horror"}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


class Prometheus:
    """A real prometheus process with a generated config; TSDB in a temp dir."""

    def __init__(self, root: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make prometheus` (apt-get install -y prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = "\n".join(
            f"  - job_name: {job}\n    static_configs: [{{ targets: ['{target}'] }}]" for job, target in targets.items()
        )
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{RULES}']\nscrape_configs:\n{jobs}\n"
        )
        self.log = root / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus not ready in 60 s:\n" + self.log.read_text()[-3000:]
            time.sleep(0.3)

    def _ready(self) -> bool:
        try:  # 2 s: a local process that is up answers in milliseconds
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict]:
        # 10 s: one instant query over a few minutes of 1 s samples
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 2.0) -> list[dict]:
        params = {"query": expr, "start": start, "end": end, "step": step}
        body = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def rule_health(self) -> dict[str, str]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

    def targets_up(self) -> dict[str, str]:
        active = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Trainer:
    """`python -m services.trainer run` as a child process with its own model repository (ranker v1)."""

    def __init__(self, stack: LiveStack, root: Path) -> None:
        from recstream.config import settings_env
        from recstream.models.export import export_ranker
        from recstream.models.ranker import RankerConfig, new_ranker

        repo = root / "model_repo"
        export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
        self.metrics_port = free_port()
        # No Triton for the trainer: a promoted version is written to its own repository and the
        # reload is deferred, so the session's shared tritonserver is left alone.
        env = {
            **settings_env(stack.settings),
            "MODEL_REPO": str(repo),
            "METRICS_PORT": str(self.metrics_port),
            "TRITON_URL": "127.0.0.1:9",
        }
        self.log = root / "trainer.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.trainer",
                    "run",
                    "--train-every",
                    "250",
                    "--train-every-s",
                    "5",
                    "--min-examples",
                    "250",
                    "--holdout",
                    "200",
                ],
                env=env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def trainer(live_stack: LiveStack, tmp_path: Path) -> Iterator[Trainer]:
    proc = Trainer(live_stack, tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def prometheus(live_stack: LiveStack, trainer: Trainer, tmp_path: Path) -> Iterator[Prometheus]:
    port = live_stack.base_url.rsplit(":", 1)[1]
    prom = Prometheus(
        tmp_path,
        {
            "recstream-gateway": f"127.0.0.1:{port}",
            "recstream-worker": f"127.0.0.1:{live_stack.worker.metrics_port}",
            "recstream-trainer": f"127.0.0.1:{trainer.metrics_port}",
        },
    )
    try:
        yield prom
    finally:
        prom.stop()


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


class Traffic:
    """Background user traffic through the gateway: search, impressions, clicks, recommendations."""

    def __init__(self, stack: LiveStack) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Distinct texts: the worker caches query embeddings, and repeated queries would never reach Triton.
        queries = ["space", "haunted house", "wedding comedy", "love story", "robots", "zombies"]
        with self.stack.http() as http:
            n = 0
            while not self.stop.is_set():
                user = f"p{n % 5}"
                query = f"{queries[n % 6]} {n}"
                r = http.post("/v1/search", json={"user_id": user, "session_id": f"{user}s", "query": query, "k": 10})
                if r.status_code != 200:
                    self.errors.append(f"search {r.status_code}: {r.text[:200]}")
                    continue
                res = GatewayResult.model_validate(r.json())
                liked = [i for i in res.items if i.category == FAVOURITE[user]][:2]
                feedback = res.impressions() + [res.feedback(i, "click") for i in liked]
                http.post("/v1/events", json={"events": [e.model_dump(mode="json") for e in feedback]})
                http.post("/v1/recommend", json={"user_id": user, "session_id": f"{user}s", "k": 5})
                n += 1
                time.sleep(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def exploring_answers(n: int = 60, seed: int = 0) -> list[tuple[str, object]]:
    """(topic, event) of `n` answers an exploring policy (pl:4) drew from pools of the live catalog,
    with the outcome of every shown slot: what the trainer's off-policy check evaluates. The live
    stack's worker answers greedily with the in-process ranker, which logs nothing to evaluate."""
    from live_stack import catalog_items

    from recstream.contracts.events import PoolCandidate, RankingLog
    from recstream.explore import make_policy
    from recstream.models.ranker import CONTEXT_DIM, N_CAND_FEATURES

    rng = np.random.default_rng(seed)
    catalog = [item["item_id"] for item in catalog_items()]
    policy = make_policy("pl:4")
    run = uuid.uuid4().hex[:6]
    out: list[tuple[str, object]] = []
    for r in range(n):
        ids = [str(i) for i in rng.choice(catalog, 8, replace=False)]
        features = rng.random((8, N_CAND_FEATURES)).round(6)
        pool = [
            PoolCandidate(item_id=i, score=float(8 - j), features=f.tolist())
            for j, (i, f) in enumerate(zip(ids, features, strict=True))
        ]
        log = RankingLog(
            request_id=f"ope-{run}-{r}",
            user_id=f"o{r % 10}",
            model_version="1",
            policy_spec="pl:4",
            k=4,
            pool=pool,
            greedy=pool[:4],
            context=rng.standard_normal(CONTEXT_DIM).round(6).tolist(),
        )
        out.append(("ranking-log", log))
        for shown in policy.rank(ids, np.arange(8, 0, -1, dtype=np.float64), 4, rng):
            clicked = bool(rng.random() < 0.3)
            out.append(("training-examples", log.outcome(shown.item_id, shown.position, shown.propensity, clicked)))
    return out


def pause_triton(triton_server, seconds: float) -> None:
    """A real outage: the server process stops answering (SIGSTOP) and comes back (SIGCONT)."""
    pid = triton_server.read_pid()
    assert pid, "tritonserver pid unknown"
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def render(prom: Prometheus, start: float, end: float, path: Path, outage: tuple[float, float]) -> None:
    """A few dashboard panels from query_range data, as a PNG (Grafana itself cannot run here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = [
        "Events in /s by topic",
        "Request end to end at publish p99 (budget 50 ms)",
        "Online CTR by model version",
        "Feature freshness p50 / p99 (event produced -> session features updated)",
        "Gateway requests /s by route and status",
        "Degraded answers /s by reason",
    ]
    panels = {title: exprs for title, exprs in _panels_by_title().items() if title in wanted}
    fig, axes = plt.subplots(3, 2, figsize=(14, 10))
    for ax, title in zip(axes.flat, wanted, strict=True):
        for expr, legend in panels[title]:
            for series in prom.query_range(expr, start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if not any(y > 0 for y in ys):  # flat-zero series only clutter the picture
                    continue
                label = legend
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                ax.plot(xs, ys, label=label[:40])
        ax.axvspan(outage[0] - start, outage[1] - start, color="red", alpha=0.1, label="Triton paused")
        ax.set_title(title[:60], fontsize=10)
        ax.set_xlabel("seconds into the test")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[:8], labels[:8], fontsize=6, loc="upper left")
    fig.suptitle("recstream overview: live Prometheus data (query_range) from the test stack")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _panels_by_title() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            out[panel["title"]] = [(t["expr"], t.get("legendFormat", "")) for t in panel.get("targets", [])]
    return out


def test_every_dashboard_panel_has_live_data(
    live_stack: LiveStack,
    prometheus: Prometheus,
    trainer: Trainer,
    triton_server,
) -> None:
    queries = panel_queries() + [("rules.yml", name, name) for name in RECORDED]
    assert len(queries) >= 20, queries
    start = time.time()
    with Traffic(live_stack) as traffic:
        with live_stack.http() as http:
            assert http.post("/v1/events", json={"events": []}, headers={"X-API-Key": "wrong"}).status_code == 403
            r = http.post(
                "/v1/items",
                json={"item_id": f"new{uuid.uuid4().hex[:6]}", "title": "Brand New Space Saga", "category": "Sci-Fi"},
            )
            assert r.status_code == 202
        with EventProducer(live_stack.settings, worker="test") as producer:  # a malformed event: dead letter
            producer.send_raw(producer.topic_for("behaviour"), b"u1", b"{not json")
            for topic, event in exploring_answers():  # for the trainer's off-policy check panel
                producer.send(topic, event)
        time.sleep(15)  # a few scrapes of normal traffic first
        outage = (time.time(), time.time() + 4.0)
        pause_triton(triton_server, 4.0)  # traffic keeps flowing: calls time out, answers degrade

        deadline = time.monotonic() + 240  # the trainer's first round needs ~250 joined examples
        while True:
            missing = [(d, title, expr) for d, title, expr in queries if not has_data(prometheus.query(expr))]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert prometheus.targets_up() == {
            "recstream-gateway": "up",
            "recstream-worker": "up",
            "recstream-trainer": "up",
        }, trainer.tail()
        while time.time() < outage[1] + 25:  # recovery after the outage, for the rendered panels
            time.sleep(1)
    assert not missing, (
        "panels without data:\n"
        + "\n".join(f"{d}: {t}: {e}" for d, t, e in missing)
        + ("\n--- trainer log ---\n" + trainer.tail())
    )
    assert len(traffic.errors) < 5, traffic.errors
    health = prometheus.rule_health()
    assert len(health) >= 9 and set(health.values()) == {"ok"}, health  # a few 504s while Triton is paused are expected

    render(prometheus, start, time.time(), ARTIFACTS / "dashboard.png", outage)
