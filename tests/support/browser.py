"""What the browser tests share: headless Chromium driven over the DevTools protocol, a real `triage api`
process to point it at, the sign-in form, and the worklist page's rows selector and screenshot folder."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import REPO, start_process, stop_process, wait_for

SCREENSHOTS = REPO / "test-output" / "worklist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROWS = "document.querySelectorAll('#worklist tbody tr')"
#: True once the sign-in page has read its configuration and enabled its button.
SIGN_IN_READY = "document.querySelector('#login')?.disabled === false"


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol (a websocket, JSON messages)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1400,900")

    def __init__(self, profile: Path) -> None:
        import websocket

        self.process = start_process([CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30,
                 what="Chromium's DevTools port")
        port = int(port_file.read_text().split()[0])

        def page_target():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        self.socket = websocket.create_connection(wait_for(page_target, 30, what="a page"), timeout=30,
                                                  suppress_origin=True)
        self.ids = itertools.count(1)
        self.console: list[str] = []
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params):
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                             for a in message["params"]["args"]))
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(message["params"]["exceptionDetails"]))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20, what: str | None = None):
        return wait_for(lambda: self.evaluate(expression), timeout, interval=0.2, what=what or expression)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.evaluate(f"document.querySelector({json.dumps(selector)}).value = ''")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            stop_process(self.process)


@pytest.fixture
def chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (run ops/setup.sh)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[test]')")
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.close()



def submit_token(browser: Chromium, token: str) -> None:
    """Type the token into the sign-in form and press its button (the form must be ready: SIGN_IN_READY)."""
    browser.type_into("#token", token)
    browser.click("#login")


class ApiServer:
    """`triage api` with a given configuration file, in a process group of its own, for a browser."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config, self.log = config, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> ApiServer:
        """Start it and wait until /healthz answers (it is stopped again if it does not)."""
        env = {**os.environ, "TRIAGE_CONFIG": str(self.config)}
        with self.log.open("wb") as out:
            self.process = start_process([sys.executable, "-m", "worker.cli", "api"], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, 60, what="the API to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, grace_s=20)
        self.process = None
