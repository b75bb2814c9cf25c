"""Synthetic non-digits, rendered on the fly: what the model learns "not a digit" from.

Six kinds, in equal shares: letters and symbols from the system's fonts, random scribbles,
geometric shapes, noise and textures, digits cut in half, and two digits side by side. Every
kind that is a picture goes through `to_mnist`, as a user's input would; noise and textures are
made at 28x28, as an array fed straight to the model would be. Glyphs that look like digits
(O, l, S, Z, ...) are left out, and so are halves of ones and sevens (a half of a 1 is a 1).

`render(n, seed, digits)` is deterministic for a seed, fonts and digits. Training draws its pool
with TRAIN_SEED from the training images; the held-out slice that measures rejection uses other
seeds and the held-out digits.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from flaxdigits.data import Split
from flaxdigits.preprocess import SIZE, to_mnist

KINDS = ("glyph", "scribble", "shape", "noise", "half", "pair")
TRAIN_SEED = 0
HELD_OUT_SEED = 1
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts",
             "C:/Windows/Fonts")
# Letters and symbols; those a reader could take for a digit are not here (O o Q D I l i j | !
# S s Z z B b G g q T t L ? and the like).
GLYPHS = "ACEFHKMNPRUVWXYacefhkmnpruvwxy#%&@$*+<>{}[]~^=€£¥§¶©®ΣΩΨΦΛΞπλµ♥♦♣♠★✓✗→←↑↓"
_CANVAS = 96
_NO_HALVES = (1, 7)
_VERSION = 1  # of the rendering: part of the cache key


def render(n: int, seed: int, digits: Split | None = None, kinds: tuple[str, ...] = KINDS, *,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
  """n synthetic non-digits as uint8 (n, 28, 28), white on black; kinds in turn.

  digits (MNIST images) are needed for the "half" and "pair" kinds; without them those kinds are
  skipped. progress(1), if given, is called after each image.
  """
  rng = np.random.default_rng(seed)
  kinds = tuple(k for k in kinds if digits is not None or k not in ("half", "pair"))
  makers = {"glyph": _glyph, "scribble": _scribble, "shape": _shape, "noise": _noise,
            "half": functools.partial(_half, digits), "pair": functools.partial(_pair, digits)}
  out = np.zeros((n, SIZE, SIZE), np.uint8)
  for i in range(n):
    kind = kinds[i % len(kinds)]
    while True:
      made = makers[kind](rng)
      if isinstance(made, Image.Image):
        try:
          made = to_mnist(made)
        except ValueError:  # nothing left after preprocessing: draw another
          continue
      if made.max() > 0.05:
        break
    out[i] = np.clip(np.round(made * 255), 0, 255).astype(np.uint8)
    if progress is not None:
      progress(1)
  return out


def kind_of(i: int, has_digits: bool = True) -> str:
  """The kind of the i-th image that render made."""
  kinds = KINDS if has_digits else tuple(k for k in KINDS if k not in ("half", "pair"))
  return kinds[i % len(kinds)]


def cache_path(n: int, seed: int, digits: Split | None = None) -> Path:
  """Where `cached` keeps render(n, seed, digits): $FLAXDIGITS_OUTLIER_CACHE, by default
  ~/.cache/flaxdigits/outliers, under a name that hashes everything the images depend on."""
  key = hashlib.sha256(f"{_VERSION} {n} {seed} {sorted(fonts())}".encode())
  if digits is not None:
    key.update(np.ascontiguousarray(digits.images).tobytes())
    key.update(np.ascontiguousarray(digits.labels).tobytes())
  folder = Path(os.environ.get("FLAXDIGITS_OUTLIER_CACHE",
                               Path.home() / ".cache" / "flaxdigits" / "outliers"))
  return folder / f"{key.hexdigest()[:24]}.npy"


def cached(n: int, seed: int, digits: Split | None = None, *,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
  """render(n, seed, digits), kept on disk (cache_path) between runs: rendering costs about
  2 ms an image."""
  path = cache_path(n, seed, digits)
  folder = path.parent
  try:
    images = np.load(path, allow_pickle=False)
    if images.shape == (n, SIZE, SIZE) and images.dtype == np.uint8:
      return images
  except (OSError, ValueError):
    pass
  images = render(n, seed, digits, progress=progress)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
      np.save(f, images)
    os.replace(partial, path)
  except OSError:
    pass  # a read-only home: render again next time
  return images


@functools.cache
def fonts() -> tuple[str, ...]:
  """TrueType/OpenType fonts found on this system (may be empty: Pillow's own font is used)."""
  found = []
  for folder in FONT_DIRS:
    for pattern in ("**/*.ttf", "**/*.otf"):
      found.extend(glob.glob(os.path.join(folder, pattern), recursive=True))
  return tuple(sorted(set(found)))


@functools.cache
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def _page(rng: np.random.Generator) -> tuple[Image.Image, int]:
  """A blank picture and its ink colour: dark ink on a light page or the reverse."""
  light = rng.random() < 0.7
  paper = int(rng.integers(200, 256)) if light else int(rng.integers(0, 50))
  ink = int(rng.integers(0, 60)) if light else int(rng.integers(200, 256))
  return Image.new("L", (_CANVAS, _CANVAS), paper), ink


def _glyph(rng: np.random.Generator) -> Image.Image:
  page, ink = _page(rng)
  paper = page.getpixel((0, 0))
  available = fonts()
  path = available[rng.integers(len(available))] if available else None
  font = _font(path, 56)  # to_mnist rescales: one size per font
  text = GLYPHS[rng.integers(len(GLYPHS))]
  draw = ImageDraw.Draw(page)
  if draw.textbbox((0, 0), text, font=font)[2] == 0:  # a font without the glyph
    font, text = _font(None, 56), GLYPHS[rng.integers(16)]
  draw.text((_CANVAS / 2, _CANVAS / 2), text, fill=ink, font=font, anchor="mm",
            stroke_width=int(rng.integers(0, 3)), stroke_fill=ink)
  return page.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, fillcolor=paper)


