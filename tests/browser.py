"""A headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium, for the HTML
report tests: open a page, collect its console errors, measure each plotly figure, save a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Each plotly figure: its div id, the size of its main SVG, and the traces plotly drew.
_FIGURES = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => {
  const svg = d.querySelector('svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {id: d.id, width: box.width, height: box.height, traces: (d._fullData || []).length};
});
"""


_READY = (
    "return document.readyState === 'complete' && Array.from("
    "document.querySelectorAll('.plotly-graph-div')).every(d => d._fullLayout !== undefined)"
)


def missing() -> str | None:
    """Why no browser check can run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (Debian: apt-get install chromium chromium-driver)"
    return None


def open_pages(pages: list[Path], shots: Path, width: int = 1280, height: int = 2000) -> list[dict[str, Any]]:
    """Load each page in one headless Chromium, wait for its figures and save a ``width`` x ``height``
    screenshot as ``shots/<page name>.png``; per page: {"errors": console messages at level SEVERE,
    "figures": each figure's id, SVG size and traces drawn, "screenshot": its path}."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root (CI containers)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    out = []
    try:
        for page in pages:
            driver.get(page.resolve().as_uri())
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(_READY))
            shot = shots / f"{page.stem}.png"
            figures = driver.execute_script(_FIGURES)
            driver.save_screenshot(str(shot))
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            out.append({"errors": errors, "figures": figures, "screenshot": shot})
    finally:
        driver.quit()
    return out
