"""Turns a real-world picture of a digit into an MNIST-format 28x28 image.

MNIST digits are white ink on black, size-normalised to fit a 20x20 box (aspect ratio kept,
anti-aliased) and centred by centre of mass in 28x28. Photos, scans and canvas exports are
nothing like that, so this module reproduces the format: it reads any image Pillow reads,
separates ink from (unevenly lit, tinted, noisy) background, fixes polarity, crops to the ink,
normalises stroke width and size, and centres by centre of mass.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError
from scipy import ndimage

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 40_000_000  # larger images are refused (Pillow's decompression-bomb guard)
# At most this many pixels are ever decoded. JPEGs are decoded reduced (1/2 to 1/8 scale, almost
# free), so photos up to MAX_PIXELS pass; other formats decode whole, so this bounds their memory
# (at most 4 bytes a pixel: 64 MB) however small the file that declares them.
MAX_DECODED_PIXELS = 1 << 24
# Every input is brought to at most this long side before any analysis: ink separation works at
# this size, and a 28x28 result needs no more.
WORK_SIDE = 160
MIN_SIDE = 8
BOX = 20  # MNIST fits each digit's longer side to 20 px ...
SIZE = 28  # ... inside a 28x28 canvas
# Typical MNIST stroke width, in pixels of the 20-px box.
TARGET_STROKE = 2.4


class NoDigitFound(ValueError):
  """The image holds no ink that could be a digit (a blank page, say)."""


def load_image(source: ImageSource) -> Image.Image:
  """Opens a path, bytes, PIL image or array, applying EXIF orientation, at a working size.

  The result's longer side is at most WORK_SIDE (smaller images keep their size). Memory stays
  bounded whatever the file declares: the size is checked from the header before decoding,
  JPEGs are decoded reduced, and nothing else over MAX_DECODED_PIXELS is decoded at all.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: not a readable image, too small, or larger than MAX_PIXELS (MAX_DECODED_PIXELS
      for formats that cannot be decoded reduced).
  """
  if isinstance(source, Image.Image):
    return _working_size(source)
  if isinstance(source, np.ndarray):
    if source.ndim >= 2 and source.shape[0] * source.shape[1] > MAX_PIXELS:
      raise ValueError(f"array of {source.shape[1]}x{source.shape[0]} pixels is too large "
                       f"(limit {MAX_PIXELS:,})")
    return _working_size(Image.fromarray(_array_to_uint8(source)))
  if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
    if Path(source).is_dir():
      raise FileNotFoundError(f"no images in directory {source}")
    raise FileNotFoundError(f"no such file: {source}")
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        _check_declared_size(image)
        if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, no smaller than needed
          scale = WORK_SIDE / max(image.size)
          if scale < 1:
            image.draft(image.mode, (math.ceil(image.width * scale),
                                     math.ceil(image.height * scale)))
        if image.width * image.height > MAX_DECODED_PIXELS:
          raise ValueError(f"{image.format or 'image'} of {image.width}x{image.height} pixels is "
                           f"too large to decode (limit {MAX_DECODED_PIXELS:,} pixels; only "
                           "JPEGs are decoded reduced)")
        image.load()
        # Shrink, then turn (the EXIF travels in .info): exif_transpose copies the image.
        return ImageOps.exif_transpose(_working_size(image))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
      raise ValueError("image is too large (decompression-bomb guard)") from None
    except UnidentifiedImageError:
      raise ValueError("not an image Pillow can read") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data
      raise ValueError(f"cannot decode image ({e})") from None


def _check_declared_size(image: Image.Image) -> None:
  if image.width * image.height > MAX_PIXELS:
    raise ValueError(f"image of {image.width}x{image.height} pixels is too large "
                     f"(limit {MAX_PIXELS:,})")


def _working_size(image: Image.Image) -> Image.Image:
  """Shrinks (box filter: every source pixel counts) to a longer side of at most WORK_SIDE."""
  _check_declared_size(image)
  scale = WORK_SIDE / max(image.size)
  if scale >= 1:
    return image
  if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F", "I;16"):
    image = image.convert("RGBA" if "transparency" in image.info or "A" in image.mode else "RGB")
  elif image.mode == "1":
    image = image.convert("L")
  if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] == 255:
    image = image.convert("RGB")  # opaque (a filled canvas): resizing RGB is cheaper
  size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
  return image.resize(size, Image.BOX)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
  """An image array of any numeric dtype -> uint8, keeping its contrast.

  uint8 stays as it is; floats in [0, 1] are scaled by 255; other values that fit 0-255 are kept;
  anything else (16-bit scans, say) is stretched from its minimum to its maximum, as 16-bit
  image files are.
  """
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"array of shape {array.shape} is not an image (H, W[, 1|3|4])")
  if array.dtype == np.uint8:
    return array
  if array.dtype.kind not in "biuf":
    raise ValueError(f"array of dtype {array.dtype} is not an image")
  is_float = array.dtype.kind == "f"
  values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if array.dtype.kind == "b" or (is_float and lo >= 0 and hi <= 1):
    values = values * 255
  elif lo < 0 or hi > 255:
    values = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def ink_map(image: Image.Image) -> np.ndarray:
  """Ink strength in [0, 1] per pixel (1 = ink, 0 = background), whatever the polarity."""
  if image.width < MIN_SIDE or image.height < MIN_SIDE:
    raise ValueError(f"image of {image.width}x{image.height} pixels is too small to hold a "
                     f"digit (at least {MIN_SIDE}x{MIN_SIDE})")
  if max(image.size) > WORK_SIDE:
    image = _working_size(image)
  alpha = _alpha(image)
  gray = _gray(image)
  if alpha is not None:
    # A canvas export: strokes are opaque, background transparent. Alpha is the ink; where it
    # is opaque, colour decides between ink and an opaque background fill.
    opaque = alpha > 0.5
    if opaque.mean() < 0.6:
      return alpha
    gray = gray * alpha + (1 - alpha) * np.median(gray[opaque])
  return _separate_ink(gray)


def _alpha(image: Image.Image) -> np.ndarray | None:
  """The alpha channel in [0, 1], or None where there is none or it is (almost) all opaque."""
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
    return None
  channel = image.getchannel("A")
  if channel.getextrema()[0] >= 230:  # opaque: a canvas filled with white, say
    return None
  return np.asarray(channel, np.float32) / 255


def _gray(image: Image.Image) -> np.ndarray:
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    values = np.asarray(image, np.float64)
    lo, hi = values.min(), values.max()
    return ((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)).astype(np.float32)
  if image.mode in ("L", "LA", "La"):
    return np.asarray(image.getchannel(0), np.float32) / 255
  rgb = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
  bands = rgb.split()[:3]
  if not (ImageChops.difference(bands[0], bands[1]).getbbox()
          or ImageChops.difference(bands[1], bands[2]).getbbox()):
    # Grey (a canvas, a scan): Pillow's luma of three equal channels is that channel, exactly.
    return np.asarray(bands[0], np.float32) / 255
  luma = np.asarray(rgb.convert("L"), np.float32) / 255  # ITU-R 601 luma, as Pillow computes it
  r, g, b = (np.asarray(channel) for channel in bands)
  saturation = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # uint8
  # Luma, but let a coloured pen stand out from paper of any tint: mix in saturation.
  median = 255 * _quantiles(saturation, 256, [50])[0]
  return np.clip(luma - (0.5 / 255) * (saturation.astype(np.float32) - median), 0, 1)


def _quantiles(values: np.ndarray, levels: int, percents, high: float = 1.0) -> np.ndarray:
  """Percentiles of values in [0, high] (uint8: levels=256, high=1 gives them / 255), read off
  a histogram of `levels` levels: exact to high / levels, and many times faster than sorting."""
  return _histogram_quantiles(_histogram(values, levels, high), percents) * (high / (levels - 1))


def _histogram(values: np.ndarray, levels: int, high: float = 1.0) -> np.ndarray:
  if values.dtype != np.uint8:
    scaled = values * ((levels - 1) / high)
    scaled += 0.5
    values = np.clip(scaled, 0, levels - 1, out=scaled).astype(np.intp)
  return np.bincount(values.ravel(), minlength=levels)


def _histogram_quantiles(hist: np.ndarray, percents) -> np.ndarray:
  """The levels at `percents` of a histogram's mass."""
  cumulative = np.cumsum(hist)
  ranks = np.asarray(percents, np.float64) / 100 * (cumulative[-1] - 1)
  return np.searchsorted(cumulative, ranks, side="right").astype(np.float64)


