"""The drawing page in a real browser: Debian's headless Chromium, driven by Selenium."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import serving

from flaxdigits.predict import Predictor
from flaxdigits.serve import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("FLAXDIGITS_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))

if not (CHROMIUM and CHROMEDRIVER):
  if os.environ.get("CI"):
    pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)",
                pytrace=False)
  pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium "
              "chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Every test here that uses the one-epoch real-MNIST checkpoint runs on one xdist worker, which
# trains it once.
pytestmark = pytest.mark.xdist_group("real_checkpoint")


@pytest.fixture(scope="module")
def server(real_checkpoint):
  with serving(create_app(Predictor.from_checkpoint(real_checkpoint))) as url:
    yield url + "/"


@pytest.fixture(scope="module")
def browser():
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=800,760"):
    options.add_argument(arg)
  os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
  yield driver
  driver.quit()


def ink_runs(digit_28x28: np.ndarray, threshold: int = 128) -> list[tuple[int, int, int]]:
  """The digit as pen strokes: each row's runs of ink, (row, first column, last column)."""
  runs = []
  for r, row in enumerate(digit_28x28 > threshold):
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs += [(r, int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]
  return runs


def draw(driver, pad, digit_28x28: np.ndarray, kind: str) -> None:
  """Draws with pointer events: pointerdown, pointermove, pointerup for each stroke."""
  scale = pad.size["width"] * 0.75 / 20  # MNIST's 20-pixel box spans 3/4 of the pad
  ab = ActionBuilder(driver, mouse=PointerInput(kind, kind), duration=0)
  for r, c0, c1 in ink_runs(digit_28x28):
    y = round((r - 14) * scale)
    ab.pointer_action.move_to(pad, round((c0 - 14) * scale), y)
    ab.pointer_action.pointer_down()
    ab.pointer_action.move_to(pad, round((c1 - 14) * scale), y)
    ab.pointer_action.pointer_up()
  ab.perform()


def answer(driver) -> str:
  digit = driver.find_element(By.ID, "digit")
  WebDriverWait(driver, 20).until(lambda d: digit.get_attribute("data-state") == "done")
  time.sleep(0.3)  # a request scheduled by the last stroke may still be on its way
  WebDriverWait(driver, 20).until(lambda d: digit.get_attribute("data-state") == "done")
  return digit.text


@pytest.mark.slow
def test_drawn_mnist_digits_are_recognised(server, browser, mnist):
  browser.get(server)
  pad = browser.find_element(By.ID, "pad")
  test = mnist["test"]
  kinds = (interaction.POINTER_MOUSE, interaction.POINTER_TOUCH, interaction.POINTER_PEN)
  shown = []
  for i in range(10):
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text == "?"
    draw(browser, pad, test.images[i], kinds[i % 3])
    shown.append(answer(browser))
    if i == 0:
      assert browser.find_element(By.ID, "seen").get_attribute("src").startswith("data:image/png")
      widths = [b.value_of_css_property("width")
                for b in browser.find_elements(By.CSS_SELECTOR, ".bars .fill")]
      assert len(widths) == 10 and any(w != "0px" for w in widths)
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  browser.save_screenshot(str(ARTIFACTS / "serve.png"))
  labels = [str(y) for y in test.labels[:10]]
  assert sum(a == b for a, b in zip(shown, labels)) >= 9, (shown, labels)


@pytest.mark.slow
def test_page_fits_a_phone_screen(server, browser):
  browser.set_window_size(390, 844)
  try:
    browser.get(server)
    fits = browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    pad = browser.find_element(By.ID, "pad")
    assert fits and 200 <= pad.size["width"] <= 390
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_phone.png"))
  finally:
    browser.set_window_size(800, 760)


def phone_photo(digit_28x28: np.ndarray, path: Path) -> None:
  """A 12-megapixel phone photo of a digit on paper, stored turned with EXIF orientation 6 and
  noisy enough to be over the server's 5 MB upload limit as a file."""
  from PIL import Image
  rng = np.random.default_rng(0)
  ink = np.asarray(Image.fromarray(digit_28x28).resize((1400, 1400), Image.BICUBIC), np.float32)
  page = np.full((3000, 4000), 225, np.float32)
  page[800:2200, 1300:2700] -= 190 * ink / 255
  page += rng.normal(0, 10, page.shape).astype(np.float32)
  upright = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).convert("RGB")
  exif = Image.Exif()
  exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
  upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=97, exif=exif)


@pytest.mark.slow
def test_a_large_phone_photo_is_shrunk_in_the_browser_and_recognised(server, browser, small,
                                                                     tmp_path):
  from flaxdigits.serve import MAX_UPLOAD_BYTES
  browser.get(server)
  upload = browser.find_element(By.ID, "upload")
  test = small["test"]
  for i in (0, 1):
    photo = tmp_path / f"photo{i}.jpg"
    phone_photo(test.images[i], photo)
    assert photo.stat().st_size > MAX_UPLOAD_BYTES  # as a file, the server would refuse it
    browser.find_element(By.ID, "clear").click()
    upload.send_keys(str(photo))
    assert answer(browser) == str(test.labels[i])
    assert browser.find_element(By.ID, "error").text == ""


@pytest.mark.slow
def test_refusals_are_said_in_words(server, browser, tmp_path):
  browser.get(server)
  notes = tmp_path / "notes.png"
  notes.write_text("not a picture at all")
  browser.find_element(By.ID, "upload").send_keys(str(notes))
  error = browser.find_element(By.ID, "error")
  WebDriverWait(browser, 20).until(lambda d: error.text != "")
  assert "not a picture the server can read" in error.text
  assert browser.find_element(By.ID, "digit").text == "?"


@pytest.mark.slow
def test_a_non_digit_gets_words_not_a_number(server, browser, real_checkpoint, tmp_path):
  """A picture the model rejects (the first of a few shapes and letters that it does) is
  answered with a sentence and no digit."""
  from PIL import Image

  from flaxdigits import outliers
  predictor = Predictor.from_checkpoint(real_checkpoint)
  rendered = outliers.render(12, 11, kinds=("shape", "glyph"))
  path = None
  for i, image in enumerate(rendered):
    candidate = tmp_path / f"shape{i}.png"
    Image.fromarray(255 - image).resize((168, 168), Image.BILINEAR).save(candidate)
    if predictor.predict([str(candidate)])[0].rejected:
      path = candidate
      break
  assert path is not None, "the model rejected none of 12 shapes and letters"
  browser.get(server)
  browser.find_element(By.ID, "upload").send_keys(str(path))
  digit = browser.find_element(By.ID, "digit")
  WebDriverWait(browser, 20).until(lambda d: digit.get_attribute("data-state") == "rejected")
  assert digit.text == "?"
  assert browser.find_element(By.ID, "confidence").text == "that doesn't look like a digit"
  assert browser.find_element(By.ID, "error").text == ""
