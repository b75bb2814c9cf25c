"""Rich rendering of training progress and evaluation results (the library never prints)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich import box
from rich.table import Table
from rich.text import Text

from flaxdigits.writers import MetricWriter, periodic


def plain(text: object, style: str = "") -> Text:
  """Text from outside (file names, error messages) shown as it is: never read as Rich markup,
  and with control characters (ESC sequences, say) made visible instead of sent to the terminal."""
  return Text("".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in str(text)),
              style=style)


def message(label: str, style: str, text: object) -> Text:
  """`label: text` with the label styled and the text plain."""
  return Text.assemble((f"{label}:", style), " ", plain(text))


def format_epoch(scalars: Mapping[str, float], epochs: int) -> str:
  """One line for an epoch's scalars (flaxdigits.writers' tags)."""
  line = (f"epoch {scalars['epoch']:.0f}/{epochs}  loss {scalars['epoch/train_loss']:.4f}  "
          f"acc {100 * scalars['epoch/train_accuracy']:.2f}%")
  if "validation/accuracy" in scalars:
    line += (f"  [bold]val acc {100 * scalars['validation/accuracy']:.2f}%[/]  "
             f"val loss {scalars['validation/loss']:.4f}")
  if "test/accuracy" in scalars:
    line += (f"  [bold]test acc {100 * scalars['test/accuracy']:.2f}%[/]  "
             f"test loss {scalars['test/loss']:.4f}")
  return line + f"  {scalars['epoch/seconds']:.1f} s"


class TrainingDisplay(MetricWriter):
  """A writer (flaxdigits.writers) that shows training as a Rich progress bar and a line per
  epoch. Notes (what a resume changed) are said even when quiet."""

  def __init__(self, console: Console, epochs: int, quiet: bool = False):
    self.console, self.epochs, self.quiet = console, epochs, quiet
    self._progress: RichProgress | None = None
    self._task = None
    self._steps_per_epoch = 1

  def __enter__(self):
    if not self.quiet:
      self._progress = RichProgress(
          TextColumn("[bold blue]epoch {task.fields[epoch]}/" + str(self.epochs)),
          BarColumn(), MofNCompleteColumn(),
          TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}  "
                     "{task.fields[rate]} img/s"),
          TimeElapsedColumn(), TimeRemainingColumn(),
          console=self.console, transient=True, refresh_per_second=4)
      self._progress.__enter__()
    return self

  def __exit__(self, *exc):
    if self._progress is not None:
      self._progress.__exit__(*exc)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._steps_per_epoch = hparams["steps_per_epoch"]
    if self.quiet:
      return
    start = hparams["start_step"]
    self.console.print(
        f"CNN with {hparams['num_params']:,} parameters on {hparams['num_devices']} device(s); "
        f"{self._steps_per_epoch} steps/epoch, step {start} of {hparams['total_steps']}")
    self._task = self._progress.add_task("train", total=hparams["total_steps"], completed=start,
                                         epoch=1 + start // self._steps_per_epoch,
                                         loss=0.0, acc=0.0, rate="-")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for text in texts.values():
      self.console.print(message("note", "yellow", text), soft_wrap=True)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.quiet or self._task is None:
      return
    if periodic(scalars):
      rate = scalars.get("train/images_per_second")
      self._progress.update(self._task, completed=step, epoch=1 + step // self._steps_per_epoch,
                            loss=scalars["train/loss"], acc=scalars["train/accuracy"],
                            rate="-" if rate is None else f"{rate:,.0f}")
    else:
      self._progress.update(self._task, completed=step)
      self.console.print(format_epoch(scalars, self.epochs))


@contextlib.contextmanager
def counting_progress(console: Console, what: str, total: int) -> Iterator[Callable[[int], None]]:
  """A transient progress bar over `total` items; yields `advance(n)`."""
  with RichProgress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True) as bar:
    task = bar.add_task(what, total=total)
    yield lambda n: bar.advance(task, n)


def confusion_table(confusion: Any, title: str = "Confusion matrix") -> Table:
  table = Table(title=title, caption="rows: true digit, columns: predicted digit",
                box=box.SIMPLE_HEAD, header_style="bold", collapse_padding=True)
  table.add_column("true", justify="right", style="bold")
  for k in range(len(confusion)):
    table.add_column(str(k), justify="right")
  table.add_column("recall", justify="right", style="dim")
  for i, row in enumerate(confusion):
    cells = [Text(str(count), style="bold green" if i == j else "red" if count else "dim")
             for j, count in enumerate(row)]
    total = sum(row)
    cells.append(Text(f"{100 * row[i] / total:.1f}%" if total else "-"))
    table.add_row(str(i), *cells)
  return table


def confidence_line(c: dict[str, Any]) -> str:
  """`digits eval`'s sentence on calibration and the reject option (calibration.summary)."""
  if c["temperature"] is None:
    return (f"calibration error (ECE, 15 bins) {100 * c['ece']:.2f}%, NLL {c['nll']:.4f}; "
            "no calibration in this checkpoint (train with --validation), so no reject option")
  r = c["reject"]
  kept = (f"; the not-a-digit threshold {r['threshold']:.3f} keeps {100 * r['kept']:.2f}% of "
          f"these digits")
  if r["kept_accuracy"] is not None:
    kept += f", {100 * r['kept_accuracy']:.2f}% of them right"
  return (f"calibration (temperature {c['temperature']:.3f}): ECE "
          f"{100 * c['ece_uncalibrated']:.2f}% -> {100 * c['ece']:.2f}%, NLL "
          f"{c['nll_uncalibrated']:.4f} -> {c['nll']:.4f}{kept}")


