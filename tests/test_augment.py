"""Training's augmentation (flaxdigits.augment): the random ops, and the recipe's combination."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxdigits import augment
from flaxdigits.config import TrainConfig


def test_random_shift_moves_each_image_within_bounds():
  images = np.zeros((16, 28, 28, 1), np.float32)
  images[:, 14, 14, 0] = 1.0
  shifted = np.asarray(augment.random_shift(jax.random.PRNGKey(0), images, 2))
  assert shifted.shape == images.shape and np.allclose(shifted.sum((1, 2, 3)), 1.0)
  rows = np.nonzero(shifted[..., 0].reshape(16, -1))[1] // 28 - 14
  assert np.all(np.abs(rows) <= 2) and len(set(rows.tolist())) > 1


def test_random_stroke_thickens_thins_or_keeps():
  images = np.zeros((64, 28, 28, 1), np.float32)
  images[:, 10:18, 13:15, 0] = 1.0  # a 2-px-wide bar
  out = np.asarray(augment.random_stroke(jax.random.PRNGKey(0), images, 0.5))
  ink = out.sum((1, 2, 3))
  assert set(np.unique(ink).tolist()) <= {7.0, 16.0, 27.0}  # thinned, unchanged, thickened
  assert (ink == 16.0).sum() > 16 and (ink == 7.0).sum() > 4 and (ink == 27.0).sum() > 4
  np.testing.assert_array_equal(augment.random_stroke(jax.random.PRNGKey(0), images, 0.0),
                                images)


def test_random_stroke_windows_are_2x2_same_max_and_min():
  # Ink on every border row and column: where the window hangs over the edge.
  images = jax.random.uniform(jax.random.PRNGKey(3), (4, 28, 28, 1))
  window = ((1, 2, 2, 1), (1, 1, 1, 1), "SAME")
  want_thick = jax.lax.reduce_window(images, -np.inf, jax.lax.max, *window)
  want_thin = jax.lax.reduce_window(images, np.inf, jax.lax.min, *window)
  # With probability 1, each image is thickened (its draw < 0.5) or else thinned.
  draws = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (4,)))[:, None, None, None]
  assert 0 < (draws < 0.5).sum() < 4
  np.testing.assert_array_equal(augment.random_stroke(jax.random.PRNGKey(0), images, 1.0),
                                np.where(draws < 0.5, want_thick, want_thin))


def test_random_affine_is_identity_at_zero_and_keeps_ink_otherwise():
  rng = np.random.default_rng(0)
  images = np.zeros((32, 28, 28, 1), np.float32)
  images[:, 8:20, 12:16, 0] = rng.uniform(0.5, 1.0, (32, 12, 4))
  same = augment.random_affine(jax.random.PRNGKey(0), images, 0, 0.0, 0.0)
  np.testing.assert_allclose(same, images, atol=1e-6)
  moved = np.asarray(augment.random_affine(jax.random.PRNGKey(1), images, 2, 0.15, 0.1))
  assert moved.shape == images.shape and not np.allclose(moved, images)
  # Rotation and a scale of 1 +- 0.1 keep the ink's mass within the scale's square, and the
  # bar's centre within the shift and the rotation's reach of where it was.
  ratio = moved.sum((1, 2, 3)) / images.sum((1, 2, 3))
  assert np.all((ratio > 0.75) & (ratio < 1.3))
  ys, xs = np.mgrid[0:28, 0:28]
  cy = (moved[..., 0] * ys).sum((1, 2)) / moved[..., 0].sum((1, 2))
  cx = (moved[..., 0] * xs).sum((1, 2)) / moved[..., 0].sum((1, 2))
  assert np.all(np.abs(cy - 13.5) <= 3) and np.all(np.abs(cx - 13.5) <= 3)
  assert np.std(cy) > 0.3  # each image gets its own transform


def test_augment_batch_follows_the_recipe_and_depends_on_key_and_step_only():
  images = jnp.zeros((4, 28, 28, 1)).at[:, 10:18, 12:16, :].set(1.0)
  key = jax.random.PRNGKey(0)
  plain = TrainConfig(max_shift=0, max_rotation=0.0, max_scale=0.0, stroke_jitter=0.0)
  np.testing.assert_array_equal(augment.augment_batch(plain, key, 3, images), images)
  recipe = TrainConfig()
  once = np.asarray(augment.augment_batch(recipe, key, 3, images))
  np.testing.assert_array_equal(once, augment.augment_batch(recipe, key, 3, images))
  assert not np.array_equal(once, augment.augment_batch(recipe, key, 4, images))
  assert not np.array_equal(once, np.asarray(images))
  shifts = TrainConfig(max_shift=1, max_rotation=0.0, max_scale=0.0, stroke_jitter=0.0)
  shifted = np.asarray(augment.augment_batch(shifts, key, 3, images))
  assert set(np.unique(shifted)) <= {0.0, 1.0}  # whole-pixel moves: no interpolation
  assert (shifted.sum(axis=(1, 2, 3)) == 32).all()  # 8x4 blocks, never cut at the edge


def test_elastic_displacement_is_smooth_random_and_scales_with_alpha():
  key = jax.random.PRNGKey(0)
  unit = np.asarray(augment.elastic_displacement(key, (16, 28, 28), 1.0))
  assert unit.shape == (16, 2, 28, 28)
  np.testing.assert_allclose(augment.elastic_displacement(key, (16, 28, 28), 34.0), 34 * unit,
                             rtol=1e-5, atol=1e-6)
  # Smoothed at sigma = 4 px: neighbours move nearly alike, far pixels independently, and the
  # smoothed field is much weaker than its uniform noise (std 0.58).
  inner = unit[..., 8:20, 8:20]
  step = np.abs(np.diff(inner, axis=-1)).mean()
  assert step < 0.2 * np.abs(inner).mean()
  assert 0.005 < unit.std() < 0.1
  assert not np.allclose(unit[0], unit[1])  # each image and each axis its own field
  assert not np.allclose(unit[:, 0], unit[:, 1])


def test_elastic_distortion_bends_strokes_and_keeps_the_affine_draws():
  images = jnp.zeros((8, 28, 28, 1)).at[:, 6:22, 12:16, :].set(1.0)
  key = jax.random.PRNGKey(3)
  affine = np.asarray(augment.random_affine(key, images, 1, 0.1, 0.1))
  bent = np.asarray(augment.random_affine(key, images, 1, 0.1, 0.1, elastic=34.0))
  assert not np.allclose(bent, affine)
  ratio = bent.sum((1, 2, 3)) / affine.sum((1, 2, 3))
  # Bent: stretched here, squeezed there (the mass follows the local area), never erased.
  assert np.all((ratio > 0.6) & (ratio < 1.8))
  # Alone (no rotation or scale asked), it still runs, through the warp.
  elastic_only = TrainConfig(max_shift=0, max_rotation=0.0, max_scale=0.0, stroke_jitter=0.0,
                             elastic=20.0)
  out = np.asarray(augment.augment_batch(elastic_only, key, 0, images))
  assert not np.array_equal(out, np.asarray(images))
  assert np.all(np.abs(out.sum((1, 2, 3)) / 64 - 1) < 0.2)
