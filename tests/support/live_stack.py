"""A live stack for the gateway tests: real Kafka, real Triton, a worker process and the gateway in
a thread, with a small catalog of clear topical clusters; one per test session."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from recstream.config import Settings
from services.gateway import GatewayLimits, create_app
from streams.process import WorkerProcess, free_port

KEY = "live-test-key"
HEADERS = {"X-API-Key": KEY}

# A small catalog with clear topical clusters, so search and session effects are easy to see.
CATALOG: dict[str, list[str]] = {
    "Sci-Fi": [
        "Star Voyage to the Outer Planets",
        "Space Station Mutiny",
        "Galaxy Rangers and the Alien Fleet",
        "Mars Colony One",
        "Rocket Pilots of Andromeda",
        "Robots Among the Stars",
        "Time Machine Paradox",
        "The Last Astronaut",
        "Asteroid Miners",
        "Cyborg Uprising on the Moon",
    ],
    "Horror": [
        "The Haunted Mansion on the Hill",
        "Night of the Zombies",
        "Vampire Castle",
        "The Cursed Doll",
        "Scream in the Dark Forest",
        "Ghosts of the Asylum",
        "Werewolf Moon",
        "The Possession",
        "Slasher Summer Camp",
        "Demon in the Cellar",
    ],
    "Comedy": [
        "Wedding Disaster",
        "My Neighbour the Clown",
        "Office Party Gone Wrong",
        "Road Trip Mayhem",
        "The Bumbling Detective",
        "Family Holiday Chaos",
        "Stand-up Nights",
        "Pranksters Academy",
        "The Lazy Chef",
        "Dog Show Fiasco",
    ],
    "Romance": [
        "Love in Paris",
        "Summer Letters",
        "The Wedding Planner's Heart",
        "Second Chance at Love",
        "Moonlight Sonata Romance",
        "A Kiss in the Rain",
        "Sweethearts Forever",
        "Falling for the Prince",
        "Notes from a Lover",
        "Autumn Romance in Vermont",
    ],
}


def catalog_items() -> list[dict]:
    return [
        {
            "item_id": f"{cat[:3].lower()}{i}",
            "title": title,
            "category": cat,
            "tags": [cat.lower()],
            "description": f"A {cat.lower()} film: {title.lower()}.",
        }
        for cat, titles in CATALOG.items()
        for i, title in enumerate(titles)
    ]


@dataclass
class LiveStack:
    settings: Settings
    worker: WorkerProcess
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    def http(self, timeout_s: float = 30.0) -> httpx.Client:
        # 30 s: first requests of a fresh worker pay for lazy start-up on a shared 2-core machine.
        return httpx.Client(base_url=self.base_url, headers=HEADERS, timeout=timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()


def start_live_stack(kafka_bootstrap: str, triton_server, root: Path) -> LiveStack:
    from recstream.kafka.admin import ensure_topics

    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"g{uuid.uuid4().hex[:8]}.",
        qdrant_path=root / "qdrant",
        run_dir=root / "run",
        triton_url=triton_server.url,
        triton_grpc_url=triton_server.grpc_url,
        api_keys=KEY,
        # 2 s, not the 250 ms production budget: on a shared 2-core CI box Triton calls queue behind
        # other work, and these tests are about the gateway, not about degraded mode (which the
        # Prometheus test still provokes with a real multi-second Triton pause).
        triton_timeout_s=2.0,
    )
    ensure_topics(settings)
    # The in-process ranker, as the stream tests run their stack: these tests are about the gateway,
    # so they must not depend on whichever trained weights sit in the shared model_repo (the
    # stream and trainer tests check the Triton ranker). Retrieval and query embeddings still go
    # through the real tritonserver.
    worker = WorkerProcess(settings, root / "worker.log", ["--feedback-window-s", "3", "--ranker", "inprocess"]).start(
        ready_timeout_s=240
    )
    port = free_port()
    app = create_app(settings, GatewayLimits(request_timeout_s=15.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.05)
    stack = LiveStack(settings, worker, f"http://127.0.0.1:{port}", server, thread)
    with stack.http() as http:
        for item in catalog_items():
            assert http.post("/v1/items", json=item).status_code == 202
        # Indexed when a search returns the whole requested page (the indexer embeds via Triton).
        deadline = time.monotonic() + 180
        while True:
            r = http.post("/v1/search", json={"user_id": "warmup", "query": "space", "k": 20})
            if r.status_code == 200 and len(r.json()["items"]) >= 20:
                break
            assert time.monotonic() < deadline, f"catalog never indexed: {r.status_code} {r.text[:300]}"
            time.sleep(1)
    return stack
