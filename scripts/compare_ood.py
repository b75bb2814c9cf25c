"""Calibration and the not-a-digit option of a checkpoint, measured; and which score to reject by.

  python scripts/compare_ood.py --checkpoint ckpt --data-dir ../shared/data/mnist \
      --realistic realistic

Choosing (held-out data only): the checkpoint's held-out training images (its validation split)
against synthetic outliers rendered from those images with a seed training never uses. For each
candidate score (the largest calibrated probability, the energy, the largest logit) it prints the
AUROC and the share of outliers rejected at the threshold the default rule picks (99% of
the held-out digits kept, with 95% confidence: calibration.threshold).

Reporting (once, for the checkpoint's own calibration and threshold): on the 10,000 test images,
ECE and NLL before and after calibration, the share kept and the accuracy on those kept; the
held-out outliers rejected, per kind; uniform noise rejected; with --realistic, the share of the
realistic photos (scripts/make_realistic_set.py) kept and the accuracy on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import special, stats


def auroc(digit_scores: np.ndarray, outlier_scores: np.ndarray) -> float:
  """P(a digit scores above an outlier), ties counted half (Mann-Whitney U over the counts)."""
  ranks = stats.rankdata(np.concatenate([digit_scores, outlier_scores]))
  n, m = len(digit_scores), len(outlier_scores)
  return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def candidate_scores(logits: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
  """High means digit-like, for every candidate."""
  z = np.asarray(logits, np.float64)
  return {"max_probability": special.softmax(z / temperature, -1).max(-1),
          "energy": temperature * special.logsumexp(z / temperature, -1),
          "max_logit": z.max(-1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--outliers", type=int, default=3000, help="held-out synthetic outliers")
  parser.add_argument("--noise", type=int, default=10000, help="uniform-noise images")
  parser.add_argument("--realistic", help="a folder made by scripts/make_realistic_set.py")
  parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
  args = parser.parse_args()
  from flaxdigits import calibration, outliers
  from flaxdigits.checkpoint import load_model
  from flaxdigits.config import TrainConfig
  from flaxdigits.data import Split, hold_out, load_mnist
  from flaxdigits.evaluation import evaluate

  model, meta = load_model(args.checkpoint)
  if not meta.get("calibration"):
    raise SystemExit(f"{args.checkpoint} has no calibration: train it with --validation > 0")
  fitted = calibration.Calibration.from_dict(meta["calibration"])
  held = TrainConfig.from_dict(meta["train"]).validation
  data = load_mnist(args.data_dir)
  _, validation = hold_out(data["train"], held)
  logits = lambda images: evaluate(model, Split(images, np.zeros(len(images), np.uint8))).logits

  started = time.perf_counter()
  rendered = outliers.render(args.outliers, outliers.HELD_OUT_SEED, validation)
  seconds = time.perf_counter() - started
  kinds = np.array([outliers.kind_of(i) for i in range(len(rendered))])
  val_logits, out_logits = evaluate(model, validation).logits, logits(rendered)
  figures: dict = {"checkpoint": args.checkpoint, "step": meta["step"],
                   "temperature": fitted.temperature, "threshold": fitted.threshold,
                   "choice": {}}
  print(f"checkpoint {args.checkpoint} step {meta['step']}: temperature "
        f"{fitted.temperature:.3f}, threshold {fitted.threshold:.4f} (keeps "
        f"{100 * fitted.keep:g}% of {fitted.examples:,} held-out digits)")
  print(f"rendered {len(rendered):,} outliers in {seconds:.1f} s "
        f"({1000 * seconds / max(len(rendered), 1):.2f} ms each)")
  figures["render_ms_per_image"] = 1000 * seconds / max(len(rendered), 1)
  print(f"\nchoosing a score: {len(validation):,} held-out digits against {len(rendered):,} "
        "held-out synthetic outliers")
  print(f"{'score':16s} {'AUROC':>8s}  outliers rejected at the default threshold rule")
  digit_scores = candidate_scores(val_logits, fitted.temperature)
  outlier_scores = candidate_scores(out_logits, fitted.temperature)
  for name in digit_scores:
    cut = calibration.threshold(digit_scores[name])
    rejected = float(np.mean(outlier_scores[name] < cut))
    area = auroc(digit_scores[name], outlier_scores[name])
    figures["choice"][name] = {"auroc": area, "outliers_rejected": rejected}
    print(f"{name:16s} {area:8.4f}  {100 * rejected:6.2f}%")

  test = data["test"]
  result = evaluate(model, test)
  summary = calibration.summary(result.logits, test.labels, fitted)
  figures["test"] = summary | {"accuracy": result.accuracy}
  reject = summary["reject"]
  print(f"\ntest digits ({len(test):,}): accuracy {100 * result.accuracy:.2f}%; ECE "
        f"{100 * summary['ece_uncalibrated']:.2f}% -> {100 * summary['ece']:.2f}%, NLL "
        f"{summary['nll_uncalibrated']:.4f} -> {summary['nll']:.4f}; kept "
        f"{100 * reject['kept']:.2f}%, accuracy on those kept {100 * reject['kept_accuracy']:.2f}%")

  probs = calibration.softmax(out_logits, fitted.temperature)
  out_rejected = calibration.rejected(probs, fitted)
  figures["outliers"] = {"rejected": float(out_rejected.mean()), "count": len(rendered),
                         "by_kind": {}}
  print(f"held-out synthetic outliers ({len(rendered):,}): rejected "
        f"{100 * out_rejected.mean():.2f}%")
  for kind in outliers.KINDS:
    share = float(out_rejected[kinds == kind].mean())
    figures["outliers"]["by_kind"][kind] = share
    print(f"  {kind:10s} {100 * share:6.2f}%")

  noise = np.random.default_rng(7).integers(0, 256, (args.noise, 28, 28), dtype=np.uint8)
  noise_rejected = calibration.rejected(
      calibration.softmax(logits(noise), fitted.temperature), fitted)
  figures["noise"] = {"rejected": float(noise_rejected.mean()), "count": args.noise}
  print(f"uniform noise ({args.noise:,}): rejected {100 * noise_rejected.mean():.2f}%")

  if args.realistic:
    from flaxdigits.predict import Predictor, expand_paths
    predictor = Predictor.from_checkpoint(args.checkpoint)
    paths = [p for kind in sorted(q for q in Path(args.realistic).iterdir() if q.is_dir())
             for p in expand_paths([str(kind)])]
    results = predictor.predict(paths)
    labels = [int(Path(p).stem.split("_")[1]) for p in paths]
    kept = [(r.digit == y) for r, y in zip(results, labels) if r.digit is not None]
    figures["realistic"] = {"count": len(paths), "kept": len(kept) / len(paths),
                            "kept_accuracy": sum(kept) / max(len(kept), 1)}
    print(f"realistic photos ({len(paths):,}): kept {100 * len(kept) / len(paths):.2f}%, "
          f"accuracy on those kept {100 * sum(kept) / max(len(kept), 1):.2f}%")
  if args.json:
    print(json.dumps(figures))


if __name__ == "__main__":
  main()
