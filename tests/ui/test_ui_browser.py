"""The web view in a real headless browser (the system's chromium, driven by Selenium through the system's
chromedriver; nothing is downloaded): from the tasks to a version to its lineage graph and back by a click on
a node, the compare page's charts drawn by plotly.js served from the installed package, stored markup shown as
text with no script run. Screenshots go to $ADAPTER_HUB_SCREENSHOTS, else the test's temporary folder."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ui_registry import HOSTILE_METRIC, XSS

pytest.importorskip("flask", reason="the web view needs the ui extra")
pytest.importorskip("plotly", reason="the web view needs the ui extra")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives chromium with selenium")

Demo = tuple[Path, dict[str, Any]]  # the registry's home and the refs ui_registry.fill returns
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
DOT = shutil.which("dot")  # without Graphviz the lineage page lists the edges instead of drawing them
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no headless browser: install chromium and chromedriver (apt install chromium chromium-driver)",
)


def _serve(home: Path) -> Iterator[str]:
    """The web view of the registry at HOME on a free loopback port, in a thread, until the generator ends."""
    from werkzeug.serving import make_server

    from adapter_hub.ui import create_app

    app = create_app(home, f"sqlite:///{home / 'hub.db'}")
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    app.config["REGISTRY"].close()


@pytest.fixture(scope="module")
def server(demo_home: Demo) -> Iterator[str]:
    yield from _serve(demo_home[0])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # selenium's manager never fetches a browser or a driver
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ADAPTER_HUB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver: Any, css: str, count: int = 1) -> list[Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= count)
    return driver.find_elements(By.CSS_SELECTOR, css)


def _no_alert(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is the check


def _errors(driver: Any) -> list[str]:
    """What the page logged as errors (a script that failed, a blocked resource, a CSP violation)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_click_from_a_task_to_a_version_to_its_lineage(server: str, browser: Any, shots: Path,
                                                       demo_home: Demo) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    _home, refs = demo_home
    browser.get(server + "/")
    assert browser.title.startswith("Tasks")
    browser.save_screenshot(str(shots / "tasks.png"))
    browser.find_element(By.LINK_TEXT, "digits-rotated").click()
    assert browser.find_element(By.TAG_NAME, "h1").text == "Task digits-rotated"
    browser.find_element(By.LINK_TEXT, "digits-rotated/lora-r4").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "table.versions tbody tr")
    assert len(rows) == 2 and "★" in rows[0].text  # newest first: v2 has the best test/accuracy
    browser.save_screenshot(str(shots / "versions.png"))
    browser.find_element(By.CSS_SELECTOR, "table.versions tbody tr:nth-child(1) td:nth-child(2) a").click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(refs["rotated"])
    assert "4" in browser.find_element(By.CSS_SELECTOR, "#config dd").text  # rank
    browser.find_element(By.ID, "verify").click()
    assert "matches its sha256" in _wait(browser, "#verified")[0].text
    browser.save_screenshot(str(shots / "version.png"))
    browser.find_element(By.LINK_TEXT, "lineage graph").click()
    if DOT is None:  # the page says why it draws nothing and lists the edges as links
        assert "Graphviz" in browser.find_element(By.ID, "graph-problem").text
        browser.save_screenshot(str(shots / "lineage.png"))
        browser.find_element(By.CSS_SELECTOR, f'#edges a[href$="{refs["merged"]}"]').click()
    else:
        nodes = _wait(browser, "#graph svg g.node")
        # v1 → v2 (finetuned), v2 → the transfer, v2 → the TIES combination
        assert len(nodes) == 4, [n.text for n in nodes]
        labels = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#graph svg g.edge text")}
        assert {"finetuned_from", "transferred_from"} <= labels
        assert any(t.startswith("composed_from w=") for t in labels)
        browser.save_screenshot(str(shots / "lineage.png"))
        browser.find_element(By.CSS_SELECTOR, f'#graph svg a[*|href$="{refs["merged"]}"]').click()  # a node
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(refs["merged"])
    recipe = browser.find_elements(By.CSS_SELECTOR, "#recipe tbody tr")
    assert len(recipe) == 3 and all("ties" in r.text for r in recipe)
    assert _errors(browser) == []


def test_compare_draws_a_chart_per_metric_and_a_curve_over_steps(server: str, browser: Any, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    picked = ["digits-rotated/lora-r4:1", "digits-rotated/lora-r4:2", "digits-rotated/probe:1"]
    browser.get(server + "/compare?task=digits-rotated&" + "&".join(f"ref={r}" for r in picked))
    charts = browser.find_elements(By.CSS_SELECTOR, "[data-figure]")
    assert len(charts) == 4  # test/accuracy, train/loss, val/accuracy bars + val/accuracy over steps
    _wait(browser, ".chart.drawn", len(charts))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".chart.bar .main-svg")) >= 3
    assert len(browser.find_elements(By.CSS_SELECTOR, ".chart.steps .scatterlayer .trace")) == 2
    best = browser.find_elements(By.CSS_SELECTOR, "#compare-table td.best")
    assert len(best) == 3
    browser.set_window_size(1280, 1500)  # the whole page: table, bars and the curve over steps
    browser.save_screenshot(str(shots / "compare.png"))
    browser.set_window_size(1280, 900)
    assert _errors(browser) == []


