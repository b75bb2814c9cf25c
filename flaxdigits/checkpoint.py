"""Orbax checkpoints that carry their own config, metrics history and array digests."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxdigits import bundle, distributed
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.model import CNN, abstract_model

# 2: the metadata holds a digest of every saved array (format 1 checkpoints load unverified).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MAX_TO_KEEP = 3
# Fields that may differ on resume: the evaluation batch size changes no parameter; epochs and
# cycle_start only as resolve_resume allows (extending a finished run). Steps per dispatch changes
# no parameter either, but a run stopped at one chunk boundary resumes at a step the new chunk
# length may not divide.
_FREE_ON_RESUME = {"eval_batch_size"}


class CheckpointDamaged(ValueError):
  """A step folder that cannot be read back, or whose arrays do not match their digests."""


def digests(tree: Any) -> dict[str, str]:
  """sha256 of each array's dtype, shape and bytes, keyed by its path in the tree."""
  return {jax.tree_util.keystr(path): bundle.array_digest(np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _refuse_file(path: Path) -> None:
  """ValueError if `path` is a file. Asked in this order because another process of the job may
  create the folder at any moment: a folder seen missing, then present, is not a file."""
  if path.exists() and not path.is_dir():
    raise ValueError(f"checkpoint path {path} is a file, not a folder")


def check_writable(directory: str | os.PathLike) -> Path:
  """The absolute checkpoint folder, created if needed; ValueError naming it if it cannot be
  written. Checked before any training, so that no run ends in a save that cannot happen."""
  path = Path(directory).expanduser().absolute()
  _refuse_file(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as e:
    raise ValueError(f"cannot write checkpoints to {path}: {e.strerror or e}") from None
  return path


class CheckpointManager:
  """Saves and restores training checkpoints in `directory`, one step-numbered folder each.

  Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
  half-written checkpoint is never taken as the latest. Saves are synchronous: a failed
  asynchronous save leaves Orbax threads waiting minutes for signals that never come, and from
  host arrays a save takes ~0.2 s. Use as a context manager, or call close().
  """

  def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
    self.directory = Path(directory).expanduser().absolute()
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
    if not read_only:
      check_writable(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=not read_only,
                                             enable_async_checkpointing=False))

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def reload(self) -> None:
    """Re-reads the step folders (another process may have renamed some)."""
    self._manager.reload()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """Every finished step, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def save(self, state, model_config: ModelConfig, train_config: TrainConfig,
           history: list[dict[str, float]], *, train_examples: int,
           calibration: Any = None) -> None:
    """Saves the state with its configs, history and array digests, then the inference bundle.

    Raises OSError (disk full, say) with Orbax's temporary folder and the bundle's partial file
    removed, so a failed save leaves the folder as it was.
    """
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    host = jax.device_get(state)
    # Orbax writes host arrays in ~0.2 s; replicated device arrays cost it ~1.1 s a save here.
    # Across processes every one saves together, and only arrays on the global mesh can be saved
    # that way (process 0 writes the replicated ones).
    variables, trainer = _items(host if jax.process_count() == 1 else state)
    host_variables, host_trainer = _items(host)
    meta = {"format": FORMAT_VERSION, "step": step, "model": model_config.to_dict(),
            "train": train_config.to_dict(), "train_examples": int(train_examples),
            "history": history,
            "calibration": calibration.to_dict() if calibration is not None else None,
            "digests": {"params": digests(host_variables), "trainer": digests(host_trainer)}}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(variables), trainer=ocp.args.StandardSave(trainer),
          meta=ocp.args.JsonSave(meta)))
      if distributed.is_primary():  # the sidecar: one writer
        graphdef = nnx.graphdef(abstract_model(model_config))
        bundle.write(self.directory, nnx.merge(graphdef, host_variables), step, meta["model"],
                     meta["calibration"])
    except BaseException:
      if distributed.is_primary():
        self._remove_unfinished()
      raise

  def _remove_unfinished(self) -> None:
    for path in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in path.name or path.name.endswith(".partial"):
        _remove(path)
    self._manager.reload()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The step's metadata (configs, history, digests); CheckpointDamaged naming the file if it
    cannot be read, ValueError for another format."""
    step = self._require_step(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
      if not isinstance(meta, dict):
        raise ValueError(f"not a JSON object but {type(meta).__name__}")
    except Exception as e:  # pylint: disable=broad-except  # any damage, any exception type
      raise CheckpointDamaged(f"checkpoint step {step}: {self.directory / str(step) / 'meta'} is "
                              f"unreadable ({_first_line(e)})") from None
    if meta.get("format") not in READABLE_FORMATS:
      raise ValueError(f"checkpoint {self.directory} has format {meta.get('format')}, "
                       f"this flaxdigits reads formats {READABLE_FORMATS}")
    return meta

  def restore(self, step: int, meta: dict[str, Any], **abstract: Any) -> dict[str, Any]:
    """Restores the named items (`params`, `trainer`) onto the given abstract trees and checks
    every array against the digest saved with it.

    Raises:
      CheckpointDamaged: an item cannot be read, or an array differs from its digest.
    """
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # any damage, any exception type
      raise CheckpointDamaged(f"checkpoint step {step}: {self.directory / str(step)} cannot be "
                              f"restored ({type(e).__name__}: {_first_line(e)})") from None
    saved = meta.get("digests")
    for name in abstract:
      if saved is None:  # format 1, written before digests: only non-finite values can show
        if not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored[name]))
                   if np.issubdtype(np.asarray(x).dtype, np.floating)):
          raise CheckpointDamaged(f"checkpoint step {step}: {self.directory / str(step) / name} "
                                  "holds non-finite values (damaged?)")
        continue
      got = digests(restored[name])
      bad = [k for k in saved[name] if got.get(k) != saved[name][k]] + sorted(
          set(got) - set(saved[name]))
      if bad:
        raise CheckpointDamaged(
            f"checkpoint step {step}: {self.directory / str(step) / name} is damaged "
            f"({len(bad)} array(s) differ from their saved digests, first {bad[0]})")
    return {name: restored[name] for name in abstract}

  def newest_good(self, load: Callable[[int, dict[str, Any]], Any],
                  step: int | None = None) -> tuple[Any, dict[str, Any], list[str]]:
    """Runs load(step, meta) on the newest step (or just `step`) that reads back whole.

    Returns load's result, that step's metadata and one line per newer step skipped as
    damaged. Raises the newest step's CheckpointDamaged if none loads.
    """
    skipped: list[str] = []
    for candidate in [self._require_step(step)] if step is not None else self.steps():
      try:
        meta = self.read_meta(candidate)
        return load(candidate, meta), meta, skipped
      except CheckpointDamaged as e:
        skipped.append(str(e))
    if not skipped:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    raise CheckpointDamaged(skipped[0] + ("" if len(skipped) == 1 else
                                          f"; the {len(skipped) - 1} older step(s) are damaged too"))

  def set_aside(self, step: int) -> Path:
    """Renames a damaged step folder to `<step>.damaged-<time>`, out of Orbax's sight but kept,
    so that the resumed run can write that step again."""
    stem = f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    target, n = self.directory / stem, 1
    while target.exists():
      target, n = self.directory / f"{stem}-{n}", n + 1
    (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
      raise FileNotFoundError(f"{what} in {self.directory}")
    return step

  def close(self) -> None:
    self._manager.close()


def _items(state) -> tuple[Any, dict[str, Any]]:
  """A TrainState as the checkpoint's two items: the model's variables (params and batch
  statistics: all a model needs) and the trainer's state."""
  return (nnx.merge_state(*state.variables()),
          {"step": state.step, "opt_state": state.opt_state, "key": state.key})


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def _remove(path: Path) -> None:
  if path.is_dir():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def _abstract(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Restore targets: on this process's first device, or replicated over `mesh` in a job of
  several processes (which all restore together).

  Without an explicit sharding Orbax restores onto the devices the checkpoint was written from,
  which fails when the topology differs (trained by 2 processes on 2 CPU devices each, evaluated
  by 1 on 1 device, say). Callers replicate onto their own mesh afterwards.
  """
  if mesh is not None and jax.process_count() > 1:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def refuse_existing(directory: str | os.PathLike) -> None:
  """A new run must not write into a folder holding another run's checkpoint: its steps would
  overwrite that run's and interleave with them.

  Reads the folder listing only (Orbax names finished steps by their number): opening an Orbax
  manager is a collective in a job of several processes, and this check runs before the job's
  processes agree on anything.
  """
  path = Path(directory)
  _refuse_file(path)
  if not path.is_dir():
    return
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()]
  if steps:
    raise ValueError(f"{directory} already holds a checkpoint (step {max(steps)}); resume it "
                     "(--resume) or choose another checkpoint directory")


# ----------------------------------------------------------------------------- resuming


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  """What a resume continues: the checkpoint's configs (epochs possibly extended), its step,
  and a sentence for the user when the schedule changes."""

  model_config: ModelConfig
  train_config: TrainConfig
  step: int
  note: str | None = None


def _finished(meta: dict[str, Any], saved: TrainConfig) -> bool:
  history = meta.get("history") or []
  return bool(history) and history[-1]["epoch"] == saved.epochs and \
      history[-1]["step"] == meta["step"]


def resolve_resume(meta: dict[str, Any], model_config: ModelConfig,
                   train_config: TrainConfig) -> ResumePlan:
  """The configs a resume from `meta` trains with, given the configs asked for.

  The recipe must be the checkpoint's own, except the evaluation batch size. `epochs` may
  differ only to extend a run that finished all its epochs: the added epochs then get a one-cycle
  schedule of their own (warm-up and cosine decay over those epochs, TrainConfig.cycle_start),
  since recomputing the finished run's schedule over more epochs would jump the learning rate
  back up mid-cycle, possibly into warm-up. An interrupted run resumes only with its own epochs.

  Raises:
    ValueError: a setting differs that may not, with the reason.
  """
  saved_model = ModelConfig.from_dict(meta["model"])
  if saved_model != model_config:
    raise ValueError(f"checkpoint model config {saved_model} differs from {model_config}")
  saved = TrainConfig.from_dict(meta["train"])
  for name in train_config.to_dict():
    if name in _FREE_ON_RESUME | {"epochs", "cycle_start"}:
      continue
    if getattr(saved, name) != getattr(train_config, name):
      raise ValueError(f"checkpoint was trained with {name}={getattr(saved, name)!r}, "
                       f"not {getattr(train_config, name)!r}; resume with the same settings")
  step, epochs = meta["step"], train_config.epochs
  config = dataclasses.replace(saved, eval_batch_size=train_config.eval_batch_size)
  if epochs == saved.epochs:
    return ResumePlan(saved_model, config, step)
  if not _finished(meta, saved):
    raise ValueError(f"the checkpoint's {saved.epochs}-epoch run stopped at step {step}, before "
                     f"its end; resume it with its own {saved.epochs} epochs (omit --epochs), "
                     "then extend it")
  if epochs < saved.epochs:
    raise ValueError(f"the checkpoint already finished {saved.epochs} epochs; to extend it, ask "
                     f"for more than {saved.epochs}")
  added = (f"epoch {epochs} gets a learning-rate cycle of its own" if epochs == saved.epochs + 1
           else f"epochs {saved.epochs + 1}-{epochs} get a learning-rate cycle of their own")
  note = (f"extending the finished {saved.epochs}-epoch run to {epochs} epochs: {added} "
          f"(warm-up to {saved.learning_rate:g}, then cosine decay)")
  return ResumePlan(saved_model, dataclasses.replace(config, epochs=epochs,
                                                     cycle_start=saved.epochs), step, note)


def resume_configs(checkpoint_dir: str | os.PathLike, *, epochs: int | None = None,
                   **overrides: Any) -> ResumePlan:
  """The plan for resuming the checkpoint in `checkpoint_dir`: its own recipe, with `epochs`
  (to extend a finished run) and TrainConfig `overrides` checked by resolve_resume."""
  with CheckpointManager(checkpoint_dir, read_only=True) as manager:
    meta = manager.newest_good(lambda step, meta: None)[1]
  saved = TrainConfig.from_dict(meta["train"])
  wanted = dataclasses.replace(saved, epochs=epochs or saved.epochs, cycle_start=0, **overrides)
  return resolve_resume(meta, ModelConfig.from_dict(meta["model"]), wanted)


def restore_for_resume(manager: CheckpointManager, state: Any, model_config: ModelConfig,
                       train_config: TrainConfig, train_examples: int,
                       mesh: jax.sharding.Mesh | None = None):
  """Restores a TrainState shaped like `state` from the newest step that reads back whole.

  Newer damaged steps are set aside (renamed, not deleted) so the run can write those steps
  again. Returns the state, the step's metadata, the ResumePlan and the damaged-step messages.

  Raises:
    ValueError: the configs or the training set differ from the checkpoint's (resolve_resume).
    CheckpointDamaged: no step reads back whole.
  """
  abstract = _abstract(state, mesh)
  items = {"params": nnx.merge_state(*abstract.variables()),
           "trainer": {"step": abstract.step, "opt_state": abstract.opt_state,
                       "key": abstract.key}}
  def load(step: int, meta: dict[str, Any]):
    plan = resolve_resume(meta, model_config, train_config)  # before restoring onto our shapes
    return manager.restore(step, meta, **items), plan

  (restored, plan), meta, skipped = manager.newest_good(load)
  saved_examples = meta.get("train_examples")
  if saved_examples is not None and saved_examples != train_examples:
    raise ValueError(f"the checkpoint was trained on {saved_examples:,} training images, this "
                     f"data has {train_examples:,}; resume on the same data, or start a new run")
  if distributed.is_primary():
    for newer in [s for s in manager.steps() if s > meta["step"]]:
      manager.set_aside(newer)
  if jax.process_count() > 1:  # the others see the folder as process 0 left it
    distributed.barrier("flaxdigits: damaged steps set aside")
    manager.reload()
  params, batch_stats = nnx.split_state(restored["params"], nnx.Param, nnx.BatchStat)
  trainer = restored["trainer"]
  return (type(state)(trainer["step"], params, batch_stats, trainer["opt_state"], trainer["key"]),
          meta, plan, skipped)


# ----------------------------------------------------------------------------- loading


def load_model(checkpoint_dir: str | os.PathLike,
               step: int | None = None) -> tuple[CNN, dict[str, Any]]:
  """Rebuilds the model from a checkpoint's own config and restores its verified parameters.

  Takes the newest step whose files read back whole and match their digests (or just `step`).
  Returns the model and the step's metadata (configs, step, metrics history); a
  `meta["damaged"]` list says which newer steps were skipped and why.

  Raises:
    FileNotFoundError: no checkpoint there.
    CheckpointDamaged (a ValueError): no step reads back whole; names the step and file.
  """
  def load(step: int, meta: dict[str, Any]):
    graphdef, variables = nnx.split(abstract_model(ModelConfig.from_dict(meta["model"])))
    return nnx.merge(graphdef, manager.restore(step, meta, params=_abstract(variables))["params"])

  with CheckpointManager(checkpoint_dir, read_only=True) as manager:
    model, meta, skipped = manager.newest_good(load, step)
  return model, meta | {"damaged": skipped}
