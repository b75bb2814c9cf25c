"""Builds a realistic digit test set from MNIST *test* digits, the way real inputs arrive.

(--split train renders training digits instead: a set to choose preprocessing settings on;
--split validation the held-out training digits, to choose training settings on.)

  python scripts/make_realistic_set.py --data-dir ../shared/data/mnist --out realistic

Kinds (one folder each; file names carry the true label as `<index>_<label>.<ext>`):
  paper_jpeg   dark ink on light paper, gradient lighting, sensor noise, saved as JPEG
  canvas_rgba  a drawing-canvas export: dark strokes on a fully transparent background (PNG)
  colour_pen   blue, red or green pen on tinted paper (PNG)
  chalk        light chalk on a dark board with texture (JPEG)
  thick        marker-thick strokes on white (PNG)
  thin         fine-pen strokes on white (PNG)
  phone        a 12-megapixel phone photo of a digit on paper: 3000-4000 px, uneven light,
               vignetting, lens blur, sensor noise, JPEG; a third are stored turned and carry
               the EXIF orientation tag that turns them back (JPEG)
Every kind also gets a small random rotation (up to 12 degrees), a random digit size and a
random, usually off-centre, position in a canvas of 64 to 480 px (phone: the full frame).
Phone photos are large (about 2-4 MB each), so they have their own count, --phone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

KINDS = ("paper_jpeg", "canvas_rgba", "colour_pen", "chalk", "thick", "thin", "phone")
# EXIF orientation -> the transpose that stores a picture so that the tag turns it upright.
_STORED_TURNED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                  8: Image.Transpose.ROTATE_270}


def place(ink: np.ndarray, rng: np.random.Generator, stroke: str = "normal") -> np.ndarray:
  """Scales an MNIST ink map (28x28, [0, 1]) into a random canvas at a random spot."""
  side = int(rng.integers(64, 481))
  digit = int(rng.integers(int(side * 0.3), int(side * 0.85) + 1))
  up = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((digit, digit),
                                                                        Image.BICUBIC)) / 255.0
  up = ndimage.rotate(up, float(rng.uniform(-12, 12)), reshape=False, order=1)
  px = digit / 28  # canvas pixels per MNIST pixel
  if stroke == "thick":
    up = ndimage.grey_dilation(up, size=max(2, int(round(px * 1.5))))
  elif stroke == "thin":
    up = ndimage.grey_erosion(up, size=max(2, int(round(px * 1.2))))
    up = np.where(up > 0.3, np.maximum(up, 0.9), 0)
  canvas = np.zeros((side, side))
  top, left = (int(rng.integers(0, side - digit + 1)) for _ in range(2))
  canvas[top:top + digit, left:left + digit] = np.clip(up, 0, 1)
  return canvas


def lighting(side: int, rng: np.random.Generator) -> np.ndarray:
  """A smooth gradient of illumination across the page, 0.65 to 1.0."""
  y, x = np.mgrid[0:side, 0:side] / side
  angle = rng.uniform(0, 2 * np.pi)
  g = np.cos(angle) * x + np.sin(angle) * y
  g = (g - g.min()) / max(g.max() - g.min(), 1e-6)
  return 1.0 - rng.uniform(0.15, 0.35) * g


def phone_photo(ink28: np.ndarray, rng: np.random.Generator,
                size: tuple[int, int] | None = None) -> tuple[Image.Image, Image.Exif]:
  """A 3000-4000 px photo of a pen digit on paper, as a phone camera takes it, and its EXIF.

  `size` (width, height) fixes the frame; by default it is 3000-4000 px on the long side, 4:3,
  in either orientation.

  The picture is composed at a quarter of its size (everything in it is smooth at that scale),
  brought to full size, then given per-pixel sensor noise and lens blur at full size.
  """
  long_side = int(rng.integers(3000, 4001))
  width, height = long_side, long_side * 3 // 4
  if rng.random() < 0.5:
    width, height = height, width
  width, height = size or (width, height)
  w, h = width // 4, height // 4
  digit = int(rng.uniform(0.25, 0.6) * min(w, h))
  up = np.asarray(Image.fromarray((ink28 * 255).astype(np.uint8)).resize(
      (digit, digit), Image.BICUBIC)) / 255.0
  up = ndimage.rotate(up, float(rng.uniform(-12, 12)), reshape=False, order=1)
  ink = np.zeros((h, w))
  top, left = int(rng.integers(0, h - digit + 1)), int(rng.integers(0, w - digit + 1))
  ink[top:top + digit, left:left + digit] = np.clip(up, 0, 1)
  paper = np.array([0.93, 0.9, 0.84]) * rng.uniform(0.8, 1.0)  # warm indoor light on paper
  pen = np.full(3, rng.uniform(0.05, 0.3)) + rng.uniform(-0.05, 0.05, 3)
  rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
  y, x = np.mgrid[0:h, 0:w]
  vignette = 1 - 0.35 * (((x - w / 2) / w) ** 2 + ((y - h / 2) / h) ** 2)
  rgb = rgb * (lighting_rect(h, w, rng) * vignette)[..., None]
  small = Image.fromarray(np.uint8(np.clip(rgb, 0, 1) * 255))
  full = small.resize((width, height), Image.BICUBIC).filter(
      ImageFilter.GaussianBlur(float(rng.uniform(1.0, 4.0))))
  noise = rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(3, 10)
  pixels = np.clip(np.asarray(full, np.float32) + noise, 0, 255).astype(np.uint8)
  photo = Image.fromarray(pixels)
  exif = Image.Exif()
  orientation = int(rng.choice([1, 1, 3, 6, 8, 1]))
  if orientation != 1:
    photo = photo.transpose(_STORED_TURNED[orientation])
    exif[0x0112] = orientation
  return photo, exif


def lighting_rect(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """lighting() for an h x w page."""
  side = max(h, w)
  return lighting(side, rng)[:h, :w]


def render(kind: str, ink28: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, str]:
  stroke = kind if kind in ("thick", "thin") else "normal"
  ink = place(ink28, rng, stroke)
  side = ink.shape[0]
  if kind == "canvas_rgba":
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 40)
    rgba[..., 3] = np.rint(ink * 255)
    return Image.fromarray(rgba, "RGBA"), "png"
  if kind == "chalk":
    board = np.array(rng.choice([[30, 60, 40], [25, 25, 30]]), float) / 255
    texture = ndimage.gaussian_filter(rng.normal(0, 1, ink.shape), 1.0)
    chalk = ink * np.clip(0.85 + 0.15 * texture, 0, 1)
    rgb = board * (1 - chalk[..., None]) + 0.92 * chalk[..., None]
    rgb = rgb * lighting(side, rng)[..., None] + rng.normal(0, 0.03, rgb.shape)
    return Image.fromarray(np.uint8(np.clip(rgb, 0, 1) * 255)), "jpg"
  if kind == "colour_pen":
    paper = np.array(rng.choice([[250, 240, 200], [235, 240, 250], [245, 230, 230]]), float) / 255
    pen = np.array(rng.choice([[30, 60, 200], [200, 30, 40], [20, 140, 60]]), float) / 255
  elif kind == "paper_jpeg":
    paper = np.full(3, rng.uniform(0.85, 1.0))
    pen = np.full(3, rng.uniform(0.05, 0.25))
  else:  # thick / thin on white
    paper, pen = np.ones(3), np.full(3, 0.1)
  rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
  if kind == "paper_jpeg":
    rgb = rgb * lighting(side, rng)[..., None] + rng.normal(0, 0.04, rgb.shape)
  return Image.fromarray(np.uint8(np.clip(rgb, 0, 1) * 255)), "jpg" if kind == "paper_jpeg" \
      else "png"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--out", default="realistic")
  parser.add_argument("--per-kind", type=int, default=2000)
  parser.add_argument("--phone", type=int, default=500, help="phone photos (2-4 MB each)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", choices=("test", "train", "validation"), default="test",
                      help="the MNIST digits to render: test (to report on), train (to choose "
                           "preprocessing settings on, never looking at test) or validation "
                           "(the training images `digits train` holds out by default, which no "
                           "such model has seen: to choose training settings on)")
  args = parser.parse_args()
  from flaxdigits.config import TrainConfig
  from flaxdigits.data import hold_out, load_mnist
  split = "train" if args.split == "validation" else args.split
  test = load_mnist(args.data_dir, (split,))[split]
  if args.split == "validation":
    test = hold_out(test, TrainConfig().validation)[1]
  rng = np.random.default_rng(args.seed)
  for kind in KINDS:
    count = args.phone if kind == "phone" else args.per_kind
    if count == 0:
      continue
    if kind == "phone":  # a generator of its own: the other kinds stay what they were before it
      rng = np.random.default_rng([args.seed, len(KINDS)])
    folder = Path(args.out) / kind
    folder.mkdir(parents=True, exist_ok=True)
    for index in rng.choice(len(test), count, replace=False):
      name = folder / f"{index:05d}_{test.labels[index]}"
      if kind == "phone":
        photo, exif = phone_photo(test.images[index] / 255.0, rng)
        photo.save(f"{name}.jpg", quality=int(rng.integers(80, 93)), exif=exif)
      else:
        image, ext = render(kind, test.images[index] / 255.0, rng)
        image.save(f"{name}.{ext}", quality=85)
    print(f"{kind}: {count} images in {folder}/")


if __name__ == "__main__":
  main()