def test_stored_markup_shows_as_text_and_runs_nothing(server: str, browser: Any,
                                                      demo_home: Demo) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    _home, refs = demo_home
    browser.get(server + "/versions/" + refs["hostile"])
    _no_alert(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".description").text == XSS
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img")
    browser.get(server + "/compare?ref=" + refs["hostile"])
    _wait(browser, ".chart.drawn")
    _no_alert(browser)
    titles = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".chart .gtitle")]
    assert titles == [HOSTILE_METRIC]  # plotly shows the name literally, not as bold markup
    browser.get(server + "/lineage/" + refs["hostile"])
    _no_alert(browser)
    label = "#edges td" if DOT is None else "#graph g.edge text"
    assert "composed_from w=1 <i>m</i>" in {e.text for e in _wait(browser, label)}
    browser.get(server + "/")
    _no_alert(browser)
    assert XSS in browser.find_element(By.ID, "task-hostile").text
    assert _errors(browser) == []


@pytest.fixture(scope="module")
def real_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The web view over a registry filled by the demo itself (one epoch of everything: what the registry holds
    is the same, only the numbers are worse)."""
    from adapter_hub import demo
    from adapter_hub.registry import Hub

    home = tmp_path_factory.mktemp("demo")
    with Hub.open(home) as hub:
        demo.run_demo(hub, demo.DemoSettings(epochs=1, backbone_epochs=1, progress=False))
    yield from _serve(home)


def test_every_page_of_a_registry_the_demo_filled(real_demo: str, browser: Any, shots: Path) -> None:
    """Tasks → a task → its adapter → the version → its lineage (a click on the TIES node) → the combined
    adapter's recipe, then the compare page of the transfer against the fresh adapter."""
    from selenium.webdriver.common.by import By

    browser.get(real_demo + "/")
    tasks = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "h2 a")}
    assert {"digits-rotated", "digits-inverted", "digits-noisy", "digits-rotated-noisy", "digits-multitask"} <= tasks
    browser.save_screenshot(str(shots / "demo-tasks.png"))
    browser.find_element(By.LINK_TEXT, "digits-rotated").click()
    browser.find_element(By.LINK_TEXT, "digits-rotated/lora-r8").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "table.versions tbody tr")
    assert len(rows) == 1 and "demo" in rows[0].text and "★" in rows[0].text
    rows[0].find_element(By.CSS_SELECTOR, "td:nth-child(2) a").click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("digits-rotated/lora-r8:1")
    browser.find_element(By.ID, "verify").click()
    assert "matches its sha256" in _wait(browser, "#verified")[0].text
    browser.save_screenshot(str(shots / "demo-version.png"))
    browser.find_element(By.LINK_TEXT, "lineage graph").click()
    merged = "digits-multitask/ties-r24:1"
    if DOT is None:
        browser.find_element(By.CSS_SELECTOR, f'#edges a[href$="{merged}"]').click()
    else:
        nodes = _wait(browser, "#graph svg g.node")
        assert len(nodes) == 3, [n.text for n in nodes]  # the adapter, the TIES combination, the transfer
        labels = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#graph svg g.edge text")}
        assert "transferred_from" in labels and any(t.startswith("composed_from w=") for t in labels)
        browser.save_screenshot(str(shots / "demo-lineage.png"))
        browser.find_element(By.CSS_SELECTOR, f'#graph svg a[*|href$="{merged}"]').click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(merged)
    recipe = browser.find_elements(By.CSS_SELECTOR, "#recipe tbody tr")
    assert len(recipe) == 3 and all("ties" in r.text for r in recipe)
    picked = ["digits-rotated-noisy/lora-r8:1", "digits-rotated-noisy/lora-r8-transfer:1"]
    browser.get(real_demo + "/compare?task=digits-rotated-noisy&" + "&".join(f"ref={r}" for r in picked))
    charts = browser.find_elements(By.CSS_SELECTOR, "[data-figure]")
    assert len(charts) >= 2
    _wait(browser, ".chart.drawn", len(charts))
    assert browser.find_elements(By.CSS_SELECTOR, "#compare-table td.best")
    browser.save_screenshot(str(shots / "demo-compare.png"))
    assert _errors(browser) == []
