"""The page of `retlm serve` in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium): a search shows the database's nearest chunks; a generation streams with retrieval on and off
side by side, with the passages of each retrieval step beside the text and the shared spans highlighted.
What the page shows is compared with what the API answers for the same requests.

Marker ``browser`` (`make test-browser`). The screenshot is saved in the test's folder, and over
``docs/images/serve-page.png`` when ``RETLM_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import MODEL_ID, cca_backend, live_server

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# the text of a column as written: its retrieval-step markers (<sup>) taken out
TEXT_WITHOUT_MARKERS = """
const copy = document.getElementById(arguments[0]).cloneNode(true);
copy.querySelectorAll('.marker').forEach((m) => m.remove());
return copy.textContent;
"""
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "serve-page.png"


def chromium(width: int = 1600, height: int = 1200):
    """Headless Chromium through chromedriver, both from Debian (Selenium Manager is not used)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(DRIVER))


def drive(
    driver,
    url: str,
    query: str,
    prompt: str,
    max_tokens: int,
    timeout: float = 120,
    endpoint: str = "completions",
) -> dict:
    """Search for ``query`` and generate from ``prompt`` (``endpoint``: ``completions`` or ``chat``) on the
    page at ``url``, as a person would; returns what the page then shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    wait.until(ready.text_to_be_present_in_element((By.ID, "model-info"), "retrieval"))
    box = driver.find_element(By.ID, "query")
    box.send_keys(query)
    driver.find_element(By.ID, "search-button").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "search-status"), "chunks in"))
    results = [
        {
            "meta": item.find_element(By.CLASS_NAME, "meta").text,
            "text": item.find_element(By.CLASS_NAME, "passage").text,
        }
        for item in driver.find_elements(By.CSS_SELECTOR, "#results .result")
    ]
    Select(driver.find_element(By.ID, "endpoint")).select_by_value(endpoint)
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    for field, value in (("max-tokens", max_tokens), ("temperature", 0), ("repetition-penalty", 1)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    driver.find_element(By.ID, "generate-button").click()
    for side in ("on", "off"):
        wait.until(lambda d, side=side: d.find_element(By.ID, f"status-{side}").get_attribute("data-done"))
    return {
        "results": results,
        "on": driver.execute_script(TEXT_WITHOUT_MARKERS, "output-on"),
        "off": driver.execute_script(TEXT_WITHOUT_MARKERS, "output-off"),
        "status": [driver.find_element(By.ID, f"status-{s}").text for s in ("on", "off")],
        "steps": len(driver.find_elements(By.CSS_SELECTOR, "#steps .step")),
        "neighbors": len(driver.find_elements(By.CSS_SELECTOR, "#steps .neighbor")),
        "marks_in_text": len(driver.find_elements(By.CSS_SELECTOR, "#output-on mark")),
        "marks_in_passages": len(driver.find_elements(By.CSS_SELECTOR, "#steps mark")),
        "markers": len(driver.find_elements(By.CSS_SELECTOR, "#output-on .marker")),
    }


def test_the_page_searches_and_streams_with_its_passages(serve_paths, tmp_path):
    backend = cca_backend(serve_paths)
    db = backend.database
    prompt = db.chunk_text(40) + db.chunk_text(41)  # two chunks of the database: its own passages come back
    query = " ".join(db.chunk_text(12).split())  # one line, as a search box holds it
    with live_server(backend, max_tokens=64) as live:
        client = live.client()
        on = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=40, temperature=0)
        off = client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=40, temperature=0, extra_body={"retrieval": False}
        )
        driver = chromium()
        try:
            shown = drive(driver, live.url, query, prompt, max_tokens=40)
            driver.save_screenshot(str(tmp_path / "serve-page.png"))
        finally:
            driver.quit()
    found = db.search([query], 4)
    assert [r["meta"] for r in shown["results"]] == [
        f"{name} · chunk {i} · score {s:.3f}"
        for name, i, s in zip(found.doc_names[0], found.chunk_ids[0], found.scores[0], strict=True)
    ]
    assert [r["text"] for r in shown["results"]] == [t.strip("\n") for t in found.texts[0]]
    steps = on.model_extra["retrieval"]
    assert shown["on"] == prompt + on.choices[0].text
    assert shown["off"] == prompt + off.choices[0].text
    assert shown["steps"] == len(steps) == shown["markers"] > 2
    assert shown["neighbors"] == sum(len(s["neighbors"]) for s in steps)
    assert shown["marks_in_text"] > 0 and shown["marks_in_passages"] > 0  # the prompt's own chunks came back
    assert all(s.startswith("done: 40 tokens") for s in shown["status"])
    assert (tmp_path / "serve-page.png").stat().st_size > 10_000
    if os.environ.get("RETLM_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "serve-page.png", SCREENSHOT)
