"""Calibrated probabilities and the not-a-digit verdict, both fitted on held-out training images.

Temperature scaling (Guo et al., 2017): probabilities are softmax(logits / T), with the one T that
minimises the negative log-likelihood of the held-out images. It moves no argmax, so accuracy is
unchanged. The reject option scores each input by its largest calibrated probability and calls
it "not a digit" below a threshold that keeps `keep` (99%) of the held-out digits. The model is
trained to spread its probability over all ten classes on synthetic non-digits (outlier
exposure, flaxdigits.outliers), which is what makes that score tell them apart; scripts/
compare_ood.py measures it against the alternatives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import numpy as np

ECE_BINS = 15
KEEP = 0.99  # share of held-out digits the default threshold keeps
SCORE = "max_probability"  # the calibrated probability of the predicted digit
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
_Z_95 = 1.645  # one-sided 95% normal quantile


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A checkpoint's temperature and reject threshold, and what they did on the held-out images."""

  temperature: float
  threshold: float  # inputs scoring below it are "not a digit"
  examples: int  # held-out digits they were fitted on
  keep: float = KEEP
  score: str = SCORE
  nll_before: float | None = None
  nll_after: float | None = None
  ece_before: float | None = None
  ece_after: float | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Self:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _log_softmax(logits_NxK: np.ndarray, temperature: float) -> np.ndarray:
  z = np.asarray(logits_NxK, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(logits_NxK: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  return np.exp(_log_softmax(logits_NxK, temperature))


def nll(logits_NxK: np.ndarray, labels_N: np.ndarray, temperature: float = 1.0) -> float:
  """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
  log_probs = _log_softmax(logits_NxK, temperature)
  return float(-np.mean(log_probs[np.arange(len(labels_N)), labels_N]))


def fit_temperature(logits_NxK: np.ndarray, labels_N: np.ndarray) -> float:
  """The T in [0.05, 20] that minimises nll (a bounded 1-D search over log T; NLL is convex in
  1/T, so the minimum is unique)."""
  import scipy.optimize  # pylint: disable=import-outside-toplevel  # kept off predict's cold path
  labels = np.asarray(labels_N, np.int64)
  result = scipy.optimize.minimize_scalar(
      lambda log_t: nll(logits_NxK, labels, float(np.exp(log_t))), bounds=_LOG_T_BOUNDS,
      method="bounded", options={"xatol": 1e-4})
  return float(np.exp(result.x))


def reliability(probs_NxK: np.ndarray, labels_N: np.ndarray,
                bins: int = ECE_BINS) -> list[dict[str, float]]:
  """Per equal-width confidence bin: its range, count, mean confidence and accuracy."""
  probs = np.asarray(probs_NxK, np.float64)
  confidence, correct = probs.max(-1), probs.argmax(-1) == np.asarray(labels_N)
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
  rows = []
  for b in range(bins):
    members = which == b
    count = int(members.sum())
    rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                 "confidence": float(confidence[members].mean()) if count else 0.0,
                 "accuracy": float(correct[members].mean()) if count else 0.0})
  return rows


def ece(probs_NxK: np.ndarray, labels_N: np.ndarray, bins: int = ECE_BINS) -> float:
  """Expected calibration error: the count-weighted mean |accuracy - confidence| over equal-width
  confidence bins (Naeini et al., 2015; 15 bins as in Guo et al.)."""
  rows = reliability(probs_NxK, labels_N, bins)
  total = sum(r["count"] for r in rows)
  return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / total)


def scores(probs_NxK: np.ndarray) -> np.ndarray:
  """The not-a-digit score of each input: its largest (calibrated) probability; low is unlike a
  digit."""
  return np.asarray(probs_NxK).max(-1)


def threshold(digit_scores: np.ndarray, keep: float = KEEP) -> float:
  """The largest threshold that keeps `keep` of digits like these (score >= threshold), with
  95% confidence.

  The held-out digits are a sample: the threshold that keeps exactly 99% of 5,000 of them keeps
  99% +- 0.14 points of new digits, so half the time fewer than 99%. It keeps instead
  keep + 1.645 standard errors of the held-out digits (99.23% of 5,000), so that the share kept
  of new digits from the same source is at least `keep` with 95% confidence.
  """
  if not 0 < keep <= 1:
    raise ValueError(f"keep must be a share in (0, 1], got {keep}")
  ordered = np.sort(np.asarray(digit_scores, np.float64))
  n = len(ordered)
  if n == 0:
    raise ValueError("a threshold needs held-out digits' scores")
  kept = min(1.0, keep + _Z_95 * np.sqrt(keep * (1 - keep) / n))
  return float(ordered[min(n - 1, int(np.floor((1 - kept) * n + 1e-9)))])


def fit(logits_NxK: np.ndarray, labels_N: np.ndarray, keep: float = KEEP) -> Calibration:
  """The temperature and threshold for held-out digits' logits, with before/after figures."""
  logits, labels = np.asarray(logits_NxK, np.float64), np.asarray(labels_N, np.int64)
  if len(labels) == 0:
    raise ValueError("calibration needs held-out images; train with validation > 0")
  temperature = fit_temperature(logits, labels)
  calibrated = softmax(logits, temperature)
  return Calibration(
      temperature=temperature, threshold=threshold(scores(calibrated), keep),
      examples=len(labels), keep=keep,
      nll_before=nll(logits, labels), nll_after=nll(logits, labels, temperature),
      ece_before=ece(softmax(logits), labels), ece_after=ece(calibrated, labels))


def rejected(probs_NxK: np.ndarray, calibration: Calibration | None) -> np.ndarray:
  """Which inputs are "not a digit" (bool, N); none without a calibration."""
  probs = np.asarray(probs_NxK)
  if calibration is None:
    return np.zeros(len(probs), bool)
  return scores(probs) < calibration.threshold


def summary(logits_NxK: np.ndarray, labels_N: np.ndarray,
            calibration: Calibration | None) -> dict[str, Any]:
  """What `digits eval` reports about confidence on labelled digits: ECE and NLL at temperature 1
  and, with a calibration, at its temperature, and the share its threshold keeps with the
  accuracy on those kept."""
  labels = np.asarray(labels_N, np.int64)
  raw = softmax(logits_NxK)
  out: dict[str, Any] = {"ece_uncalibrated": ece(raw, labels),
                         "nll_uncalibrated": nll(logits_NxK, labels)}
  if calibration is None:
    return out | {"temperature": None, "ece": out["ece_uncalibrated"],
                  "nll": out["nll_uncalibrated"], "reject": None}
  probs = softmax(logits_NxK, calibration.temperature)
  kept = ~rejected(probs, calibration)
  correct = probs.argmax(-1) == labels
  return out | {
      "temperature": calibration.temperature, "ece": ece(probs, labels),
      "nll": nll(logits_NxK, labels, calibration.temperature),
      "reject": {"score": calibration.score, "threshold": calibration.threshold,
                 "kept": float(kept.mean()),
                 "kept_accuracy": float(correct[kept].mean()) if kept.any() else None}}
