"""The labelling page in a real headless Chromium: label by key presses, kill the server mid-way,
restart it, finish, export the pairs.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the test
skips, except where SIPO_REQUIRE_BROWSER=1 (CI), where it fails. SIPO_UPDATE_SCREENSHOT=1 copies
the screenshot it takes to docs/label-page.png (the README shows it).
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from label_helpers import ROOT, start_cli, write_candidates
from PIL import Image, ImageDraw

from sipo_plugin.pairs.cli import main as sipo_pairs
from sipo_plugin.pairs.label.store import read_labels

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,760")

pytestmark = pytest.mark.slow


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = (f"no {', '.join(missing)}: apt-get install chromium chromium-driver "
                  f"(.ci/run installs them)")
        if os.environ.get("SIPO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _draw_candidates(folder: Path) -> None:
    """Prompt 0: 2 candidates (one a folder of frames), prompt 1: 3, prompt 2: 6 (Swiss).
    Redder is better: a consistent labeller prefers the higher candidate index."""
    records = write_candidates(folder, [2, 3, 6])
    for r in records:  # a disc on a dark ground, drawn large enough to look like a picture
        image = Image.new("RGB", (96, 96), (24, 26, 30))
        ImageDraw.Draw(image).ellipse((14, 14, 82, 82), fill=(60 + 38 * r.candidate_index, 70, 90))
        image.save(folder / r.path)
    frames = folder / "images" / "p00000-c01"
    frames.mkdir()
    for n in range(3):
        Image.open(folder / "images" / "p00000-c01.png").rotate(30 * n).save(frames / f"{n}.png")
    text = (folder / "candidates.jsonl").read_text()
    (folder / "candidates.jsonl").write_text(text.replace('"images/p00000-c01.png"',
                                                          '"images/p00000-c01"'))


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class Page:
    """The page as a labeller sees it: the pair shown, the count done, key presses."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver, self.by, self.wait = driver, By, WebDriverWait(driver, 30)

    def attr(self, name: str) -> str:
        return self.driver.find_element(self.by.TAG_NAME, "body").get_attribute(f"data-{name}") or ""

    def load(self, url: str) -> None:
        self.driver.get(url)
        self.wait.until(lambda _: self.attr("status") in ("ready", "finished"))

    def press(self, key: str) -> None:
        """Press `key` and wait for the page to show the server's answer."""
        before = (self.attr("done"), self.attr("pair"))
        self.driver.find_element(self.by.TAG_NAME, "body").send_keys(key)
        self.wait.until(lambda _: (self.attr("done"), self.attr("pair")) != before)

    def message(self) -> str:
        return self.driver.find_element(self.by.ID, "message").text


def _preferred(pair: str) -> str:
    from selenium.webdriver.common.keys import Keys
    left, right = pair.split("|")
    return Keys.ARROW_LEFT if left[-2:] > right[-2:] else Keys.ARROW_RIGHT


def test_label_in_chromium_kill_restart_finish_export(tmp_path):
    _need_browser()
    from selenium.webdriver.common.keys import Keys

    folder = tmp_path / "candidates"
    _draw_candidates(folder)
    server, url = start_cli(folder)
    driver = _browser(tmp_path / "profile")
    try:
        page = Page(driver)
        page.load(url)
        assert page.attr("pair").startswith("p00000-")  # prompt 0: a still and a frame loop
        frames = driver.find_element(page.by.CSS_SELECTOR, "#pair img[alt='p00000-c01']")
        seen = {frames.get_attribute("src")}
        page.wait.until(lambda _: seen.add(frames.get_attribute("src")) or len(seen) > 1)
        page.press("s")  # skip prompt 0's only pair
        shown = page.attr("pair")
        page.press(Keys.ARROW_DOWN)  # a tie, then undone: the same pair comes back
        page.press("u")
        assert page.attr("pair") == shown and page.attr("done") == "1"
        assert "undone" in page.message()
        while page.attr("pair").startswith("p00001-"):
            page.press(_preferred(page.attr("pair")))
        for _ in range(2):  # into the Swiss rounds of prompt 2
            page.press(_preferred(page.attr("pair")))
        driver.save_screenshot(str(tmp_path / "label-page.png"))
        done_before_kill = int(page.attr("done"))

        server.send_signal(signal.SIGKILL)  # killed: the next click is the one that is lost
        server.wait()
        driver.find_element(page.by.TAG_NAME, "body").send_keys(_preferred(page.attr("pair")))
        page.wait.until(lambda _: "not reachable" in page.message())
        assert len(read_labels(folder)[1]) == done_before_kill

        server, url = start_cli(folder)  # restart (another free port) and reload
        page.load(url)
        assert int(page.attr("done")) == done_before_kill
        while page.attr("status") == "ready":
            page.press(_preferred(page.attr("pair")))
        assert "Every planned pair is labelled" in driver.find_element(page.by.ID, "finished").text
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    shot = Image.open(tmp_path / "label-page.png")
    assert shot.size[0] >= 1000 and len(shot.convert("L").getcolors(1 << 16)) > 20
    if os.environ.get("SIPO_UPDATE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "label-page.png", ROOT / "docs" / "label-page.png")

    out = tmp_path / "pairs.jsonl"
    assert sipo_pairs(["make", "--candidates", str(folder), "--from-labels", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [
        ("p00001-c02", "p00001-c00"), ("p00002-c05", "p00002-c00")]  # prompt 0 was skipped
    assert all(r["source"] == "label" and (out.parent / r["chosen"]).is_file() for r in rows)
    assert "margin" not in rows[0]  # no reward scores in the folder: a label has no margin
