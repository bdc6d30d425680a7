"""Online CTR per model version, and the automatic rollback rule.

Why: the gate judges a candidate on logged data; only live traffic shows how it really does. Each
training example carries the version that scored its list, so clicks and impressions can be
counted per version. After a promotion, once the new version has `min_impressions`, a one-sided
two-proportion z-test compares its CTR with the previous version's: a significant drop larger than
`max_relative_drop` triggers a rollback.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from recstream.atomic import atomic_write_text

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"(\d+)$")


def parse_version(label: str | None) -> int | None:
    """'ranker-v3', 'v3', '3' -> 3; 'retrieval'/None -> None (degraded answers belong to no version)."""
    if not label:
        return None
    m = _VERSION_RE.search(label)
    return int(m.group(1)) if m else None


class MonitorConfig(BaseModel):
    min_impressions: int = Field(500, ge=1, description="Impressions of the new version before judging it")
    max_relative_drop: float = Field(0.1, ge=0, description="Tolerated relative CTR drop versus previous")
    z: float = Field(2.33, description="One-sided z threshold (2.33 = 1% false alarms)")


@dataclass
class Counts:
    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else float("nan")


class CtrMonitor:
    def __init__(self, cfg: MonitorConfig | None = None) -> None:
        self.cfg = cfg or MonitorConfig()
        self.counts: dict[int, Counts] = {}

    def observe(self, version_label: str | None, clicked: bool) -> None:
        v = parse_version(version_label)
        if v is None:
            return
        c = self.counts.setdefault(v, Counts())
        c.impressions += 1
        c.clicks += int(clicked)

    def save(self, path: Path, keep: set[int] | None = None) -> None:
        """The counts of the versions in `keep` (all when None), so that a restarted trainer still
        judges the live version against the previous one: the previous version gets no traffic
        after a promotion, so its counts could never be gathered again."""
        counts = {str(v): asdict(c) for v, c in self.counts.items() if keep is None or v in keep}
        atomic_write_text(path, json.dumps(counts, sort_keys=True))

    def load(self, path: Path) -> None:
        """Counts saved by `save`; an unreadable file is logged and counting starts over."""
        if not path.is_file():
            return
        try:
            saved = {int(v): Counts(**c) for v, c in json.loads(path.read_text()).items()}
        except (OSError, ValueError, TypeError) as exc:
            log.error("CTR counts in %s unreadable (%s); counting starts over", path, exc)
            return
        self.counts.update(saved)

    def should_rollback(self, live: int, previous: int | None) -> tuple[bool, str]:
        """(rollback?, why) for `live` against `previous`."""
        if previous is None:
            return False, "no previous version"
        new, old = self.counts.get(live, Counts()), self.counts.get(previous, Counts())
        if new.impressions < self.cfg.min_impressions or old.impressions < self.cfg.min_impressions:
            return False, f"waiting for data (v{live}: {new.impressions}, v{previous}: {old.impressions})"
        p1, p0 = new.ctr, old.ctr
        pooled = (new.clicks + old.clicks) / (new.impressions + old.impressions)
        se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / new.impressions + 1 / old.impressions))
        z = (p0 - p1) / se
        drop = (p0 - p1) / p0 if p0 > 0 else 0.0
        if z > self.cfg.z and drop > self.cfg.max_relative_drop:
            return True, f"CTR v{live} {p1:.4f} < v{previous} {p0:.4f} (drop {drop:.0%}, z {z:.1f})"
        return False, f"CTR v{live} {p1:.4f} vs v{previous} {p0:.4f} (z {z:.1f})"
