"""The content-addressed response cache in the run's object store.

``<cache_prefix>/<aa>/<sha256>.json``, keyed by :func:`~libcurate.llm.messages.cache_key` (model, prompt
template version, messages with images by hash, every sampling parameter). Every pod of a run shares it,
so a re-run sends no request it has already made. Only successful HTTP replies are written.

Cost per request matters here (hundreds of replies per second on two cores), so:

* a lookup in a local store runs inline (a missing file costs a failed ``open``, ~2 us); in a remote
  store (S3 calls block) it runs on the thread pool;
* a write never holds up the reply: :meth:`ResponseCache.put_nowait` buffers the serialised entry and
  hands the buffer to the thread pool every ``batch`` entries or ``max_delay_s`` seconds, whichever comes
  first (one thread wake-up per batch, not per reply: per-reply hand-offs cost ~100-300 us of GIL
  contention each at hundreds of replies per second); until its write is done an entry is answered from
  memory, so a later identical request still hits. :meth:`ResponseCache.flush` (called when the client
  closes) writes what is buffered and waits for every write.
  A local entry is written to a temp file and renamed into place without ``fsync``: an entry is either
  whole or absent, and one left empty or torn by a power cut reads as a miss (the request is sent
  again), so durability would cost ~0.5 ms of CPU per reply for nothing. A write that fails is logged
  and counted (``write_errors``); the reply it carried is still returned (the cache is an optimisation,
  the sample's result does not depend on it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import uuid

from ..storage import LocalStore, Store

log = logging.getLogger(__name__)


class ResponseCache:
    """``<prefix>/<aa>/<key>.json`` in a :class:`Store`; remote I/O runs in ``executor``."""

    def __init__(self, store: Store, prefix: str, executor: concurrent.futures.Executor,
                 batch: int | None = None, max_delay_s: float = 0.5):
        self.store, self.prefix, self.executor = store, prefix.strip("/"), executor
        self._local = isinstance(store, LocalStore)
        # A local write is ~50 us; a remote one (an S3 PUT) tens of ms, so remote batches stay small
        # and the pool's threads write them side by side.
        self.batch = batch or (32 if self._local else 4)
        self.max_delay_s = max_delay_s
        self._buf: list[tuple[str, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._unwritten: dict[str, dict] = {}   # entries handed over whose write has not finished
        self._pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._dirs: set[str] = set()
        self.write_errors = 0

    def rel(self, key: str) -> str:
        return f"{self.prefix}/{key[:2]}/{key}.json"

    def _get(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.rel(key)))
        except (FileNotFoundError, KeyError):
            return None
        except ValueError:
            return None  # a corrupt (or torn) entry is a miss; it will be overwritten

    async def get(self, key: str) -> dict | None:
        entry = self._unwritten.get(key)
        if entry is not None:
            return entry
        if self._local:
            return self._get(key)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._get, key)

    def _write_local(self, rel: str, data: bytes) -> None:
        path = self.store.uri(rel)
        d = os.path.dirname(path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        # The ".tmp-<pid>-" infix is LocalStore's: list() skips such files and clean_partial removes them.
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _write(self, rel: str, data: bytes) -> None:
        if self._local:
            self._write_local(rel, data)
        else:
            self.store.write_bytes(rel, data)

    def _write_batch(self, batch: list[tuple[str, bytes]]) -> None:
        try:
            for key, data in batch:
                try:
                    self._write(self.rel(key), data)
                except Exception as e:  # counted and logged; the reply itself was already returned
                    with self._lock:
                        self.write_errors += 1
                    log.warning("response cache write of %s failed (the reply is kept; a re-run will ask "
                                "again): %r", key[:12], e)
        finally:
            for key, _ in batch:
                self._unwritten.pop(key, None)

    def _submit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        batch, self._buf = self._buf, []
        fut = self.executor.submit(self._write_batch, batch)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def put_nowait(self, key: str, entry: dict) -> None:
        """Write ``entry`` in the background (see the module docstring)."""
        self._unwritten[key] = entry
        self._buf.append((key, json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()))
        if len(self._buf) >= self.batch:
            self._submit()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self._submit)
            except RuntimeError:  # no event loop: write now
                self._submit()

    async def put(self, key: str, entry: dict) -> None:
        self.put_nowait(key, entry)

    def flush_nowait(self) -> None:
        """Hand what is buffered to the thread pool now."""
        self._submit()

    def flush(self) -> None:
        """Write what is buffered and wait for every write handed over so far."""
        self._submit()
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)
