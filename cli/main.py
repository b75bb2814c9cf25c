"""The `digits` command line: thin commands over the flaxdigits library."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from flaxdigits.cli.render import message  # Rich alone: no JAX at start-up
from flaxdigits.config import EVAL_BATCH_SIZE  # plain Python: no JAX at start-up

app = typer.Typer(help="Handwritten digit recognition with JAX and Flax NNX.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich")
err = Console(stderr=True)

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="FLAXDIGITS_DATA_DIR", show_default=False,
    help="Folder with the four MNIST IDX files (gzipped or raw). Default: tensorflow-datasets.")]
Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="Checkpoint directory.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Reject = Annotated[bool, typer.Option(
    "--reject/--no-reject", help="Answer \"not a digit\" for inputs the model is unsure are "
    "digits at all (below the checkpoint's threshold, fitted on held-out images).")]
CpuDevices = Annotated[int, typer.Option(
    "--cpu-devices", min=0, help="On CPU, split the host into this many data-parallel devices "
    "(0: one per core).")]


@contextlib.contextmanager
def _native_logs_hidden():
  """TensorFlow's and LiteRT's C++ logging writes straight to file descriptor 2; park it."""
  import tempfile  # pylint: disable=import-outside-toplevel
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


@contextlib.contextmanager
def _user_errors():
  """Documented library errors become one red line on stderr and exit code 1."""
  try:
    yield
  except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
    _fail(e)


# "process I: " before every error in a job of several processes; set by _join_job.
_WHO = ""


def _fail(text: object, code: int = 1) -> NoReturn:
  """One red line on stderr (the text shown as it is, never as markup), then exit `code`."""
  err.print(message(f"{_WHO}error", "bold red", text), highlight=False, soft_wrap=True)
  _exit(code)


def _exit(code: int) -> NoReturn:
  _exit_if_in_job(code)
  raise typer.Exit(code)


def _exit_if_in_job(code: int) -> None:
  """In a job of several processes, exits with `code` at once: JAX's exit handler would wait
  minutes in a barrier for peers that are gone or stuck in a collective, and the peers see this
  process's connections close and end as well."""
  if _WHO:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def _join_job(coordinator: Optional[str], num_processes: Optional[int],
              process_id: Optional[int]) -> bool:
  """Joins the multi-process job configured by the options, their environment variables or the
  cluster (SLURM, Open MPI, Cloud TPU); True if this process is process 0 (or alone)."""
  global _WHO  # pylint: disable=global-statement
  from flaxdigits import distributed  # pylint: disable=import-outside-toplevel
  index = os.environ.get("JOB_COMPLETION_INDEX", "")
  if coordinator is not None and process_id is None and index.isdigit():
    process_id = int(index)  # a Kubernetes indexed Job's pod
  with _user_errors():
    try:
      job = distributed.initialize(coordinator, num_processes, process_id)
    except RuntimeError as e:  # JAX's: the coordinator cannot be reached, a timeout
      raise ValueError(f"cannot join the job: {str(e).strip().splitlines()[0]}") from None
  if job.num_processes > 1:
    _WHO = f"process {job.process_id}: "
    # Gloo writes a line to file descriptor 1 for every connection it makes: drop those, keeping
    # Python's stdout (progress, --json) on the real one.
    sys.stdout.flush()
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
  return job.process_id == 0


def _warn_damaged(meta: dict) -> None:
  for line in meta.get("damaged", []):
    err.print(message("warning", "yellow", f"{line}; using step {meta['step']}"),
              highlight=False, soft_wrap=True)


# More devices than this per core only costs memory: each is a thread pool and its buffers.
_DEVICES_PER_CORE = 4


