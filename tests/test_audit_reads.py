"""``audit`` reads a run's markers a few at a time and lists quarantine files instead of asking for each:
on S3 every read is one request, so one-at-a-time reads made the audit (and the report's funnel) as slow
as the request latency times the shard count."""

from __future__ import annotations

import json
import threading
import time

from libcurate.audit import READ_AHEAD, audit
from libcurate.storage import open_store


class CountingStore:
    """A store that counts calls per method and the most reads in flight at once (each read waits a
    little, as an S3 request would)."""

    def __init__(self, inner, delay: float = 0.005):
        self.inner, self.delay = inner, delay
        self.calls: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*a, **k):
            with self.lock:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if name == "read_text":
                    time.sleep(self.delay)
                return attr(*a, **k)
            finally:
                with self.lock:
                    self.in_flight -= 1
        return call


def build_run(store, n: int) -> None:
    for i in range(n):
        u = f"shard-{i:06d}"
        store.write_bytes(f"raw/{u}.tar", b"")
        q = [{"key": f"k{i}", "reason": "bad_image", "detail": ""}] if i % 3 == 0 else []
        n_in = 10
        for prefix in ("raw", "stages/score_length/aaaa"):  # the stage sees what raw kept
            store.write_text(f"{prefix}/_stats/{u}.json", json.dumps(
                {"in": n_in, "out": n_in - len(q), "quarantined": len(q), "dropped": 0}))
            n_in -= len(q)
            if q:
                store.write_text(f"{prefix}/_quarantine/{u}.jsonl", "".join(json.dumps(x) + "\n" for x in q))
            store.write_text(f"{prefix}/_done/{u}", "")
    store.write_text("raw/_ingest.json", json.dumps({"n_shards": n}))


def test_audit_reads_concurrently_in_order_and_asks_no_exists_per_unit(tmp_path):
    plain = open_store(str(tmp_path / "run"))
    build_run(plain, 24)
    want = audit(plain)
    counted = CountingStore(plain)
    got = audit(counted)
    assert got == want and got["ok"]
    st = got["stages"]["stages/score_length/aaaa"]
    assert st["quarantine_reasons"] == {"bad_image": 8} and st["quarantined"] == 8
    # 24 raw stats + per stage (24 stats + 8 quarantine files): reads only, no exists per unit
    assert counted.calls["read_text"] == 24 + 2 * (24 + 8) + 1
    assert counted.calls.get("exists", 0) <= 2
    assert 1 < counted.max_in_flight <= READ_AHEAD


def test_a_quarantine_file_missing_for_quarantined_samples_is_still_a_problem(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_run(store, 4)
    store.delete("stages/score_length/aaaa/_quarantine/shard-000003.jsonl")
    st = audit(store)["stages"]["stages/score_length/aaaa"]
    assert not st["ok"] and "shard-000003: 0 quarantine lines for quarantined=1" in st["problems"]
