"""Where training reports its numbers: one writer interface, in the shape of CLU's
`metric_writers`, with the Rich display (`digits train`'s progress bar) and TensorBoard's event
files as two writers of it.

`flaxdigits.train(..., writer=...)` calls, in order:
- `write_hparams(hparams)` once: the run (`num_params`, `num_devices`, `steps_per_epoch`,
  `total_steps`, `start_step`) and both configs (`model.*`, `train.*`);
- `write_texts(step, {"note": ...})` for what a resume changed or skipped;
- `write_scalars(step, scalars)` after every dispatch, with the running figures of the epoch so
  far: `train/loss`, `train/accuracy`, `train/learning_rate` and, once measurable,
  `train/images_per_second` (only `train/*` tags: periodic, and a writer may thin them);
- `write_scalars(step, scalars)` at the end of every epoch: `epoch`, `epoch/train_loss`,
  `epoch/train_accuracy`, `epoch/train_seconds`, `epoch/seconds`, with held-out images
  `validation/loss`, `validation/accuracy`, `validation/temperature`, and where the test set was
  scored `test/loss`, `test/accuracy`; then `flush()`.
Steps count optimiser steps from the start of the run. The caller closes its writers.
"""

from __future__ import annotations

import abc
import os
from typing import Any, Mapping, Sequence

Scalars = Mapping[str, float]

# The tags of the scalars written at the end of an epoch, by their key in the run's history.
EPOCH_TAGS = {"epoch": "epoch", "train_loss": "epoch/train_loss",
              "train_accuracy": "epoch/train_accuracy", "train_seconds": "epoch/train_seconds",
              "seconds": "epoch/seconds", "validation_loss": "validation/loss",
              "validation_accuracy": "validation/accuracy",
              "temperature": "validation/temperature", "test_loss": "test/loss",
              "test_accuracy": "test/accuracy"}


def periodic(scalars: Scalars) -> bool:
  """Whether these are a dispatch's running figures (only `train/*` tags), not an epoch's."""
  return all(tag.startswith("train/") for tag in scalars)


class MetricWriter(abc.ABC):
  """Receives a run's numbers. Only write_scalars is required; the rest default to nothing."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Scalars) -> None:
    """Scalars at an optimiser step, by tag (`train/loss`, `validation/accuracy`, ...)."""

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Sentences at a step, by tag."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's settings, once, before any scalars."""

  def flush(self) -> None:
    """Makes everything written so far durable or visible."""

  def close(self) -> None:
    """Flushes and releases the writer; it is not written to again."""

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class MultiWriter(MetricWriter):
  """Writes to every one of `writers`, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for writer in self.writers:
      writer.write_texts(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


class InMemoryWriter(MetricWriter):
  """Keeps everything written: `scalars` and `texts` as (step, dict) pairs, `hparams` as a dict.
  For tests and scripts that want the numbers themselves."""

  def __init__(self):
    self.scalars: list[tuple[int, dict[str, float]]] = []
    self.texts: list[tuple[int, dict[str, str]]] = []
    self.hparams: dict[str, Any] = {}

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    self.scalars.append((step, dict(scalars)))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self.texts.append((step, dict(texts)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.hparams.update(hparams)


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files in `logdir` (tensorboardX's SummaryWriter): every epoch's scalars,
  and the running training figures every `every_steps` optimiser steps (thinned at dispatch
  boundaries). Settings and notes go in as text. In a job of several processes, only process 0
  writes; the others' writers do nothing.

  Raises:
    ValueError: `logdir` cannot be created or written.
  """

  def __init__(self, logdir: str | os.PathLike, every_steps: int = 50):
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    self.logdir, self.every_steps = os.fspath(logdir), every_steps
    self._last: int | None = None
    self._writer = None
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
      return
    try:
      os.makedirs(self.logdir, exist_ok=True)
      if not os.access(self.logdir, os.W_OK):
        raise PermissionError(f"cannot write to {self.logdir}")
    except OSError as e:
      raise ValueError(f"log directory {self.logdir}: {e.strerror or e}") from None
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    if self._writer is None:
      return
    if periodic(scalars):
      if self._last is not None and step - self._last < self.every_steps:
        return
      self._last = step
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, float(value), global_step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._writer is None:
      return
    for tag, text in texts.items():
      self._writer.add_text(tag, text, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._writer is None:
      return
    rows = "\n".join(f"| {key} | {value} |" for key, value in hparams.items())
    self._writer.add_text("hparams", "| setting | value |\n|---|---|\n" + rows, global_step=0)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
