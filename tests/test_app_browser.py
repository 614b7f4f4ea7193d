"""The web demo in a real browser (slow): scripts/app.py on the shipped demo checkpoint, on a free loopback port,
driven by headless Chromium through selenium (Debian: `apt-get install chromium chromium-driver`). It uploads an
image and gets an answer, generates images and sees them in the gallery, scores them with the detector, opens the
explorer and clicks a patch, checks that the page fetched nothing but from the app (offline) and that a corrupt
upload is a message while the app keeps serving; the screenshots it saves are the README's (docs/img/app-*.png)."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mllm.synthetic import render, sample_scene

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "img"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1250")  # fmt: skip
missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
if missing:
    pytest.skip(f"{' and '.join(missing)} not on PATH (Debian: apt-get install -y chromium chromium-driver)",
                allow_module_level=True)  # fmt: skip
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (it is in the `app` extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """scripts/app.py on a free port; yields its URL once the page answers."""
    port, log = free_port(), tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "app.py"), "--port", str(port), "--device",
                                 "cpu"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            assert proc.poll() is None, f"scripts/app.py exited: {log.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the app did not answer in 2 minutes: {log.read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def wait(driver, seconds: float, condition, what: str):
    return WebDriverWait(driver, seconds, poll_frequency=0.5).until(lambda d: condition(d), message=what)


def screenshot(driver, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    driver.save_screenshot(str(SHOTS / name))


def open_tab(driver, name: str) -> None:
    tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name)
    tab.click()
    time.sleep(0.5)


def test_chat_generate_and_explore_in_a_browser(server, browser, tmp_path):
    image = tmp_path / "scene.png"
    render(sample_scene(np.random.default_rng(7)), 256).save(image)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(server)
    wait(browser, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-upload input[type=file]"), "page loaded")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and not [url for url in loaded if not url.startswith(server)], "the page fetched from elsewhere"

    # chat: upload, ask, an answer appears
    css(browser, "#chat-upload input[type=file]").send_keys(str(image))
    wait(browser, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-image img"), "the uploaded image shown")
    css(browser, "#question textarea").send_keys("How many shapes are there?")
    css(browser, "#ask").click()
    wait(browser, 120, lambda d: d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]"), "an answer")
    wait(browser, 120, lambda d: not d.find_elements(By.CSS_SELECTOR, "#chatbot .pending, #chatbot .generating"),
         "the answer finished")  # fmt: skip
    screenshot(browser, "app-chat.png")

    # generate: two images in the gallery, each with its seed, then the detector's verdict
    open_tab(browser, "Generate")
    count = css(browser, "#num-images input[type=number]")
    count.send_keys(Keys.CONTROL, "a")
    count.send_keys("2", Keys.TAB)
    css(browser, "#generate").click()
    wait(browser, 400, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2, "two generated images")
    assert "seed 0" in css(browser, "#gallery").text and "seed 1" in css(browser, "#gallery").text
    css(browser, "#score").click()
    wait(browser, 60, lambda d: "correct for" in css(d, "#verdict textarea").get_attribute("value"), "a verdict")
    screenshot(browser, "app-generate.png")

    # explorer: tokenize the upload, PSNR shown, a click on the code map names the patch
    open_tab(browser, "Tokenizer explorer")
    css(browser, "#explorer-upload input[type=file]").send_keys(str(image))
    wait(browser, 120, lambda d: "dB" in css(d, "#psnr").text, "PSNR")
    code_map = css(browser, "#code-map img")
    webdriver.ActionChains(browser).move_to_element_with_offset(code_map, -code_map.size["width"] // 4, 0).click().perform()
    wait(browser, 60, lambda d: "semantic code i" in css(d, "#patch textarea").get_attribute("value"), "patch info")
    screenshot(browser, "app-explorer.png")

    # a corrupt upload is a message in the page, and the app keeps serving
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    css(browser, "#explorer-upload button[aria-label=Clear]").click()
    wait(browser, 30, lambda d: d.find_elements(By.CSS_SELECTOR, "#explorer-upload input[type=file]"), "upload box")
    css(browser, "#explorer-upload input[type=file]").send_keys(str(broken))
    wait(browser, 60, lambda d: "cannot use broken.png" in d.find_element(By.TAG_NAME, "body").text, "an error toast")
    assert urllib.request.urlopen(server, timeout=5).status == 200
