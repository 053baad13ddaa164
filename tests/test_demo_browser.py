"""The demo in a real browser: headless Chromium driven by selenium loads the page, picks a sample or
uploads an image, presses Compare, waits for the answers and overlays, and checks what a person sees:
the expected answer and the marks against it, the unused budget control greyed out, whole captions,
merged regions, the method descriptions, and a layout that holds on a 420 px phone screen.

Screenshots are saved under ``$VLPRUNE_TEST_ARTIFACTS`` (default: pytest's tmp_path) as
``demo-screenshot.png`` (desktop window) and ``demo-phone.png`` (the whole page, 420 px wide); with
``VLPRUNE_DEMO_SCREENSHOT=assets/demo-screenshot.png`` the desktop one is also written there
(scripts/demo-screenshot.sh regenerates the README's picture that way). Skipped, saying why, only when no
Chromium or chromedriver is installed (scripts/install-browser.sh installs both)."""
import os
import shutil
from pathlib import Path

import pytest

import vlprune
from demo_server import serve
from vlprune.eval import demo

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver on PATH; run scripts/install-browser.sh")

SAMPLES = {Path(path).name: (path, question, expected) for path, question, expected in demo.sample_examples()}
SCENE, PHOTO = "scene-000-color.jpg", "photo-chelsea-cat.jpg"

# Every element inside the screen, and no scroll box hiding content sideways (a table wider than its box).
OVERFLOW_JS = """
const width = document.documentElement.clientWidth, bad = [];
for (const e of document.querySelectorAll('body *')) {
  const r = e.getBoundingClientRect(), style = getComputedStyle(e);
  if (!r.width || !r.height || style.visibility === 'hidden') continue;
  const name = e.tagName + '#' + e.id + '.' + String(e.className).slice(0, 40);
  if (r.right > width + 1 || r.left < -1) bad.push(name + ' spans x ' + Math.round(r.left) + '..' + Math.round(r.right));
  if (['auto', 'scroll'].includes(style.overflowX) && e.clientWidth > 1 && e.scrollWidth > e.clientWidth + 1)
    bad.push(name + ' scrolls sideways: ' + e.scrollWidth + ' > ' + e.clientWidth);
}
return [document.documentElement.scrollWidth, width, bad];
"""
# Words (runs of non-space) that the browser laid out over more than one line: a mid-word break.
BROKEN_WORDS_JS = """
const broken = [];
for (const e of document.querySelectorAll(arguments[0])) {
  const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
  for (let t = walk.nextNode(); t; t = walk.nextNode()) {
    for (const m of t.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(t, m.index);
      range.setEnd(t, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (tops.size > 1) broken.push(m[0]);
    }
  }
}
return broken;
"""
# Gallery captions: (text, whether all of it is visible: nothing clipped, no one-line ellipsis).
CAPTIONS_JS = """
return [...document.querySelectorAll('#gallery .caption-label')].map(e => [e.innerText,
  e.scrollWidth <= e.clientWidth + 1 && e.scrollHeight <= e.clientHeight + 1 && getComputedStyle(e).whiteSpace !== 'nowrap']);
"""


@pytest.fixture(scope="module")
def url():
    repeats = int(os.environ.get("VLPRUNE_DEMO_REPEATS", "1"))  # more for a README screenshot
    with serve(demo.Engine.embedded("cpu", repeats=repeats)) as url:
        yield url


def chromium(width: int, height: int):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=opts)


@pytest.fixture
def browser():
    driver = chromium(1400, 1300)
    yield driver
    driver.quit()


@pytest.fixture
def phone():
    driver = chromium(420, 900)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def value(driver, elem_id) -> str:
    return css(driver, f"#{elem_id} input, #{elem_id} textarea").get_attribute("value")


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    driver.get(url)
    wait(driver, ready.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))


def pick_sample(driver, name):
    """Click a sample in the Samples table, the way a person does; it fills image, question and answer."""
    from selenium.webdriver.common.by import By

    _, question, expected = SAMPLES[name]
    row = driver.find_element(By.XPATH, f"//tr[td[contains(normalize-space(.), '{question}')]]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()", row)
    wait(driver, lambda d: value(d, "question") == question and value(d, "expected") == expected)
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))


def choose_methods(driver, names):
    from selenium.webdriver.common.by import By

    for label in driver.find_elements(By.CSS_SELECTOR, "#methods label"):
        box = label.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if (label.text.strip() in names) != box.is_selected():
            driver.execute_script("arguments[0].click()", box)
    checked = {label.text.strip() for label in driver.find_elements(By.CSS_SELECTOR, "#methods label")
               if label.find_element(By.CSS_SELECTOR, "input").is_selected()}
    assert checked == set(names), checked


