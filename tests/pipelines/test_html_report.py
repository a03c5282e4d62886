"""`segfactory inspect --html`: a self-contained page, checked in a real headless Chromium
(Debian's chromium + chromium-driver, through Selenium): no console error, one card per sample,
the class filter changes what is shown. `.ci/run` installs the browser."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_dataset import CLASSES, write_dataset

from core import schema as S
from segfactory.cli import main

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _visible(driver) -> int:
    return sum(1 for c in driver.find_elements("css selector", ".card") if c.is_displayed())


def test_html_report_in_a_real_browser(browser, tmp_path, capsys):
    from selenium.webdriver.support.ui import Select

    root = tmp_path / "ds"
    masks = write_dataset(root, scores=True)
    rejected = pa.Table.from_pylist([{S.SAMPLE_ID: "bad/source", S.DROP_REASON: "corrupt_image: cannot decode",
                                      S.SOURCE_PATH: "/data/JPEGImages/bad.jpg", S.IMAGE: b"not an image"}])
    (root / "rejected").mkdir()
    pq.write_table(rejected, root / "rejected" / "part-abc-00000.parquet")
    page = tmp_path / "report.html"
    assert main(["inspect", str(root), "--html", str(page)]) == 0
    assert "rejected bad/source: corrupt_image: cannot decode (/data/JPEGImages/bad.jpg)" in capsys.readouterr().out
    browser.get(page.as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert _visible(browser) == len(masks)
    assert browser.find_element("id", "shown").text == f"{len(masks)} of {len(masks)} cards"
    # every fake mask holds all 4 classes; a class no card shows is not offered
    options = [o.text for o in Select(browser.find_element("id", "f-class")).options]
    assert options == ["all", *sorted(CLASSES)]
    Select(browser.find_element("id", "f-source")).select_by_visible_text("src_0_1")
    assert _visible(browser) == 1
    Select(browser.find_element("id", "f-source")).select_by_visible_text("all")
    Select(browser.find_element("id", "f-method")).select_by_visible_text("imgsyn")
    assert _visible(browser) == len(masks)
    text = browser.find_element("tag name", "body").text
    assert "score_clip (10 rows" in text and "/data/JPEGImages/bad.jpg" in text and "corrupt_image" in text


def test_class_filter_changes_the_cards(browser, tmp_path):
    """Masks with different classes: picking a class shows exactly the cards that hold it."""
    import numpy as np
    from fake_dataset import _png

    from pipelines.html_report import dataset_report, render_html

    root = tmp_path / "ds"
    write_dataset(root, n_shards=1, rows=2)
    shard = next((root / "shards").iterdir())
    table = pq.read_table(shard).to_pylist()
    for i, row in enumerate(table):  # card 0: background + circle only; card 1: background + square
        row[S.MASK] = _png(np.full((12, 16), 1 + i, np.uint8) * (np.arange(16) % 2)[None, :].astype(np.uint8))
    pq.write_table(pa.Table.from_pylist(table), shard)
    page = tmp_path / "r.html"
    page.write_text(render_html(dataset_report(root)))
    browser.get(page.as_uri())
    assert _visible(browser) == 2
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "f-class")).select_by_visible_text("square")
    assert _visible(browser) == 1 and browser.find_element("id", "shown").text == "1 of 2 cards"
    Select(browser.find_element("id", "f-class")).select_by_visible_text("background")
    assert _visible(browser) == 2


def test_source_dataset_and_sweep_pages(tmp_path, capsys):
    import json
    import re

    from pipelines.html_report import sweep_html
    from pipelines.toy_data import make_toy_dataset

    src = make_toy_dataset(tmp_path / "voc", n_train=5, n_val=2, size=32)
    (src / "SegmentationClass" / "toy_train_00001.png").unlink()
    assert main(["inspect", str(src), "--format", "voc", "--html", str(tmp_path / "s.html")]) == 0
    out = capsys.readouterr().out
    assert "4 rows, 1 the index rejected" in out
    page = (tmp_path / "s.html").read_text()
    cards = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))["cards"]
    assert [c["id"] for c in cards] == ["toy_train_00000", "toy_train_00002", "toy_train_00003", "toy_train_00004"]
    assert "missing_mask" in page and "toy_train_00001.jpg" in page
    assert main(["inspect", str(src / "JPEGImages"), "--format", "voc"]) == 2  # one level off: a hint
    assert "one level up" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.csv").write_text("trial,volume,p_aug,seed,miou\nt0,0,0.0,0,0.5\nt1,150,0.5,0,0.55\n")
    html = sweep_html(sweep)
    assert html.count("<tr>") == 3 and "2 trials" in html and "0.55" in html


def test_predict_color_png_keeps_ids_and_shows_voc_colours():
    import io

    import numpy as np
    from PIL import Image

    from actors.colormap import voc_palette
    from training.predict import color_png

    pred = np.array([[0, 1], [2, 15]])
    im = Image.open(io.BytesIO(color_png(pred, 21)))
    assert im.mode == "P" and np.array(im).tolist() == pred.tolist()
    rgb = np.array(im.convert("RGB"))
    assert rgb[1, 1].tolist() == voc_palette(256)[15].tolist() and rgb[0, 1].tolist() == [128, 0, 0]
