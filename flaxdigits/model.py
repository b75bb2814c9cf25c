"""The digit classifier: a Flax NNX CNN built from a ModelConfig."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from flaxdigits.config import ModelConfig


class CNN(nnx.Module):
  """Conv blocks (conv 'SAME' -> ReLU -> 2x2 pool) then ReLU dense layers and a linear head.

  With the default config this is the Flax MNIST example's network.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    k = (config.kernel_size, config.kernel_size)
    channels = (1,) + config.conv_features
    self.convs = nnx.List([nnx.Conv(c_in, c_out, kernel_size=k, rngs=rngs)
                           for c_in, c_out in zip(channels[:-1], channels[1:])])
    side = 28
    for _ in config.conv_features:
      side //= 2
    widths = (side * side * config.conv_features[-1],) + config.dense_features
    self.denses = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.head = nnx.Linear(widths[-1], config.num_classes, rngs=rngs)
    pool = nnx.avg_pool if config.pool == "avg" else nnx.max_pool
    self._pool = functools.partial(pool, window_shape=(2, 2), strides=(2, 2))

  def __call__(self, images_BxHxWx1: jax.Array) -> jax.Array:
    """float32 images in [0, 1] -> logits_BxK."""
    x = images_BxHxWx1
    for conv in self.convs:
      x = self._pool(nnx.relu(conv(x)))
    x = x.reshape(x.shape[0], -1)
    for dense in self.denses:
      x = nnx.relu(dense(x))
    return self.head(x)


def build_model(config: ModelConfig, seed: int = 0) -> CNN:
  """Builds the CNN with parameters initialised from `seed`."""
  return CNN(config, rngs=nnx.Rngs(params=seed))


def probabilities(model: CNN, images_BxHxWx1: jax.Array) -> jax.Array:
  """Class probabilities (B, K): what prediction, the inference bundle and exports compute."""
  return jax.nn.softmax(model(images_BxHxWx1), axis=-1)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
