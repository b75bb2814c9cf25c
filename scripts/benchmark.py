"""flaxdigits against the Flax MNIST example's loop and PyTorch, side by side, in one command.

  python scripts/benchmark.py --data-dir ../shared/data/mnist [--epochs 5] [--repeats 1]

Contenders (each run trains from scratch on real MNIST and scores the 10,000 test images after
every epoch):
  flaxdigits            `digits train`'s default recipe, data-parallel over one CPU device per core
  flaxdigits-fast       `digits train --preset fast` (its own 2 epochs)
  flax-example          the Flax MNIST example's model and loop (scripts/flax_example_loop.py),
                        as its users run it
  flax-example-eigen    the same, compiled with the XLA option flaxdigits trains with (XLA's own
                        Eigen convolutions instead of YNNPACK's): what the example's loop gets
                        from that one option
  pytorch               the same CNN and recipe as the Flax example in PyTorch eager mode
                        (skipped when torch is not installed)

Every (contender, repeat) runs in a fresh child process, round-robin, so that each pays its own
start-up and compilation, its peak memory is its own, and drifts in the machine's speed hit all
contenders alike. Reported, as medians over repeats:
  images/s, s/epoch  training steps only, from epochs 2.. (epoch 1 carries compilation and
                     warm-up; none with --epochs 1); evaluation excluded
  compile            seconds JAX spent tracing, lowering and compiling during training, with an
                     empty persistent compilation cache and (flaxdigits) with the cache it filled
  time to 99.0/99.5% training seconds, compilation included, evaluation excluded, to the end of
                     the first epoch whose test accuracy reaches it (epoch granularity)
  peak RSS           the child process's maximum resident memory, data included
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONTENDERS = {
    "flaxdigits": "default recipe, 2x CPU devices",
    "flaxdigits-fast": "--preset fast",
    "flax-example": "Flax example loop, 1 device",
    "flax-example-eigen": "the same + XLA's Eigen convolutions",
    "pytorch": "PyTorch eager, same CNN + recipe",
}
BASELINE = "flax-example"
TARGETS = (0.99, 0.995)


# ----------------------------------------------------------------------------- children


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _CompileTimer:
  """Sums JAX's tracing, lowering and backend-compile durations as JAX reports them."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax.monitoring  # pylint: disable=import-outside-toplevel
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    if event in self.EVENTS:
      self.seconds += duration

  def take(self) -> float:
    seconds, self.seconds = self.seconds, 0.0
    return seconds


