"""The annotation page in a real headless browser (Debian's Chromium driven by Selenium): it opens, a box drawn with
mouse events gets a mask, a proposal from the detection file is accepted, the export is read back by pycocotools.
Skipped, saying why, where Chromium, its driver or selenium is missing (`.ci/run` installs them when it can).
``OPENSEED_SCREENSHOT=docs/annotate.png`` keeps a screenshot of the page."""

import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pycocotools.coco import COCO

from openseed.annotate.__main__ import build_app
from openseed.annotate.server import serve

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coco_panoptic_sample" / "input_images" / \
    "000000142238.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("no Chromium or chromedriver on this machine (Debian: apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def app_url(tmp_path, tiny_model_file):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(PHOTO, root / "a.jpg")
    detections = {"images": [{"id": 1, "file_name": "a.jpg", "height": 427, "width": 640}],
                  "categories": [{"id": 1, "name": "horse"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [300, 120, 200, 250]}]}
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    args = SimpleNamespace(images=str(root), ckpt=str(tiny_model_file), vocabulary=["person", "horse"],
                           boxes=str(tmp_path / "detections.json"), out=str(tmp_path / "annotations.json"),
                           device="cpu", image_size=256, **{"import": None})
    app = build_app(args)
    httpd = serve(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}/", Path(args.out), app
    httpd.shutdown()
    httpd.server_close()
    app.session.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _status(driver, text, timeout=120):
    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.ID, "status").text)
    return driver.find_element(By.ID, "status").text


def test_draw_a_box_accept_a_proposal_export(app_url, browser):
    url, out, app = app_url
    browser.get(url)
    _status(browser, "encoded in")
    canvas = browser.find_element(By.ID, "canvas")
    assert browser.execute_script("return [arguments[0].width, arguments[0].height]", canvas) == [640, 427]
    scale = canvas.size["width"] / 640  # the page fits the picture to the stage
    assert scale > 1 and abs(canvas.size["height"] - 427 * scale) <= 1
    category = browser.find_element(By.ID, "category")
    category.send_keys("person")
    # a box from (100, 100) to (300, 400) in picture pixels; offsets are in screen pixels from the canvas's centre
    start = (round((100 - 320) * scale), round((100 - 213.5) * scale))
    ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold() \
        .move_by_offset(round(100 * scale), round(150 * scale)).move_by_offset(round(100 * scale), round(150 * scale)) \
        .release().perform()
    assert browser.find_element(By.ID, "pending-count").text == "1"
    category.send_keys(Keys.ENTER)
    _status(browser, "mask(s) in")
    items = browser.find_elements(By.CSS_SELECTOR, "#object-list li")
    assert len(items) == 1 and "person" in items[0].text
    assert not items[0].find_elements(By.CSS_SELECTOR, "button[data-act=accept]")  # drawn objects are accepted
    browser.find_element(By.ID, "propose").click()
    _status(browser, "1 proposal(s) to review")
    proposal = browser.find_element(By.CSS_SELECTOR, "#object-list li.proposed")
    assert "horse" in proposal.text
    proposal.find_element(By.CSS_SELECTOR, "button[data-act=accept]").click()
    WebDriverWait(browser, 60).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#object-list li.proposed"))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#image-list li").text == "a.jpg (2)")
    category.clear()
    category.send_keys("man")  # a new class for the drawn object: relabelled and decoded again
    browser.find_element(By.CSS_SELECTOR, "#object-list li button[data-act=relabel]").click()
    _status(browser, "is now man")
    assert "man" in browser.find_elements(By.CSS_SELECTOR, "#object-list li")[0].text
    if os.environ.get("OPENSEED_SCREENSHOT"):
        time.sleep(0.5)
        browser.save_screenshot(os.environ["OPENSEED_SCREENSHOT"])
    browser.find_element(By.ID, "export-rle").click()
    _status(browser, "exported 2 annotations")
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    assert [coco.loadCats(a["category_id"])[0]["name"] for a in anns] == ["man", "horse"]
    assert all(a["area"] > 0 and a["segmentation"]["size"] == [427, 640] for a in anns)
    drawn = app.session.store.objects("a.jpg")[0]  # the box as the mouse drew it, in picture pixels
    assert all(abs(a - b) <= 2 for a, b in zip(drawn.box, (100, 100, 300, 400), strict=True))
