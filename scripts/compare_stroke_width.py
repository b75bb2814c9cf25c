"""Which stroke-width estimate `to_mnist` should use: accuracy on held-out digits, and time.

  python scripts/make_realistic_set.py --data-dir ../shared/data/mnist --split validation \\
      --per-kind 500 --phone 200 --out realistic-validation
  python scripts/compare_stroke_width.py --checkpoint ckpt --data-dir ../shared/data/mnist \\
      [--set realistic-validation]

`to_mnist` thickens strokes under 0.75x MNIST's width and thins those over 1.35x, by an amount
that follows its estimate of the width. This compares the estimate it uses (from the ink's area
and the length of its edge: flaxdigits.preprocess._stroke_width) with the one it used before
(twice the median distance to the edge along the strokes' spine, on SciPy's exact Euclidean
distance transform: kept here), on the checkpoint's held-out training digits drawn as the pad
draws them (scripts/bench_preprocess.py's pad_png, at the 112 px the page uploads) and, with
--set, on a realistic set made from them. The test set is never loaded.

Prints, per kind of input: each estimate's accuracy (to_mnist + the model), and how often the two
take the same decision (thicken, keep, thin); then each estimate's microseconds per call.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import _held_out
import numpy as np
from bench_preprocess import pad_png
from scipy import ndimage


def spine_width(ink: np.ndarray) -> float:
  """The previous estimate: twice the median distance to the edge along the strokes' spine."""
  from flaxdigits.preprocess import _max_filter  # pylint: disable=import-outside-toplevel
  distance = ndimage.distance_transform_edt(ink > 0.5)
  spine = (distance > 0) & (distance >= _max_filter(distance, 1))
  return 2.0 * float(np.median(distance[spine])) if spine.any() else 0.0


@contextlib.contextmanager
def estimate(function):
  """to_mnist with this stroke-width estimate, and a record of what it was asked to measure."""
  from flaxdigits import preprocess  # pylint: disable=import-outside-toplevel
  seen: list[np.ndarray] = []

  def recorded(ink):
    seen.append(ink)
    return function(ink)

  used, preprocess._stroke_width = preprocess._stroke_width, recorded
  try:
    yield seen
  finally:
    preprocess._stroke_width = used


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--set", type=Path, help="a realistic set of held-out digits "
                      "(make_realistic_set.py --split validation)")
  parser.add_argument("--count", type=int, default=5000, help="held-out digits drawn as the pad")
  args = parser.parse_args()
  from flaxdigits import preprocess
  from flaxdigits.predict import expand_paths
  predictor, digits = _held_out.model_and_digits(args.checkpoint, args.data_dir)
  count = min(args.count, len(digits))
  kinds = {"pad-112": ([pad_png(digits.images[i], 112) for i in range(count)],
                       [int(y) for y in digits.labels[:count]])}
  if args.set:
    for kind in sorted(p.name for p in args.set.iterdir() if p.is_dir()):
      paths = expand_paths([str(args.set / kind)])
      kinds[kind] = ([Path(p).read_bytes() for p in paths],
                     [int(Path(p).stem.split("_")[1]) for p in paths])
  estimates = {"area/edge (now)": preprocess._stroke_width, "spine (before)": spine_width}
  print(f"checkpoint {args.checkpoint}: {len(digits):,} held-out training digits")
  totals = {name: 0 for name in estimates}
  inks: list[np.ndarray] = []  # what the current estimate measured
  for kind, (inputs, labels) in kinds.items():
    line = f"{kind:12s}"
    for name, function in estimates.items():
      with estimate(function) as seen:
        hits, _ = _held_out.score(predictor, inputs, labels)
      totals[name] += hits
      line += f"  {name} {hits / len(inputs):7.2%} ({hits}/{len(inputs)})"
      if function is preprocess._stroke_width:
        measured = seen
    change = preprocess._stroke_change  # what to_mnist does with a width
    agree = np.mean([change(preprocess._stroke_width(ink)) == change(spine_width(ink))
                     for ink in measured])
    inks += measured
    print(f"{line}  same decision {agree:.1%}", flush=True)
  n = sum(len(inputs) for inputs, _ in kinds.values())
  print(f"{'overall':12s}" + "".join(f"  {name} {hits / n:7.2%} ({hits}/{n})"
                                     for name, hits in totals.items()))
  sample = inks[:500]
  for name, function in estimates.items():
    start = time.perf_counter()
    for ink in sample:
      function(ink)
    print(f"{name}: {1e6 * (time.perf_counter() - start) / len(sample):.0f} us per estimate "
          f"(mean over {len(sample)} inks at to_mnist's 4x working scale)")


if __name__ == "__main__":
  main()
