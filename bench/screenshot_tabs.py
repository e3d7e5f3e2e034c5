#!/usr/bin/env python3
"""Screenshot every tab of the Gradio demo with headless Chromium (selenium + chromedriver).

A documentation tool, not part of the pipeline: needs `pip install selenium` and Debian's
chromium + chromium-driver. Called by bench/screenshot_demo.sh.
"""

import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By


def main(url: str, out: Path, workdir: Path) -> None:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,1100"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options)
    try:
        driver.get(url)
        time.sleep(6)
        page = sorted((workdir / "datasets" / "test_images").glob("*.png"))[0]
        for name in ("Extraction", "Custom analysis", "Benchmarks"):
            tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name)
            tab.click()
            time.sleep(2)
            if name != "Benchmarks":
                upload = [i for i in driver.find_elements(By.CSS_SELECTOR, "input[type=file]")]
                visible = [i for i in upload if i.find_element(By.XPATH, "./ancestor::*[@role='tabpanel']").is_displayed()]
                (visible or upload)[0].send_keys(str(page))
                time.sleep(2)
                button = next(b for b in driver.find_elements(By.TAG_NAME, "button")
                              if b.text.strip() in ("Extract", "Analyze") and b.is_displayed())
                button.click()
                time.sleep(12)
            driver.save_screenshot(str(out / f"demo_{name.lower().replace(' ', '_')}.png"))
            print("saved", name)
    finally:
        driver.quit()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
