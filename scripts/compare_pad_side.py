"""Which size the drawing pad should upload: accuracy on held-out digits, and `to_mnist`'s time.

  python scripts/compare_pad_side.py --checkpoint ckpt --data-dir ../shared/data/mnist

The page draws on a 280x280 canvas and uploads it shrunk (flaxdigits/web/static/app.js,
PAD_UPLOAD_SIDE): a smaller PNG decodes and preprocesses faster, but thin strokes lose detail.
This renders the checkpoint's held-out training digits (its validation split, which it never
trained on; the test set is never loaded) as the pad's canvas (scripts/bench_preprocess.py's
pad_png: black strokes on white, solid like a canvas pen) at each --sides, and prints for each
side the accuracy of `to_mnist` + the model, and the mean milliseconds of `to_mnist` per image
(every image once per round, sides interleaved, rounds alternating their order).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _held_out
from bench_preprocess import pad_png


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--sides", default="280,160,128,112,96,80")
  parser.add_argument("--count", type=int, default=5000, help="held-out digits (at most the "
                      "checkpoint's validation split)")
  parser.add_argument("--timing-count", type=int, default=200, help="of those, timed")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  from flaxdigits.preprocess import NoDigitFound, to_mnist

  predictor, digits = _held_out.model_and_digits(args.checkpoint, args.data_dir)
  count = min(args.count, len(digits))
  sides = [int(s) for s in args.sides.split(",")]
  print(f"{count:,} held-out training digits as pad canvases, checkpoint {args.checkpoint}")
  pngs = {side: [pad_png(digits.images[i], side) for i in range(count)] for side in sides}
  for side in sides:
    correct, found = _held_out.score(predictor, pngs[side], digits.labels[:count])
    print(f"side {side:4d} px: {correct / count:.2%} correct ({correct}/{count}; "
          f"{count - found} found no digit)", flush=True)
  timed = min(args.timing_count, count)
  times: dict[int, list[float]] = {side: [] for side in sides}
  for side in sides:  # warm: first calls
    to_mnist(pngs[side][0])
  for round_ in range(args.rounds):
    for side in sides if round_ % 2 == 0 else sides[::-1]:
      start = time.perf_counter()
      for png in pngs[side][:timed]:
        try:
          to_mnist(png)
        except NoDigitFound:
          pass
      times[side].append((time.perf_counter() - start) / timed * 1000)
  for side in sides:
    print(f"side {side:4d} px: to_mnist {statistics.median(times[side]):.2f} ms a pad image "
          f"(mean over {timed}, median of {args.rounds} rounds: "
          + " / ".join(f"{t:.2f}" for t in times[side]) + ")")


if __name__ == "__main__":
  main()
