"""The trainer's off-policy view of live traffic: the newest ranking logs of exploring answers, joined
with their outcomes as both arrive (recstream.ope.logs evaluates them)."""

from __future__ import annotations

import numpy as np

from recstream.contracts.events import RankingLog, TrainingExample
from recstream.ope.logged import LoggedRequest, UnusableLog, join
from recstream.ope.logs import explores


class LogWindow:
    """The newest `capacity` ranking logs and their shown slots' outcomes, joined as they arrive:
    a long-running worker's view for off-policy checks (the trainer's promotion gate).

    Only logs of policies that explore are kept (the others cannot enter an estimate). The two
    topics are consumed independently, so an outcome may arrive before its ranking log (the log is
    written at answer time, the outcome when its feedback window closes, so this is rare); up to
    `capacity` such outcomes wait for it, oldest dropped first - most outcomes belong to answers
    that were never logged and must not pile up."""

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict

        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._logs: OrderedDict[str, RankingLog] = OrderedDict()
        self._inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._slots: dict[str, dict[int, TrainingExample]] = {}
        self._early: OrderedDict[tuple[str, int], TrainingExample] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def add_log(self, rl: RankingLog) -> None:
        if not explores(rl.policy_spec):
            return
        try:  # the ranker's inputs as arrays, the log without its float lists
            self._inputs[rl.request_id] = LoggedRequest(rl, []).ranker_inputs()
            rl = rl.model_copy(
                update={"context": None, "pool": [c.model_copy(update={"features": None}) for c in rl.pool]}
            )
        except UnusableLog:
            self._inputs.pop(rl.request_id, None)
        self._logs[rl.request_id] = rl
        self._logs.move_to_end(rl.request_id)
        slots = self._slots.setdefault(rl.request_id, {})
        for j in range(rl.k):
            ex = self._early.pop((rl.request_id, j), None)
            if ex is not None:
                slots[j] = ex
        while len(self._logs) > self.capacity:
            old, _ = self._logs.popitem(last=False)
            self._slots.pop(old, None)
            self._inputs.pop(old, None)

    def add_example(self, ex: TrainingExample) -> None:
        if ex.request_id in self._logs:
            self._slots[ex.request_id][ex.position] = ex
            return
        self._early[(ex.request_id, ex.position)] = ex
        while len(self._early) > self.capacity:
            self._early.popitem(last=False)

    def requests(self) -> list[LoggedRequest]:
        """Logged requests whose every shown slot has its outcome (see `join`)."""
        examples = [ex for slots in self._slots.values() for ex in slots.values()]
        joined = join(self._logs.values(), examples)[0]
        return [LoggedRequest(lr.log, lr.slots, self._inputs.get(lr.log.request_id)) for lr in joined]
