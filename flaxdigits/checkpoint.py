"""Orbax checkpoints that carry their own config and metrics history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flaxdigits import bundle
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.model import CNN, abstract_model

FORMAT_VERSION = 1
MAX_TO_KEEP = 3
# Fields that may change when resuming: more epochs extend the run; the evaluation batch size
# changes no parameter. (Steps per dispatch changes no parameter either, but a run stopped at
# one chunk boundary resumes at a step the new chunk length may not divide.)
_RESUMABLE_CHANGES = {"epochs", "eval_batch_size"}


class CheckpointManager:
  """Saves and restores training checkpoints in `directory`, one step-numbered folder each.

  Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
  half-written checkpoint is never taken as the latest.
  """

  def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
    self.directory = Path(directory).expanduser().absolute()
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=not read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state, model_config: ModelConfig, train_config: TrainConfig,
           history: list[dict[str, float]]) -> None:
    """Saves asynchronously (call wait() before relying on it), and the inference bundle."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    # Orbax writes host arrays in ~0.2 s; replicated device arrays cost it ~1.1 s a save here.
    state = jax.device_get(state)
    meta = {"format": FORMAT_VERSION, "step": step, "model": model_config.to_dict(),
            "train": train_config.to_dict(), "history": history}
    variables = nnx.merge_state(*state.variables())  # all a model needs: params, batch stats
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(variables),
        trainer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                       "key": state.key}),
        meta=ocp.args.JsonSave(meta)))
    graphdef = nnx.graphdef(abstract_model(model_config))
    bundle.write(self.directory, nnx.merge(graphdef, variables), step, meta["model"])

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
      raise FileNotFoundError(f"{what} in {self.directory}")
    return step

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._require_step(step)
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {self.directory} has format {meta.get('format')}, "
                       f"this flaxdigits reads format {FORMAT_VERSION}")
    return meta

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    step = self._require_step(step)
    return self._restore(step, params=ocp.args.StandardRestore(abstract_params)).params

  def restore_for_resume(self, state, model_config: ModelConfig, train_config: TrainConfig):
    """Restores a TrainState shaped like `state`, after checking the configs agree."""
    meta = self.read_meta()
    check_compatible(meta, model_config, train_config)
    abstract = _abstract(state)
    restored = self._restore(
        meta["step"], params=ocp.args.StandardRestore(nnx.merge_state(*abstract.variables())),
        trainer=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state,
                                          "key": abstract.key}))
    trainer = restored.trainer
    params, batch_stats = nnx.split_state(restored.params, nnx.Param, nnx.BatchStat)
    return type(state)(trainer["step"], params, batch_stats, trainer["opt_state"],
                       trainer["key"]), meta

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory} step {step} does not fit this model "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _abstract(tree: Any) -> Any:
  """Restore targets on this process's first device.

  Without an explicit sharding Orbax restores onto the devices the checkpoint was written from,
  which fails when the device count differs (trained on 2 CPU devices, evaluated on 1, say).
  Callers replicate onto their own mesh afterwards.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def refuse_existing(directory: str | os.PathLike) -> None:
  """A new run must not write into a folder holding another run's checkpoint: its steps would
  overwrite that run's and interleave with them."""
  if not Path(directory).is_dir():
    return
  manager = CheckpointManager(directory, read_only=True)
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is not None:
    raise ValueError(f"{directory} already holds a checkpoint (step {step}); resume it "
                     "(--resume) or choose another checkpoint directory")


def check_compatible(meta: dict[str, Any], model_config: ModelConfig,
                     train_config: TrainConfig) -> None:
  saved_model = ModelConfig.from_dict(meta["model"])
  if saved_model != model_config:
    raise ValueError(f"checkpoint model config {saved_model} differs from {model_config}")
  saved_train = meta["train"]
  for name, value in train_config.to_dict().items():
    if name not in _RESUMABLE_CHANGES and saved_train.get(name) != value:
      raise ValueError(f"checkpoint was trained with {name}={saved_train.get(name)!r}, "
                       f"not {value!r}; resume with the same settings")


def load_model(checkpoint_dir: str | os.PathLike,
               step: int | None = None) -> tuple[CNN, dict[str, Any]]:
  """Rebuilds the model from a checkpoint's own config and restores its parameters.

  Returns the model and the checkpoint's metadata (configs, step and metrics history).
  """
  manager = CheckpointManager(checkpoint_dir, read_only=True)
  try:
    meta = manager.read_meta(step)
    config = ModelConfig.from_dict(meta["model"])
    graphdef, variables = nnx.split(abstract_model(config))
    variables = manager.restore_params(_abstract(variables), meta["step"])
  finally:
    manager.close()
  return nnx.merge(graphdef, variables), meta
