"""The digit classifier: a Flax NNX CNN built from a ModelConfig."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdigits.config import ModelConfig


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x_BxHxWxC, kernel_KxKxCxF, (1, 1), padding,
                                      dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, padding) -> jax.Array:
  """Stride-1 NHWC convolution whose kernel gradient is one matrix product.

  XLA on CPU computes a convolution's kernel gradient as a convolution over the batch, 2-3x
  slower than gathering the input patches and multiplying them with the output gradient; that
  gradient is the largest part of a training step. The forward pass and the input gradient are
  XLA's own.
  """
  return _conv(x_BxHxWxC, kernel_KxKxCxF, padding)


def _conv2d_fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, dy_BxHxWxF):
  x_BxHxWxC, kernel_KxKxCxF = residuals
  kh, kw, c, f = kernel_KxKxCxF.shape
  _, dx_vjp = jax.vjp(lambda x: _conv(x, kernel_KxKxCxF, padding), x_BxHxWxC)
  (dx,) = dx_vjp(dy_BxHxWxF)
  _, h, w, _ = dy_BxHxWxF.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), *padding, (0, 0)))
  # Patches in (ky, kx, c) order: the row-major layout of an HWIO kernel.
  patches_BxHxWxKKC = jnp.concatenate(
      [padded[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
  dkernel = jnp.einsum("bhwp,bhwf->pf", patches_BxHxWxKKC, dy_BxHxWxF)
  return dx, dkernel.reshape(kh, kw, c, f)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _conv_general_dilated(x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None,
                          **kwargs):
  """nnx.Conv's convolution hook: conv2d for the plain case this CNN builds, lax otherwise."""
  lax_kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers,
                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  nhwc = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
  plain = (x.ndim == 4 and tuple(strides) == (1, 1)
           and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and feature_group_count == 1 and precision is None
           and jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers) == nhwc
           and kwargs.get("out_sharding") is None and "preferred_element_type" not in kwargs)
  if not plain:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, **lax_kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  return conv2d(x, kernel, tuple(tuple(p) for p in padding))


def pool2x2(x_BxHxWxC: jax.Array, kind: str = "avg") -> jax.Array:
  """2x2 pooling with stride 2 ('VALID': an odd last row/column is dropped), as a reshape.

  Same result as nnx.avg_pool / nnx.max_pool with window and strides (2, 2), but XLA on CPU
  differentiates reduce_window about 5x slower than this reduction over reshaped axes.
  """
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
  return x.mean(axis=(2, 4)) if kind == "avg" else x.max(axis=(2, 4))


class CNN(nnx.Module):
  """Conv blocks (conv 'SAME' -> ReLU -> 2x2 pool) then ReLU dense layers and a linear head.

  With the default config this is the Flax MNIST example's network.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    k = (config.kernel_size, config.kernel_size)
    channels = (1,) + config.conv_features
    self.convs = nnx.List([nnx.Conv(c_in, c_out, kernel_size=k, rngs=rngs,
                                    conv_general_dilated=_conv_general_dilated)
                           for c_in, c_out in zip(channels[:-1], channels[1:])])
    side = 28
    for _ in config.conv_features:
      side //= 2
    widths = (side * side * config.conv_features[-1],) + config.dense_features
    self.denses = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.head = nnx.Linear(widths[-1], config.num_classes, rngs=rngs)
    self._pool = functools.partial(pool2x2, kind=config.pool)

  def __call__(self, images_BxHxWx1: jax.Array) -> jax.Array:
    """float32 images in [0, 1] -> logits_BxK."""
    x = images_BxHxWx1
    for conv in self.convs:
      x = self._pool(nnx.relu(conv(x)))
    x = x.reshape(x.shape[0], -1)
    for dense in self.denses:
      x = nnx.relu(dense(x))
    return self.head(x)


@functools.partial(nnx.jit, static_argnums=(0, 1))
def _initialised(config: ModelConfig, seed: int) -> CNN:
  return CNN(config, rngs=nnx.Rngs(params=seed))


def build_model(config: ModelConfig, seed: int = 0) -> CNN:
  """Builds the CNN with parameters initialised from `seed`.

  All initialisers run as one compiled program: eagerly, each parameter shape compiles its own
  truncated-normal kernel, about a second of a cold process on CPU. The parameters are the same
  bits either way.
  """
  return _initialised(config, seed)


def probabilities(model: CNN, images_BxHxWx1: jax.Array) -> jax.Array:
  """Class probabilities (B, K): what prediction, the inference bundle and exports compute."""
  return jax.nn.softmax(model(images_BxHxWx1), axis=-1)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
