"""Compare settings of a preset on held-out training images: the test set is never loaded.

  python scripts/sweep.py --preset fast --data-dir ../shared/data/mnist \\
      --grid learning_rate=5e-3,1e-2,2e-2 --grid max_shift=0,1 --seeds 0 1

Trains the preset once per combination of the --grid values (TrainConfig or ModelConfig fields;
tuples as 16/32) and seed, holding out the preset's --validation images (5,000: the same ones
for every seed), and prints each combination's held-out accuracy and loss (mean over seeds) and
training time, best first. `--set FIELD=VALUE` changes a setting for every run (to make a quick
sweep shorter, say). With --checkpoint-dir DIR each run also keeps its checkpoint, in
DIR/<settings>-seed<N>, for the scripts that read held-out images from checkpoints
(compare_tta.py) and, once a setting is chosen, for `digits eval`. This is how the presets'
settings are chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time


def parse_value(field: dataclasses.Field, text: str):
  """A command-line value for a config field, by the type of its default."""
  default = field.default
  if isinstance(default, tuple):
    return tuple(int(part) for part in text.split("/") if part)
  if isinstance(default, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(default, (int, float, str)):
    return type(default)(text)
  return text


def run_name(settings: dict) -> str:
  """A folder name for a combination of settings: conv_features=48-96-192_epochs=20."""
  parts = [f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
           for k, v in settings.items()]
  return "_".join(parts) or "preset"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="default")
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"))
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--checkpoint-dir", default=None,
                      help="keep each run's checkpoint in DIR/<settings>-seed<N>")
  parser.add_argument("--train-subset", type=int, default=0,
                      help="train on only this many images (smoke tests)")
  args = parser.parse_args()

  from flaxdigits import parallel
  parallel.split_cpu_into_devices()  # before JAX computes anything
  from flaxdigits import data as data_lib
  from flaxdigits.config import ModelConfig, TrainConfig, preset
  from flaxdigits.training import train

  model_base, train_base = preset(args.preset)
  fields = {f.name: ("model", f) for f in dataclasses.fields(ModelConfig)}
  fields |= {f.name: ("train", f) for f in dataclasses.fields(TrainConfig)}

  def parse(item: str) -> tuple[str, list]:
    name, _, values = item.partition("=")
    if name not in fields or not values:
      parser.error(f"{item!r}: expected FIELD=VALUE[,VALUE...] with a ModelConfig or "
                   "TrainConfig field")
    return name, [parse_value(fields[name][1], v) for v in values.split(",")]

  fixed = dict(parse(item) for item in args.set)
  grid = dict(parse(item) for item in args.grid)
  if "seed" in grid or "seed" in fixed:
    parser.error("give seeds with --seeds")
  train_split = data_lib.load_mnist(args.data_dir, ("train",))["train"]
  if args.train_subset:
    train_split = data_lib.Split(train_split.images[:args.train_subset],
                                 train_split.labels[:args.train_subset])
  data = {"train": train_split}  # no test split: nothing here can look at it
  results = []
  for combo in itertools.product(*grid.values()):
    settings = dict(zip(grid, combo))
    chosen = {name: values[0] for name, values in fixed.items()} | settings
    model_config = dataclasses.replace(model_base, **{k: v for k, v in chosen.items()
                                                      if fields[k][0] == "model"})
    runs = []
    for seed in args.seeds:
      train_config = dataclasses.replace(train_base, seed=seed, **{
          k: v for k, v in chosen.items() if fields[k][0] == "train"})
      if not train_config.validation:
        parser.error("the sweep needs held-out images: --set validation=N with N > 0")
      start = time.perf_counter()
      result = train(data, model_config, train_config,
                     checkpoint_dir=args.checkpoint_dir and os.path.join(
                         args.checkpoint_dir, f"{run_name(settings)}-seed{seed}"))
      last = result.history[-1]
      runs.append((last["validation_accuracy"], last["validation_loss"],
                   time.perf_counter() - start))
      print(f"  {settings} seed {seed}: held-out {100 * runs[-1][0]:.2f}%, "
            f"loss {runs[-1][1]:.4f}, {runs[-1][2]:.1f} s", flush=True)
    results.append((settings, runs))

  print(f"\npreset {args.preset}, fixed {({k: v[0] for k, v in fixed.items()}) or '-'}, "
        f"seeds {args.seeds}, "
        f"{train_config.validation:,} held-out images; best first")
  print(f"{'settings':50s} {'held-out acc':>13s} {'loss':>8s} {'train s':>8s}")
  for settings, runs in sorted(results, key=lambda r: -statistics.mean(a for a, _, _ in r[1])):
    accuracy = [100 * a for a, _, _ in runs]
    spread = f" ± {statistics.stdev(accuracy):.2f}" if len(runs) > 1 else ""
    print(f"{str(settings or '(preset)'):50s} {statistics.mean(accuracy):7.2f}%{spread:7s} "
          f"{statistics.mean(l for _, l, _ in runs):8.4f} "
          f"{statistics.mean(s for _, _, s in runs):8.1f}")


if __name__ == "__main__":
  main()
