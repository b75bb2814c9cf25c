"""Training throughput: flaxdigits' loop against the Flax MNIST example's loop, side by side.

  python scripts/bench_train.py --data-dir ../shared/data/mnist

Both train the same CNN at batch 128 on real MNIST in this one process. Each measurement runs a
short and a long stretch of steps and divides the extra images by the extra seconds, so start-up,
compilation and warm-up cancel out; the median of --repeats such measurements is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"))
  parser.add_argument("--short", type=int, default=20, help="steps in the short stretch")
  parser.add_argument("--long", type=int, default=180, help="steps in the long stretch")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                      help="run only the contenders whose name contains TEXT (repeatable; the "
                           "Flax example's loop, the baseline, always runs)")
  args = parser.parse_args()

  from flaxdigits import parallel
  parallel.split_cpu_into_devices()  # before JAX computes anything
  import jax
  from flaxdigits import data as data_lib
  from flaxdigits.config import ModelConfig, TrainConfig
  from flaxdigits.training import train
  from rich.console import Console
  from flaxdigits.cli.render import TrainingDisplay
  sys.path.insert(0, os.path.dirname(__file__))
  from flax_example_loop import FlaxExampleLoop

  data = data_lib.load_mnist(args.data_dir)
  batch = 128
  images, labels = data["train"].images, data["train"].labels

  def baseline(steps: int) -> float:
    loop = FlaxExampleLoop(batch_size=batch)
    start = time.perf_counter()
    loop.train(images, labels, max_steps=steps)
    return time.perf_counter() - start

  def flaxdigits(devices, steps_per_dispatch=1, display=False, outlier_exposure=None):
    mesh = parallel.make_mesh(devices)
    # Steps only: no held-out images (nothing is scored); outlier exposure as in the recipe.
    config = TrainConfig(epochs=1, batch_size=batch, steps_per_dispatch=steps_per_dispatch,
                         validation=0)
    if outlier_exposure is not None:
      config = dataclasses.replace(config, outlier_exposure=outlier_exposure)
    def run(steps: int) -> float:
      start = time.perf_counter()
      # The CLI's progress bar, rendered to a terminal-like buffer, costs what it costs there.
      console = Console(file=io.StringIO(), force_terminal=True, width=100)
      with TrainingDisplay(console, epochs=1, quiet=not display) as writer:
        result = train(data, ModelConfig(), config, mesh=mesh, stop_at_step=steps,
                       writer=writer)
      jax.block_until_ready(result.state.params)
      return time.perf_counter() - start
    return run

  default_k = TrainConfig().steps_per_dispatch
  contenders = {"Flax example loop (nnx.jit per host batch, 1 device)": baseline}
  for devices in ([jax.devices()[:1], jax.devices()] if len(jax.devices()) > 1
                  else [jax.devices()]):
    for k in sorted({1, default_k}):
      tag = " (default)" if len(devices) == len(jax.devices()) and k == default_k else ""
      contenders[f"flaxdigits, {len(devices)} device(s), {k} step(s)/dispatch{tag}"] = (
          flaxdigits(devices, k))
  contenders[f"flaxdigits, {len(jax.devices())} device(s), {default_k} step(s)/dispatch "
             "+ Rich progress bar"] = flaxdigits(jax.devices(), default_k, display=True)
  contenders[f"flaxdigits, {len(jax.devices())} device(s), {default_k} step(s)/dispatch, "
             "no outlier exposure"] = flaxdigits(jax.devices(), default_k, outlier_exposure=0.0)
  if args.only:
    contenders = {name: run for i, (name, run) in enumerate(contenders.items())
                  if i == 0 or any(text in name for text in args.only)}
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {len(jax.devices())} device(s), "
        f"{os.cpu_count()} cores; batch {batch}; steps {args.short}->{args.long}; "
        f"median of {args.repeats}", flush=True)
  # Round-robin, so that drifts in the machine's speed hit every contender alike.
  samples = {name: [] for name in contenders}
  for _ in range(args.repeats):
    for name, run in contenders.items():
      t_short, t_long = run(args.short), run(args.long)
      # A long stretch no slower than the short one measured only noise (too few extra steps).
      samples[name].append((args.long - args.short) * batch / (t_long - t_short)
                           if t_long > t_short else None)
  rates = {}
  for name in contenders:
    valid = [s for s in samples[name] if s is not None]
    rates[name] = statistics.median(valid) if valid else None
    shown = [None if s is None else round(s) for s in samples[name]]
    if rates[name] is None:
      print(f"{name:58s}      - img/s  (no long stretch took longer than its short one: raise "
            f"--long)  samples {shown}", flush=True)
    else:
      print(f"{name:58s} {rates[name]:6.0f} img/s  ({60_000 / rates[name]:5.1f} s/epoch)  "
            f"samples {shown}", flush=True)
  base = next(iter(rates.values()))
  for name, rate in list(rates.items())[1:]:
    print(f"speed-up of {name}: " + (f"{rate / base:.2f}x" if rate and base else "-"))


if __name__ == "__main__":
  main()
