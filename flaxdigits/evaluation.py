"""The loss, and exact evaluation: every example scored once, the last batch padded and dropped."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from flaxdigits import distributed, parallel
from flaxdigits.augment import rotate, shift_image
from flaxdigits.config import EVAL_BATCH_SIZE
from flaxdigits.data import IMAGE_SHAPE, NUM_CLASSES, Split, normalize
from flaxdigits.model import probabilities


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy (loss_B), optionally against smoothed targets."""
  targets_BxK = jax.nn.one_hot(labels_B, logits_BxK.shape[-1])
  if label_smoothing:
    targets_BxK = optax.smooth_labels(targets_BxK, label_smoothing)
  return optax.softmax_cross_entropy(logits_BxK, targets_BxK)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Accuracy and mean loss over `num_examples`, and the confusion matrix (rows: true label).

  `predicted` and `confidence` hold each example's predicted class and its probability, and
  `logits` its (N, 10) logits (with TTA, the log of the averaged probabilities), in the split's
  order.
  """

  accuracy: float
  loss: float
  num_examples: int
  confusion_matrix: np.ndarray
  predicted: np.ndarray
  confidence: np.ndarray
  logits: np.ndarray

  def per_class(self) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each digit, from the confusion matrix."""
    cm = self.confusion_matrix
    hits, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    rows = []
    for k in range(len(cm)):
      precision = hits[k] / predicted[k] if predicted[k] else 0.0
      recall = hits[k] / support[k] if support[k] else 0.0
      f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
      rows.append({"digit": k, "precision": float(precision), "recall": float(recall),
                   "f1": float(f1), "support": int(support[k])})
    return rows

  def most_confused(self, top: int = 10) -> list[dict[str, int]]:
    """The largest off-diagonal cells, as {true, predicted, count}, largest first."""
    off = self.confusion_matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    cells = [np.unravel_index(i, off.shape) for i in order]
    return [{"true": int(t), "predicted": int(p), "count": int(off[t, p])}
            for t, p in cells if off[t, p]]

  def to_dict(self) -> dict:
    return {"accuracy": self.accuracy, "loss": self.loss, "num_examples": self.num_examples,
            "confusion_matrix": self.confusion_matrix.tolist(), "per_class": self.per_class(),
            "most_confused": self.most_confused()}


# Test-time augmentation: the image itself and its one-pixel shifts up, down, left and right,
# within what training randomises. Chosen on the held-out images of the best preset's three
# seeds (scripts/compare_tta.py, 15,000 predictions): these five views matched the best set
# (99.75%, as did the seven with rotations by +-0.1 rad, the set before, and nine with +-0.2 rad
# too), so the cheapest of them. Rotations stay possible (TTA_ROTATIONS), and are off.
TTA_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
TTA_ROTATIONS: tuple[float, ...] = ()  # radians


def tta_views(images_BxHxWxC: jax.Array) -> list[jax.Array]:
  """The TTA_SHIFTS and TTA_ROTATIONS views of a batch (the first is the batch itself)."""
  return ([shift_image(images_BxHxWxC, dy, dx) for dy, dx in TTA_SHIFTS]
          + [rotate(images_BxHxWxC, angle) for angle in TTA_ROTATIONS])


def tta_log_probs(model: nnx.Module, images_BxHxWxC: jax.Array) -> jax.Array:
  """Log of the class probabilities averaged over the tta_views (usable as logits)."""
  probs = [probabilities(model, view) for view in tta_views(images_BxHxWxC)]
  return jnp.log(jnp.mean(jnp.stack(probs), axis=0))


@functools.partial(jax.jit, static_argnames=("graphdef", "sharding", "tta"))
def _eval_batch(graphdef, params, images_BxHxW, labels_B, *, sharding, tta=False):
  """Per-example loss, predicted class, confidence and logits of one batch, sharded like the batch.

  Nothing is summed across the batch here: a sum over a batch sharded on several devices is a
  cross-device all-reduce, and XLA:CPU's all-reduce can deadlock (aborting the process after
  40 s) when many such programs are queued without a data dependency between them, as the
  batches of an evaluation are. Per-example outputs need no communication; the host sums them.
  """
  images = jax.lax.with_sharding_constraint(normalize(images_BxHxW), sharding)
  model = nnx.merge(graphdef, params)
  logits_BxK = tta_log_probs(model, images) if tta else model(images)
  loss_B = cross_entropy(logits_BxK, labels_B)
  confidence_B = jnp.max(jax.nn.softmax(logits_BxK, -1), -1)
  return loss_B, jnp.argmax(logits_BxK, -1), confidence_B, logits_BxK


def _batch_size(n: int, batch_size: int, mesh: Mesh) -> int:
  """The batch evaluate uses for n examples: batch_size, or n if fewer, rounded up to a whole
  number of examples per device."""
  n_dev = mesh.devices.size
  return -(-min(batch_size, max(n, 1)) // n_dev) * n_dev


def compile_ahead(model: nnx.Module, num_examples: int, *, batch_size: int = EVAL_BATCH_SIZE,
                  mesh: Mesh, tta: bool = False) -> None:
  """Compiles the program that evaluate(model, split, ...) runs for a split of num_examples
  images, so that its first batch finds it compiled. `model` may be abstract
  (model.abstract_model): only its shapes count. For parallel.AheadOfTime."""
  graphdef, state = nnx.split(model)
  b = _batch_size(num_examples, batch_size, mesh)
  batch = (jax.ShapeDtypeStruct((b,) + IMAGE_SHAPE, np.uint8), jax.ShapeDtypeStruct((b,), np.int32))
  _eval_batch.lower(graphdef, *parallel.replicated_shapes((state, *batch), mesh),
                    sharding=parallel.batch_sharded(mesh), tta=tta).compile()


def evaluate(model: nnx.Module, split: Split, *, batch_size: int = EVAL_BATCH_SIZE,
             mesh: Mesh | None = None, tta: bool = False) -> EvalResult:
  """Scores every example of `split` exactly once with jitted inference (no gradients).

  With tta, each image is classified by the probabilities averaged over its tta_views (itself
  and its four one-pixel shifts): five forward passes per image.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  mesh = mesh or parallel.make_mesh()
  batch_size = _batch_size(len(split), batch_size, mesh)
  n = len(split)
  if n == 0:
    raise ValueError("cannot evaluate an empty split")
  padded = -(-n // batch_size) * batch_size
  pad = padded - n
  images = np.pad(split.images, ((0, pad), (0, 0), (0, 0)))
  labels = np.pad(split.labels.astype(np.int32), (0, pad))
  graphdef, params = nnx.split(model)
  params = parallel.replicate(params, mesh)
  # Batch by batch, so that one program serves splits of any length (training scores the
  # held-out images and then the test set: one compilation, not two).
  outputs = [_eval_batch(graphdef, params,
                         *parallel.replicate((images[start:start + batch_size],
                                              labels[start:start + batch_size]), mesh),
                         sharding=parallel.batch_sharded(mesh), tta=tta)
             for start in range(0, padded, batch_size)]
  # One program per batch, none with a collective; then (across processes) one all-gather.
  loss, predicted, confidence, logits = (
      x[:n] for x in distributed.gather_rows(list(zip(*outputs))))
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(confusion, (split.labels.astype(np.int64), predicted), 1)
  return EvalResult(accuracy=float(np.trace(confusion) / n),
                    loss=float(np.sum(loss, dtype=np.float64) / n),
                    num_examples=n, confusion_matrix=confusion,
                    predicted=predicted.astype(np.int64), confidence=confidence,
                    logits=logits.astype(np.float32))