def compare(driver, methods: int):
    """Press Compare; wait for the status and all overlays (the image + one per method)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    driver.execute_script("arguments[0].click()", css(driver, "#run"))
    wait(driver, ready.text_to_be_present_in_element((By.ID, "status"), "Done"))
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 1 + methods)
    return css(driver, "#status").text, css(driver, "#table").text


def save_screenshot(driver, tmp_path, name) -> Path:
    """The window's screenshot, scrolled to the top, under the artifacts folder."""
    driver.execute_script("window.scrollTo(0, 0)")
    artifacts = Path(os.environ.get("VLPRUNE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / name
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    return shot


def test_sample_compare_screenshot(url, browser, tmp_path):
    """Desktop: a sample scene, the default methods; the expected answer and the marks against it, whole
    captions; the screenshot the README shows."""
    open_page(browser, url)
    pick_sample(browser, SCENE)
    status, table = compare(browser, methods=2)
    captions = browser.execute_script(CAPTIONS_JS)
    shot = save_screenshot(browser, tmp_path, "demo-screenshot.png")
    if target := os.environ.get("VLPRUNE_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, target)

    assert status.startswith("Done: 2 method(s) at ratio=0.75"), status
    for row in ("unpruned", "fastervlm", "uniform", "256 → 64", "Expected answer: green"):
        assert row in table, table
    assert "unpruned green ✓" in table  # the sample's answer, unpruned, marked right
    assert len(captions) == 3 and all(whole for _, whole in captions), captions
    assert captions[0][0] == "unpruned: green ✓ · all 256 tokens"


def test_upload_ask_compare_forgets_the_samples_answer(url, browser):
    """An uploaded image is not a sample: the expected answer a sample had filled in is cleared, so the
    answers are not marked against it."""
    from selenium.webdriver.common.by import By

    path, question, _ = SAMPLES[SCENE]
    open_page(browser, url)
    pick_sample(browser, PHOTO)  # fills in "orange"
    css(browser, "#image input[type=file]").send_keys(path)
    wait(browser, lambda d: value(d, "expected") == "")
    textarea = css(browser, "#question textarea")
    textarea.clear()
    textarea.send_keys(question)
    status, table = compare(browser, methods=2)
    assert status.startswith("Done: 2 method(s)") and "unpruned green" in table, table
    assert "Expected answer" not in table and "✓" not in table and "✗" not in table
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 3


def test_phone_width_budget_controls_merges_and_descriptions(url, phone, tmp_path):
    """420 px wide: only the chosen budget control is active; a photograph with three merging methods and
    one that does not merge; answers marked against the expected answer; whole captions, merged regions
    said so; every method's one-line description; no mid-word break in any header or label, nothing
    wider than the screen and no sideways-scrolling box."""
    from selenium.webdriver.common.by import By

    open_page(phone, url)
    ratio_inputs = phone.find_elements(By.CSS_SELECTOR, "#ratio input")
    assert not css(phone, "#keep input").is_enabled() and all(i.is_enabled() for i in ratio_inputs)
    phone.execute_script("arguments[0].click()", css(phone, "#mode input[value=keep]"))
    wait(phone, lambda d: css(d, "#keep input").is_enabled() and not any(i.is_enabled() for i in d.find_elements(By.CSS_SELECTOR, "#ratio input")))
    phone.execute_script("arguments[0].click()", css(phone, "#mode input[value=ratio]"))
    wait(phone, lambda d: not css(d, "#keep input").is_enabled() and all(i.is_enabled() for i in d.find_elements(By.CSS_SELECTOR, "#ratio input")))

    phone.execute_script("arguments[0].click()", css(phone, "#method-notes button"))  # open the descriptions
    notes = css(phone, "#method-notes").text
    for name in vlprune.methods():
        assert f"{name}: {demo.method_summary(name)}" in notes, name
    assert "answers photographs poorly" in css(phone, "#samples-note").text

    pick_sample(phone, PHOTO)
    merging = ["pool", "prumerge_plus", "visionzip"]
    choose_methods(phone, ["fastervlm"] + merging)
    status, table = compare(phone, methods=4)
    assert status.startswith("Done: 4 method(s)"), status
    assert "Expected answer: orange" in table
    for name in ["unpruned", "fastervlm"] + merging:  # each row: name, answer (a word or more), mark
        row = next(line.split() for line in table.splitlines() if line.startswith(name + " "))
        mark = next(i for i, word in enumerate(row) if word in ("✓", "✗"))
        assert row[mark] == ("✓" if demo.is_correct(" ".join(row[1:mark]), "orange") else "✗"), row
    captions = phone.execute_script(CAPTIONS_JS)
    assert len(captions) == 5 and all(whole for _, whole in captions), captions
    for text, _ in captions[1:]:
        assert ("average a coloured, outlined region" in text) == text.startswith(tuple(merging)), text

    phone.set_window_size(420, phone.execute_script("return document.documentElement.scrollHeight") + 150)
    save_screenshot(phone, tmp_path, "demo-phone.png")  # the whole page, 420 px wide
    page_width, screen, bad = phone.execute_script(OVERFLOW_JS)
    assert screen <= 420 and page_width <= screen and not bad, (screen, bad)
    broken = phone.execute_script(BROKEN_WORDS_JS, "h1, h2, h3, th, td, label, button, [data-testid=block-info], #status")
    assert not broken, broken
