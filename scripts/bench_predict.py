"""Accuracy of `digits predict` preprocessing on the realistic set, against clean MNIST test.

  python scripts/make_realistic_set.py --data-dir ../shared/data/mnist --out realistic
  python scripts/bench_predict.py --checkpoint ckpt --data-dir ../shared/data/mnist --set realistic

Prints accuracy per kind of input and overall, the same model's accuracy on the clean MNIST test
set, and the gap in percentage points; the share the reject option keeps ("not a digit" below
the checkpoint's threshold) and the accuracy on those; also the time per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--set", default="realistic")
  parser.add_argument("--show-errors", action="store_true")
  parser.add_argument("--clean", choices=("test", "validation"), default="test",
                      help="the clean images to compare with: the test set (to report), or the "
                           "checkpoint's held-out training images (to choose settings on, with "
                           "a set made by make_realistic_set.py --split validation)")
  args = parser.parse_args()
  from flaxdigits.checkpoint import load_model
  from flaxdigits.config import TrainConfig
  from flaxdigits.data import hold_out, load_mnist
  from flaxdigits.evaluation import evaluate
  from flaxdigits.predict import Predictor, expand_paths
  model, meta = load_model(args.checkpoint)
  if args.clean == "test":
    images = load_mnist(args.data_dir, ("test",))["test"]
  else:
    held = TrainConfig.from_dict(meta["train"]).validation
    if not held:
      parser.error("the checkpoint held out no training images (--validation 0)")
    images = hold_out(load_mnist(args.data_dir, ("train",))["train"], held)[1]
  clean = evaluate(model, images).accuracy
  predictor = Predictor.from_checkpoint(args.checkpoint)
  print(f"clean MNIST {args.clean} accuracy: {100 * clean:.2f}%")
  total = correct = kept_total = kept_correct = 0
  for kind in sorted(p.name for p in Path(args.set).iterdir() if p.is_dir()):
    paths = expand_paths([str(Path(args.set) / kind)])
    start = time.perf_counter()
    results = predictor.predict(paths)
    seconds = time.perf_counter() - start
    labels = [int(Path(p).stem.split("_")[1]) for p in paths]
    # Accuracy as without the reject option (the model's answer, rejected or not); "kept" is the
    # share the reject option lets through, "kept acc" the accuracy on those.
    answers = [None if r.probabilities is None else int(np.argmax(r.probabilities))
               for r in results]
    hits = sum(a == y for a, y in zip(answers, labels))
    kept = [(a == y) for r, a, y in zip(results, answers, labels) if r.digit is not None]
    total, correct = total + len(paths), correct + hits
    kept_total, kept_correct = kept_total + len(kept), kept_correct + sum(kept)
    acc = hits / len(paths)
    print(f"{kind:12s} {100 * acc:6.2f}%  ({hits}/{len(paths)})  gap {100 * (clean - acc):+.2f} pp"
          f"  kept {100 * len(kept) / len(paths):6.2f}%  kept acc "
          f"{100 * sum(kept) / max(len(kept), 1):6.2f}%  "
          f"{1000 * seconds / len(paths):.1f} ms/image")
    if args.show_errors:
      for r, y in zip(results, labels):
        if r.digit != y:
          print(f"   {r.source}: predicted {r.digit} ({r.confidence}), true {y} {r.error or ''}")
  acc = correct / total
  print(f"{'overall':12s} {100 * acc:6.2f}%  ({correct}/{total})  "
        f"gap {100 * (clean - acc):+.2f} pp  kept {100 * kept_total / total:6.2f}%  kept acc "
        f"{100 * kept_correct / max(kept_total, 1):6.2f}%")


if __name__ == "__main__":
  main()
