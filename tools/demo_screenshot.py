"""docs/demo.png, the README's screenshot: the chat demo serving a REAL trained adapter (base vs tuned), driven
through Debian's headless chromium. Run it after `make run` (it never runs in the test suite, which must not
rewrite committed files):

    .venv/bin/python tools/demo_screenshot.py                       # the newest adapter under runs/ -> docs/demo.png
    .venv/bin/python tools/demo_screenshot.py --adapter runs/default/adapter --out /tmp/demo.png
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium_driver(width: int = 1280, height: int = 900):
    """Debian's chromium through its own chromedriver, headless (Selenium downloads nothing); FileNotFoundError
    naming the packages when they are missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()):
        raise FileNotFoundError("needs Debian's chromium and chromium-driver (`apt-get install chromium "
                                "chromium-driver`)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def ask(driver, url: str, message: str, reference: str, timeout: float = 300) -> dict[str, str]:
    """Type `message` (and `reference`) into the demo at `url`, send, and wait until both sides show their
    scores -> {side: its info line}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea")).send_keys(message)
    driver.find_element(By.CSS_SELECTOR, "#reference textarea").send_keys(reference)
    driver.find_element(By.CSS_SELECTOR, "button#send").click()
    info = {}
    for side in ("base", "tuned"):
        wait.until(lambda d: re.search(r"similarity to your reference -?\d", d.find_element(By.ID, f"{side}-info").text))
        info[side] = driver.find_element(By.ID, f"{side}-info").text
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="", help="adapter or run folder (default: the newest under runs/)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    ap.add_argument("--message", default="What is a lighthouse?")
    ap.add_argument("--reference", default="A tower with a bright light that guides ships at night.")
    args = ap.parse_args()
    import chat
    app, url = chat.serve_demo(block=False, DEMO_ADAPTER=args.adapter)
    driver = chromium_driver()
    try:
        for side, line in ask(driver, url, args.message, args.reference).items():
            print(f"{side}: {line}")
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
