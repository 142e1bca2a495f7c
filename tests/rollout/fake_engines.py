"""A RolloutEngine without vLLM, for fast pool tests (imported by Ray workers through PYTHONPATH)."""
from __future__ import annotations

import os
import time

from prism_mcore.rollout.engine import (Completion, EngineError, EngineHealth, GenerationResult, RolloutEngine,
                                        StagedUpdate, StaleWeightsError, UpdateSummary)


class EchoEngine(RolloutEngine):
    """Completes each prompt with [engine_id, len(prompt)] after `delays[engine_id]` seconds."""

    def __init__(self, engine_id: int, schema: dict, delays: dict | None = None, **_):
        self.engine_id, self.delay = engine_id, (delays or {}).get(engine_id, 0.0)
        self._staging = StagedUpdate(engine_id, schema)
        self._version, self._sleeping = 0, False

    def generate(self, prompts, params, expect_version=None):
        if self._sleeping:
            raise EngineError(f"engine {self.engine_id} is asleep")
        if expect_version is not None and expect_version != self._version:
            raise StaleWeightsError(f"engine {self.engine_id} holds {self._version}")
        time.sleep(self.delay)
        return [GenerationResult([Completion([self.engine_id, len(p.token_ids)], [0.0, 0.0], "length")
                                  for _ in range(params.n)], self.engine_id, self._version) for p in prompts]

    def score(self, sequences):
        return [[0.0] * (len(s) - 1) for s in sequences]

    def receive_bucket(self, version, bucket):
        return self._staging.receive(version, self._version, bucket)

    def commit_update(self, version, expected_tensors, digest=False):
        buckets = self._staging.take(version, expected_tensors, self._version)
        # With `digest`, the applied tensors themselves come back (transport tests compare them).
        applied = {n: t.clone() for b in buckets for n, t in b.open()} if digest else {}
        for b in buckets:
            b.release()
        self._version = version
        return UpdateSummary(version, expected_tensors, 0, 0.0, {"tensors": applied} if digest else {})

    def abort_update(self, version=None):
        self._staging.clear(version)

    def sleep(self):
        self._sleeping = True

    def wake_up(self):
        self._sleeping = False

    def health(self):
        return EngineHealth(self.engine_id, True, self._version, self._sleeping, os.getpid(), self._staging.version)

    @property
    def weight_version(self):
        return self._version
