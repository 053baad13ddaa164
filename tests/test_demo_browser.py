"""The demo in a real browser: headless Chromium driven by selenium loads the page, uploads a sample image,
types a question, presses Compare, waits for the answers and overlays, and takes a screenshot.

The screenshot is saved under ``$VLPRUNE_TEST_ARTIFACTS`` (default: pytest's tmp_path) as
``demo-screenshot.png``; with ``VLPRUNE_DEMO_SCREENSHOT=assets/demo-screenshot.png`` it is also written there
(scripts/demo-screenshot.sh regenerates the README's picture that way). Skipped, saying why, only when no
Chromium or chromedriver is installed (scripts/install-browser.sh installs both)."""
import os
import shutil
from pathlib import Path

import pytest

from demo_server import serve
from vlprune.eval import demo

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver on PATH; run scripts/install-browser.sh")


@pytest.fixture(scope="module")
def url():
    repeats = int(os.environ.get("VLPRUNE_DEMO_REPEATS", "1"))  # more for a README screenshot
    with serve(demo.Engine.embedded("cpu", repeats=repeats)) as url:
        yield url


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1400,1300"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_upload_ask_compare_screenshot(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    image, question = demo.sample_examples()[0]
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    upload = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(image)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image img")))  # the preview: upload done
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    browser.find_element(By.ID, "run").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Done"))
    status = browser.find_element(By.ID, "status").text
    table = browser.find_element(By.ID, "table").text
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 3)  # image + 2 overlays

    artifacts = Path(os.environ.get("VLPRUNE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "demo-screenshot.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("VLPRUNE_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, target)

    assert status.startswith("Done: 2 method(s) at ratio=0.75"), status
    for row in ("unpruned", "fastervlm", "uniform", "256 → 64"):
        assert row in table, table
    assert "green" in table  # the sample's answer, unpruned