def _setup_jax(cpu_devices: int) -> None:
  cores = os.cpu_count() or 1
  if cpu_devices > max(8, _DEVICES_PER_CORE * cores):
    raise typer.BadParameter(f"{cpu_devices} devices on {cores} CPU cores; use at most "
                             f"{max(8, _DEVICES_PER_CORE * cores)}", param_hint="--cpu-devices")
  import logging  # pylint: disable=import-outside-toplevel
  # Orbax logs its worker threads' failures (with tracebacks) through absl; every failure also
  # reaches the command as an exception, which becomes its one error line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  import jax  # pylint: disable=import-outside-toplevel
  from flaxdigits import parallel  # pylint: disable=import-outside-toplevel
  parallel.split_cpu_into_devices(cpu_devices or None)
  # Compiled programs persist across runs: a second `digits eval` or `predict` skips XLA.
  cache = os.environ.get("FLAXDIGITS_CACHE_DIR",
                         os.path.join(os.path.expanduser("~"), ".cache", "flaxdigits", "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _load_data(data_dir: Optional[Path], splits: tuple[str, ...], console: Console):
  from flaxdigits import data  # pylint: disable=import-outside-toplevel
  source = str(data_dir) if data_dir else "tensorflow-datasets"
  with console.status(f"loading MNIST from {source}"):
    return data.load_mnist(data_dir, splits)


class Preset(str, enum.Enum):
  default = "default"
  fast = "fast"
  best = "best"
  speedrun = "speedrun"


class Norm(str, enum.Enum):
  none = "none"
  batch = "batch"


@app.command()
def train(
    epochs: Annotated[Optional[int], typer.Option(
        help="Passes over the 60,000 training images.  \\[default: 5; presets: fast 2, best 15, speedrun 1]",
        show_default=False)] = None,
    preset: Annotated[Optional[Preset], typer.Option(
        help="A named recipe: default (99.5% in 5 epochs), fast (a narrower CNN, 99.2% in 2 "
        "epochs), best (a deeper CNN, 15 epochs, for the highest accuracy) or speedrun (99% in "
        "one epoch, the shortest cold run). Options given explicitly override it.",
        show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Global batch, split across devices.  \\[default: 128]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate of the one-cycle schedule.  \\[default: 3e-3]",
        show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.  \\[default: 0]",
                                                show_default=False)] = None,
    norm: Annotated[Optional[Norm], typer.Option(
        help="Batch normalisation after every conv, or none.  \\[default: none; preset best: "
        "batch]", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(
        help="Dropout rate on the dense layers' inputs, in training.  \\[default: 0]",
        show_default=False)] = None,
    validation: Annotated[Optional[int], typer.Option(
        min=0, help="Training images held out (the same ones for every seed): each epoch is "
        "scored on them, the confidence calibration and the not-a-digit threshold are fitted on "
        "them, and the test set is scored once, at the end. 0: train on all and score the test "
        "set every epoch (no calibration).  \\[default: 5000]", show_default=False)] = None,
    data_dir: DataDir = None,
    checkpoint: Checkpoint = Path("ckpt"),
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Json = False,
    logdir: Annotated[Optional[Path], typer.Option(
        help="Also write TensorBoard event files here: every epoch's losses, accuracies and "
        "timings, and the running training figures every --log-every steps "
        "(tensorboard --logdir DIR).", show_default=False)] = None,
    log_every: Annotated[int, typer.Option(
        min=1, help="Optimiser steps between the running training figures in --logdir.")] = 50,
    cpu_devices: CpuDevices = 0,
    coordinator: Annotated[Optional[str], typer.Option(
        envvar="FLAXDIGITS_COORDINATOR", show_default=False, rich_help_panel="Multi-process",
        help="HOST:PORT of process 0, to train as one process of a job. Under SLURM, Open MPI "
        "or on a Cloud TPU slice the job is found without it.")] = None,
    num_processes: Annotated[Optional[int], typer.Option(
        envvar="FLAXDIGITS_NUM_PROCESSES", show_default=False, rich_help_panel="Multi-process",
        help="How many processes the job has.")] = None,
    process_id: Annotated[Optional[int], typer.Option(
        envvar="FLAXDIGITS_PROCESS_ID", show_default=False, rich_help_panel="Multi-process",
        help="This process's index in the job, from 0 (default with --coordinator: "
        "$JOB_COMPLETION_INDEX).")] = None,
):
  """Train the CNN on MNIST: scored on held-out training images every epoch, on the test set at
  the end."""
  _setup_jax(cpu_devices)
  primary = _join_job(coordinator, num_processes, process_id)
  from flaxdigits import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from flaxdigits.config import preset as preset_configs  # pylint: disable=import-outside-toplevel
  from flaxdigits.training import train as train_fn  # pylint: disable=import-outside-toplevel
  if not primary:  # one voice: process 0 reports; the others only name their errors
    quiet, json_out = True, False
  console = err if json_out else Console(quiet=not primary)
  with _user_errors():
    given = {k: v for k, v in dict(batch_size=batch_size, learning_rate=lr, seed=seed,
                                   epochs=epochs).items() if v is not None}
    if validation is not None:  # on resume, it must be the checkpoint's own (resolve_resume)
      given["validation"] = validation
    model_given = {k: v for k, v in dict(norm=norm.value if norm else None,
                                         dropout=dropout).items() if v is not None}
    if resume:
      if preset is not None or model_given:
        dropped = ["--preset"] * (preset is not None) + [f"--{k}" for k in model_given]
        raise ValueError(f"--resume keeps the checkpoint's own recipe; drop {' '.join(dropped)}")
      plan = ckpt_lib.resume_configs(checkpoint, **given)  # the run's own recipe, checked
      model_config, train_config = plan.model_config, plan.train_config
    else:
      ckpt_lib.refuse_existing(checkpoint)  # before loading any data
      model_config, recipe = preset_configs((preset or Preset.default).value)
      model_config = dataclasses.replace(model_config, **model_given)
      train_config = dataclasses.replace(recipe, **given)
    # Before the data: a log directory that cannot be written fails at once.
    from flaxdigits.writers import MultiWriter, TensorBoardWriter  # pylint: disable=import-outside-toplevel
    board = TensorBoardWriter(logdir, every_steps=log_every) if logdir is not None else None
    data = _load_data(data_dir, ("train", "test"), console)
    from flaxdigits import training  # pylint: disable=import-outside-toplevel
    to_render = training.outliers_to_render(data, train_config)
    if to_render and not quiet:  # once per training set: later runs read them from disk
      from flaxdigits.cli.render import counting_progress  # pylint: disable=import-outside-toplevel
      with counting_progress(console, "rendering non-digits to learn from", to_render) as advance:
        training.prepare_outliers(data, train_config, advance)
    try:
      with contextlib.ExitStack() as writers:
        writer = writers.enter_context(_render_training(console, train_config.epochs, quiet))
        if board is not None:
          writer = MultiWriter([writer, writers.enter_context(board)])
        result = train_fn(data, model_config, train_config, checkpoint_dir=str(checkpoint),
                          resume=resume, writer=writer)
    except KeyboardInterrupt:
      with ckpt_lib.CheckpointManager(checkpoint, read_only=True) as manager:
        step = manager.latest_step()
      where = ("before the first checkpoint was saved; nothing to resume" if step is None else
               f"checkpoint at step {step} in {checkpoint}/; continue with --resume")
      if primary:
        err.print(message("interrupted", "yellow", where), highlight=False, soft_wrap=True)
      _exit(130)
  if json_out:
    print(json.dumps({"checkpoint": str(checkpoint), "step": int(result.state.step),
                      "history": result.history,
                      "test": result.test.to_dict() if result.test else None}))
  elif not quiet:
    console.print(f"saved checkpoint to {checkpoint}/ (step {int(result.state.step)})",
                  markup=False, highlight=False)


def _render_training(console: Console, epochs: int, quiet: bool):
  from flaxdigits.cli.render import TrainingDisplay  # pylint: disable=import-outside-toplevel
  return TrainingDisplay(console, epochs, quiet)


class SplitChoice(str, enum.Enum):
  train = "train"
  test = "test"
  all = "all"


@app.command()
def eda(
    data_dir: DataDir = None,
    split: Annotated[SplitChoice, typer.Option(help="Which split to describe.")] = SplitChoice.all,
    out: Annotated[Path, typer.Option(help="Folder for the PNG figures.")] = Path("eda"),
    json_out: Json = False,
):
  """Look at the data: class balance, pixel statistics, sample digits and figures."""
  from flaxdigits import eda as eda_lib  # pylint: disable=import-outside-toplevel
  console = err if json_out else Console()
  splits = ("train", "test") if split == SplitChoice.all else (split.value,)
  with _user_errors():
    data = _load_data(data_dir, splits, console)
    summaries = [eda_lib.summarize(data[name], name) for name in splits]
    with console.status(f"drawing figures into {out}/"):
      from flaxdigits import figures  # pylint: disable=import-outside-toplevel
      written = figures.save_all(figures.eda_figures(data, summaries), out)
  if json_out:
    print(json.dumps({"splits": {s.split: s.to_dict() for s in summaries},
                      "figures": [str(p) for p in written]}))
    return
  from flaxdigits.cli import render  # pylint: disable=import-outside-toplevel
  console.print(render.class_balance_table(summaries))
  for s in summaries:
    for line in render.summary_lines(s):
      console.print(line)
  console.print(f"figures: {', '.join(str(p) for p in written)}", soft_wrap=True, markup=False)


@app.command("eval")
def eval_(
    checkpoint: Checkpoint = Path("ckpt"),
    data_dir: DataDir = None,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Evaluation batch size.")] = EVAL_BATCH_SIZE,
    report: Annotated[Optional[Path], typer.Option(
        help="Also show per-class metrics and the most confused pairs, and write figures "
        "(confusion heatmap, misclassified images, training curves) into this folder.",
        show_default=False)] = None,
    tta: Annotated[bool, typer.Option(
        help="Test-time augmentation: average each image's probabilities over itself and its "
        "four one-pixel shifts (5x the work).")] = False,
    json_out: Json = False,
    cpu_devices: CpuDevices = 0,
):
  """Accuracy, mean loss and confusion matrix of a checkpoint on the 10,000 test images."""
  _setup_jax(cpu_devices)
  from flaxdigits.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  from flaxdigits.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  console = err if json_out else Console()
  with _user_errors():
    model, meta = load_model(checkpoint)
    _warn_damaged(meta)
    test = _load_data(data_dir, ("test",), console)["test"]
    result = evaluate(model, test, batch_size=batch_size, tta=tta)
    from flaxdigits import calibration  # pylint: disable=import-outside-toplevel
    fitted = (calibration.Calibration.from_dict(meta["calibration"])
              if meta.get("calibration") else None)
    confidence = calibration.summary(result.logits, test.labels, fitted)
    written = []
    if report is not None:
      with console.status(f"drawing figures into {report}/"):
        from flaxdigits import figures  # pylint: disable=import-outside-toplevel
        written = figures.save_all(figures.report_figures(
            result, test, meta["history"], fitted.temperature if fitted else None), report)
  if json_out:
    print(json.dumps(result.to_dict() | confidence
                     | {"checkpoint": str(checkpoint), "step": meta["step"], "tta": tta}
                     | ({"figures": [str(p) for p in written]} if report else {})))
    return
  from flaxdigits.cli import render  # pylint: disable=import-outside-toplevel
  console.print(render.confusion_table(result.confusion_matrix.tolist()))
  if report is not None:
    console.print(render.per_class_table(result.per_class()))
    console.print(render.confused_pairs_table(result.most_confused()))
    console.print(f"figures: {', '.join(str(p) for p in written)}", soft_wrap=True,
                  markup=False)
  console.print(Text.assemble(
      f"checkpoint {checkpoint}/ step {meta['step']}"
      f"{' with test-time augmentation' if tta else ''}: ",
      (f"accuracy {100 * result.accuracy:.2f}%", "bold"),
      f" ({int(result.confusion_matrix.trace())}/{result.num_examples}), mean loss "
      f"{result.loss:.4f}"))
  console.print(render.confidence_line(confidence), highlight=False, soft_wrap=True)


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (every image inside) or glob patterns.", show_default=False)],
    checkpoint: Checkpoint = Path("ckpt"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=10,
                                       help="How many ranked guesses to show.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout, one "
                                           "object per input.")] = False,
    save_preprocessed: Annotated[Optional[Path], typer.Option(
        "--save-preprocessed", help="Write the 28x28 image the model saw for each input here.",
        show_default=False)] = None,
    reject: Reject = True,
):
  """Recognise the digit in photos, scans and drawings (any format Pillow reads)."""
  _setup_jax(1)
  from flaxdigits.predict import Predictor, expand_paths  # pylint: disable=import-outside-toplevel
  console = err if json_out else Console()
  with _user_errors():
    predictor = Predictor.from_checkpoint(checkpoint, reject=reject)
    _warn_damaged(predictor.meta)
    files = expand_paths(paths)
    from flaxdigits.cli.render import counting_progress  # pylint: disable=import-outside-toplevel
    with counting_progress(console, "recognising", len(files)) as advance:
      results = predictor.predict(files, progress=advance)
    if save_preprocessed is not None:
      _save_preprocessed(results, save_preprocessed)
  if json_out:
    print(json.dumps([r.to_dict() for r in results]))
  else:
    from flaxdigits.cli.render import predictions_table  # pylint: disable=import-outside-toplevel
    console.print(predictions_table(results, top_k))
  failed = [r for r in results if r.error]
  for r in failed:
    err.print(message("error", "bold red", f"{r.source}: {r.error}"), highlight=False,
              soft_wrap=True)
  if failed:
    raise typer.Exit(1)


@app.command()
def serve(
    checkpoint: Checkpoint = Path("ckpt"),
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the app to your "
                                      "network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest accepted upload.")] = 5.0,
    max_pending: Annotated[int, typer.Option(
        min=1, help="Requests in progress at once; beyond it the app answers 503 with "
        "Retry-After.")] = 64,
    processes: Annotated[Optional[int], typer.Option(
        min=0, help="Processes that preprocess uploads (0: threads of the server's own "
        "process).  \\[default: one per core]", show_default=False)] = None,
    access_log: Annotated[bool, typer.Option(help="One line per request on stdout, in "
                                             "uvicorn's format.")] = True,
    reject: Reject = True,
):
  """Serve the web app where people draw a digit (and an HTTP API: POST /api/predict).

  Concurrent requests are classified together; GET /metrics gives Prometheus metrics.
  """
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel
    from flaxdigits import serve as serve_lib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    _fail(f"digits serve needs the serve extra ({e.name} is missing): "
          "pip install 'flaxdigits[serve]'")
  import socket  # pylint: disable=import-outside-toplevel
  try:  # bound before the model loads, so a busy port fails at once
    sock = socket.create_server((host, port))
  except OSError as e:
    _fail(f"cannot serve on {host}:{port}: {e.strerror or e}")
  _setup_jax(1)
  from flaxdigits.predict import Predictor  # pylint: disable=import-outside-toplevel
  if processes is None:
    processes = os.cpu_count() or 1
  with _user_errors():
    with err.status(f"loading and compiling the model from {checkpoint}/"):
      predictor = Predictor.from_checkpoint(checkpoint, reject=reject)
      app_ = serve_lib.create_app(predictor, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                  max_pending=max_pending, processes=processes,
                                  info={"checkpoint": str(checkpoint)})
  _warn_damaged(predictor.meta)
  # Everything alive now (JAX, the model, the app) lives as long as the server: out of the
  # collector's sight, a full collection under load pauses the event loop for 2-3 ms, not 75-117.
  gc.freeze()
  bound_host, bound_port = sock.getsockname()[:2]
  err.print(Text.assemble("flaxdigits is serving ", (f"http://{bound_host}:{bound_port}/", "bold"),
                          " (Ctrl-C stops it)"), highlight=False)
  if host not in ("127.0.0.1", "localhost", "::1"):
    err.print(message("note", "yellow", f"--host {host} exposes the app beyond this machine; "
                      "put a reverse proxy with TLS and rate limits in front (README, 'The web "
                      "app')"), highlight=False, soft_wrap=True)
  # Connections that never finish their headers are closed, and at most MAX_CONNECTIONS are
  # open at once; exposed beyond loopback, run it behind a reverse proxy (README).
  config = uvicorn.Config(app_, log_level=None, log_config=serve_lib.log_config(),
                          access_log=access_log, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5, http=serve_lib.guarded_http_protocol())
  uvicorn.Server(config).run(sockets=[sock])


