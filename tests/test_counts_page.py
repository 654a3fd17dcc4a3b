"""The live page's counts view in headless Chromium: the real web app on 127.0.0.1 over a fake
hub holding known visits; the totals, legends and bars for each range and camera, the CSV link
and the refresh."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import chromium_page, keep_screenshot
from tests.fake_hub import FakeHub
from tests.test_web import call, serving

if TYPE_CHECKING:
    from playwright.sync_api import Page

TOKEN = "counts-token"
MINUTE, HOUR, DAY = 60, 3600, 86400
# (camera, seconds before the test starts, age, gender) of each stored visit.
VISITS = [
    ("door", 10 * MINUTE, 34.0, "female"),
    ("door", 20 * MINUTE, 8.0, "male"),
    ("lobby", 30 * MINUTE, 65.0, "unsure"),
    ("door", 5 * HOUR, 25.0, "male"),
    ("lobby", 6 * HOUR, None, None),
    ("lobby", 2 * DAY, 15.0, "female"),
    ("door", 3 * DAY, 45.0, "female"),
    ("door", 3 * DAY + HOUR, 50.0, "female"),
    ("door", 10 * DAY, 30.0, "male"),  # before every range the page offers
]
COLOURS = {
    "0-9": "#8dd3c7", "10-19": "#80b1d3", "20-39": "#fdb462", "40-59": "#fb8072",
    "60+": "#bc80bd", "unknown": "#dcdcdc",
}  # fmt: skip
GENDERS = ("male", "female", "unsure", "unknown")
# What the view shows for each pick, in the order picked: (range, camera ("": all), people,
# age groups and genders with people, the bars' part of the chart's label).
VIEWS = [
    ("day", "", 5, {"0-9": 1, "20-39": 2, "60+": 1, "unknown": 1},
     {"male": 2, "female": 1, "unsure": 1, "unknown": 1}, "24 bars of one hour"),
    ("hour", "", 3, {"0-9": 1, "20-39": 1, "60+": 1}, {"male": 1, "female": 1, "unsure": 1},
     "of one hour"),
    ("week", "door", 5, {"0-9": 1, "20-39": 2, "40-59": 2}, {"male": 2, "female": 3},
     "7 bars of one day"),
    ("week", "", 8, {"0-9": 1, "10-19": 1, "20-39": 2, "40-59": 2, "60+": 1, "unknown": 1},
     {"male": 2, "female": 4, "unsure": 1, "unknown": 1}, "7 bars of one day"),
]  # fmt: skip
RANGE_SECONDS = {"hour": HOUR, "day": DAY, "week": 7 * DAY}
LEGEND_ITEM = re.compile(r"^(\S+): (\d+) \((\d+)%\)$")


@pytest.fixture
def hub() -> FakeHub:
    hub = FakeHub()
    hub.add("rtsp://camera.local/stream", "door")
    hub.add("/videos/lobby.mp4", "lobby")
    now = time.time()
    for camera, ago_s, age, gender in VISITS:
        hub.add_visit(camera, now - ago_s, age, gender)
    return hub


def legend(page: Page, which: str) -> dict[str, int]:
    """A legend's count per key, read from the text the page shows ("20-39: 2 (40%)")."""
    counts = {}
    for text in page.locator(f"#legend-{which} li").all_inner_texts():
        match = LEGEND_ITEM.match(text.strip())
        assert match, f"legend item {text!r} is not 'key: count (share%)'"
        counts[match[1]] = int(match[2])
    return counts


def bar_pixels(page: Page) -> dict[str, int]:
    """Opaque pixels of the bar chart in each age group's colour."""
    return page.evaluate(
        """colours => {
            const c = document.getElementById('chart-age');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const found = {};
            for (const [group, hex] of Object.entries(colours)) {
                const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
                let n = 0;
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2]
                        && d[i + 3] === 255) n++;
                }
                found[group] = n;
            }
            return found;
        }""",
        COLOURS,
    )


