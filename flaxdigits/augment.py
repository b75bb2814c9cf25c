"""Deterministic image transforms shared by training's random augmentation and by test-time
augmentation: whole-pixel shifts and rotate/scale/shift warps about the image centre."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_image(images_BxHxWxC: jax.Array, dy: int, dx: int) -> jax.Array:
  """Moves every image dy pixels down and dx right (|dy|, |dx| <= 1), filling with zeros."""
  _, h, w, _ = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w, :]


def affine_warp(images_BxHxWxC: jax.Array, angle_B: jax.Array, scale_B: jax.Array,
                shift_Bx2: jax.Array) -> jax.Array:
  """Rotates each image by angle radians, scales it by scale and moves it by shift (pixels down,
  right), about its centre, with bilinear sampling (grayscale: one channel; zeros outside)."""
  _, h, w, _ = images_BxHxWxC.shape
  centre = (h - 1) / 2
  yy_HxW, xx_HxW = jnp.mgrid[0:h, 0:w].astype(jnp.float32) - centre

  def warp(image_HxWxC, angle, scale, shift_2):
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    source_y = cos * yy_HxW - sin * xx_HxW + centre - shift_2[0]
    source_x = sin * yy_HxW + cos * xx_HxW + centre - shift_2[1]
    return jax.scipy.ndimage.map_coordinates(image_HxWxC[..., 0], [source_y, source_x], order=1,
                                             mode="constant")[..., None]

  return jax.vmap(warp)(images_BxHxWxC, angle_B, scale_B, shift_Bx2)


def rotate(images_BxHxWxC: jax.Array, angle: float, scale: float = 1.0) -> jax.Array:
  """Every image rotated by the same angle (radians), and scaled by scale, about its centre."""
  b = images_BxHxWxC.shape[0]
  return affine_warp(images_BxHxWxC, jnp.full((b,), angle, jnp.float32),
                     jnp.full((b,), scale, jnp.float32), jnp.zeros((b, 2), jnp.float32))
