"""A headless Chromium driven over the Chrome DevTools Protocol, to check and time reports.

Used by the report's browser tests and ``benchmarks/report_speed.py``: it opens a report from disk,
moves the mouse, types, reads the page, records every request the page makes and every console
error, and takes screenshots. It needs a ``chromium`` binary on the PATH (Debian: ``apt-get install
chromium``) and the ``websocket-client`` package (the ``dev`` extra); it downloads nothing. The
browser is started isolated: a fresh profile, no background networking, updates, sync or QUIC.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedlens.errors import EmbedLensError

#: Binaries tried in order when none is given.
BINARIES = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Flags every session starts with.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class BrowserError(EmbedLensError):
    """Chromium is missing, did not start, or a DevTools command failed."""


def find_chromium(binary: str | None = None) -> str:
    """The Chromium binary to run: ``binary``, ``$EMBEDLENS_CHROMIUM``, or the first of :data:`BINARIES`.

    Raises:
        BrowserError: When none is installed, with the command that installs it.
    """
    for name in (binary, os.environ.get("EMBEDLENS_CHROMIUM"), *BINARIES):
        if name and (found := shutil.which(name)):
            return found
    raise BrowserError(
        "no Chromium found (tried " + ", ".join(BINARIES) + "); install it with "
        "`apt-get install -y chromium chromium-driver` or set EMBEDLENS_CHROMIUM to its path"
    )


class Chromium:
    """One headless Chromium with one page, controlled over the DevTools websocket.

    Attributes:
        requests: URL of every request the page made (``Network.requestWillBeSent``).
        blocked: ``(url, reason)`` of every request the browser refused (e.g. ``"csp"``).
        responses: URL of every request that got a response.
        errors: Console errors, uncaught exceptions and log entries of level error, as text.
    """

    def __init__(self, binary: str | None = None, *, width: int = 1280, height: int = 900, timeout: float = 30) -> None:
        try:
            import websocket
        except ImportError as err:  # the dev extra
            raise BrowserError(
                "the report's browser checks need websocket-client (pip install websocket-client)"
            ) from err
        self.timeout = timeout
        self._socket_errors: tuple[type[Exception], ...] = (websocket.WebSocketException,)
        self.requests: list[str] = []
        self.blocked: list[tuple[str, str]] = []
        self.responses: list[str] = []
        self._urls: dict[str, str] = {}
        self.errors: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._next = 0
        self._profile = tempfile.mkdtemp(prefix="embedlens-chromium-")
        command = [find_chromium(binary), *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}"]
        self._process = subprocess.Popen(
            [*command, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        try:
            port = self._port()
            pages = self._targets(port)
            self._socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
            for domain in ("Page", "Runtime", "Network", "Log"):
                self.send(f"{domain}.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- start-up
    def _port(self) -> int:
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(f"Chromium exited at start (code {self._process.returncode})")
            if marker.is_file() and (lines := marker.read_text().split()):
                return int(lines[0])
            time.sleep(0.05)
        raise BrowserError("Chromium did not open its DevTools port in time")

    def _targets(self, port: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as answer:
                pages = [t for t in json.load(answer) if t.get("type") == "page"]
            if pages:
                return pages
            time.sleep(0.05)
        raise BrowserError("Chromium opened no page")

    # ----------------------------------------------------------------- protocol
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result (events that arrive meanwhile are recorded)."""
        self._next += 1
        ident = self._next
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self._socket.recv())
        method = message.get("method")
        if method:
            self._events.append(message)
            params = message.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
                self._urls[params["requestId"]] = params["request"]["url"]
            elif method == "Network.responseReceived":
                self.responses.append(params["response"]["url"])
            elif method == "Network.loadingFailed" and params.get("blockedReason"):
                self.blocked.append((self._urls.get(params["requestId"], "?"), params["blockedReason"]))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.errors.append(
                    f"exception: {details.get('exception', {}).get('description') or details.get('text')}"
                )
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append(
                    "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
        return message

    def wait_event(self, method: str) -> dict[str, Any]:
        """Wait for the next event ``method`` (or one already received since the last wait)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for index, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(index)
            self._receive()
        raise BrowserError(f"no {method} within {self.timeout} s")

    # ----------------------------------------------------------------- page
    def forget(self) -> None:
        """Clear the recorded requests, responses, refusals and errors."""
        for record in (self.requests, self.blocked, self.responses, self.errors):
            record.clear()

    def open(self, path: str | Path) -> None:
        """Load a file and wait for its load event."""
        self._events.clear()
        self.send("Page.navigate", url=Path(path).absolute().as_uri())
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression[:80]}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.02)
        raise BrowserError(f"never true: {expression}")

    def mouse(self, kind: str, x: float, y: float, button: str = "none") -> None:
        """``Input.dispatchMouseEvent`` (``kind``: mouseMoved, mousePressed, mouseReleased)."""
        self.send(
            "Input.dispatchMouseEvent", type=kind, x=x, y=y, button=button, clickCount=1 if button != "none" else 0
        )

    def hover(self, x: float, y: float) -> None:
        """Move the mouse to viewport coordinates."""
        self.mouse("mouseMoved", x, y)

    def click(self, x: float, y: float) -> None:
        """A left click at viewport coordinates."""
        self.hover(x, y)
        self.mouse("mousePressed", x, y, "left")
        self.mouse("mouseReleased", x, y, "left")

    def press(self, key: str, key_code: int) -> None:
        """Press and release a key (e.g. ``"End"``, 35; ``"ArrowRight"``, 39) in the focused element."""
        for kind in ("rawKeyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=key,
                windowsVirtualKeyCode=key_code,
                nativeVirtualKeyCode=key_code,
            )

    def rect(self, selector: str) -> dict[str, float]:
        """Scroll the first element matching ``selector`` into view; its box in viewport coordinates."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
        )
        if found is None:
            raise BrowserError(f"no element matches {selector}")
        return found

    def click_on(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        box = self.rect(selector)
        self.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)

    def type_text(self, text: str) -> None:
        """Type into the focused element."""
        self.send("Input.insertText", text=text)

    def screenshot(self, path: str | Path, clip: Sequence[float] | None = None) -> Path:
        """Save a PNG of the page (or of ``clip`` = x, y, width, height in page coordinates)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            x, y, width, height = clip
            params["clip"] = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def open_report(self, html: str | Path) -> None:
        """Load a report with a fresh request log and wait until its script says it is ready."""
        self.forget()
        self.open(html)
        self.wait_for("window.__ready")

    def hover_cell(self, panel: int, cell: int, grid: tuple[int, int]) -> None:
        """Move the mouse over grid cell ``cell`` (row-major) of the report's panel ``panel``."""
        box = self.rect(f"#panel-{panel} canvas")
        rows, cols = grid
        row, col = divmod(cell, cols)
        self.hover(box["x"] + (col + 0.5) * box["width"] / cols, box["y"] + (row + 0.5) * box["height"] / rows)

    def close(self) -> None:
        """Close the page and the browser, and delete the profile."""
        socket = getattr(self, "_socket", None)
        if socket is not None:
            try:
                self.send("Browser.close")
            except (BrowserError, OSError, *self._socket_errors):  # already gone; the process is stopped below
                pass
            socket.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
