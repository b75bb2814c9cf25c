import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from scipy import ndimage

from flaxdigits.preprocess import (MAX_DECODED_PIXELS, MAX_PIXELS, WORK_SIDE, NoDigitFound,
                                   load_image, to_mnist)


@pytest.fixture(scope="module")
def digit(small):
  """A real MNIST test digit (a 7) as ink in [0, 1], and a 200x200 upscaled version."""
  ink = small["test"].images[0] / 255.0
  big = np.asarray(Image.fromarray(small["test"].images[0]).resize((200, 200), Image.BICUBIC))
  return ink, big / 255.0


def assert_mnist_like(out):
  assert out.shape == (28, 28) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5
  rows, cols = np.nonzero(out > 0.05)
  assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 22  # fits MNIST's 20x20 box (+ anti-aliasing)
  cy, cx = ndimage.center_of_mass(out)
  assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def similarity(a, b):
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def page(big, *, ink=0.1, paper=0.95, side=480, at=(200, 40)):
  """Dark ink on light paper, the digit at an off-centre spot of a large page."""
  canvas = np.zeros((side, side))
  canvas[at[0]:at[0] + big.shape[0], at[1]:at[1] + big.shape[1]] = big
  return (paper * (1 - canvas) + ink * canvas)


def test_mnist_digit_round_trips(digit):
  ink, _ = digit
  out = to_mnist((ink * 255).astype(np.uint8))
  assert_mnist_like(out)
  assert similarity(out, ink) > 0.85


def test_polarity_off_centre_and_scale_do_not_matter(digit):
  ink, big = digit
  dark_on_light = to_mnist(page(big))
  light_on_dark = to_mnist(1 - page(big))
  for out in (dark_on_light, light_on_dark):
    assert_mnist_like(out)
    assert similarity(out, ink) > 0.8
  assert similarity(dark_on_light, light_on_dark) > 0.95


def test_uneven_lighting_tint_and_jpeg_noise(digit):
  ink, big = digit
  rng = np.random.default_rng(0)
  gray = page(big) * np.linspace(0.6, 1.0, 480)[None, :] + rng.normal(0, 0.04, (480, 480))
  rgb = np.clip(gray[..., None] * np.array([1.0, 0.95, 0.8]), 0, 1)
  buffer = io.BytesIO()
  Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, "JPEG", quality=70)
  out = to_mnist(buffer.getvalue())
  assert_mnist_like(out)
  assert similarity(out, ink) > 0.8


def test_transparent_canvas_export_uses_alpha_as_ink(digit):
  ink, big = digit
  rgba = np.zeros((300, 300, 4), np.uint8)
  rgba[50:250, 60:260, 3] = (big * 255).astype(np.uint8)  # black strokes, transparent elsewhere
  out = to_mnist(Image.fromarray(rgba, "RGBA"))
  assert_mnist_like(out)
  assert similarity(out, ink) > 0.8


def test_thin_pen_strokes_are_thickened(digit):
  ink, big = digit
  thin = ndimage.grey_erosion(np.pad(big, 100), size=7) > 0.5
  out = to_mnist(page(thin.astype(float), side=400, at=(0, 0)))
  assert_mnist_like(out)
  assert (out > 0.5).sum() > 0.5 * (ink > 0.5).sum()  # strokes survive the shrink


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK", "1"])
def test_every_mode(digit, mode):
  _, big = digit
  gray = Image.fromarray((page(big) * 255).astype(np.uint8))
  image = gray.convert("I").point(lambda v: v * 256).convert("I;16") if mode == "I;16" \
      else gray.convert(mode)
  assert_mnist_like(to_mnist(image))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_format(digit, fmt):
  _, big = digit
  buffer = io.BytesIO()
  Image.fromarray((page(big) * 255).astype(np.uint8)).save(buffer, fmt)
  assert_mnist_like(to_mnist(buffer.getvalue()))


@pytest.mark.parametrize("side", [480, 3000])  # 3000: shrunk to the working size first
def test_exif_orientation_is_applied(digit, tmp_path, side):
  _, big = digit
  upright = Image.fromarray((page(big) * 255).astype(np.uint8)).resize((side, side))
  stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a sideways camera stores it
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to view"
  stored.save(tmp_path / "photo.jpg", exif=exif)
  assert similarity(to_mnist(tmp_path / "photo.jpg"), to_mnist(upright)) > 0.9


@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "not an image"),
    (b"", "not an image"),
])
def test_unreadable_bytes(content, message):
  with pytest.raises(ValueError, match=message):
    to_mnist(content)


