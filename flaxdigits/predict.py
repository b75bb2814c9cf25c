"""Classifying user images: a Predictor loads a model once and runs batched jitted calls."""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdigits import bundle
from flaxdigits.calibration import Calibration, scores
from flaxdigits.preprocess import ImageSource, to_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Batch sizes compiled for: powers of two up to 64 (a server's batches waste at most half a call on
# padding), then 512 for long lists of files.
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 512)


NOT_A_DIGIT = "not a digit"


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The answer for one input.

  `digit` is None when the input failed (`error` says why) or was rejected: then `reason` is
  "not a digit", and `confidence` and `probabilities` still show what the model thought.
  `score` is the not-a-digit score (the largest calibrated probability) and `threshold` the
  checkpoint's (None where the reject option is off or the checkpoint has no calibration).
  """

  source: str
  digit: int | None
  confidence: float | None
  probabilities: list[float] | None
  image: np.ndarray | None = None  # the 28x28 the model saw
  error: str | None = None
  reason: str | None = None
  score: float | None = None
  threshold: float | None = None

  @property
  def rejected(self) -> bool:
    return self.reason == NOT_A_DIGIT

  def top_k(self, k: int) -> list[tuple[int, float]]:
    if self.probabilities is None:
      return []
    order = np.argsort(self.probabilities)[::-1][:k]
    return [(int(d), float(self.probabilities[d])) for d in order]

  def to_dict(self) -> dict:
    return {"file": self.source, "digit": self.digit, "confidence": self.confidence,
            "probabilities": self.probabilities, "error": self.error, "reason": self.reason,
            "score": self.score, "threshold": self.threshold}


class Predictor:
  """Classifies paths, bytes, PIL images or arrays, all through one preprocessing (`to_mnist`).

  Wraps a jitted `probabilities(images_Bx28x28) -> probs_Bx10` (calibrated: computed at the
  calibration's temperature); build one with `from_checkpoint` or `from_model`. With a
  calibration and `reject` on, inputs whose score falls below its threshold come back as "not a
  digit".
  """

  def __init__(self, probabilities_fn: Callable[[jax.Array], jax.Array],
               meta: dict[str, Any] | None = None, calibration: Calibration | None = None,
               reject: bool = True):
    self._probabilities = probabilities_fn
    # Where the model came from: its step and, when newer steps were damaged, why they were
    # skipped (meta["damaged"]).
    self.meta = meta or {"damaged": []}
    self.calibration = calibration
    self.reject = reject

  @property
  def threshold(self) -> float | None:
    """The not-a-digit threshold in force, or None (reject off, or no calibration)."""
    return self.calibration.threshold if self.reject and self.calibration else None

  @classmethod
  def from_model(cls, model: Any, calibration: Calibration | None = None, *,
                 reject: bool = True) -> "Predictor":
    """From an NNX model in memory (for example `train(...).model`)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from flaxdigits.model import probabilities  # pylint: disable=import-outside-toplevel
    graphdef, params = nnx.split(model)
    temperature = calibration.temperature if calibration else 1.0
    call = jax.jit(lambda p, x: probabilities(nnx.merge(graphdef, p), x[..., None], temperature))
    return cls(lambda images: call(params, images), calibration=calibration, reject=reject)

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, *,
                      reject: bool = True) -> "Predictor":
    """From the latest checkpoint: its inference bundle when current, else the Orbax checkpoint.

    reject=False turns the not-a-digit verdict off: every input with ink gets a digit.
    """
    path = bundle.find(checkpoint_dir)
    if path is not None:
      try:
        loaded = bundle.load(path)
        return cls(loaded.probabilities, {"step": loaded.step, "damaged": []},
                   _calibration(loaded.calibration), reject)
      except ValueError:
        pass  # damaged, or from another version: the (verified) checkpoint itself still loads
    from flaxdigits.checkpoint import load_model  # pylint: disable=import-outside-toplevel
    model, meta = load_model(checkpoint_dir)
    predictor = cls.from_model(model, _calibration(meta.get("calibration")), reject=reject)
    predictor.meta = meta
    return predictor

  def warm_up(self, up_to: int = 1) -> None:
    """Compiles now, rather than on the first call, every batch shape that batches of up to
    `up_to` images use."""
    for size in _BUCKETS:
      self.probabilities(np.zeros((size, 28, 28), np.float32))
      if size >= up_to:
        break

  def probabilities(self, images_Nx28x28: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) for already-preprocessed float images in [0, 1]."""
    images = np.asarray(images_Nx28x28, np.float32)
    out = []
    for start in range(0, len(images), _BUCKETS[-1]):
      chunk = images[start:start + _BUCKETS[-1]]
      size = next(b for b in _BUCKETS if b >= len(chunk))
      padded = np.zeros((size, 28, 28), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._probabilities(jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)

  def predict(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None, *,
              progress: Callable[[int], None] | None = None) -> list[Prediction]:
    """Preprocesses every input, then classifies all that succeeded in batched calls.

    progress(n), if given, is called as each input is preprocessed, with n = 1.
    """
    names = list(names) if names is not None else [_name(s) for s in sources]
    images, errors = [], []
    for source in sources:
      try:
        images.append(to_mnist(source))
        errors.append(None)
      except (ValueError, FileNotFoundError) as e:
        images.append(None)
        errors.append(str(e))
      if progress is not None:
        progress(1)
    ok = [i for i, img in enumerate(images) if img is not None]
    probs = self.probabilities(np.stack([images[i] for i in ok])) if ok else []
    by_index = dict(zip(ok, probs))
    return [prediction(name, images[i], by_index[i], self.threshold) if i in by_index
            else Prediction(name, None, None, None, None, errors[i])
            for i, name in enumerate(names)]


def prediction(name: str, image: np.ndarray, probabilities: np.ndarray,
               threshold: float | None = None) -> Prediction:
  """The Prediction for one classified image: "not a digit" if its score is below threshold."""
  p = np.asarray(probabilities)
  score = float(scores(p[None])[0])
  rejected = threshold is not None and score < threshold
  return Prediction(name, None if rejected else int(np.argmax(p)), float(np.max(p)),
                    [float(x) for x in p], image, reason=NOT_A_DIGIT if rejected else None,
                    score=score, threshold=threshold)


def _calibration(d: dict[str, Any] | None) -> Calibration | None:
  return Calibration.from_dict(d) if d else None


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