class ExportFormat(str, enum.Enum):
  onnx = "onnx"
  tflite = "tflite"


_EXPORT_NEEDS = {ExportFormat.onnx: ("jax2onnx", "onnx", "onnxruntime"),
                 ExportFormat.tflite: ("tensorflow", "ai_edge_litert")}


@app.command("export")
def export_(
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (ONNX Runtime) or "
                                              "tflite (LiteRT on Android and iOS).")],
    checkpoint: Checkpoint = Path("ckpt"),
    out: Annotated[Optional[Path], typer.Option(
        help="Output file.  \\[default: digits.onnx or digits.tflite]", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    json_out: Json = False,
):
  """Export the model for mobile and other runtimes, and check it against JAX."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  missing = [m for m in _EXPORT_NEEDS[fmt] if importlib.util.find_spec(m) is None]
  if missing:
    _fail(f"digits export --format {fmt.value} needs {', '.join(missing)}: "
          "pip install 'flaxdigits[export]'")
  _setup_jax(1)
  from flaxdigits import export as export_lib  # pylint: disable=import-outside-toplevel
  from flaxdigits.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  out = out or Path(f"digits.{fmt.value}")
  console = err if json_out else Console()
  with _user_errors():
    model, meta = load_model(checkpoint)
    _warn_damaged(meta)
    with (console.status(f"exporting to {out} and checking it in its runtime"),
          _native_logs_hidden()):
      result = export_lib.export(model, meta, fmt.value, out, overwrite=force)
  if json_out:
    print(json.dumps({"file": str(result.path), "sidecar": str(result.sidecar),
                      "size_bytes": result.size_bytes, "max_abs_diff": result.max_abs_diff}))
    return
  console.print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB) and {result.sidecar}; "
                f"matches JAX within {result.max_abs_diff:.1e} on a check batch", highlight=False,
                markup=False)


def _save_preprocessed(results, folder: Path) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  for i, r in enumerate(results):
    if r.image is not None:
      name = f"{i:04d}_{Path(r.source).stem}.png"
      Image.fromarray((r.image * 255).round().astype("uint8"), "L").save(folder / name)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             rich_help_panel="Multi-process")
def launch(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option(
        "--processes", "-n", min=1, max=64, help="How many processes the job has.")] = 2,
):
  """Run a digits command as a job of N processes on this machine, to try multi-host training.

  Example: digits launch -n 2 -- train --cpu-devices 2 --epochs 1. Process 0's output is shown;
  the first process to fail ends the job, and Ctrl-C makes all of them save and stop.
  """
  from flaxdigits import launch as launch_lib  # pylint: disable=import-outside-toplevel
  if not ctx.args:
    raise typer.BadParameter("name the command to run, e.g. digits launch -n 2 -- train",
                             param_hint="COMMAND")
  outcome = launch_lib.run(ctx.args, processes, on_start=lambda index, pid: err.print(
      f"started process {index} (pid {pid})", style="dim", highlight=False))
  if outcome.failed is not None:
    _fail(f"process {outcome.failed} {outcome.reason}; the job was stopped", outcome.returncode)
  if outcome.returncode:
    raise typer.Exit(outcome.returncode)


def main() -> None:
  try:
    app()
  except KeyboardInterrupt:
    err.print(f"[yellow]{_WHO}interrupted[/]")
    _exit_if_in_job(130)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if not _WHO:  # one process: a bug shows its traceback
      raise
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Gloo" in text or "peer" in text:
      text = f"another process of the job failed or was stopped ({text[:200]})"
    err.print(message(f"{_WHO}error", "bold red", text), highlight=False, soft_wrap=True)
    _exit_if_in_job(1)


if __name__ == "__main__":
  main()
