"""Dataset statistics for `digits eda`: class balance and pixel statistics of each split, exact."""

from __future__ import annotations

import dataclasses

import numpy as np

from flaxdigits.data import NUM_CLASSES, Split


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  """What one split holds.

  `imbalance_ratio` is the largest class count over the smallest; `chi2` and `chi2_p_value` test
  the class counts against a uniform distribution. Pixel statistics are over every pixel of the
  split scaled to [0, 1] (for MNIST's training set, the familiar 0.1307 and 0.3081).
  """

  split: str
  num_examples: int
  class_counts: list[int]
  imbalance_ratio: float
  chi2: float
  chi2_p_value: float
  pixel_mean: float
  pixel_std: float
  pixel_histogram: list[int]  # how many pixels take each uint8 value 0..255

  @property
  def class_shares(self) -> list[float]:
    return [c / self.num_examples for c in self.class_counts]

  @property
  def balanced(self) -> bool:
    """No class under half or over twice the mean (well-balanced for classification)."""
    mean = self.num_examples / len(self.class_counts)
    return min(self.class_counts) >= mean / 2 and max(self.class_counts) <= 2 * mean

  def to_dict(self) -> dict:
    return {"num_examples": self.num_examples, "class_counts": self.class_counts,
            "class_shares": self.class_shares, "imbalance_ratio": self.imbalance_ratio,
            "chi2": self.chi2, "chi2_p_value": self.chi2_p_value, "balanced": self.balanced,
            "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std}


def summarize(split: Split, name: str) -> SplitSummary:
  """Class counts, balance test and pixel statistics of `split` (ValueError if it is empty)."""
  from scipy.special import chdtrc  # pylint: disable=import-outside-toplevel

  if len(split) == 0:
    raise ValueError(f"split {name!r} is empty")
  counts = np.bincount(split.labels, minlength=NUM_CLASSES)
  expected = len(split) / NUM_CLASSES
  chi2 = float(((counts - expected) ** 2 / expected).sum())  # Pearson's, against uniform
  # Exact moments from the histogram of the 256 possible values: no float copy of the images.
  # Counted in chunks that stay in cache: 10x faster than one bincount over 47M pixels.
  histogram = sum(np.bincount(chunk.ravel(), minlength=256)
                  for chunk in np.array_split(split.images, max(1, len(split) // 1000)))
  values = np.arange(256) / 255.0
  total = histogram.sum()
  mean = float(histogram @ values / total)
  std = float(np.sqrt(histogram @ (values - mean) ** 2 / total))
  return SplitSummary(
      split=name, num_examples=len(split), class_counts=[int(c) for c in counts],
      imbalance_ratio=float(counts.max() / counts.min()) if counts.min() else float("inf"),
      chi2=chi2, chi2_p_value=float(chdtrc(NUM_CLASSES - 1, chi2)), pixel_mean=mean,
      pixel_std=std, pixel_histogram=[int(h) for h in histogram])


def class_means(split: Split) -> np.ndarray:
  """The mean image of each class: float (10, 28, 28) in [0, 1]; zeros for an absent class."""
  means = np.zeros((NUM_CLASSES,) + split.images.shape[1:])
  for k in range(NUM_CLASSES):
    members = split.images[split.labels == k]
    if len(members):
      means[k] = members.mean(0, dtype=np.float64) / 255.0
  return means


def samples(split: Split, per_class: int, seed: int = 0) -> np.ndarray:
  """Indices of up to `per_class` random examples of each class: int (10, per_class), -1 pads."""
  rng = np.random.default_rng(seed)
  chosen = np.full((NUM_CLASSES, per_class), -1)
  for k in range(NUM_CLASSES):
    members = np.flatnonzero(split.labels == k)
    picked = rng.choice(members, min(per_class, len(members)), replace=False)
    chosen[k, :len(picked)] = np.sort(picked)
  return chosen
