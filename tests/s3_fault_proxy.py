"""A fault-injecting HTTP proxy on loopback in front of an S3 endpoint (moto's server in tests).

    with S3FaultProxy("http://127.0.0.1:5000", rate=1 / 20, seed=1) as proxy:
        open_store("s3://bucket/run", {"endpoint_url": proxy.url})   # every request passes the proxy
        ...
        proxy.counts        # Counter: fault kind -> injected

Each request is read completely, then, with probability ``rate`` (a seeded RNG, drawn per request), it
gets one fault drawn uniformly from ``kinds``:

``error_500``      a 500 InternalError reply; the request is not forwarded.
``slowdown_503``   a 503 SlowDown reply (S3's throttling); not forwarded.
``reset_request``  the connection is reset (RST) without forwarding: a read or a write that never happened.
``reset_response`` the request is forwarded (a write is applied), then the connection is reset instead of
                   replying: the client cannot know the write happened.
``cut_body``       the reply's status line, headers and half its body are sent, then the connection is reset
                   (a GET body cut partway through; a list reply cut while botocore parses it). Requests whose
                   reply has no body get ``reset_response`` instead (counted as that).
``delay``          the request is held ``delay_s`` seconds (uniform in the range), then forwarded normally.

Every fault is counted by kind (``counts``) and by kind and HTTP method (``by_method``); ``requests``
counts requests by method. The proxy speaks plain HTTP/1.1 with keep-alive and forwards each request on
a fresh upstream connection. Run it standalone for a shell session::

    python -m tests.s3_fault_proxy --upstream http://127.0.0.1:5000 --rate 0.05 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("error_500", "slowdown_503", "reset_request", "reset_response", "cut_body", "delay")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
              '<RequestId>fault-proxy</RequestId></Error>')


class _Reset(Exception):
    """Raised inside a handler to drop the connection with an RST."""


class S3FaultProxy:
    """The proxy (a threaded HTTP server). ``rate`` and ``kinds`` may be changed while it runs.

    Args:
        upstream: the real endpoint, ``http://host:port``.
        rate: probability that a request gets a fault.
        kinds: the fault kinds to draw from (see the module docstring).
        seed: seeds the RNG.
        delay_s: (lo, hi) seconds of a ``delay`` fault.
    """

    def __init__(self, upstream: str, rate: float = 0.0, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                 delay_s: tuple[float, float] = (0.05, 0.4), port: int = 0):
        bad = set(kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown fault kind(s) {sorted(bad)}; known: {KINDS}")
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rate, self.kinds, self.delay_s = rate, tuple(kinds), delay_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.by_method: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def draw(self, method: str) -> str | None:
        """The fault for one request (or None), drawn under the lock so the sequence follows the seed."""
        with self.lock:
            self.requests[method] += 1
            if self.rate <= 0 or self.rng.random() >= self.rate:
                return None
            return self.rng.choice(self.kinds)

    def record(self, kind: str, method: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.by_method[(kind, method)] += 1

    def delay(self) -> float:
        with self.lock:
            return self.rng.uniform(*self.delay_s)

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()
            self.by_method.clear()
            self.requests.clear()

    def summary(self) -> dict:
        with self.lock:
            return {"requests": sum(self.requests.values()), "faults": sum(self.counts.values()),
                    "by_kind": dict(sorted(self.counts.items())),
                    "by_kind_method": {f"{k}/{m}": n for (k, m), n in sorted(self.by_method.items())}}

    def start(self) -> "S3FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "S3FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(proxy: S3FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self):
            self._handle()

        do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        # -- request -----------------------------------------------------------------------------
        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = b"" if self.command == "HEAD" else resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()

        # -- reply ---------------------------------------------------------------------------------
        def _head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> bytes:
            lines = [f"HTTP/1.1 {status} {reason}"]
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP:
                    lines.append(f"{k}: {v}")
            if length is not None:
                lines.append(f"Content-Length: {length}")
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        def _reply(self, status, reason, headers, data) -> None:
            if self.command == "HEAD":
                upstream_len = next((v for k, v in headers if k.lower() == "content-length"), None)
                self.wfile.write(self._head(status, reason, headers, int(upstream_len) if upstream_len else 0))
            else:
                self.wfile.write(self._head(status, reason, headers, len(data)) + data)
            self.wfile.flush()

        def _error(self, status: int, code: str, msg: str) -> None:
            data = _ERROR_XML.format(code=code, msg=msg).encode()
            hdrs = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")]
            if status == 503:
                hdrs.append(("Retry-After", "0"))
            self._reply(status, "Internal Server Error" if status == 500 else "Slow Down", hdrs,
                        b"" if self.command == "HEAD" else data)

        def _reset(self) -> None:
            """Drop the connection with an RST (SO_LINGER 0), whatever was sent so far."""
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            raise _Reset()

        def _handle(self) -> None:
            try:
                self._serve()
            except _Reset:
                try:
                    self.connection.close()
                except OSError:
                    pass
            except (ConnectionError, BrokenPipeError):
                self.close_connection = True

        def _serve(self) -> None:
            body = self._read_body()
            kind = proxy.draw(self.command)
            if kind == "error_500":
                proxy.record(kind, self.command)
                return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
            if kind == "slowdown_503":
                proxy.record(kind, self.command)
                return self._error(503, "SlowDown", "Please reduce your request rate.")
            if kind == "reset_request":
                proxy.record(kind, self.command)
                return self._reset()
            if kind == "delay":
                proxy.record(kind, self.command)
                time.sleep(proxy.delay())
            status, reason, headers, data = self._forward(body)
            if kind == "cut_body" and len(data) < 2:
                kind = "reset_response"
            if kind == "reset_response":
                proxy.record(kind, self.command)
                return self._reset()
            if kind == "cut_body":
                proxy.record(kind, self.command)
                self.wfile.write(self._head(status, reason, headers, len(data)) + data[:len(data) // 2])
                return self._reset()
            self._reply(status, reason, headers, data)

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="S3 fault proxy on loopback")
    p.add_argument("--upstream", required=True)
    p.add_argument("--rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = p.parse_args(argv)
    proxy = S3FaultProxy(args.upstream, rate=args.rate, kinds=tuple(args.kinds), seed=args.seed, port=args.port)
    proxy.start()
    print(f"PROXY {proxy.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(proxy.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
