"""The sign-in page's return address in headless Chromium against a real `triage api`: after signing in, the
browser goes back only to a page of this site, however the `next` parameter is encoded."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.support.api_process import ApiProcess
from tests.support.browser import (
    SIGN_IN_READY,
    chromium,  # noqa: F401 (the fixture)
    submit_token,
)
from tests.support.processes import wait_for

pytestmark = pytest.mark.slow
TOKEN = "tok-radiologist-" + "b" * 32


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    process = ApiProcess(folder, f"sqlite:///{folder / 'api.db'}", {"dr.grey": ("radiologist", TOKEN)}).start()
    yield process
    process.stop()


def address(browser) -> str:
    history = browser.send("Page.getNavigationHistory")
    return history["entries"][history["currentIndex"]]["url"]


def sign_in(browser, api: ApiProcess, next_parameter: str) -> str:
    """Opens the login page with ``?next=`` (as written, already URL-encoded), signs in, and returns where the
    browser went."""
    login = f"{api.url}/worklist/login?next={next_parameter}"
    browser.navigate(login)
    # The page's module script attaches its sign-in handler once it has read GET config.
    browser.wait("document.readyState === 'complete' && performance.getEntriesByType('resource')"
                 ".some(e => e.name.endsWith('/worklist/config'))")
    browser.wait(SIGN_IN_READY, what="the sign-in form, ready")  # enabled once the handler is attached
    submit_token(browser, TOKEN)
    return wait_for(lambda: (lambda url: url if "/worklist/login" not in url else None)(address(browser)), 20,
                    what="the browser to leave the login page")


@pytest.mark.parametrize("next_parameter", ["/%09/evil.example/", "/%5Cevil.example/", "/%0A/evil.example/",
                                            "/%5C%5Cevil.example/", "/.//evil.example/", "https://evil.example/"])
def test_after_sign_in_the_browser_never_leaves_the_site(chromium, api, next_parameter):  # noqa: F811
    went = sign_in(chromium, api, next_parameter)
    assert urlsplit(went).netloc == urlsplit(api.url).netloc, went


def test_after_sign_in_the_browser_returns_to_the_page_it_came_from(chromium, api):  # noqa: F811
    went = sign_in(chromium, api, "/worklist/study%3Fuid%3D1.2.3")
    assert went == f"{api.url}/worklist/study?uid=1.2.3"
