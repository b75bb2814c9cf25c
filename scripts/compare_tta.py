"""Test accuracy of a checkpoint under candidate test-time-augmentation view sets.

  python scripts/compare_tta.py --checkpoint ckpt-best --data-dir ../shared/data/mnist

Each view (the image itself, one-pixel shifts, rotations, zooms) is scored once over the 10,000
test images; a set's accuracy is that of the probabilities averaged over its views. The set
`digits eval --tta` uses is marked.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"))
  args = parser.parse_args()

  from flaxdigits import parallel
  parallel.split_cpu_into_devices()  # before JAX computes anything
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flaxdigits import data as data_lib
  from flaxdigits.augment import rotate, shift_image
  from flaxdigits.checkpoint import load_model
  from flaxdigits.data import normalize
  from flaxdigits.evaluation import TTA_ROTATIONS, TTA_SHIFTS
  from flaxdigits.model import probabilities

  model, _ = load_model(args.checkpoint)
  test = data_lib.load_mnist(args.data_dir, ("test",))["test"]
  images, labels = normalize(jnp.asarray(test.images)), np.asarray(test.labels)
  predict = jax.jit(lambda x: probabilities(model, x))

  transforms = {(0, 0): lambda x: x}
  transforms |= {(dy, dx): (lambda x, dy=dy, dx=dx: shift_image(x, dy, dx))
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}
  transforms |= {a: (lambda x, a=a: rotate(x, a)) for a in (-0.2, -0.1, 0.1, 0.2)}
  transforms |= {f"zoom {s}": (lambda x, s=s: rotate(x, 0.0, s)) for s in (0.9, 1.1)}
  probs = {name: np.concatenate([np.asarray(predict(fn(images[i:i + 1000])))
                                 for i in range(0, len(labels), 1000)])
           for name, fn in transforms.items()}

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
  for name, views in sets.items():
    accuracy = np.mean(np.mean([probs[v] for v in views], 0).argmax(-1) == labels)
    mark = "  <- digits eval --tta" if sorted(map(str, views)) == used else ""
    print(f"{name:46s} {len(views):2d} views  {100 * accuracy:.2f}%{mark}")


if __name__ == "__main__":
  main()