def pick(page: Page, range_name: str, camera: str, people: int) -> None:
    """Picks a range and camera, and waits until the view shows `people` for that camera."""
    page.select_option("#counts-range", range_name)
    page.select_option("#counts-camera", camera)
    wait_for_total(page, people, camera)


def wait_for_total(page: Page, people: int, camera: str) -> None:
    page.wait_for_function(
        "([people, camera]) => document.getElementById('counts-total').textContent === people"
        " && document.getElementById('counts-span').textContent.endsWith(camera)",
        arg=[str(people), camera or "all cameras"],
        timeout=5_000,
    )


def check_view(page: Page, ages: dict[str, int], genders: dict[str, int], bars: str) -> None:
    """The legends give `ages` and `genders` (every key, 0 where not listed), the bars are drawn
    in the colours of the groups with people only, and the chart's label names `bars`."""
    every_age = dict.fromkeys(COLOURS, 0) | ages
    assert legend(page, "age") == every_age
    assert legend(page, "gender") == dict.fromkeys(GENDERS, 0) | genders
    drawn = bar_pixels(page)
    assert {group for group, n in drawn.items() if n > 50} == set(ages), drawn
    label = page.get_attribute("#chart-age", "aria-label") or ""
    assert f"{sum(ages.values())} people" in label and bars in label, label


def check_csv_link(page: Page, port: int, range_name: str, camera: str, people: int) -> None:
    """The link carries the shown range's query (and the token) and downloads its counts."""
    href = page.get_attribute("#counts-csv", "href") or ""
    parts = urlsplit(href)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert parts.path == "api/counts.csv" and query["token"] == TOKEN, href
    assert query["by"] == ("day" if range_name == "week" else "hour"), query
    assert query.get("camera", "") == camera, query
    start, end = (datetime.fromisoformat(query[key]).timestamp() for key in ("from", "to"))
    seconds = RANGE_SECONDS[range_name]
    assert seconds - 86400 < end - start <= seconds, query
    status, headers, data = call(port, "GET", f"/{href}")
    assert status == 200 and headers["content-disposition"].startswith("attachment")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert {row["camera"] for row in rows} <= ({camera} if camera else {"door", "lobby"})
    assert sum(int(row["people"]) for row in rows) == people


def test_given_known_visits_then_the_counts_view_shows_each_range_and_camera(
    hub: FakeHub, tmp_path: Path
):
    shot = tmp_path / "counts-view.png"
    with serving(hub, TOKEN) as port, chromium_page(1280, 1000) as page:
        page.clock.install()  # time runs, and can be moved on to the next refresh
        page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}", wait_until="load")
        cameras = page.locator("#counts-camera option")
        page.wait_for_function("() => document.querySelectorAll('#counts-camera option')"
                               ".length === 3", timeout=5_000)  # fmt: skip
        assert cameras.evaluate_all("o => o.map(x => [x.value, x.textContent])") == [
            ["", "All cameras"], ["door", "door"], ["lobby", "lobby"]
        ]  # fmt: skip
        for range_name, camera, people, ages, genders, bars in VIEWS:
            pick(page, range_name, camera, people)
            check_view(page, ages, genders, bars)
            check_csv_link(page, port, range_name, camera, people)
        page.screenshot(path=str(shot), full_page=True)
        with page.expect_download(timeout=5_000) as download:
            page.click("#counts-csv")
        assert re.fullmatch(
            r"agestream-counts-\d{8}T\d{6}Z-\d{8}T\d{6}Z\.csv", download.value.suggested_filename
        )
        hub.add_visit("lobby", time.time(), 70.0, "male")
        page.clock.fast_forward(31_000)  # the view refreshes every 30 s
        wait_for_total(page, 9, "")
        assert legend(page, "age")["60+"] == 2
    assert shot.stat().st_size > 20_000
    keep_screenshot(shot)
