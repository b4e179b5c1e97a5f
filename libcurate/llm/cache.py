"""The content-addressed response cache in the run's object store.

``<cache_prefix>/<aa>/<sha256>.json``, keyed by :func:`~libcurate.llm.messages.cache_key` (model, prompt
template version, messages with images by hash, every sampling parameter). Every pod of a run shares it,
so a re-run sends no request it has already made. Only successful HTTP replies are written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

from ..storage import Store


class ResponseCache:
    """``<prefix>/<aa>/<key>.json`` in a :class:`Store`; I/O runs in a thread pool (S3 calls block)."""

    def __init__(self, store: Store, prefix: str, executor: concurrent.futures.Executor):
        self.store, self.prefix, self.executor = store, prefix.strip("/"), executor

    def rel(self, key: str) -> str:
        return f"{self.prefix}/{key[:2]}/{key}.json"

    def _get(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.rel(key)))
        except (FileNotFoundError, KeyError):
            return None
        except ValueError:
            return None  # a corrupt entry is a miss; it will be overwritten

    async def get(self, key: str) -> dict | None:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._get, key)

    async def put(self, key: str, entry: dict) -> None:
        data = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.write_bytes, self.rel(key), data)
