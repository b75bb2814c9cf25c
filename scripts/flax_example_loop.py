"""A faithful reimplementation of the Flax MNIST example's training loop, as a baseline.

The example's CNN (conv 32 -> avg pool -> conv 64 -> avg pool -> dense 256 -> 10, the shape of
flaxdigits' default, written as the example writes it: nnx.Conv and nnx.avg_pool), the example's
optimiser (SGD, lr 0.1, momentum 0.9, batch 128) and its loop: shuffle on the host
with numpy, slice host numpy batches, scale to [0, 1] on the host, and call one `nnx.jit` step per
batch that updates the model, optimizer and an `nnx.MultiMetric` in place.
"""

from __future__ import annotations

import functools
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx



class CNN(nnx.Module):
  """The Flax MNIST tutorial's model, verbatim."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.conv1(x)))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.linear1(x))
    return self.linear2(x)


def loss_fn(model, batch):
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model, optimizer, metrics, batch):
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


@nnx.jit
def eval_step(model, metrics, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])


class FlaxExampleLoop:
  """The example's state: model, optimizer and metrics, stepped from host numpy batches."""

  def __init__(self, seed: int = 0, learning_rate: float = 0.1, momentum: float = 0.9,
               batch_size: int = 128):
    self.model = CNN(rngs=nnx.Rngs(seed))
    self.optimizer = nnx.Optimizer(self.model, optax.sgd(learning_rate, momentum), wrt=nnx.Param)
    self.metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                                   loss=nnx.metrics.Average("loss"))
    self.batch_size = batch_size
    self.rng = np.random.default_rng(seed)

  def batches(self, images: np.ndarray, labels: np.ndarray):
    perm = self.rng.permutation(len(images))
    steps = len(images) // self.batch_size
    for idx in perm[:steps * self.batch_size].reshape(steps, self.batch_size):
      yield {"image": (images[idx] / 255.0).astype(np.float32)[..., None],
             "label": labels[idx].astype(np.int32)}

  def train(self, images: np.ndarray, labels: np.ndarray, max_steps: int | None = None) -> float:
    """Trains one epoch (or max_steps steps); returns the seconds taken, blocking at the end."""
    start = time.perf_counter()
    self.metrics.reset()
    for step, batch in enumerate(self.batches(images, labels)):
      if max_steps is not None and step >= max_steps:
        break
      train_step(self.model, self.optimizer, self.metrics, batch)
    self.metrics.compute()["loss"].block_until_ready()
    return time.perf_counter() - start

  def evaluate(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    self.metrics.reset()
    for i in range(0, len(images), batch_size):
      eval_step(self.model, self.metrics, {
          "image": jnp.asarray(images[i:i + batch_size] / 255.0, jnp.float32)[..., None],
          "label": jnp.asarray(labels[i:i + batch_size], jnp.int32)})
    return float(self.metrics.compute()["accuracy"])
