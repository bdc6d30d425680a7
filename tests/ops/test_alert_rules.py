"""The alerting rules fire on what they are meant to and only then: promtool's rule unit tests
(infra/prometheus/rules_test.yml) evaluate rules.yml over synthetic series. promtool ships with
Debian's `prometheus` package, which `make setup` installs."""

from __future__ import annotations

import shutil
import subprocess

from recstream.config import REPO_ROOT

PROMETHEUS = REPO_ROOT / "infra" / "prometheus"


def test_the_alert_rules_pass_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not on PATH: run `make prometheus` (Debian's prometheus package)"
    check = subprocess.run([promtool, "check", "rules", str(PROMETHEUS / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(PROMETHEUS / "rules_test.yml")], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
