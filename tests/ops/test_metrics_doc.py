"""README's metrics table is the one the metrics make: every metric, its type and real labels."""

from __future__ import annotations

from recstream.config import REPO_ROOT
from recstream.telemetry import metrics_table


def test_the_readme_metrics_table_is_the_generated_one() -> None:
    table = metrics_table()
    assert table.count("\n") >= 20 and "| `recstream_consumer_lag` | gauge | topic, partition, group |" in table
    readme = (REPO_ROOT / "README.md").read_text()
    assert table in readme, "README's metrics table is stale: python -m recstream.telemetry prints it"