_LEVELS = 1024  # histogram resolution of the ink statistics
_LEVEL_INDEX = np.arange(_LEVELS, dtype=np.float64)
_OTSU_CENTRES = (np.arange(64) + 0.5) / 64


def _separate_ink(gray: np.ndarray) -> np.ndarray:
  """Background-subtracts, normalises contrast and soft-thresholds a grey image."""
  # The page's edge is background in photos, scans and canvases alike: light edges mean dark
  # ink. Where the edge is mid-grey, ink is the minority whose tail lies further from the median.
  border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
  edge = _quantiles(border, _LEVELS, [50])[0]
  flip = edge > 0.55  # dark ink on light paper
  if 0.45 <= edge <= 0.55:
    p_low, median, p_high = _quantiles(gray, _LEVELS, [0.1, 50, 99.9])
    flip = median - p_low > p_high - median
  if flip:
    gray, border, edge = 1 - gray, 1 - border, 1 - edge  # -> light ink on dark
  # A quadratic surface that is constant all along a rectangle's border is constant inside it,
  # so a page whose border is one level (a canvas, a scan) needs no fit.
  if _one_level(border, edge):
    signal = gray - np.float32(edge)
  else:
    signal = gray - _background(gray)
  np.maximum(signal, 0, out=signal)
  peak = max(float(signal.max()), 1e-6)
  # All the statistics below come from one histogram of the signal, in levels of peak / 1023.
  hist = _histogram(signal, _LEVELS, peak)
  centre, top = _histogram_quantiles(hist, [50, 99.7])
  deviation = np.abs(_LEVEL_INDEX - centre).astype(np.intp)  # |level - median|, per level
  spread = _histogram_quantiles(np.bincount(deviation, weights=hist, minlength=_LEVELS), [50])[0]
  unit = peak / (_LEVELS - 1)
  centre, top, spread = centre * unit, top * unit, spread * unit
  noise = centre + 3 * 1.4826 * spread
  if top < 0.08 or top < 2.5 * noise:
    raise NoDigitFound("no digit found (no ink stands out from the background)")
  threshold = _otsu(hist, unit / top)
  low = max(threshold * 0.5, noise / top)
  # (signal / top - low) / width, clipped to [0, 1], in place.
  width = max(threshold * 1.5 - low, 1e-3)
  signal -= low * top
  signal *= 1 / (top * width)
  return np.clip(signal, 0, 1, out=signal)


