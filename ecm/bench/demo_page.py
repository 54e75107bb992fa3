"""Driving ``ecm-demo``'s page in a real headless browser (Selenium + Debian's chromium and chromedriver).

Used by the browser test and by ``benchmarks/demo.py`` (timings, the README's screenshot): upload a
condition, press Generate, and record in the page when each preview and the result appear.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: Counts the preview's image updates and stamps the first preview and the first result image (page clock, ms).
WATCH = """
window.__ecm = {previews: 0, first: null, result: null, t0: performance.now()};
const seen = new WeakSet();
new MutationObserver(() => {
  const img = document.querySelector('#preview img');
  if (img && img.src && img.src !== window.__ecm.last) {
    window.__ecm.last = img.src; window.__ecm.previews += 1;
    if (window.__ecm.first === null) window.__ecm.first = performance.now();
  }
  const out = document.querySelector('#result img');
  if (out && window.__ecm.result === null) window.__ecm.result = performance.now();
}).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


@dataclass
class PageRun:
    previews: int  # preview images the page showed
    first_preview_s: float  # from pressing Generate to the first preview shown
    result_s: float  # from pressing Generate to the first result image shown
    final_size: tuple[int, int]  # the result image's own pixels (width, height)


def browser(webdriver: ModuleType, width: int = 1400, height: int = 1250):
    """A headless chromium through chromedriver, both from Debian's packages."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=opts)


def drive_page(webdriver: ModuleType, url: str, cond: Path, screenshot: Path | None = None,
               timeout: float = 120) -> PageRun:
    """Open the page (waiting for the server), upload ``cond`` as the first control's map, press Generate, wait
    for the result; optionally save a screenshot of the page then."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(webdriver)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                driver.get(url)
                break
            except Exception:  # the server is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        wait = WebDriverWait(driver, timeout)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(Path(cond).resolve()))
        wait.until(lambda d: Path(cond).stem in d.find_element(By.CSS_SELECTOR, "[id^=cond-]").text)  # uploaded
        driver.execute_script(WATCH)
        button = driver.find_element(By.XPATH, "//button[normalize-space()='Generate']")
        t0 = driver.execute_script("return performance.now()")
        button.click()
        wait.until(lambda d: "per image" in d.find_element(By.ID, "status").text)
        state = driver.execute_script("return window.__ecm")
        size = driver.execute_script("const i = document.querySelector('#result img'); "
                                     "return [i.naturalWidth, i.naturalHeight]")
        if screenshot is not None:
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(screenshot))
        first = (state["first"] - t0) / 1000 if state["first"] is not None else float("inf")
        return PageRun(state["previews"], first, (state["result"] - t0) / 1000, tuple(size))
    finally:
        driver.quit()