def _scribble(rng: np.random.Generator) -> Image.Image:
  page, ink = _page(rng)
  draw = ImageDraw.Draw(page)
  points = [tuple(p) for p in rng.uniform(10, _CANVAS - 10, (int(rng.integers(5, 12)), 2))]
  draw.line(points, fill=ink, width=int(rng.integers(3, 9)), joint="curve")
  return page.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def _shape(rng: np.random.Generator) -> Image.Image:
  page, ink = _page(rng)
  draw = ImageDraw.Draw(page)
  c, r = _CANVAS / 2, float(rng.uniform(20, 40))
  width = int(rng.integers(3, 9))
  fill = ink if rng.random() < 0.4 else None
  kind = rng.integers(6)
  if kind == 0:  # a polygon: triangle to octagon
    draw.regular_polygon((c, c, r), int(rng.integers(3, 9)), rotation=float(rng.uniform(0, 360)),
                         fill=fill, outline=ink, width=width)
  elif kind == 1:  # a rectangle or square
    w, h = rng.uniform(15, 40, 2)
    draw.rectangle((c - w, c - h, c + w, c + h), fill=fill, outline=ink, width=width)
  elif kind == 2:  # a star
    spikes = int(rng.integers(4, 8))
    angles = np.linspace(0, 2 * np.pi, 2 * spikes, endpoint=False) + rng.uniform(0, np.pi)
    radii = np.where(np.arange(2 * spikes) % 2 == 0, r, r * rng.uniform(0.3, 0.55))
    draw.polygon([(c + q * np.cos(a), c + q * np.sin(a)) for q, a in zip(radii, angles)],
                 fill=fill, outline=ink, width=width)
  elif kind == 3:  # a grid or hash
    lines = int(rng.integers(2, 5))
    for t in np.linspace(c - r, c + r, lines):
      draw.line((t, c - r, t, c + r), fill=ink, width=width)
      draw.line((c - r, t, c + r, t), fill=ink, width=width)
  elif kind == 4:  # a smiley
    draw.ellipse((c - r, c - r, c + r, c + r), outline=ink, width=width)
    for dx in (-0.35, 0.35):
      e = max(2.0, r * 0.12)
      draw.ellipse((c + dx * r - e, c - 0.3 * r - e, c + dx * r + e, c - 0.3 * r + e), fill=ink)
    draw.arc((c - 0.55 * r, c - 0.4 * r, c + 0.55 * r, c + 0.55 * r), 20, 160, fill=ink,
             width=width)
  else:  # a filled blob of overlapping discs
    for _ in range(int(rng.integers(3, 7))):
      x, y = rng.uniform(c - r / 2, c + r / 2, 2)
      q = float(rng.uniform(6, 18))
      draw.ellipse((x - q, y - q, x + q, y + q), fill=ink)
  return page