def _one_level(border: np.ndarray, level: float) -> bool:
  """Whether (almost) all of a border lies within 2/255 of `level`."""
  return bool(np.mean(np.abs(border - level) < 2 / 255) >= 0.95)


def _background(gray: np.ndarray) -> np.ndarray:
  """The paper's (or board's) level under the ink: a smooth quadratic surface fitted robustly.

  Uneven lighting is smooth across a page, so a low-order surface captures it, and a grid of
  about 32x32 samples fits it; refitting without the pixels that stand out as ink keeps
  strokes and filled loops of any size out of the fit.
  """
  h, w = gray.shape
  step = max(1, max(h, w) // 32)
  sample = gray[::step, ::step]
  y, x = np.mgrid[0:sample.shape[0], 0:sample.shape[1]]
  y, x = y.ravel() / sample.shape[0] - 0.5, x.ravel() / sample.shape[1] - 0.5
  design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
  values = sample.ravel().astype(np.float64)
  keep = np.ones(values.shape, bool)
  for _ in range(4):
    coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
    residual = values - design @ coef
    spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep]))) + 1e-3
    before, keep = keep, residual < 2.5 * spread  # ink is bright: drop what stands above
    if np.array_equal(keep, before):
      break  # converged: the next fit would be the same
  # The surface, evaluated separably: rows and columns, then the cross term.
  yy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
  xx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
  c = coef.astype(np.float32)
  surface = (c[0] + c[2] * yy + c[5] * yy * yy) + (c[1] * xx + c[3] * xx * xx)
  if abs(c[4]) > 1e-6:
    surface += c[4] * yy * xx
  return surface


