"""The demo in a real browser: headless Chromium drives the Gradio page against the real API
server, as a reviewer would use it, and checks what the page renders.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs
them when missing, so in CI (``CI`` set) their absence fails the test, elsewhere it skips it.
The server serves the tiny model taught phase 3's lab page (conftest ``lab_page_model``): the
random stand-in cannot read a page, and a record whose fields have both a confidence and a box
is what the Extraction tab is for.

The screenshots in docs/screenshots are taken by these tests:

    MEDVL_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest tests/test_demo_browser.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from medvl.http.demo_ui import confidence_colour
from medvl.http.validate import free_port, running_server

from conftest import INVENTED_LAB, REPO, drawn_box, lab_page_document

WAIT_S = 120


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium, with the system's chromedriver (nothing downloaded)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs them")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1400,1400"):
        options.add_argument(flag)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


@contextlib.contextmanager
def demo_ui(api: str, workdir: Path):
    """The demo in its own process, talking to the API at ``api`` over HTTP; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    log = open(workdir / "logs" / "demo_ui_stdout.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "medvl.http.demo_ui", "--api-url", api,
                             "--port", url.rsplit(":", 1)[1]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, "the demo exited at start (logs/demo_ui_stdout.log)"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo did not answer in time"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def demo(phases_1_4, lab_page_model):
    """The API server on the taught model, and the demo (its own process) talking to it over HTTP."""
    with running_server(phases_1_4, extra_args=["--model", str(lab_page_model)]) as api, \
            demo_ui(api, phases_1_4) as url:
        yield url


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition, message=f"waiting for {what}")


def open_tab(driver, url: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    tab = wait_for(driver, lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                           if b.text.strip() == name), None), f"the {name} tab")
    tab.click()


def upload(driver, panel: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"{panel} input[type=file]"),
                     "the upload field")[0]
    field.send_keys(str(path))


def click_button(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button")
                                     if b.text.strip() == label and b.is_displayed()), None), label).click()


def table_rows(driver, table: str) -> list[list[str]]:
    """The rendered cells of a Gradio Dataframe, row by row (``data-testid="cell-R-C"``)."""
    from selenium.webdriver.common.by import By

    cells: dict[tuple[int, int], str] = {}
    for cell in driver.find_elements(By.CSS_SELECTOR, f"{table} [data-testid^='cell-']"):
        parts = cell.get_attribute("data-testid").split("-")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            cells[int(parts[1]), int(parts[2])] = cell.text.strip()
    rows = sorted({r for r, _ in cells})
    return [[cells.get((r, c), "") for c in range(1 + max(c for _, c in cells))] for r in rows]


def shown_images(driver, panel: str) -> list[Image.Image]:
    from selenium.webdriver.common.by import By

    sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, f"{panel} img")]
    return [Image.open(io.BytesIO(httpx.get(src, timeout=30).content)).convert("RGB")
            for src in sources if src and "/file=" in src]


