"""Classifying user images: a Predictor loads a checkpoint once and runs batched jitted calls."""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdigits.checkpoint import load_model
from flaxdigits.preprocess import ImageSource, to_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_BUCKETS = (1, 8, 64, 512)  # batch sizes compiled for: few shapes, little padding


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The answer for one input; `digit` is None and `error` says why when it failed."""

  source: str
  digit: int | None
  confidence: float | None
  probabilities: list[float] | None
  image: np.ndarray | None = None  # the 28x28 the model saw
  error: str | None = None

  def top_k(self, k: int) -> list[tuple[int, float]]:
    if self.probabilities is None:
      return []
    order = np.argsort(self.probabilities)[::-1][:k]
    return [(int(d), float(self.probabilities[d])) for d in order]

  def to_dict(self) -> dict:
    return {"file": self.source, "digit": self.digit, "confidence": self.confidence,
            "probabilities": self.probabilities, "error": self.error}


@jax.jit
def _probabilities(graphdef, params, images_Bx28x28: jax.Array) -> jax.Array:
  return jax.nn.softmax(nnx.merge(graphdef, params)(images_Bx28x28[..., None]), axis=-1)


class Predictor:
  """Loads a model once; classifies paths, bytes, PIL images or arrays with one preprocessing."""

  def __init__(self, model: nnx.Module):
    self.model = model
    self._graphdef, self._params = nnx.split(model)

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> "Predictor":
    return cls(load_model(checkpoint_dir)[0])

  def warm_up(self) -> None:
    """Compiles the smallest batch shape now rather than on the first request."""
    self.probabilities(np.zeros((1, 28, 28), np.float32))

  def probabilities(self, images_Nx28x28: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) for already-preprocessed float images in [0, 1]."""
    images = np.asarray(images_Nx28x28, np.float32)
    out = []
    for start in range(0, len(images), _BUCKETS[-1]):
      chunk = images[start:start + _BUCKETS[-1]]
      size = next(b for b in _BUCKETS if b >= len(chunk))
      padded = np.zeros((size, 28, 28), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(_probabilities(self._graphdef, self._params, jnp.asarray(padded)))
                 [:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)

  def predict(self, sources: Sequence[ImageSource],
              names: Sequence[str] | None = None) -> list[Prediction]:
    """Preprocesses every input, then classifies all that succeeded in batched calls."""
    names = list(names) if names is not None else [_name(s) for s in sources]
    images, errors = [], []
    for source in sources:
      try:
        images.append(to_mnist(source))
        errors.append(None)
      except (ValueError, FileNotFoundError) as e:
        images.append(None)
        errors.append(str(e))
    ok = [i for i, img in enumerate(images) if img is not None]
    probs = self.probabilities(np.stack([images[i] for i in ok])) if ok else []
    by_index = dict(zip(ok, probs))
    results = []
    for i, name in enumerate(names):
      if i in by_index:
        p = by_index[i]
        results.append(Prediction(name, int(np.argmax(p)), float(np.max(p)),
                                  [float(x) for x in p], images[i]))
      else:
        results.append(Prediction(name, None, None, None, None, errors[i]))
    return results


def _name(source: ImageSource) -> str:
  return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def expand_paths(patterns: Iterable[str]) -> list[str]:
  """Files, directories (their images, sorted) and globs -> image paths, in the given order.

  A pattern that matches nothing is kept as it is, so that it is reported as missing.
  """
  paths: list[str] = []
  for pattern in patterns:
    path = Path(pattern)
    if path.is_dir():
      found = sorted(str(p) for p in path.iterdir()
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
      paths.extend(found or [pattern])  # an empty folder is reported as a failed input
    elif not path.exists() and glob.has_magic(pattern):
      matches = sorted(glob.glob(pattern))
      paths.extend(matches if matches else [pattern])
    else:
      paths.append(pattern)
  return paths