def _otsu(hist: np.ndarray, scale: float) -> float:
  """Otsu's threshold, in [0, 1], of levels * scale (clipped to 1) in 64 bins."""
  bins = np.minimum((_LEVEL_INDEX[:len(hist)] * scale * 64).astype(np.intp), 63)
  hist = np.bincount(bins, weights=hist, minlength=64)
  centres = _OTSU_CENTRES
  weight_low = np.cumsum(hist)
  weight_high = weight_low[-1] - weight_low
  moments = hist * centres
  mean_low = np.cumsum(moments) / np.maximum(weight_low, 1)
  total_mean = moments.sum() / max(weight_low[-1], 1)
  mean_high = (total_mean * weight_low[-1] - mean_low * weight_low) / np.maximum(weight_high, 1)
  between = weight_low * weight_high * (mean_low - mean_high) ** 2
  return float(centres[np.argmax(between)])


def _keep_digit(ink: np.ndarray) -> np.ndarray:
  """Drops specks and edge clutter: keeps connected components of real weight, cropped to
  them (with the 2-pixel margin that keeps their soft edges)."""
  strong = ink > 0.3
  rows, cols = np.flatnonzero(strong.any(1)), np.flatnonzero(strong.any(0))
  if len(rows) == 0:
    raise NoDigitFound("no digit found (no ink)")
  # Every component lies in the strong ink's bounding box: label only that, with the margin
  # kept below (the same components, numbered in the same order, in less time).
  window = _margin(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, ink.shape)
  ink = ink[window]
  labels, n = ndimage.label(strong[window], structure=np.ones((3, 3)))
  kept = np.ones(n + 1, bool)
  if n > 1:
    mass = np.bincount(labels.ravel(), weights=ink.ravel(), minlength=n + 1)
    kept = mass >= 0.15 * mass[1:].max()
  kept[0] = False
  boxes = [box for box, k in zip(ndimage.find_objects(labels), kept[1:]) if k]
  region = _margin(min(b[0].start for b in boxes), max(b[0].stop for b in boxes),
                   min(b[1].start for b in boxes), max(b[1].stop for b in boxes), ink.shape)
  # Dilating by 2 px (a 5x5 square).
  mask = _max_filter(kept[labels[region]].view(np.uint8), 2)
  return ink[region] * mask


def _margin(top: int, bottom: int, left: int, right: int, shape) -> tuple[slice, slice]:
  """A box grown by the 2 pixels that keep soft edges, within an array of `shape`."""
  return (slice(max(0, top - 2), min(shape[0], bottom + 2)),
          slice(max(0, left - 2), min(shape[1], right + 2)))


def _stroke_width(ink: np.ndarray) -> float:
  """Typical stroke width in pixels, from the ink's area and the length of its edge.

  A stroke of width w and length L covers w * L pixels and is edged by 2 * L (loops included:
  an inner and an outer edge), so w = 2 * area / edge. Counted along pixel sides, an edge is
  on average 4 / pi times its length over all directions, hence 8 / pi * area / sides. On
  held-out digits this decides thickening and thinning as well as the median distance to the
  edge along the strokes' spine did (scripts/compare_stroke_width.py), in a thirtieth of the
  time.
  """
  mask = ink > 0.5
  sides = (np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
           + np.count_nonzero(mask[0]) + np.count_nonzero(mask[-1])  # the array's edges count
           + np.count_nonzero(mask[:, 0]) + np.count_nonzero(mask[:, -1]))
  return 8 / math.pi * np.count_nonzero(mask) / sides if sides else 0.0


# MNIST's stroke width at to_mnist's working scale (4x the final one).
_WORK_STROKE = 4 * TARGET_STROKE


def _stroke_change(width: float) -> int:
  """What to_mnist does with strokes of this width at its working scale: -1 thickens them (well
  under MNIST's), 1 thins them (well over), 0 keeps them."""
  if 0 < width < 0.75 * _WORK_STROKE:
    return -1
  return 1 if width > 1.35 * _WORK_STROKE else 0


def _max_filter(values: np.ndarray, radius: int) -> np.ndarray:
  """`ndimage.maximum_filter(values, size=2 * radius + 1)`, as whole-array maxima of shifted
  views: a fraction of its time on small arrays. (Its "reflect" edges only repeat pixels that
  lie in the window anyway, so a window cut off at the edge has the same maximum.)"""
  for _ in range(2):  # down the columns, then (transposed) along the rows
    source, values = values, values.copy()
    for k in range(1, min(radius, len(values) - 1) + 1):
      np.maximum(values[k:], source[:-k], out=values[k:])
      np.maximum(values[:-k], source[k:], out=values[:-k])
    values = values.T
  return values


