"""report.html in a real browser: headless Chromium loads it, shows the curves and the
results table, and logs no console error.

The browser is driven over the Chrome DevTools Protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ending in a NUL byte on file descriptors 3 and 4, the transport Playwright and
Puppeteer use for Chromium), so the test needs the browser and nothing else: no driver, no
network port, no Python package. Install the browser with ``apt-get install chromium``
(``.ci/run`` does); point ``MGRAL_CHROMIUM`` at another Chromium or Chrome binary. Without
one the tests skip, saying so.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mgral.report import write_report

from .test_html import make_run

pytestmark = pytest.mark.browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
TIMEOUT = 60.0
"""Seconds any one step may take (the browser's start included) before the test fails."""


def find_browser() -> str | None:
    explicit = os.environ.get("MGRAL_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium and one page, spoken to over the DevTools protocol on a pipe."""

    def __init__(self, executable: str, profile: Path, log: Path) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # the child needs its ends at fds 3 (it reads commands) and 4 (it writes replies); move
        # them above 10 first so that dup2 onto 3 and 4 cannot overwrite one with the other
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)

        def pipes_on_3_and_4() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [
            executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",  # no update checks, field trials, ... on a closed network
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--window-size=1280,900",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                close_fds=False,  # the fds made inheritable by dup2 must reach the browser
                preexec_fn=pipes_on_3_and_4,
            )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    # -- protocol ---------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DevToolsError(f"no message from the browser within {TIMEOUT:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise DevToolsError(f"the browser closed the pipe (exit code {self.process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        """The first event ``method`` of the page (kept ones first)."""
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and event.get("sessionId") == self.session:
                    return event
            seen = len(self.events)
            reply = self._read_message(deadline)
            if "method" in reply:
                self.events.append(reply)

    # -- page -------------------------------------------------------------------------------
    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def load(self, url: str) -> None:
        """Navigate and wait for the load event (every embedded image decoded or failed)."""
        self.events.clear()
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise DevToolsError(f"cannot open {url}: {reply['errorText']}")
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise DevToolsError(f"evaluation failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def console_errors(self) -> list[str]:
        """Errors the page logged: console.error/assert, uncaught exceptions, and the browser's
        own log entries of level error (failed loads, Content-Security-Policy violations)."""
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        return errors

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (DevToolsError, OSError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_browser()
    if executable is None:
        pytest.skip(
            "no Chromium or Chrome found (looked for " + ", ".join(BROWSERS) + " on PATH and $MGRAL_CHROMIUM); "
            "install one with: apt-get install -y chromium"
        )
    tmp = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(executable, tmp / "profile", tmp / "chromium.log")
    try:
        chromium.open_page()
    except (DevToolsError, OSError) as err:
        chromium.close()
        log = (tmp / "chromium.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"{executable} did not start a DevTools session: {err}\n{log}")
    yield chromium
    chromium.close()


PAGE_FACTS = """JSON.stringify((() => {
  const size = e => { const r = e.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  const images = [...document.images];
  return {
    title: document.title,
    curves: [...document.querySelectorAll('#curves figure img')].map(i => ({
      size: size(i), natural: [i.naturalWidth, i.naturalHeight], alt: i.alt })),
    labels: [...document.querySelectorAll('table.results tbody th.label')].map(e => e.textContent.trim()),
    resultsTable: size(document.querySelector('table.results')),
    timingsHeader: [...document.querySelectorAll('table.timings thead th')].map(e => e.textContent.trim()),
    mgralFigure: [...document.querySelectorAll('#mgral figure img')].map(i => [i.naturalWidth, ...size(i)]),
    mgralRows: document.querySelectorAll('table.mgral-summary tbody tr').length,
    thumbnails: [...document.querySelectorAll('#gallery .thumb img')].map(i => [i.naturalWidth, i.naturalHeight]),
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    scripts: document.scripts.length,
    text: document.body.innerText.length,
  };
})())"""


def test_report_html_loads_and_shows_curves_and_table_without_errors(browser, tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "out"
    write_report([run], out)
    started = time.monotonic()
    browser.load((out / "report.html").as_uri())
    facts = json.loads(browser.evaluate(PAGE_FACTS))
    elapsed = time.monotonic() - started

    assert facts["title"].startswith("Active-learning report")
    assert [label.split()[0] for label in facts["labels"]] == ["entropy-max", "mgral", "random"], facts["labels"]
    assert facts["resultsTable"][0] > 200 and facts["resultsTable"][1] > 50
    assert len(facts["curves"]) == 3
    for curve in facts["curves"]:
        assert curve["natural"][0] > 300 and curve["natural"][1] > 200, curve  # the SVG/PNG decoded
        assert curve["size"][0] > 300 and curve["size"][1] > 200, curve  # and is laid out visibly
    assert "label" in facts["timingsHeader"]
    assert facts["mgralFigure"] and facts["mgralFigure"][0][0] > 300
    assert facts["mgralRows"] == 2
    assert len(facts["thumbnails"]) >= 4 and all(0 < max(size) <= 160 for size in facts["thumbnails"])
    assert facts["broken"] == []
    assert facts["scripts"] == 0
    assert browser.console_errors() == []
    assert elapsed < 30

    from PIL import Image  # what a person sees: a screenshot with more than a blank page

    with Image.open(io.BytesIO(browser.screenshot())) as shot:
        assert shot.size[0] >= 1000
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50


def test_console_errors_are_caught(browser, tmp_path):
    """The error check above is not vacuous: a script error, console.error and a blocked
    load (the report's Content-Security-Policy forbids any URL) are all reported."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body>"
        "<script>console.error('deliberate'); undefinedFunction();</script></body></html>"
    )
    browser.load(page.as_uri())
    errors = browser.console_errors()
    assert any("deliberate" in e for e in errors), errors
    assert any("undefinedFunction" in e for e in errors), errors

    blocked = tmp_path / "blocked.html"
    blocked.write_text(
        "<!DOCTYPE html><html><head>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:">'
        '<title>blocked</title></head><body><img src="file:///nonexistent.png" alt="x"></body></html>'
    )
    browser.load(blocked.as_uri())
    assert any("Content Security Policy" in e for e in browser.console_errors()), browser.console_errors()