def _child_flaxdigits(args, preset_name: str) -> dict:
  import dataclasses  # pylint: disable=import-outside-toplevel
  from flaxdigits import parallel  # pylint: disable=import-outside-toplevel
  parallel.split_cpu_into_devices()
  import jax  # pylint: disable=import-outside-toplevel
  from flaxdigits import data as data_lib, training as train_lib  # pylint: disable=import-outside-toplevel
  from flaxdigits.config import preset  # pylint: disable=import-outside-toplevel
  from flaxdigits.writers import InMemoryWriter  # pylint: disable=import-outside-toplevel

  cache_dir = tempfile.mkdtemp(prefix="flaxdigits-bench-xla-")  # empty: a cold CLI's first run
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  timer = _CompileTimer()
  data = data_lib.load_mnist(args.data_dir)
  model_config, train_config = preset(preset_name)
  if preset_name == "default":
    train_config = dataclasses.replace(train_config, epochs=args.epochs)
  # Like the Flax example: all 60,000 images, the test set scored after every epoch.
  train_config = dataclasses.replace(train_config, validation=0)
  epochs = []

  class EpochTimes(InMemoryWriter):  # the first epoch's time includes compilation
    def write_scalars(self, step, scalars):
      if "epoch/train_seconds" in scalars:
        epochs.append({"train_seconds": scalars["epoch/train_seconds"],
                       "accuracy": scalars["test/accuracy"]})
        if len(epochs) == 1:
          epochs[0]["compile_seconds"] = timer.take()

  timer.take()
  result = train_lib.train(data, model_config, train_config, writer=EpochTimes())
  images_per_epoch = (len(data["train"]) // train_config.batch_size) * train_config.batch_size
  # The same training again, compiled from the persistent cache the first run filled.
  jax.clear_caches()
  timer.take()
  train_lib.train(data, model_config, train_config, stop_at_step=1, evaluate_each_epoch=False)
  return {"epochs": epochs, "images_per_epoch": images_per_epoch,
          "compile_seconds": epochs[0]["compile_seconds"],
          "compile_cached_seconds": timer.take(), "final_accuracy": result.test.accuracy,
          "devices": len(jax.devices()), "peak_rss_mb": _peak_rss_mb()}


def _child_flax_example(args) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=import-outside-toplevel
  from flax_example_loop import FlaxExampleLoop  # pylint: disable=import-outside-toplevel
  from flaxdigits import data as data_lib  # pylint: disable=import-outside-toplevel

  timer = _CompileTimer()
  data = data_lib.load_mnist(args.data_dir)
  train, test = data["train"], data["test"]
  loop = FlaxExampleLoop()
  epochs = []
  for _ in range(args.epochs):
    timer.take()
    seconds = loop.train(train.images, train.labels)
    compile_seconds = timer.take()
    epochs.append({"train_seconds": seconds, "compile_seconds": compile_seconds,
                   "accuracy": loop.evaluate(test.images, test.labels)})
  return {"epochs": epochs, "images_per_epoch": len(train) // loop.batch_size * loop.batch_size,
          "compile_seconds": epochs[0]["compile_seconds"], "compile_cached_seconds": None,
          "final_accuracy": epochs[-1]["accuracy"], "devices": len(jax.devices()),
          "peak_rss_mb": _peak_rss_mb()}


def _child_pytorch(args) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from flaxdigits import data as data_lib  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  data = data_lib.load_mnist(args.data_dir)
  train, test = data["train"], data["test"]
  model = nn.Sequential(  # the Flax example's CNN, NCHW
      nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Flatten(), nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 10))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  loss_fn = nn.CrossEntropyLoss()
  batch = 128
  rng = np.random.default_rng(0)

  def to_tensor(images_uint8):
    return torch.from_numpy(images_uint8).float().div_(255).unsqueeze(1)

  test_x, test_y = to_tensor(test.images), torch.from_numpy(test.labels.astype(np.int64))
  steps = len(train) // batch
  epochs = []
  for _ in range(args.epochs):
    start = time.perf_counter()
    model.train()
    for idx in rng.permutation(len(train))[:steps * batch].reshape(steps, batch):
      x, y = to_tensor(train.images[idx]), torch.from_numpy(train.labels[idx].astype(np.int64))
      optimizer.zero_grad(set_to_none=True)
      loss_fn(model(x), y).backward()
      optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
      correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                    for i in range(0, len(test), 1000))
    epochs.append({"train_seconds": seconds, "accuracy": correct / len(test)})
  return {"epochs": epochs, "images_per_epoch": steps * batch, "compile_seconds": None,
          "compile_cached_seconds": None, "final_accuracy": epochs[-1]["accuracy"],
          "devices": f"{torch.get_num_threads()} threads", "peak_rss_mb": _peak_rss_mb()}


def child(name: str, args) -> dict:
  if name == "flaxdigits":
    return _child_flaxdigits(args, "default")
  if name == "flaxdigits-fast":
    return _child_flaxdigits(args, "fast")
  if name in ("flax-example", "flax-example-eigen"):
    return _child_flax_example(args)
  return _child_pytorch(args)


# ----------------------------------------------------------------------------- the parent


def summarize(run: dict) -> dict:
  """One child's measurements -> the table's quantities."""
  epochs = run["epochs"]
  # Steady speed needs a second epoch: the first one's compilations also run on a background
  # thread beside its steps, so subtracting their durations from its wall time means nothing.
  epoch_seconds = (statistics.median(e["train_seconds"] for e in epochs[1:])
                   if len(epochs) > 1 else None)
  out = {"images_per_sec": run["images_per_epoch"] / epoch_seconds if epoch_seconds else None,
         "epoch_seconds": epoch_seconds, "compile_seconds": run["compile_seconds"],
         "compile_cached_seconds": run["compile_cached_seconds"],
         "final_accuracy": run["final_accuracy"], "peak_rss_mb": run["peak_rss_mb"],
         "epochs": len(epochs), "devices": run["devices"]}
  for target in TARGETS:
    elapsed, reached = 0.0, None
    for e in epochs:
      elapsed += e["train_seconds"]
      if e["accuracy"] >= target:
        reached = elapsed
        break
    out[f"time_to_{target}"] = reached
  return out


def median_of(runs: list[dict], key: str):
  values = [r[key] for r in runs if r[key] is not None]
  if not values:
    return None
  return statistics.median(values) if isinstance(values[0], (int, float)) else values[0]