def _crop(ink: np.ndarray) -> np.ndarray:
  rows, cols = np.flatnonzero(ink.max(1) > 0.05), np.flatnonzero(ink.max(0) > 0.05)
  if len(rows) == 0:
    raise NoDigitFound("no digit found (no ink)")
  return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _disk(diameter: float) -> np.ndarray:
  r = max(1.0, diameter / 2)
  y, x = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
  return x * x + y * y <= r * r


# Above this diameter a disk's erosion costs more than repeated 3x3 ones (0.14 s at 50 px, where
# a filled shape's "stroke" is the whole shape): those approximate it by an octagon.
_DIRECT_EROSION = 12
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _erode(ink: np.ndarray, diameter: float) -> np.ndarray:
  """Grey erosion by a disk of this diameter; large ones by alternating 3x3 squares and crosses
  (an octagon of the same radius), in time linear in the radius."""
  if diameter <= _DIRECT_EROSION:
    return ndimage.grey_erosion(ink, footprint=_disk(diameter))
  for i in range(round(diameter / 2)):
    ink = ndimage.minimum_filter(ink, size=3) if i % 2 == 0 else ndimage.minimum_filter(
        ink, footprint=_CROSS)
  return ink


def _resize(values: np.ndarray, width: int, height: int) -> np.ndarray:
  """Anti-aliased resize of a float map."""
  shrink = width < values.shape[1] or height < values.shape[0]
  return np.asarray(Image.fromarray(values.astype(np.float32), "F").resize(
      (width, height), Image.BOX if shrink else Image.BILINEAR))


def _center_of_mass(values: np.ndarray) -> tuple[float, float]:
  """`ndimage.center_of_mass`, computed as it does (the same sums, the same result) without its
  per-call overhead."""
  total = values.sum()
  rows = np.arange(values.shape[0], dtype=np.float64)[:, None]
  cols = np.arange(values.shape[1], dtype=np.float64)[None, :]
  return float((values * rows).sum() / total), float((values * cols).sum() / total)


def stages(source: ImageSource) -> dict[str, np.ndarray]:
  """What `to_mnist` sees at each stage, for figures: "picture" (decoded, upright, at the
  working size, grey), "ink" (ink strength, background removed), "digit" (the kept ink, cropped)
  and "mnist" (the 28x28 result)."""
  image = load_image(source)
  ink = ink_map(image)
  return {"picture": np.asarray(image.convert("L"), np.float32) / 255.0, "ink": ink,
          "digit": _crop(_keep_digit(ink)), "mnist": to_mnist(image)}


def to_mnist(source: ImageSource) -> np.ndarray:
  """Any digit picture -> float32 (28, 28) in [0, 1], white ink on black, MNIST-centred.

  Raises:
    FileNotFoundError: a path that does not exist.
    ValueError: unreadable, too small or too large an image.
    NoDigitFound (a ValueError): no ink stands out (a blank page).
  """
  image = load_image(source)
  ink = _keep_digit(ink_map(image))
  ink = _crop(ink)
  # Normalise stroke width at 4x the final scale: pen lines on a big canvas would vanish when
  # shrunk, and marker strokes would fill the loops.
  h, w = ink.shape
  work = 4 * BOX / max(h, w)
  ink = _resize(ink, max(1, round(w * work)), max(1, round(h * work)))
  width, target = _stroke_width(ink), _WORK_STROKE
  change = _stroke_change(width)
  if change < 0:
    ink = ndimage.grey_dilation(np.pad(ink, int(target)), footprint=_disk(target - width))
    ink = _crop(ink)
  elif change > 0:
    ink = _crop(_erode(ink, width - 1.1 * target))
  h, w = ink.shape
  scale = BOX / max(h, w)
  new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
  small = np.clip(_resize(ink, new_w, new_h), 0, 1)
  canvas = np.zeros((SIZE, SIZE), np.float32)
  cy, cx = _center_of_mass(small)
  top = int(np.clip(round(SIZE / 2 - cy), 0, SIZE - new_h))
  left = int(np.clip(round(SIZE / 2 - cx), 0, SIZE - new_w))
  canvas[top:top + new_h, left:left + new_w] = small
  return canvas
