"""The documentation's preprocessing figure: realistic renderings of MNIST test digits (a phone
photo, chalk on a board, a canvas export, coloured pen) through each stage of `to_mnist`.

  python scripts/make_doc_figures.py --data-dir ../shared/data/mnist --out docs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import make_realistic_set


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--out", default="docs")
  args = parser.parse_args()
  from flaxdigits import figures, preprocess
  from flaxdigits.data import load_mnist
  test = load_mnist(args.data_dir, ("test",))["test"]
  rng = np.random.default_rng(3)
  examples = []
  for index, kind in enumerate(("phone", "chalk", "canvas_rgba", "colour_pen")):
    if kind == "phone":  # the full-size photo, as a phone's camera saves it
      image, _ = make_realistic_set.phone_photo(test.images[index] / 255.0, rng)
    else:
      image, _ = make_realistic_set.render(kind, test.images[index] / 255.0, rng)
    examples.append((f"{kind}, {image.width}x{image.height}", preprocess.stages(image)))
  path = figures.save(figures.preprocessing_stages(examples),
                      Path(args.out) / "preprocessing_stages.png")
  print(path)


if __name__ == "__main__":
  main()
