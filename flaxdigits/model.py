"""The digit classifier: a Flax NNX CNN built from a ModelConfig."""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
from flax import nnx

from flaxdigits.config import ModelConfig
from flaxdigits.parallel import run_once_options


def pool2x2(x_BxHxWxC: jax.Array, kind: str = "avg") -> jax.Array:
  """2x2 pooling with stride 2 ('VALID': an odd last row/column is dropped), as a reshape.

  Same result as nnx.avg_pool / nnx.max_pool with window and strides (2, 2), but XLA on CPU
  differentiates reduce_window about 5x slower than this reduction over reshaped axes.
  """
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
  return x.mean(axis=(2, 4)) if kind == "avg" else x.max(axis=(2, 4))


class CNN(nnx.Module):
  """Conv blocks (conv 'SAME' -> ReLU, config.block_depths of them, then a 2x2 pool) then ReLU
  dense layers and a linear head.

  With the default config this is the Flax MNIST example's network. With config.norm "batch",
  every conv (then without bias) is followed by batch normalisation: batch statistics when
  called with train=True, which also updates the running averages (nnx.BatchStat state), and
  the running averages otherwise. With config.dropout, each dense layer's input (the head's
  included) is dropped out when a dropout_key is given: in training. Called plainly, the model is
  deterministic and stateless, as evaluation, prediction and exports call it.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    k = (config.kernel_size, config.kernel_size)
    # Every conv's (in, out) channels, block after block: one list, so that a model of one conv
    # per block has the layers (and the checkpoints) it had before blocks could be deeper.
    shapes, c_in = [], 1
    for c_out, depth in zip(config.conv_features, config.block_depths):
      shapes += [(c_in, c_out)] + [(c_out, c_out)] * (depth - 1)
      c_in = c_out
    batch_norm = config.norm == "batch"
    self.convs = nnx.List([nnx.Conv(c_in, c_out, kernel_size=k, use_bias=not batch_norm, rngs=rngs)
                           for c_in, c_out in shapes])
    self.norms = nnx.List([nnx.BatchNorm(c_out, use_running_average=True, momentum=0.9, rngs=rngs)
                           for _, c_out in shapes] if batch_norm else [])
    side = 28
    for _ in config.conv_features:
      side //= 2
    widths = (side * side * config.conv_features[-1],) + config.dense_features
    self.denses = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.head = nnx.Linear(widths[-1], config.num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout)
    # Everything static in the module is plain, value-compared data (the config is a frozen
    # dataclass): two models of one config have equal graphdefs, so jitted functions that take
    # the graphdef as a static argument compile once for all of them, not once per instance.

  def __call__(self, images_BxHxWx1: jax.Array, *, dropout_key: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """float32 images in [0, 1] -> logits_BxK."""
    x = images_BxHxWx1
    layers = iter(range(len(self.convs)))
    for depth in self.config.block_depths:
      for i in itertools.islice(layers, depth):
        x = self.convs[i](x)
        if self.norms:
          x = self.norms[i](x, use_running_average=not train)
        x = nnx.relu(x)
      x = pool2x2(x, self.config.pool)
    x = x.reshape(x.shape[0], -1)
    n = len(self.denses) + 1  # the head's input is dropped out too
    dropping = dropout_key is not None and self.config.dropout
    keys = list(jax.random.split(dropout_key, n)) if dropping else [None] * n
    # Dropout is skipped, not called deterministically, without a key: exporters such as
    # jax2onnx patch nnx.Dropout's call with a signature of their own.
    def drop(x, key):
      return x if key is None else self.dropout(x, rngs=key)

    for dense, key in zip(self.denses, keys):
      x = nnx.relu(dense(drop(x, key)))
    return self.head(drop(x, keys[-1]))


def abstract_model(config: ModelConfig) -> CNN:
  """The CNN with shapes but no parameter values: what restoring or exporting needs."""
  return nnx.eval_shape(lambda: CNN(config, rngs=nnx.Rngs(params=0)))


@functools.cache
def _init_program(config: ModelConfig) -> Callable[[jax.Array], nnx.State]:
  def init(key):
    return nnx.state(CNN(config, rngs=nnx.Rngs(params=key)))
  # The program runs once, in milliseconds, but LLVM's optimisations cost ~1.7 of its 2.1 s of
  # compilation on CPU. Unoptimised, a few truncated-normal draws round differently in the last
  # bit.
  return jax.jit(init).lower(jax.eval_shape(jax.random.key, 0)).compile(run_once_options())


def build_model(config: ModelConfig, seed: int = 0) -> CNN:
  """Builds the CNN with parameters initialised from `seed`.

  All initialisers run as one compiled program: eagerly, each parameter shape compiles its own
  truncated-normal kernel, about a second of a cold process on CPU.
  """
  # Traced outside compile-time evaluation, which would run each initialiser's constants (fan-in
  # scales, iotas) eagerly as programs of their own: 14 compilations, ~0.5 s of a cold process.
  program = _init_program(config)
  with jax.ensure_compile_time_eval():  # concrete even inside another trace
    params = program(jax.random.key(seed))
  return nnx.merge(nnx.graphdef(abstract_model(config)), params)


def probabilities(model: CNN, images_BxHxWx1: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Class probabilities (B, K), softmax(logits / temperature): what prediction, the inference
  bundle and exports compute (with the checkpoint's fitted temperature)."""
  return jax.nn.softmax(model(images_BxHxWx1) / temperature, axis=-1)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