def test_truncated_png(digit):
  buffer = io.BytesIO()
  Image.fromarray((page(digit[1]) * 255).astype(np.uint8)).save(buffer, "PNG")
  with pytest.raises(ValueError, match="cannot decode"):
    to_mnist(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def test_missing_path_and_tiny_and_enormous_images(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    to_mnist(tmp_path / "nope.png")
  with pytest.raises(ValueError, match="too small"):
    to_mnist(np.zeros((1, 1), np.uint8))
  Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 Mpx in a few KB
  assert 10_000 * 10_000 > MAX_PIXELS
  with pytest.raises(ValueError, match="too large"):
    to_mnist(tmp_path / "bomb.png")


@pytest.mark.parametrize("dtype, top", [(np.uint16, 65535), (np.uint16, 4095), (np.uint16, 250),
                                        (np.int32, 1000), (np.float64, 1000.0)])
def test_arrays_of_any_range_keep_their_contrast(digit, dtype, top):
  # A 16-bit scan passed as an array was clipped to 0-255: a blank page.
  ink, big = digit
  scan = (page(big) * top).astype(dtype)
  expected = to_mnist((page(big) * 255).astype(np.uint8))
  assert similarity(to_mnist(scan), expected) > 0.98


def test_large_jpeg_is_decoded_reduced_to_the_working_size(digit, tmp_path):
  _, big = digit
  photo = Image.fromarray((page(big) * 255).astype(np.uint8)).resize((4000, 4000), Image.BILINEAR)
  photo.crop((0, 500, 4000, 3500)).save(tmp_path / "phone.jpg", quality=90)  # 12 Mpx
  with Image.open(tmp_path / "phone.jpg") as image:
    image.draft("L", (WORK_SIDE, WORK_SIDE * 3 // 4))
    assert image.size == (500, 375)  # Pillow decodes this JPEG at 1/8 scale
  loaded = load_image(tmp_path / "phone.jpg")
  assert loaded.size == (WORK_SIDE, WORK_SIDE * 3 // 4)
  assert_mnist_like(to_mnist(tmp_path / "phone.jpg"))


def test_small_file_declaring_huge_size_costs_bounded_memory(tmp_path):
  # A 6320x6320 PNG (40 Mpx, under the bomb guard) took 6-8 s and 1.4-1.7 GB in predict. Now
  # non-JPEG images over MAX_DECODED_PIXELS are refused from their header, before decoding, and
  # smaller ones are shrunk to the working size before any float array exists.
  Image.new("L", (6320, 6320), 255).save(tmp_path / "huge.png")
  Image.new("L", (4000, 4000), 255).save(tmp_path / "big.png")
  assert 6320 * 6320 > MAX_DECODED_PIXELS > 4000 * 4000
  code = (
      "import sys, time\n"
      "from flaxdigits.preprocess import to_mnist\n"
      "t = time.perf_counter()\n"
      "for name, expected in (('huge.png', 'too large to decode'), ('big.png', 'no digit')):\n"
      "  try:\n"
      "    to_mnist(sys.argv[1] + '/' + name)\n"
      "  except ValueError as e:\n"
      "    assert expected in str(e), e\n"
      # VmHWM: this address space's peak (ru_maxrss would include the parent's, across exec)
      "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
      "print(int(peak) // 1024, time.perf_counter() - t)\n")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  peak_mb, seconds = out.stdout.split()
  assert int(peak_mb) < 400 and float(seconds) < 10, out.stdout


@pytest.mark.parametrize("blank", [
    np.full((300, 300), 240, np.uint8),
    np.clip(np.random.default_rng(0).normal(200, 6, (300, 300)), 0, 255).astype(np.uint8),
    (np.linspace(120, 250, 300)[None, :] * np.ones((300, 1))).astype(np.uint8),
])
def test_blank_page_is_no_digit(blank):
  with pytest.raises(NoDigitFound, match="no digit found"):
    to_mnist(blank)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=hnp.arrays(
    dtype=np.float64,
    shape=st.tuples(st.integers(1, 64), st.integers(1, 64)).flatmap(
        lambda hw: st.sampled_from([hw, hw + (1,), hw + (3,), hw + (4,)])),
    elements=st.one_of(st.floats(-10, 300), st.just(np.nan), st.just(np.inf))),
    dtype=st.sampled_from([np.uint8, np.int32, np.float32, np.float64]))
def test_any_array_gives_a_valid_image_or_the_documented_error(values, dtype):
  array = values.astype(dtype) if np.dtype(dtype).kind == "f" else (
      np.clip(np.nan_to_num(values), 0, 255).astype(dtype))
  try:
    out = to_mnist(array)
  except ValueError:  # includes NoDigitFound
    return
  assert out.shape == (28, 28) and out.dtype == np.float32
  assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@given(hnp.arrays(np.float32, st.integers(1, 2000), elements=st.floats(0, 1, width=32)))
@settings(max_examples=50, deadline=None)
def test_histogram_quantiles_match_numpy_to_a_level(values):
  from flaxdigits.preprocess import _quantiles
  percents = [0.1, 50, 99.7]
  got = _quantiles(values, 1024, percents)
  # Each is a value's level: no further from numpy's (which interpolates) than one level plus
  # the gap between the two neighbouring values it interpolates between.
  ordered = np.sort(values)
  for p, g in zip(percents, got):
    rank = p / 100 * (len(values) - 1)
    lo, hi = ordered[int(np.floor(rank))], ordered[int(np.ceil(rank))]
    assert lo - 1 / 1023 <= g <= hi + 1 / 1023


def test_a_uniform_border_skips_the_fit_with_the_same_result(digit, monkeypatch):
  # A quadratic surface constant along the border is constant: the fit would find that level.
  import flaxdigits.preprocess as preprocess
  _, big = digit
  canvas = (page(big, ink=0.0, paper=1.0) * 255).astype(np.uint8)
  fast = to_mnist(canvas)
  fitted = preprocess._background
  calls = []
  monkeypatch.setattr(preprocess, "_background", lambda g: calls.append(1) or fitted(g))
  assert np.array_equal(to_mnist(canvas), fast) and not calls  # the fit is skipped ...
  monkeypatch.setattr(preprocess, "_one_level", lambda border, level: False)
  assert similarity(to_mnist(canvas), fast) > 0.999 and calls  # ... and would agree


def test_stages_show_what_to_mnist_does(digit):
  from flaxdigits.preprocess import stages
  _, big = digit
  picture = Image.fromarray(np.round(255 * page(big)).astype(np.uint8))
  shown = stages(picture)
  assert list(shown) == ["picture", "ink", "digit", "mnist"]
  assert shown["picture"].shape == shown["ink"].shape and max(shown["picture"].shape) <= WORK_SIDE
  assert shown["picture"].mean() > 0.8 and shown["ink"].mean() < 0.2  # light page, dark ink
  assert shown["digit"].shape[0] < shown["ink"].shape[0]  # cropped to the digit
  np.testing.assert_array_equal(shown["mnist"], to_mnist(picture))


@pytest.mark.parametrize("width", [3, 6, 10, 14, 20])
def test_stroke_width_of_rings_and_bars(width):
  """The area/edge estimate: a ring (every direction at once) within 10% of its width; a
  straight bar within 25% whatever its direction (pixel sides overcount a diagonal edge and
  count an axis-aligned one exactly, so one direction alone is biased)."""
  from flaxdigits.preprocess import _stroke_width
  y, x = np.mgrid[:100, :100]
  radius = np.hypot(y - 50, x - 50)
  ring = ((radius <= 42) & (radius > 42 - width)).astype(np.float32)
  assert abs(_stroke_width(ring) - width) <= 0.1 * width
  for angle in np.radians([0, 20, 45, 70, 90]):
    across = np.abs((y - 50) * np.cos(angle) - (x - 50) * np.sin(angle))
    along = np.abs((y - 50) * np.sin(angle) + (x - 50) * np.cos(angle))
    bar = ((across < width / 2) & (along < 45)).astype(np.float32)
    assert abs(_stroke_width(bar) - width) <= 0.25 * width, np.degrees(angle)
  assert _stroke_width(np.zeros((10, 10), np.float32)) == 0.0


def test_filled_shapes_come_out_mnist_like():
  """A filled disc is all "stroke": it is eroded to the target stroke width by repeated 3x3
  erosions (one disk footprint as wide as the shape took 0.23 s; scripts/bench_hostile.py
  times it)."""
  y, x = np.mgrid[:400, :400]
  disc = np.where((y - 200) ** 2 + (x - 200) ** 2 < 150 ** 2, 0, 255).astype(np.uint8)
  out = to_mnist(disc)
  assert_mnist_like(out)


# The fast helpers are exact stand-ins for what they replace: same numbers, less per-call time.

@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                  elements=st.floats(0, 10)), st.integers(1, 3))
def test_max_filter_is_scipys_maximum_filter(values, radius):
  from flaxdigits.preprocess import _max_filter
  expected = ndimage.maximum_filter(values, size=2 * radius + 1)
  np.testing.assert_array_equal(_max_filter(values, radius), expected)
  as_uint8 = (values > 5).view(np.uint8)
  np.testing.assert_array_equal(_max_filter(as_uint8, radius),
                                ndimage.maximum_filter(as_uint8, size=2 * radius + 1))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=28),
                  elements=st.floats(0, 1, width=32)).filter(lambda a: a.sum() > 0))
def test_center_of_mass_is_scipys(values):
  from flaxdigits.preprocess import _center_of_mass
  assert _center_of_mass(values) == tuple(float(c) for c in ndimage.center_of_mass(values))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_grey_pictures_take_the_luma_path_exactly(mode):
  from flaxdigits.preprocess import _gray
  rng = np.random.default_rng(0)
  level = rng.integers(0, 256, (30, 40), dtype=np.uint8)
  if mode == "P":  # a grey palette
    image = Image.fromarray(255 - level, "P")
    image.putpalette([v for i in range(256) for v in (255 - i,) * 3])
  else:
    image = Image.fromarray(np.dstack([level] * 3), "RGB").convert(mode)
  expected = np.asarray(image.convert("RGB").convert("L"), np.float32) / 255  # Pillow's luma
  np.testing.assert_array_equal(_gray(image), expected)
  tinted = np.dstack([level, level, np.maximum(level, 1) - 1])  # not grey: saturation counts
  assert not np.array_equal(_gray(Image.fromarray(tinted, "RGB")),
                            np.asarray(Image.fromarray(tinted).convert("L"), np.float32) / 255)
