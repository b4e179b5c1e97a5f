"""A tiny headless-Chromium driver over the DevTools protocol (CDP), for the report's browser test and
its README screenshot.

Chromium (Debian's ``chromium``) starts headless with ``--remote-debugging-port=0``: it picks a free port
and writes it to ``DevToolsActivePort`` in its profile directory, which we poll instead of parsing its
stderr. One WebSocket (``websocket-client``, already pinned through kubernetes) talks to the browser;
pages are attached with flat sessions, so every command and event carries its ``sessionId``. Chromium
needs no network: background services, sync, component updates and first-run pages are off, so the
only requests a page makes are its own (which :class:`Page` records).

    with Browser() as b:
        page = b.open("file:///tmp/report.html", width=1280, height=900)
        page.console_errors()       # console.error, uncaught exceptions, failed loads
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Loopback only; no extension, GPU, sandbox (CI containers run as root) or background network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class CDPError(RuntimeError):
    """The browser did not start, a command failed, or an awaited event never came."""


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None (the caller skips with its reason)."""
    for c in CHROMIUM_CANDIDATES:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.access(path, os.X_OK):
            return path
    return None


def missing_reason() -> str | None:
    """Why a browser test cannot run here (None: it can)."""
    if find_chromium() is None:
        return "Chromium is not installed (Debian: apt-get install chromium; .ci/run does it as root)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "the websocket-client package is not installed"
    return None


class Browser:
    """One headless Chromium process and its DevTools WebSocket."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        import websocket

        self.binary = binary or find_chromium()
        if not self.binary:
            raise CDPError(missing_reason() or "no Chromium")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="curate-chromium-")
        self.log_path = os.path.join(self.profile, "chromium.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            url = self._ws_url()
            self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True,
                                                  enable_multithread=False)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.events: list[dict] = []

    def _ws_url(self) -> str:
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}: {self._tail()}")
            try:
                with open(path) as f:
                    lines = f.read().split("\n")
                if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
                    return f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        raise CDPError(f"chromium did not open its DevTools port in {self.timeout}s: {self._tail()}")

    def _tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = self._recv(time.monotonic() + self.timeout, f"the reply to {method}")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _recv(self, deadline: float, what: str) -> dict:
        import websocket

        left = deadline - time.monotonic()
        if left <= 0:
            raise CDPError(f"timed out waiting for {what}")
        self.ws.settimeout(left)
        try:
            return json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException as e:
            raise CDPError(f"timed out waiting for {what}") from e

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None) -> dict:
        """The first event ``method`` (of ``session``) received so far or within ``timeout`` seconds."""
        def match(e):
            return e.get("method") == method and (session is None or e.get("sessionId") == session)

        for e in self.events:
            if match(e):
                return e
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            e = self._recv(deadline, method)
            if "method" in e:
                self.events.append(e)
                if match(e):
                    return e

    def open(self, url: str, width: int = 1280, height: int = 900) -> "Page":
        """A new tab of ``width`` x ``height`` CSS pixels that has loaded ``url`` (its load event fired)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=sid)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, sid)
        nav = self.send("Page.navigate", {"url": url}, sid)
        if nav.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {nav['errorText']}")
        self.wait_event("Page.loadEventFired", sid)
        return Page(self, sid, url)

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self.send("Browser.close")
            except Exception:
                pass
            ws.close()
            self.ws = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One attached tab."""

    def __init__(self, browser: Browser, session: str, url: str):
        self.b, self.session, self.url = browser, session, url

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (awaited if it is a promise); a thrown error raises."""
        r = self.b.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, self.session)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"script error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def _events(self) -> list[dict]:
        self.evaluate("0")  # a round trip: events the page emitted before it are now received
        return [e for e in self.b.events if e.get("sessionId") == self.session]

    def console_errors(self) -> list[str]:
        """``console.error``/``console.assert`` calls, uncaught exceptions and errors Chromium logged for
        the page (a resource that failed to load, a blocked request, a CSP violation)."""
        out = []
        for e in self._events():
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("uncaught: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                ent = p["entry"]
                out.append(f"{ent.get('source')}: {ent.get('text')} {ent.get('url', '')}".strip())
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made (the document, images, scripts, fetches)."""
        return [e["params"]["request"]["url"] for e in self._events()
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, full_height: int | None = None) -> bytes:
        """A PNG of the viewport, or of the page's top ``full_height`` CSS pixels (at most the page's
        height) when given."""
        params: dict = {"format": "png"}
        if full_height:
            w, h = self.evaluate("[document.documentElement.clientWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": w, "height": min(h, full_height), "scale": 1})
        return base64.b64decode(self.b.send("Page.captureScreenshot", params, self.session)["data"])


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.cdp PAGE OUT.png [--width W] [--height H]``: a screenshot of a local HTML file
    (the top ``H`` CSS pixels of the page at ``W`` wide), e.g. the README's picture of the demo's report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.cdp", description=main.__doc__)
    p.add_argument("page", help="an HTML file")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2000, help="at most this many pixels of the page's top")
    p.add_argument("--colors", type=int, default=0,
                   help="store as a palette PNG of this many colours (256: a third of the bytes; 0: RGB)")
    a = p.parse_args(argv)
    with Browser() as b:
        page = b.open("file://" + os.path.abspath(a.page), width=a.width, height=min(a.height, 900))
        errors = page.console_errors()
        png = page.screenshot(full_height=a.height)
    if a.colors:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(
            colors=a.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
        png = buf.getvalue()
    with open(a.out, "wb") as f:
        f.write(png)
    print(f"{a.out}: {len(png):,} bytes" + (f"; console errors: {errors}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