def _noise(rng: np.random.Generator) -> np.ndarray:
  """A 28x28 texture in [0, 1]: uniform or sparse noise, smooth blobs, stripes or checks."""
  kind = rng.integers(5)
  if kind == 0:
    image = rng.uniform(0, 1, (SIZE, SIZE)) * rng.uniform(0.3, 1)
  elif kind == 1:
    image = (rng.random((SIZE, SIZE)) < rng.uniform(0.05, 0.4)) * rng.uniform(0.5, 1)
  elif kind == 2:
    small = rng.uniform(0, 1, (int(rng.integers(3, 8)),) * 2)
    image = np.asarray(Image.fromarray(small.astype(np.float32), "F").resize(
        (SIZE, SIZE), Image.BICUBIC)).clip(0, 1)
  elif kind == 3:
    y, x = np.mgrid[:SIZE, :SIZE]
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
    image = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
  else:
    cell = int(rng.integers(2, 8))
    y, x = np.mgrid[:SIZE, :SIZE]
    image = ((y // cell + x // cell) % 2).astype(np.float64)
  return image.astype(np.float32)


def _digit_picture(digits: Split, rng: np.random.Generator,
                   exclude: tuple[int, ...] = _NO_HALVES) -> np.ndarray:
  while True:
    i = rng.integers(len(digits))
    if digits.labels[i] not in exclude:
      return digits.images[i].astype(np.float32) / 255.0


def _half(digits: Split, rng: np.random.Generator) -> Image.Image:
  """The left or right half of a digit, as a picture. Not of ones and sevens, whose halves are
  strokes like a one; not top or bottom halves, which are often a whole digit's look (the top of
  a 9 is a 0, the bottom of a 7 a 1)."""
  image = _digit_picture(digits, rng)
  cols = np.flatnonzero(image.max(0) > 0.2)
  mid = (cols[0] + cols[-1] + 1) // 2
  return _as_picture(image[:, :mid] if rng.random() < 0.5 else image[:, mid:])


def _pair(digits: Split, rng: np.random.Generator) -> Image.Image:
  """Two digits side by side, a few pixels apart or touching."""
  left, right = (_digit_picture(digits, rng, exclude=()) for _ in range(2))
  gap = int(rng.integers(-6, 2))  # columns of the 28x28 frames that overlap (<0) or part
  canvas = np.zeros((SIZE, 2 * SIZE + gap), np.float32)
  canvas[:, :SIZE] = left
  canvas[:, SIZE + gap:] = np.maximum(canvas[:, SIZE + gap:], right)
  return _as_picture(canvas)


def _as_picture(image: np.ndarray) -> Image.Image:
  """An MNIST-format array (white on black) as a picture at 3x, the size of a small scan."""
  picture = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), "L")
  return picture.resize((picture.width * 3, picture.height * 3), Image.BILINEAR)
