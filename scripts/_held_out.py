"""A checkpoint's held-out training digits, for the scripts that choose preprocessing settings
on them (the test set is never loaded), and how many of some inputs its model gets right."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np


def model_and_digits(checkpoint: str, data_dir: str):
  """(a Predictor of the checkpoint's model, uncalibrated: the same top-1 answers; the training
  images it held out, a Split). Exits with one line if it held none out."""
  from flaxdigits.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  from flaxdigits.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from flaxdigits.data import hold_out, load_mnist  # pylint: disable=import-outside-toplevel
  from flaxdigits.predict import Predictor  # pylint: disable=import-outside-toplevel
  model, meta = load_model(checkpoint)  # once: the held-out count and the model
  held = meta.get("train", {}).get("validation", TrainConfig().validation)
  if not held:
    raise SystemExit("the checkpoint holds no training images out (trained with --validation 0)")
  train = load_mnist(data_dir, ("train",))["train"]
  return Predictor.from_model(model), hold_out(train, held)[1]


def score(predictor, inputs: Sequence, labels: Sequence[int]) -> tuple[int, int]:
  """(right, found): how many inputs `to_mnist` and the model answer right, and in how many
  `to_mnist` found a digit at all."""
  from flaxdigits import preprocess  # pylint: disable=import-outside-toplevel
  images, kept = [], []
  for x, label in zip(inputs, labels):
    with contextlib.suppress(preprocess.NoDigitFound):
      images.append(preprocess.to_mnist(x))
      kept.append(label)
  if not images:
    return 0, 0
  answers = predictor.probabilities(np.stack(images)).argmax(-1)
  return int((answers == np.asarray(kept)).sum()), len(images)