def _cpu_training_options() -> dict[str, str]:
  """The options `digits train` compiles its training program with on this machine's CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  from flaxdigits import parallel, training  # pylint: disable=import-outside-toplevel
  return training.training_compiler_options(parallel.make_mesh(jax.devices("cpu"))) or {}


def _torch_installed() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("torch") is not None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"))
  parser.add_argument("--epochs", type=int, default=5,
                      help="epochs for every contender but flaxdigits-fast (its preset's 2)")
  parser.add_argument("--repeats", type=int, default=1, help="fresh runs per contender")
  parser.add_argument("--only", default=",".join(CONTENDERS),
                      help=f"comma-separated subset of {', '.join(CONTENDERS)}")
  parser.add_argument("--json", dest="json_path", help="also write the results here")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    print(json.dumps(child(args.child, args)))
    return

  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel
  console = Console(width=None if sys.stdout.isatty() else 150)
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = set(names) - set(CONTENDERS)
  if unknown:
    parser.error(f"unknown contenders {sorted(unknown)}")
  if "pytorch" in names and not _torch_installed():
    console.print("[yellow]torch is not installed: skipping the PyTorch baseline[/]")
    names.remove("pytorch")
  import jax  # pylint: disable=import-outside-toplevel  (versions for the header only)
  console.print(f"jax {jax.__version__}, {os.cpu_count()} cores; {args.epochs} epochs, "
                f"{args.repeats} repeat(s), each run in a fresh process, round-robin")
  runs = {name: [] for name in names}
  for repeat in range(args.repeats):
    for name in names:
      start = time.perf_counter()
      cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--epochs",
             str(args.epochs)] + (["--data-dir", args.data_dir] if args.data_dir else [])
      env = dict(os.environ)
      if name == "flax-example-eigen":  # as train.training_compiler_options, process-wide
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + " ".join(
            f"--{k}={v}" for k, v in _cpu_training_options().items())).strip()
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
      if proc.returncode != 0:
        console.print(proc.stderr[-3000:], markup=False)
        sys.exit(f"{name} failed (exit {proc.returncode})")
      run = json.loads(proc.stdout.strip().splitlines()[-1])
      runs[name].append(summarize(run))
      console.print(f"  repeat {repeat + 1} {name}: {time.perf_counter() - start:.0f} s, "
                    f"accuracy per epoch {[round(e['accuracy'] * 100, 2) for e in run['epochs']]}")

  results = {name: {key: median_of(rs, key) for key in rs[0]} for name, rs in runs.items()}
  base = results.get(BASELINE)
  table = Table(title="Training on MNIST, this machine (medians)")
  for column in ("contender", "setup", "epochs", "images/s", "s/epoch", "compile s (cold/cached)",
                 "to 99.0%", "to 99.5%", "peak RSS", "test acc.", "img/s vs Flax ex."):
    table.add_column(column, justify="left" if column in ("contender", "setup") else "right")

  def seconds(value):
    return "-" if value is None else f"{value:.1f} s"

  for name, r in results.items():
    compile_cold = "eager" if r["compile_seconds"] is None else f"{r['compile_seconds']:.1f}"
    compile_cached = ("" if r["compile_cached_seconds"] is None
                      else f" / {r['compile_cached_seconds']:.1f}")
    speed, base_speed = r["images_per_sec"], base and base["images_per_sec"]
    ratio = f"{speed / base_speed:.2f}x" if speed and base_speed else "-"
    table.add_row(name, CONTENDERS[name], str(r["epochs"]),
                  "-" if speed is None else f"{speed:.0f}",
                  "-" if speed is None else f"{r['epoch_seconds']:.1f}",
                  compile_cold + compile_cached,
                  seconds(r["time_to_0.99"]), seconds(r["time_to_0.995"]),
                  f"{r['peak_rss_mb']:.0f} MB", f"{r['final_accuracy'] * 100:.2f}%", ratio)
  console.print(table)
  console.print("images/s and s/epoch: training steps of epochs 2.. (no compilation, no "
                "evaluation; '-' with one epoch). to 99.x%: training seconds, compilation included, to the end of "
                "the first epoch at that test accuracy; '-' not reached.")
  if args.json_path:
    with open(args.json_path, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "runs": runs, "medians": results}, f, indent=2)


if __name__ == "__main__":
  main()