def predictions_table(results, top_k: int) -> Table:
  table = Table(box=box.SIMPLE_HEAD, header_style="bold")
  table.add_column("file", overflow="fold")
  table.add_column("digit", justify="center", style="bold")
  table.add_column("confidence", justify="right")
  table.add_column(f"top {top_k}")
  for r in results:
    if r.error:
      table.add_row(plain(r.source), Text("-", style="dim"), "", plain(r.error, "red"))
      continue
    style = "green" if r.confidence >= 0.9 else "yellow" if r.confidence >= 0.5 else "red"
    guesses = "  ".join(f"{d}: {p:.1%}" for d, p in r.top_k(top_k))
    digit = Text(r.reason, style="yellow") if r.digit is None else str(r.digit)
    table.add_row(plain(r.source), digit, Text(f"{r.confidence:.1%}", style=style), guesses)
  return table


def class_balance_table(summaries) -> Table:
  """Counts and shares of each digit, a column pair per split."""
  table = Table(title="Class balance", box=box.SIMPLE_HEAD, header_style="bold")
  table.add_column("digit", justify="right", style="bold")
  for s in summaries:
    table.add_column(f"{s.split} count", justify="right")
    table.add_column("share", justify="right", style="dim")
  for k in range(len(summaries[0].class_counts)):
    cells = []
    for s in summaries:
      cells += [f"{s.class_counts[k]:,}", f"{100 * s.class_shares[k]:.2f}%"]
    table.add_row(str(k), *cells)
  totals = []
  for s in summaries:
    totals += [f"{s.num_examples:,}", "100%"]
  table.add_section()
  table.add_row("all", *totals)
  return table


def summary_lines(summary) -> list[str]:
  counts = summary.class_counts
  big, small = counts.index(max(counts)), counts.index(min(counts))
  verdict = "[green]balanced[/]" if summary.balanced else "[red]imbalanced[/]"
  uniform = ("not exactly uniform" if summary.chi2_p_value < 0.05 else "consistent with uniform")
  return [
      f"[bold]{summary.split}[/]: {verdict}: largest/smallest class {summary.imbalance_ratio:.2f} "
      f"(digit {big}: {max(counts):,}, digit {small}: {min(counts):,}); {uniform} "
      f"(chi-square {summary.chi2:.1f}, 9 dof, p = {summary.chi2_p_value:.2g})",
      f"  pixels scaled to [0, 1]: mean {summary.pixel_mean:.4f}, std {summary.pixel_std:.4f}",
  ]


def per_class_table(rows: list[dict]) -> Table:
  table = Table(title="Per-class metrics", box=box.SIMPLE_HEAD, header_style="bold")
  for name in ("digit", "precision", "recall", "F1", "support"):
    table.add_column(name, justify="right", style="bold" if name == "digit" else None)
  worst = min(r["f1"] for r in rows)
  for r in rows:
    style = "red" if r["f1"] == worst else None
    table.add_row(str(r["digit"]), f"{100 * r['precision']:.2f}%", f"{100 * r['recall']:.2f}%",
                  Text(f"{100 * r['f1']:.2f}%", style=style or ""), f"{r['support']:,}")
  return table


def confused_pairs_table(pairs: list[dict]) -> Table:
  table = Table(title="Most confused pairs", box=box.SIMPLE_HEAD, header_style="bold")
  table.add_column("true", justify="right")
  table.add_column("predicted as", justify="right")
  table.add_column("count", justify="right", style="bold")
  for p in pairs:
    table.add_row(str(p["true"]), str(p["predicted"]), str(p["count"]))
  return table
