"""Tiny helpers shared by the bench scripts: result files, a plain-text table, timing and memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_dataset_arg(name: str) -> Any:
    """`--dataset` for a bench: a wrong file ends the run with the loader's message, not a traceback."""
    from recstream.data.datasets import DataFormatError, load_dataset

    try:
        return load_dataset(name)
    except DataFormatError as exc:
        raise SystemExit(f"--dataset {name}: {exc}") from exc


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `bench/results/NAME.json` (pretty, stable key order) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".4f") -> str:
    """A fixed-width text table of `columns` from `rows` (missing values '-'; times/MiB one decimal)."""

    def cell(v: Any, col: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, ".1f" if col.endswith(("_s", "_mb")) else floatfmt)
        return str(v)

    cells = [[cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}", flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclass
class Measure:
    """Wall time and peak-RSS growth of a block (growth is 0 when an earlier peak was higher)."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def measure() -> Iterator[Measure]:
    """Time a block and record the process peak RSS after it."""
    m = Measure()
    before = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t0
        m.peak_rss_mb = peak_rss_mb()
        m.rss_growth_mb = max(0.0, m.peak_rss_mb - before)


def index_catalog(settings: Any, worker: Any, items: Sequence[Any], timeout_s: float, poll_s: float = 0.5) -> float:
    """Send the catalog through the catalog topic and wait until the worker (streams.process
    .WorkerProcess, or a list of them: each builds its own index replica) has indexed all of it;
    returns the seconds it took. Every bench indexes each run: a reused index from another encoder
    version would be re-embedded from an empty topic."""
    from recstream.client import EventProducer

    workers = list(worker) if isinstance(worker, list | tuple) else [worker]
    t0 = time.time()
    with EventProducer(settings) as p:
        p.send_many("catalog", list(items))
    while min(w.metric("recstream_indexed_items") for w in workers) < len(items):
        time.sleep(poll_s)
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"catalog not indexed in {timeout_s:.0f} s")
    return time.time() - t0


def cold_draws(option: str, seeds: Sequence[int]) -> list[int]:
    """The cold-start draw (which items are held out) of each training seed, from a `--cold-seeds`
    value: empty = the seeds themselves (seed s on draw s), one value = that draw for every seed, or
    one draw per seed."""
    draws = [int(s) for s in option.split(",") if s.strip()] or list(seeds)
    if len(draws) == 1:
        draws = draws * len(seeds)
    if len(draws) != len(seeds):
        raise SystemExit(f"--cold-seeds needs one draw or one per training seed ({list(seeds)}), got {option!r}")
    return draws


def paired_over_splits(groups: Sequence[tuple[Sequence[Any], Sequence[Any]]], k: int = 10) -> dict[str, Any]:
    """NDCG@k of a model minus a baseline, paired over the cases of several splits at once.

    `groups`: per split (e.g. one cold-start draw of held-out items), the model's and the baseline's
    rank arrays on that split's cases, one per seed (a single baseline array stands for every seed).
    Within a split the seeds are averaged per case (recstream.eval.stats.paired_difference); the
    interval is then over every (split, case), since different draws hold different users' cases.
    One split gives exactly paired_difference.
    """
    import numpy as np

    from recstream.eval.stats import mean_ci95, ndcg_gains, paired_difference

    per_split, case_diffs = [], []
    for model_ranks, baseline_ranks in groups:
        base = list(baseline_ranks) * len(model_ranks) if len(baseline_ranks) == 1 else list(baseline_ranks)
        per_split.append(paired_difference(list(model_ranks), base, k=k))
        gains = [np.mean([ndcg_gains(r, k) for r in side], axis=0) for side in (model_ranks, base)]
        case_diffs.append(gains[0] - gains[1])
    if len(per_split) == 1:
        return per_split[0]
    diff, lo, hi = mean_ci95(np.concatenate(case_diffs))
    return {
        "diff": diff,
        "ci95": [lo, hi],
        "seeds_won": sum(int(p["seeds_won"]) for p in per_split),
        "seeds_compared": sum(int(p["seeds_compared"]) for p in per_split),
        "per_seed_diff": [d for p in per_split for d in p["per_seed_diff"]],
        "per_split": [{"diff": p["diff"], "ci95": p["ci95"], "n_cases": p["n_cases"]} for p in per_split],
        "n_cases": int(sum(len(d) for d in case_diffs)),
    }
