"""Figures for `digits eda` and `digits eval --report`: matplotlib Figure objects, no pyplot.

Each function returns a `matplotlib.figure.Figure` of a fixed size (`save` writes it as PNG at
DPI), so callers, notebooks included, decide where it goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from flaxdigits.data import NUM_CLASSES, Split
from flaxdigits.eda import SplitSummary, class_means, samples

DPI = 100
_SPLIT_COLOURS = {"train": "#4C72B0", "validation": "#55A868", "test": "#DD8452"}


def save(figure: Figure, path: str | os.PathLike) -> Path:
  """Writes `figure` as a PNG of exactly its size in inches times DPI."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=DPI, format="png")
  return path


def _mosaic(images_NxHxW: np.ndarray, rows: int, cols: int, gap: int = 2) -> np.ndarray:
  """Tiles images into one array with `gap` pixels between them (a blank tile for -1 slots)."""
  h, w = images_NxHxW.shape[1:]
  mosaic = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap))
  for i, image in enumerate(images_NxHxW[:rows * cols]):
    r, c = divmod(i, cols)
    mosaic[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
  return mosaic


def sample_grid(split: Split, name: str, per_class: int = 12, seed: int = 0) -> Figure:
  """Random examples of each digit, one row per class."""
  chosen = samples(split, per_class, seed)
  tiles = np.where((chosen >= 0)[..., None, None], split.images[np.maximum(chosen, 0)] / 255.0, 0)
  figure = Figure(figsize=(8, 7.2), layout="constrained")
  ax = figure.add_subplot()
  ax.imshow(1 - _mosaic(tiles.reshape(-1, 28, 28), NUM_CLASSES, per_class), cmap="gray",
            vmin=0, vmax=1, interpolation="nearest")
  ax.set_yticks([k * 30 + 14 for k in range(NUM_CLASSES)], [str(k) for k in range(NUM_CLASSES)])
  ax.set_xticks([])
  ax.set_ylabel("digit (class)")
  ax.set_title(f"MNIST {name}: {per_class} random examples of each digit")
  return figure


def class_distribution(summaries: Sequence[SplitSummary]) -> Figure:
  """Share of each digit per split, side by side, with the uniform 10% marked."""
  figure = Figure(figsize=(9, 4.5), layout="constrained")
  ax = figure.add_subplot()
  width = 0.8 / len(summaries)
  digits = np.arange(NUM_CLASSES)
  for i, s in enumerate(summaries):
    offset = (i - (len(summaries) - 1) / 2) * width
    bars = ax.bar(digits + offset, 100 * np.asarray(s.class_shares), width,
                  color=_SPLIT_COLOURS.get(s.split), label=f"{s.split} ({s.num_examples:,} images)")
    ax.bar_label(bars, labels=[f"{c:,}" for c in s.class_counts], fontsize=7, rotation=90,
                 padding=2)
  ax.axhline(100 / NUM_CLASSES, color="gray", linestyle="--", linewidth=1, label="uniform (10%)")
  ax.set_xticks(digits)
  ax.set_xlabel("digit")
  ax.set_ylabel("share of the split (%)")
  ax.set_ylim(0, 100 * max(max(s.class_shares) for s in summaries) * 1.25)
  ax.set_title("Class distribution (bar labels: image counts)")
  ax.legend(loc="upper left", ncols=len(summaries) + 1, fontsize=8)
  return figure


def mean_images(split: Split, name: str) -> Figure:
  """The mean image of each digit: where its ink usually lies."""
  means = class_means(split)
  figure = Figure(figsize=(10, 4.6), layout="constrained")
  axes = figure.subplots(2, 5)
  for k, ax in enumerate(axes.flat):
    ax.imshow(means[k], cmap="magma", vmin=0, vmax=1)
    ax.set_title(str(k))
    ax.set_axis_off()
  figure.suptitle(f"Mean image of each digit, MNIST {name} (pixel value in [0, 1])")
  return figure


def pixel_histogram(summaries: Sequence[SplitSummary]) -> Figure:
  """How often each pixel value occurs, on a log scale: mostly black, a peak at full ink."""
  figure = Figure(figsize=(8, 4.5), layout="constrained")
  ax = figure.add_subplot()
  values = np.arange(256) / 255.0
  for i, s in enumerate(summaries):
    shares = np.asarray(s.pixel_histogram) / sum(s.pixel_histogram)
    ax.step(values, shares, where="mid", color=_SPLIT_COLOURS.get(s.split),
            linewidth=2.2 - i, linestyle="-" if i == 0 else "--",
            label=f"{s.split}: mean {s.pixel_mean:.4f}, std {s.pixel_std:.4f}, "
            f"{shares[0]:.1%} exactly 0")
  ax.set_yscale("log")
  ax.set_xlabel("pixel value (scaled to [0, 1])")
  ax.set_ylabel("share of all pixels (log scale)")
  ax.set_title("Pixel intensity histogram")
  ax.legend(fontsize=9)
  return figure


def confusion_heatmap(confusion_KxK: np.ndarray, title: str = "Confusion matrix") -> Figure:
  """Counts (log colour scale, so rare mistakes show) and row-normalised percentages."""
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel

  cm = np.asarray(confusion_KxK)
  rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  figure = Figure(figsize=(14, 6.5), layout="constrained")
  left, right = figure.subplots(1, 2)
  panels = ((left, cm, "counts", LogNorm(vmin=1, vmax=max(cm.max(), 2)), lambda v: f"{v:d}"),
            (right, 100 * rows, "row-normalised (% of each true digit)", LogNorm(0.01, 100),
             lambda v: f"{v:.1f}" if v >= 0.05 else ""))
  for ax, values, label, norm, text in panels:
    image = ax.imshow(np.where(values > 0, values, np.nan), cmap="Blues", norm=norm)
    for (i, j), v in np.ndenumerate(values):
      if v > 0:
        ax.text(j, i, text(v), ha="center", va="center", fontsize=7,
                color="white" if i == j else "black")
    ax.set_xticks(range(len(cm)))
    ax.set_yticks(range(len(cm)))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(label)
    figure.colorbar(image, ax=ax, shrink=0.8)
  figure.suptitle(f"{title}: {int(np.trace(cm)):,} of {int(cm.sum()):,} correct "
                  f"({100 * np.trace(cm) / max(cm.sum(), 1):.2f}%)")
  return figure


def misclassified_gallery(images_NxHxW: np.ndarray, labels_N: np.ndarray,
                          predicted_N: np.ndarray, confidence_N: np.ndarray,
                          max_images: int = 40, cols: int = 8) -> Figure:
  """The model's mistakes, most confident first, titled true -> predicted (confidence)."""
  wrong = np.flatnonzero(predicted_N != labels_N)
  wrong = wrong[np.argsort(-confidence_N[wrong], kind="stable")][:max_images]
  rows = max(1, -(-len(wrong) // cols))
  height = rows * 1.45 + 0.8  # inches: a row per 8 images and a header
  figure = Figure(figsize=(cols * 1.25, height))
  figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / height,
                         hspace=0.45, wspace=0.1)
  axes = np.atleast_1d(figure.subplots(rows, cols)).reshape(-1)
  for ax in axes:
    ax.set_axis_off()
  for ax, i in zip(axes, wrong):
    ax.imshow(images_NxHxW[i], cmap="gray_r", interpolation="nearest")
    ax.set_title(f"{labels_N[i]} → {predicted_N[i]} ({confidence_N[i]:.0%})", fontsize=9,
                 color="firebrick")
  shown = f"the {len(wrong)} most confident" if len(wrong) else "none"
  figure.suptitle(f"Misclassified test images: {shown} of {int((predicted_N != labels_N).sum())} "
                  "(true → predicted, confidence)", fontsize=11, y=1 - 0.2 / height)
  return figure


def training_curves(history: Sequence[dict[str, float]]) -> Figure:
  """Loss and accuracy per epoch, from a checkpoint's history."""
  figure = Figure(figsize=(11, 4.2), layout="constrained")
  loss_ax, acc_ax = figure.subplots(1, 2)
  epochs = [r["epoch"] for r in history]
  for ax, metric, scale in ((loss_ax, "loss", 1), (acc_ax, "accuracy", 100)):
    for split, style in (("train", "o-"), ("validation", "^-"), ("test", "s-")):
      key = f"{split}_{metric}"
      if all(key in r for r in history):
        ax.plot(epochs, [scale * r[key] for r in history], style, label=split,
                color=_SPLIT_COLOURS[split])
    ax.set_xlabel("epoch")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()
  loss_ax.set_ylabel("cross-entropy")
  loss_ax.set_title("Loss (train: augmented, label-smoothed)")
  acc_ax.set_ylabel("accuracy (%)")
  acc_ax.set_title("Accuracy")
  acc_ax.margins(y=0.12)
  if history and "test_accuracy" in history[-1]:
    last = history[-1]
    acc_ax.annotate(f"{100 * last['test_accuracy']:.2f}%", (last["epoch"],
                    100 * last["test_accuracy"]), textcoords="offset points", xytext=(4, 8),
                    ha="right", fontsize=9)
  return figure


def eda_figures(splits: dict[str, Split],
                summaries: Sequence[SplitSummary]) -> dict[str, Figure]:
  """Every `digits eda` figure, by file stem."""
  figures = {"class_distribution": class_distribution(summaries),
             "pixel_histogram": pixel_histogram(summaries)}
  for name, split in splits.items():
    figures[f"samples_{name}"] = sample_grid(split, name)
    figures[f"mean_images_{name}"] = mean_images(split, name)
  return figures


def reliability_diagram(logits_NxK: np.ndarray, labels_N: np.ndarray,
                        temperature: float | None) -> Figure:
  """Accuracy against confidence per confidence bin, at temperature 1 and (when given) at the
  fitted temperature; a calibrated model's bars sit on the diagonal."""
  from flaxdigits import calibration  # pylint: disable=import-outside-toplevel
  panels = [("uncalibrated (T = 1)", 1.0)]
  if temperature is not None:
    panels.append((f"calibrated (T = {temperature:.3f})", temperature))
  figure = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
  for ax, (title, t) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
    probs = calibration.softmax(logits_NxK, t)
    rows = calibration.reliability(probs, labels_N)
    used = [r for r in rows if r["count"]]
    ax.bar([r["low"] for r in used], [r["accuracy"] for r in used],
           width=[r["high"] - r["low"] for r in used], align="edge", color="#4C72B0",
           edgecolor="white", label="accuracy")
    ax.bar([r["low"] for r in used], [r["confidence"] - r["accuracy"] for r in used],
           bottom=[r["accuracy"] for r in used], width=[r["high"] - r["low"] for r in used],
           align="edge", color="#DD8452", alpha=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (largest probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {100 * calibration.ece(probs, labels_N):.2f}%")
    ax.legend(loc="upper left")
  return figure


def preprocessing_stages(examples: Sequence[tuple[str, dict[str, np.ndarray]]]) -> Figure:
  """A row per example (its name and preprocess.stages(...)): the picture, the ink found in it,
  the digit kept and cropped, and the 28x28 the model sees."""
  titles = {"picture": "picture (working size)", "ink": "ink, background removed",
            "digit": "digit kept, cropped", "mnist": "28x28 for the model"}
  figure = Figure(figsize=(10, 2.6 * len(examples)), layout="constrained")
  axes = np.atleast_2d(figure.subplots(len(examples), len(titles)))
  for row, (name, stage) in zip(axes, examples):
    for ax, key in zip(row, titles):
      ax.imshow(stage[key], cmap="gray" if key == "picture" else "gray_r" if key != "mnist"
                else "gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(titles[key], fontsize=9)
    row[0].set_ylabel(name, fontsize=9)
  return figure


def report_figures(result, test: Split, history: Sequence[dict[str, float]],
                   temperature: float | None = None) -> dict[str, Figure]:
  """Every `digits eval --report` figure, by file stem, for an EvalResult on `test`."""
  figures = {"confusion_matrix": confusion_heatmap(result.confusion_matrix),
             "misclassified": misclassified_gallery(test.images, test.labels, result.predicted,
                                                    result.confidence),
             "reliability": reliability_diagram(result.logits, test.labels, temperature)}
  if history:
    figures["training_curves"] = training_curves(history)
  return figures


def save_all(figures: dict[str, Figure], folder: str | os.PathLike) -> list[Path]:
  return [save(figure, Path(folder) / f"{stem}.png") for stem, figure in figures.items()]
