"""A scriptable fake OpenAI-compatible server for tests and benchmarks (real HTTP on 127.0.0.1).

It serves ``POST /v1/chat/completions`` plus the minimal Batch API surface (``POST /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``)
on an aiohttp event loop running in a background thread (or, for benchmarks, in its own process via
``python -m libcurate.llm.testing --port 0``).

Behaviour is scripted with *actions*. For every chat request the server takes, in this order:

1. the next action of the FIFO ``script`` (``server.script(Error(429, retry_after=0.05), Reply("88"))``);
2. otherwise ``responder(body)`` (a function of the request JSON returning an action or a plain string);
3. otherwise ``Reply(default_text)``.

Actions: :class:`Reply` (text, finish_reason, optional extra delay), :class:`Error` (status, optional
``Retry-After``), :class:`Sleep` (hold the connection for N seconds, i.e. a client-side timeout, then
reply), :class:`Malformed` (a 200 whose body is not a chat completion). ``latency_s`` is added to every
chat request. ``usage.prompt_tokens`` is counted
by :func:`libcurate.llm.cost.body_prompt_tokens`. ``server.requests`` keeps every chat request body (in arrival order) and ``server.count``
their number; ``server.max_in_flight`` is the most chat requests it held open at once; batch lines are answered through the same responder but counted in ``batch_lines``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Reply:
    text: str
    finish_reason: str = "stop"
    delay_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Error:
    status: int
    retry_after: float | None = None
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sleep:
    seconds: float
    then: Reply | None = None


@dataclass
class Malformed:
    body: str = '{"id": "x", "choices": '   # truncated JSON
    content_type: str = "application/json"


Action = Reply | Error | Sleep | Malformed


def completion_body(model: str, text: str, finish_reason: str = "stop", prompt_tokens: int = 10,
                    completion_tokens: int | None = None) -> dict:
    completion_tokens = max(1, len(text) // 4) if completion_tokens is None else completion_tokens
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _prompt_tokens(body: dict) -> int:
    """The ``usage.prompt_tokens`` the server reports: the documented count of
    :func:`libcurate.llm.cost.body_prompt_tokens` (text characters / 4, message framing, images by the
    provider's tile rule for their ``detail``), so ``curate estimate`` can be checked against it."""
    from .cost import body_prompt_tokens

    return max(1, body_prompt_tokens(body))


class FakeOpenAIServer:
    """The fake server. Use as a context manager; ``base_url`` ends in ``/v1``.

    Args:
        responder: ``body -> action | str``; called when the script is empty.
        default_text: reply when neither script nor responder gives one.
        latency_s: added to every chat request (async sleep: the server stays concurrent).
        batch_polls: how many ``GET /v1/batches/{id}`` answer ``in_progress`` before ``completed``.
    """

    def __init__(self, responder: Callable[[dict], Any] | None = None, default_text: str = "50",
                 latency_s: float = 0.0, batch_polls: int = 1, port: int = 0):
        self.responder = responder
        self.default_text = default_text
        self.latency_s = latency_s
        self.batch_polls = batch_polls
        self.port = port
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.batch_lines = 0
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._script: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._ready = threading.Event()

    # -- scripting ---------------------------------------------------------------------------
    def script(self, *actions: Action) -> "FakeOpenAIServer":
        with self._lock:
            self._script.extend(actions)
        return self

    @property
    def count(self) -> int:
        return len(self.requests)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.batch_lines = 0
            self.max_in_flight = self.in_flight

    def _next_action(self, body: dict) -> Action:
        with self._lock:
            if self._script:
                return self._script.popleft()
        if self.responder is not None:
            a = self.responder(body)
            if a is not None:
                return Reply(a) if isinstance(a, str) else a
        return Reply(self.default_text)

    # -- handlers ----------------------------------------------------------------------------
    async def _chat(self, request):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._chat_reply(request)
        finally:
            self.in_flight -= 1

    async def _chat_reply(self, request):
        from aiohttp import web

        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}},
                                     status=400)
        with self._lock:
            self.requests.append(body)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        action = self._next_action(body)
        if isinstance(action, Sleep):
            await asyncio.sleep(action.seconds)
            action = action.then or Reply(self.default_text)
        if isinstance(action, Error):
            headers = dict(action.headers)
            if action.retry_after is not None:
                headers["Retry-After"] = f"{action.retry_after:g}"
            return web.json_response({"error": {"message": action.message, "type": "scripted", "code": None}},
                                     status=action.status, headers=headers)
        if isinstance(action, Malformed):
            return web.Response(text=action.body, content_type=action.content_type.split(";")[0])
        assert isinstance(action, Reply), action
        if action.delay_s:
            await asyncio.sleep(action.delay_s)
        return web.json_response(completion_body(
            body.get("model", "fake"), action.text, action.finish_reason,
            action.prompt_tokens if action.prompt_tokens is not None else _prompt_tokens(body),
            action.completion_tokens))

    async def _file_create(self, request):
        from aiohttp import web

        form = await request.post()
        f = form.get("file")
        data = f.file.read() if hasattr(f, "file") else str(f).encode()
        fid = f"file-{uuid.uuid4().hex[:12]}"
        self.files[fid] = {"data": data, "purpose": form.get("purpose", "batch"),
                           "filename": getattr(f, "filename", "upload.jsonl")}
        return web.json_response(self._file_obj(fid))

    def _file_obj(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["data"]), "created_at": int(time.time()),
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    async def _file_get(self, request):
        from aiohttp import web

        fid = request.match_info["fid"]
        if fid not in self.files:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.json_response(self._file_obj(fid))

    async def _file_content(self, request):
        from aiohttp import web

        fid = request.match_info["fid"]
        if fid not in self.files:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=self.files[fid]["data"], content_type="application/octet-stream")

    async def _batch_create(self, request):
        from aiohttp import web

        body = await request.json()
        bid = f"batch_{uuid.uuid4().hex[:12]}"
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                             "input_file_id": body["input_file_id"],
                             "completion_window": body.get("completion_window", "24h"),
                             "status": "validating", "created_at": int(time.time()),
                             "output_file_id": None, "error_file_id": None, "_polls": 0,
                             "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        return web.json_response(self._batch_obj(bid))

    def _batch_obj(self, bid: str) -> dict:
        return {k: v for k, v in self.batches[bid].items() if not k.startswith("_")}

    def _run_batch(self, b: dict) -> None:
        out, err = [], []
        lines = self.files[b["input_file_id"]]["data"].decode().splitlines()
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            self.batch_lines += 1
            action = self._next_action(req["body"])
            rid = f"req_{uuid.uuid4().hex[:8]}"
            if isinstance(action, Error):
                err.append({"id": rid, "custom_id": req["custom_id"], "response": {
                    "status_code": action.status, "request_id": rid,
                    "body": {"error": {"message": action.message}}}, "error": None})
            elif isinstance(action, Reply):
                out.append({"id": rid, "custom_id": req["custom_id"], "error": None, "response": {
                    "status_code": 200, "request_id": rid, "body": completion_body(
                        req["body"].get("model", "fake"), action.text, action.finish_reason,
                        _prompt_tokens(req["body"]))}})
            # Sleep / Malformed: the line is silently missing from both files (as with an expired batch)
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{uuid.uuid4().hex[:12]}"
                self.files[fid] = {"data": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                   "purpose": "batch_output", "filename": f"{name}.jsonl"}
                b[name] = fid
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b["status"] = "completed"

    async def _batch_get(self, request):
        from aiohttp import web

        bid = request.match_info["bid"]
        if bid not in self.batches:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        b = self.batches[bid]
        b["_polls"] += 1
        if b["status"] != "completed":
            if b["_polls"] > self.batch_polls:
                self._run_batch(b)
            else:
                b["status"] = "in_progress"
        return web.json_response(self._batch_obj(bid))

    # -- lifecycle ---------------------------------------------------------------------------
    def make_app(self):
        from aiohttp import web

        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/files", self._file_create)
        app.router.add_get("/v1/files/{fid}", self._file_get)
        app.router.add_get("/v1/files/{fid}/content", self._file_content)
        app.router.add_post("/v1/batches", self._batch_create)
        app.router.add_get("/v1/batches/{bid}", self._batch_get)
        return app

    async def _start(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeOpenAIServer":
        def main():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            fut.result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve forever in this process (benchmarks): prints ``PORT <n>`` once listening."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat request")
    p.add_argument("--text", default="88\nA clear, specific caption.", help="reply text")
    args = p.parse_args(argv)
    server = FakeOpenAIServer(default_text=args.text, latency_s=args.latency, port=args.port)

    async def run():
        await server._start()
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- fixtures for tests and the benchmark --------------------------------------------------------
def make_sample(img, instruction: str, answer: str, i: int = 0, metadata: dict | None = None,
                domain: str | None = None, more_turns: list[tuple[str, str]] | None = None):
    """A valid one-image :class:`~libcurate.records.Sample` from a PIL image (a small JPEG, varied by ``i``)."""
    import hashlib
    import io as _io

    from ..records import ImageRef, Sample, Source, Turn, make_key

    buf = _io.BytesIO()
    w = 48 + i % 11
    img.convert("RGB").resize((w, 48)).save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    turns = [Turn("human", "<image>\n" + instruction), Turn("gpt", answer)]
    for q, a in more_turns or []:
        turns += [Turn("human", q), Turn("gpt", a)]
    return Sample(key=make_key([sha], turns), images=[ImageRef("jpeg", sha, w, 48, f"img{i}.jpg", data)],
                  conversations=turns, source=Source("test", str(i), "llava"), domain=domain,
                  metadata=metadata or {})


def write_raw_shards(store, shards: list[list], index: bool = True) -> None:
    """Write ``raw/shard-NNNNNN.tar`` for each list of samples and, as ingest does, its record index
    ``raw/_index/shard-NNNNNN.jsonl`` (text-only stages read that instead of the tar) unless ``index``
    is False."""
    from ..shards import ShardWriter, index_bytes, index_rel

    for si, samples in enumerate(shards):
        rel = f"raw/shard-{si:06d}.tar"
        with ShardWriter(store, rel) as w:
            for s in samples:
                w.write_sample(s)
        if index:
            store.write_bytes(index_rel(rel), index_bytes(samples))
