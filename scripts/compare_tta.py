"""Choose the test-time-augmentation view set on held-out training images, never on test.

  python scripts/compare_tta.py --checkpoint ckpt-best-0 ckpt-best-1 ckpt-best-2 \
      --data-dir ../shared/data/mnist

Each view (the image itself, one-pixel shifts, rotations, zooms) is scored once over the
checkpoints' held-out images (the `--validation` images each was trained without: the same ones
for every seed); a set's accuracy is that of the probabilities averaged over its views, pooled
over the checkpoints. The best set is marked (on a tie, the one with fewer views), and so is the
set `digits eval --tta` uses. With --ensemble, each set is also scored on the checkpoints as one
ensemble (their probabilities averaged): whether several models would beat one. The test set is
not read.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", nargs="+", default=["ckpt"])
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"))
  parser.add_argument("--ensemble", action="store_true",
                      help="also score the checkpoints as one ensemble of averaged probabilities")
  args = parser.parse_args()

  from flaxdigits import parallel
  parallel.split_cpu_into_devices()  # before JAX computes anything
  import jax
  import numpy as np
  from flaxdigits import data as data_lib
  from flaxdigits.augment import rotate, shift_image
  from flaxdigits.checkpoint import load_model
  from flaxdigits.config import TrainConfig
  from flaxdigits.data import normalize
  from flaxdigits.evaluation import TTA_ROTATIONS, TTA_SHIFTS
  from flaxdigits.model import probabilities

  train = data_lib.load_mnist(args.data_dir, ("train",))["train"]
  models, held_out = [], None
  for checkpoint in args.checkpoint:
    model, meta = load_model(checkpoint)
    n = TrainConfig.from_dict(meta["train"]).validation
    if not n:
      parser.error(f"{checkpoint} was trained on every training image (--validation 0): "
                   "nothing is held out to choose on")
    _, held = data_lib.hold_out(train, n)
    if held_out is not None and len(held) != len(held_out):
      parser.error("the checkpoints hold out different numbers of images")
    models.append(model)
    held_out = held
  images, labels = normalize(held_out.images), np.asarray(held_out.labels)

  transforms = {(0, 0): lambda x: x}
  transforms |= {(dy, dx): (lambda x, dy=dy, dx=dx: shift_image(x, dy, dx))
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}
  transforms |= {a: (lambda x, a=a: rotate(x, a)) for a in (-0.2, -0.1, 0.1, 0.2)}
  transforms |= {f"zoom {s}": (lambda x, s=s: rotate(x, 0.0, s)) for s in (0.9, 1.1)}
  # Per view, every checkpoint's probabilities, stacked: pooled over the checkpoints.
  probs = {}
  for model in models:
    predict = jax.jit(lambda x, model=model: probabilities(model, x))
    for name, fn in transforms.items():
      p = np.concatenate([np.asarray(predict(fn(images[i:i + 1000])))
                          for i in range(0, len(labels), 1000)])
      probs[name] = p if name not in probs else np.concatenate([probs[name], p])
  labels = np.tile(labels, len(models))

  straight = [(-1, 0), (1, 0), (0, -1), (0, 1)]
  diagonal = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
  sets = {
      "the image alone": [(0, 0)],
      "+ 4 straight shifts": [(0, 0)] + straight,
      "+ 8 shifts": [(0, 0)] + straight + diagonal,
      "+ rotations +-0.1": [(0, 0), -0.1, 0.1],
      "+ 4 straight shifts, rotations +-0.1": [(0, 0)] + straight + [-0.1, 0.1],
      "+ 8 shifts, rotations +-0.1": [(0, 0)] + straight + diagonal + [-0.1, 0.1],
      "+ 4 straight shifts, rotations +-0.1, +-0.2": [(0, 0)] + straight + [-0.2, -0.1, 0.1, 0.2],
      "+ 4 straight shifts, zoom 0.9, 1.1": [(0, 0)] + straight + ["zoom 0.9", "zoom 1.1"],
      "all of them": list(transforms),
  }
  used = sorted(map(str, list(TTA_SHIFTS) + list(TTA_ROTATIONS)))
  averaged = {name: np.mean([probs[v] for v in views], 0) for name, views in sets.items()}
  accuracy = {name: np.mean(p.argmax(-1) == labels) for name, p in averaged.items()}
  # The ensemble: per image, the mean over the checkpoints (probs stacks them model by model).
  ensemble = {name: np.mean(p.reshape(len(models), len(held_out), -1).mean(0).argmax(-1)
                            == labels[:len(held_out)]) for name, p in averaged.items()}
  best = max(sets, key=lambda name: (accuracy[name], -len(sets[name])))
  print(f"{len(held_out):,} held-out images x {len(models)} checkpoint(s)"
        + (": single models pooled, then the ensemble" if args.ensemble else ""))
  for name, views in sets.items():
    marks = ["best on held-out images"] * (name == best) + ["digits eval --tta"] * (
        sorted(map(str, views)) == used)
    print(f"{name:46s} {len(views):2d} views  {100 * accuracy[name]:.2f}%"
          + (f"  ensemble {100 * ensemble[name]:.2f}%" if args.ensemble else "")
          + (f"  <- {', '.join(marks)}" if marks else ""))


if __name__ == "__main__":
  main()
