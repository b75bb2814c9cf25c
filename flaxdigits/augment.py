"""Image transforms: the deterministic ones shared by training's random augmentation and by
test-time augmentation (whole-pixel shifts, rotate/scale/shift warps about the image centre), and
training's random augmentation itself (shifts, affine warps, elastic distortion, stroke-width
jitter, and augment_batch: the recipe's combination of them)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from flaxdigits.config import TrainConfig


def shift_image(images_BxHxWxC: jax.Array, dy: int, dx: int) -> jax.Array:
  """Moves every image dy pixels down and dx right (|dy|, |dx| <= 1), filling with zeros."""
  _, h, w, _ = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w, :]


def affine_warp(images_BxHxWxC: jax.Array, angle_B: jax.Array, scale_B: jax.Array,
                shift_Bx2: jax.Array, displacement_Bx2xHxW: jax.Array | None = None) -> jax.Array:
  """Rotates each image by angle radians, scales it by scale and moves it by shift (pixels down,
  right), about its centre, with bilinear sampling (grayscale: one channel; zeros outside).

  With displacement_Bx2xHxW, each output pixel also samples that many pixels (down, right)
  further: an elastic distortion on top of the affine warp, in the same sampling pass.
  """
  _, h, w, _ = images_BxHxWxC.shape
  centre = (h - 1) / 2
  yy_HxW, xx_HxW = jnp.mgrid[0:h, 0:w].astype(jnp.float32) - centre

  def warp(image_HxWxC, angle, scale, shift_2, displacement_2xHxW=None):
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    source_y = cos * yy_HxW - sin * xx_HxW + centre - shift_2[0]
    source_x = sin * yy_HxW + cos * xx_HxW + centre - shift_2[1]
    if displacement_2xHxW is not None:  # without it, the program is the plain warp's
      source_y, source_x = source_y + displacement_2xHxW[0], source_x + displacement_2xHxW[1]
    return jax.scipy.ndimage.map_coordinates(image_HxWxC[..., 0], [source_y, source_x], order=1,
                                             mode="constant")[..., None]

  extra = () if displacement_Bx2xHxW is None else (displacement_Bx2xHxW,)
  return jax.vmap(warp)(images_BxHxWxC, angle_B, scale_B, shift_Bx2, *extra)


# The smoothing of elastic distortion's random fields (Simard et al., 2003, used sigma = 4 px on
# MNIST): fields this smooth bend strokes without tearing them.
ELASTIC_SIGMA = 4.0


def elastic_displacement(key: jax.Array, shape_BxHxW: tuple[int, int, int], alpha: float,
                         sigma: float = ELASTIC_SIGMA) -> jax.Array:
  """Random displacement fields (B, 2, H, W) in pixels: uniform noise in [-1, 1], smoothed by a
  Gaussian of sigma pixels (zeros beyond the edge), times alpha (Simard et al., 2003)."""
  b, h, w = shape_BxHxW
  radius = int(math.ceil(3 * sigma))
  taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1, dtype=jnp.float32) / sigma) ** 2)
  taps = taps / taps.sum()
  noise = jax.random.uniform(key, (2 * b, 1, h, w), minval=-1.0, maxval=1.0)
  smooth = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                             padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  fields = smooth(smooth(noise, taps.reshape(1, 1, -1, 1)), taps.reshape(1, 1, 1, -1))
  return alpha * fields.reshape(b, 2, h, w)


def rotate(images_BxHxWxC: jax.Array, angle: float, scale: float = 1.0) -> jax.Array:
  """Every image rotated by the same angle (radians), and scaled by scale, about its centre."""
  b = images_BxHxWxC.shape[0]
  return affine_warp(images_BxHxWxC, jnp.full((b,), angle, jnp.float32),
                     jnp.full((b,), scale, jnp.float32), jnp.zeros((b, 2), jnp.float32))


def augment_batch(config: TrainConfig, key: jax.Array, step: jax.Array,
                  images_BxHxWxC: jax.Array) -> jax.Array:
  """Training's random augmentation of one step's batch, as the recipe asks: an affine warp
  (or whole-pixel shifts when it asks no rotation or scaling), then stroke-width jitter. The
  randomness is a function of (key, step) alone, so a resumed run draws what it would have."""
  images = images_BxHxWxC
  step_key = jax.random.fold_in(jax.random.fold_in(key, 1), step)
  if config.max_rotation or config.max_scale or config.elastic:
    images = random_affine(step_key, images, config.max_shift, config.max_rotation,
                           config.max_scale, config.elastic)
  elif config.max_shift:
    images = random_shift(step_key, images, config.max_shift)
  if config.stroke_jitter:
    stroke_key = jax.random.fold_in(jax.random.fold_in(key, 2), step)
    images = random_stroke(stroke_key, images, config.stroke_jitter)
  return images


def random_shift(key: jax.Array, images_BxHxWxC: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by an independent random offset of up to max_shift pixels (zero fill)."""
  b, h, w, _ = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  offsets_Bx2 = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets_Bx2)


def random_affine(key: jax.Array, images_BxHxWxC: jax.Array, max_shift: float,
                  max_rotation: float, max_scale: float, elastic: float = 0.0) -> jax.Array:
  """Rotates (up to max_rotation radians), scales (by 1 +- max_scale) and shifts (up to
  max_shift pixels) each image about its centre, independently, with bilinear sampling; with
  elastic > 0, also bends it by an elastic distortion of that strength (elastic_displacement's
  alpha)."""
  b, h, w, _ = images_BxHxWxC.shape
  k_angle, k_scale, k_shift = jax.random.split(key, 3)
  angle_B = jax.random.uniform(k_angle, (b,), minval=-max_rotation, maxval=max_rotation)
  scale_B = jax.random.uniform(k_scale, (b,), minval=1 - max_scale, maxval=1 + max_scale)
  shift_Bx2 = jax.random.uniform(k_shift, (b, 2), minval=-max_shift, maxval=max_shift)
  displacement = None
  if elastic:  # its own key: the affine draws stay what they were without it
    displacement = elastic_displacement(jax.random.fold_in(key, 7), (b, h, w), elastic)
  return affine_warp(images_BxHxWxC, angle_B, scale_B, shift_Bx2, displacement)


def random_stroke(key: jax.Array, images_BxHxWxC: jax.Array, probability: float) -> jax.Array:
  """Thickens (2x2 max) or thins (2x2 min) each image's strokes with probability/2 each.

  Pens, markers and chalk draw strokes of very different widths from MNIST's; seeing varied
  widths in training makes the model robust to them.
  """
  windows = _neighbourhood_2x2(images_BxHxWxC)
  thick = functools.reduce(jnp.maximum, windows)
  thin = functools.reduce(jnp.minimum, windows)
  u_B = jax.random.uniform(key, images_BxHxWxC.shape[:1])[:, None, None, None]
  return jnp.where(u_B < probability / 2, thick,
                   jnp.where(u_B < probability, thin, images_BxHxWxC))


def _neighbourhood_2x2(images_BxHxWxC: jax.Array) -> list[jax.Array]:
  """Each pixel and its right, lower and lower-right neighbours: the four members of a 2x2
  'SAME' window (the edge repeated, so padding never wins a max or min), as shifted slices.

  reduce_window over the same windows runs several times slower on XLA's CPU backend.
  """
  _, h, w, _ = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
  return [padded[:, i:i + h, j:j + w, :] for i in (0, 1) for j in (0, 1)]