def screenshot(driver, name: str) -> None:
    """Saved only when MEDVL_SCREENSHOTS names a folder (the docs' screenshots)."""
    if folder := os.environ.get("MEDVL_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"demo_{name}.png"))


def test_the_lab_page_shows_each_item_with_its_confidence_and_its_boxes_drawn(browser, demo, phases_1_4,
                                                                              tiny_settings):
    """Upload the lab page through the page, press Extract, and read what the browser shows:
    the item to review first (the invented lab, "not found" on the page), every lab the page
    shows with its confidence in [0, 1], and on the returned page image a box in the item's
    confidence colour around each lab value, where the generator drew it and where the plain
    page has no such colour."""
    doc = lab_page_document(tiny_settings)
    page = next((phases_1_4 / "datasets" / "test_images").glob("*lab_results*.png"))
    open_tab(browser, demo, "Extraction")
    upload(browser, "#document", page)
    wait_for(browser, lambda d: shown_images(d, "#pages"), "the page before extraction")
    click_button(browser, "Extract")
    rows = wait_for(browser, lambda d: [r for r in table_rows(d, "#items") if r[2].startswith("/lab_values/")],
                    "the extracted items")
    labs = doc.structured()["lab_values"]
    assert len(rows) == len(labs) + 1
    by_pointer = {row[2]: row for row in rows}
    invented = by_pointer[f"/lab_values/{len(labs)}"]
    assert invented[0] == "review" and invented[5].startswith("not found: name, value, unit")
    assert INVENTED_LAB["name"] in invented[3]
    reviewed = [row[0] == "review" for row in rows]
    assert reviewed == sorted(reviewed, reverse=True), "the items to review come first"
    confidences = {}
    for i, lab in enumerate(labs):
        row = by_pointer[f"/lab_values/{i}"]
        assert row[1] == "1" and lab["name"] in row[3] and lab["value"] in row[3], row
        confidences[i] = float(row[4])
        assert 0 <= confidences[i] <= 1 and (row[5] == "found" or row[5].startswith("not found: reference_range"))
    summary = browser.find_element("css selector", "#summary").text
    assert "1 page(s)" in summary and "item(s) to review" in summary

    drawn = wait_for(browser, lambda d: shown_images(d, "#pages"), "the page with its boxes")[0]
    plain = Image.open(page).convert("RGB")
    assert drawn.size == plain.size
    for i, lab in enumerate(labs):
        x0, y0, x1, y1 = drawn_box(doc, lab["name"], lab["value"])
        around = (int(x0) - 10, int(y0) - 10, int(x1) + 10, int(y1) + 10)
        colour = tuple(int(confidence_colour(confidences[i])[k:k + 2], 16) for k in (1, 3, 5))
        assert colour in set(drawn.crop(around).getdata()), (lab, colour)
        assert colour not in set(plain.crop(around).getdata())
    screenshot(browser, "extraction")


def test_a_pdf_is_shown_page_by_page(browser, demo, phases_1_4):
    """The test PDF phase 3 wrote: the gallery shows each of its pages once uploaded."""
    import pypdfium2

    pdf = next((phases_1_4 / "datasets" / "test_images").glob("*.pdf"))
    count = len(pypdfium2.PdfDocument(pdf.read_bytes()))
    assert count >= 2
    open_tab(browser, demo, "Extraction")
    upload(browser, "#document", pdf)
    shown = wait_for(browser, lambda d: (lambda images: images if len(images) >= count else None)(
        shown_images(d, "#pages")), f"{count} pages")
    assert len(shown) == count


def test_custom_analysis_answers_the_prompt_typed_in(browser, demo, phases_1_4):
    """The Custom analysis tab: a page and a prompt in, the model's answer and its latency out."""
    page = next((phases_1_4 / "datasets" / "test_images").glob("*prescription*.png"))
    open_tab(browser, demo, "Custom analysis")
    upload(browser, "[role=tabpanel]:not([style*='display: none'])", page)
    click_button(browser, "Analyze")
    from selenium.webdriver.common.by import By

    answer = wait_for(browser, lambda d: next((t.get_attribute("value") for t in d.find_elements(By.TAG_NAME, "textarea")
                                               if t.is_displayed() and t.get_attribute("value")
                                               and t.get_attribute("value") != "Summarise the key clinical findings."),
                                              None), "the answer")
    assert answer.strip()
    wait_for(browser, lambda d: "latency" in d.find_element(By.TAG_NAME, "body").text, "the latency line")
    screenshot(browser, "custom_analysis")


def test_benchmarks_tab_tables_the_stages_phases_3_and_4_measured(browser, demo):
    """The Benchmarks tab reads /benchmark: baseline and int4 rows with numbers, fine-tuned not run."""
    open_tab(browser, demo, "Benchmarks")
    rows = wait_for(browser, lambda d: [r for r in table_rows(d, "[role=tabpanel]") if r and r[0]
                                        in ("Baseline", "INT4 quantized", "Fine-tuned")], "the stage table")
    stages = {row[0]: row for row in rows}
    assert float(stages["Baseline"][1]) > 0 and float(stages["Baseline"][3]) > 0
    assert stages["Fine-tuned"][1] == "not run"
    screenshot(browser, "benchmarks")


REVIEW_KEY = "x9b0mO0Jp0H1o5l8yM2fS0tqH2xY6bXHk3r1Yl5m4bA="


def test_a_reviewer_corrects_a_dose_and_the_store_and_the_export_keep_it(browser, phases_1_4, tmp_path):
    """A prescription filed for review (the OCR + rules server, with a review store): in the
    Review tab the reviewer opens it, types the right dose of the first medication, names
    themself and saves. The database holds the correction under the reviewer's name, the
    export's training row has the corrected dose, and the audit log holds no value."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = next((phases_1_4 / "datasets" / "test_images").glob("*prescription*.png"))
    env = {"MEDVL_REVIEW_KEY": REVIEW_KEY, "MEDVL_DATABASE_URL": f"sqlite:///{tmp_path / 'review.db'}"}
    corrected = "999 mg"
    with running_server(phases_1_4, extra_args=["--model", "ocr", "--set", "api.review_store=true"], env=env) as api:
        filed = httpx.post(f"{api}/extract?review=true", files={"file": ("rx.png", page.read_bytes(), "image/png")},
                           timeout=120).json()
        doc_id, read_dose = filed["review_id"], filed["structured"]["medications"][0]["dose"]
        with demo_ui(api, phases_1_4) as url:
            open_tab(browser, url, "Review")
            wait_for(browser, lambda d: doc_id[:8] in d.find_element(By.CSS_SELECTOR, "#review-docs input")
                     .get_attribute("value"), "the filed document in the list")
            click_button(browser, "Open")
            rows = wait_for(browser, lambda d: table_rows(d, "#review-items"), "the items to review")
            row = next(i for i, r in enumerate(rows) if r[2] == "/medications/0" and r[3] == "dose")
            assert rows[row][4] == read_dose and rows[row][0] == "review"
            shown = wait_for(browser, lambda d: shown_images(d, "#review-pages"), "the filed page")
            assert shown[0].size == Image.open(page).size
            cell = browser.find_element(By.CSS_SELECTOR, f"#review-items [data-testid='cell-{row}-5']")
            ActionChains(browser).double_click(cell).perform()
            editor = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#review-items textarea"),
                              "the cell editor")[0]
            editor.send_keys(corrected, Keys.ENTER)
            browser.find_element(By.CSS_SELECTOR, "#reviewer textarea, #reviewer input").send_keys("dr.alice")
            click_button(browser, "Save review")
            status = wait_for(browser, lambda d: (lambda t: t if "saved" in t else None)(
                d.find_element(By.CSS_SELECTOR, "#review-status").text), "the save")
            assert "corrected" in status and "version 2" in status
            screenshot(browser, "review")

        kept = httpx.get(f"{api}/review/{doc_id}", timeout=30).json()
        assert kept["status"] == "corrected" and kept["reviewed_by"] == "dr.alice"
        assert {"pointer": "/medications/0/dose", "action": "correct", "value": corrected} in [
            {k: d[k] for k in ("pointer", "action", "value")} for d in kept["decisions"]]
        rows = [json.loads(line) for line in httpx.get(f"{api}/review/export", timeout=60).text.splitlines()]
        mine = next(r for r in rows if r["document_id"] == doc_id)
        assert mine["record"]["medications"][0]["dose"] == corrected
    audit = (phases_1_4 / "logs" / "audit.jsonl").read_text()
    assert '"/medications/0/dose"' in audit and corrected not in audit
