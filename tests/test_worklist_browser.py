"""The worklist page in headless Chromium, against the real API process and real Postgres.

A radiologist signs in with a token; the worklist shows a STAT phantom study (processed by the real pipeline)
above two routine studies that arrived earlier; a study processed while the page is open appears without a
reload. Screenshots go to test-output/worklist/. Chromium is Debian's, driven over the DevTools protocol.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import insert

from sql.database import make_engine, upgrade
from sql.schema import predictions, processing_runs, studies, utcnow
from tests.conftest import free_port, wait_for
from tests.test_publishers import ingest
from worker.config import load_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-output" / "worklist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "radiologist-token-for-the-browser-test"
ROWS = "document.querySelectorAll('#worklist tbody tr')"


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol (a websocket, JSON messages)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1400,900")

    def __init__(self, profile: Path) -> None:
        import websocket

        self.process = subprocess.Popen([CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
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
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (run ops/setup.sh)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[test]')")
    browser = Chromium(tmp_path / "chromium-profile")
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from models.bundle import random_bundle, save_bundle

    folder = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)
    return folder


def routine_study(engine, description: str, waiting: timedelta, finding: str, probability: float) -> str:
    """A study read by the AI as routine some time ago (rows as the pipeline leaves them)."""
    uid, arrived = generate_uid(), utcnow() - waiting
    with engine.begin() as c:
        study_id = c.execute(insert(studies).values(
            study_instance_uid=uid, accession_number=f"R{uid[-8:]}", study_description=description,
            modalities="MR", status="done", version=1, instance_count=40, first_received_at=arrived,
            last_received_at=arrived + timedelta(minutes=2))).inserted_primary_key[0]
        run_id = c.execute(insert(processing_runs).values(
            study_id=study_id, study_version=1, pipeline="neuro_mri", status="done", attempts=1,
            priority="routine", model_name="prima", model_version="tiny",
            last_image_at=arrived + timedelta(minutes=2),
            finished_at=arrived + timedelta(minutes=5))).inserted_primary_key[0]
        c.execute(insert(predictions), [
            {"run_id": run_id, "kind": "diagnosis", "label": finding, "probability": probability,
             "threshold": 0.5, "reported": 1},
            {"run_id": run_id, "kind": "priority", "label": "none", "probability": 0.9, "threshold": None,
             "reported": 0}])
    return uid


def process(settings, engine, files, priority: str) -> str:
    """Run the real pipeline on a phantom study. The tiny random model has no clinical opinion, so the
    clinical priority map makes every output of it read as ``priority``: this test is about the service, not
    accuracy."""
    from worker.pipelines.neuro_mri import NeuroMriPipeline
    from worker.run_book import RunBook

    settings.model.priority_map = {k: priority for k in ("none", "low", "medium", "high")}
    run_id = ingest(engine, files)
    outcome = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=lambda _: None)).process(run_id)
    assert outcome.status == "done", outcome
    return outcome.result.study_instance_uid


def rows(browser: Chromium) -> list[tuple[str, str]]:
    return [tuple(r) for r in browser.evaluate(
        f"[...{ROWS}].map(r => [r.dataset.studyUid, r.dataset.priority])")]


def test_the_worklist_puts_a_stat_study_first_and_shows_new_results_without_a_reload(
        tmp_path, tmp_path_factory, postgres_url, tiny_bundle, chromium):
    from train.phantoms import write_phantom_study

    bleed = write_phantom_study(tmp_path_factory.mktemp("bleed"), lesion="subdural_haemorrhage", seed=11)
    tumour = write_phantom_study(tmp_path_factory.mktemp("tumour"), lesion="tumour", seed=5)
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    config = {"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
              "model": {"bundle": str(tiny_bundle), "device": "cpu"},
              "api": {"port": port, "tokens": [{"name": "dr-house", "role": "radiologist",
                                                "token_file": str(tmp_path / "token")}]},
              "worklist": {"poll_interval_s": 1}}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(tmp_path / "triage.yaml", environ={})
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    oldest = routine_study(engine, "MRI HEAD ROUTINE FOLLOW-UP", timedelta(hours=3, minutes=10),
                           "structural_cerebral_atrophy", 0.31)
    older = routine_study(engine, "MRI BRAIN HEADACHE", timedelta(hours=1, minutes=45), "cyst_arachnoid_cyst",
                          0.22)
    stat_uid = process(settings, engine, bleed.files, "stat")  # arrives last, read first

    env = {**os.environ, "TRIAGE_CONFIG": str(tmp_path / "triage.yaml")}
    api = subprocess.Popen([sys.executable, "-m", "worker.cli", "api"], cwd=REPO, env=env,
                           start_new_session=True, stdout=(tmp_path / "api.log").open("wb"),
                           stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def api_up() -> bool:
        assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(api_up, 60, what="the API to answer")
        chromium.navigate(f"{base}/worklist/")
        chromium.wait("location.pathname.endsWith('/worklist/login') "
                      "&& document.querySelector('#login')?.disabled === false", what="the login page, ready")
        chromium.type_into("#token", "not-the-token")
        chromium.click("#login")
        chromium.wait("!document.querySelector('#login-error').hidden", what="the refusal of a wrong token")
        assert "not accepted" in chromium.evaluate("document.querySelector('#login-error').textContent")
        chromium.screenshot(SCREENSHOTS / "1-login-refused.png")

        chromium.type_into("#token", TOKEN)
        chromium.click("#login")
        chromium.wait(f"{ROWS}.length === 3", what="three studies listed")
        chromium.wait("document.querySelector('#user').textContent.includes('dr-house')",
                      what="the user's name")
        assert rows(chromium) == [(stat_uid, "stat"), (oldest, "routine"), (older, "routine")]
        first = chromium.evaluate("document.querySelector('#worklist tbody tr').innerText")
        assert "STAT" in first and "%" in first and "SR" in first
        assert "3 h 10 min" in chromium.evaluate(f"{ROWS}[1].innerText")
        assert chromium.evaluate("sessionStorage.getItem('triage.worklist.token')") == TOKEN
        chromium.screenshot(SCREENSHOTS / "2-worklist.png")

        chromium.evaluate("window.stillTheSamePage = true")
        urgent_uid = process(settings, engine, tumour.files, "urgent")
        # While it is processed the page may already list it as "AI pending"; then its result arrives.
        chromium.wait(f"[...{ROWS}].some(r => "
                      f"r.dataset.studyUid === '{urgent_uid}' && r.dataset.priority === 'urgent')",
                      timeout=15, what="the new study's result to appear")
        assert chromium.evaluate("window.stillTheSamePage === true"), "the page was reloaded"
        assert rows(chromium) == [(stat_uid, "stat"), (urgent_uid, "urgent"), (oldest, "routine"),
                                  (older, "routine")]
        assert chromium.evaluate(f"{ROWS}[1].classList.contains('new')")  # highlighted as new
        chromium.screenshot(SCREENSHOTS / "3-new-study-without-reload.png")

        chromium.click("#worklist tbody tr a.detail")
        chromium.wait("!!document.querySelector('#findings table')", what="the study page")
        text = chromium.evaluate("document.querySelector('#detail').innerText")
        assert stat_uid in text and "Download the SR" in text
        chromium.screenshot(SCREENSHOTS / "4-study.png")
        assert not [line for line in chromium.console if "Error" in line], chromium.console
    finally:
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(20)
        engine.dispose()
