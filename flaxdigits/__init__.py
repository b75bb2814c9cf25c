"""flaxdigits: a JAX/Flax NNX handwritten-digit recogniser trained on MNIST.

The public API, imported lazily so that `import flaxdigits` (and the `digits` CLI's start-up)
does not pull in JAX until a name that needs it is used:

    import flaxdigits as fd
    data = fd.load_mnist("path/to/mnist")          # or None: through tensorflow-datasets
    result = fd.train(data, fd.ModelConfig(), fd.TrainConfig(epochs=5), checkpoint_dir="ckpt")
    model, meta = fd.load_model("ckpt")
    print(fd.evaluate(model, data["test"]).accuracy)

Each name maps to "module" (the same name there) or "module:attribute". No public name is also
a submodule's name: importing a submodule binds it on the package, over the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "flaxdigits.config",
    "TrainConfig": "flaxdigits.config",
    "preset": "flaxdigits.config",
    "Split": "flaxdigits.data",
    "load_mnist": "flaxdigits.data",
    "normalize": "flaxdigits.data",
    "hold_out": "flaxdigits.data",
    "Calibration": "flaxdigits.calibration",
    "fit_calibration": "flaxdigits.calibration:fit",
    "calibration_summary": "flaxdigits.calibration:summary",
    "render_outliers": "flaxdigits.outliers:render",
    "CNN": "flaxdigits.model",
    "build_model": "flaxdigits.model",
    "count_params": "flaxdigits.model",
    "make_mesh": "flaxdigits.parallel",
    "TrainState": "flaxdigits.training",
    "TrainResult": "flaxdigits.training",
    "train": "flaxdigits.training",
    "MetricWriter": "flaxdigits.writers",
    "MultiWriter": "flaxdigits.writers",
    "InMemoryWriter": "flaxdigits.writers",
    "TensorBoardWriter": "flaxdigits.writers",
    "EvalResult": "flaxdigits.evaluation",
    "cross_entropy": "flaxdigits.evaluation",
    "evaluate": "flaxdigits.evaluation",
    "CheckpointManager": "flaxdigits.checkpoint",
    "load_model": "flaxdigits.checkpoint",
    "SplitSummary": "flaxdigits.eda",
    "summarize": "flaxdigits.eda",
    "NoDigitFound": "flaxdigits.preprocess",
    "to_mnist": "flaxdigits.preprocess",
    "Prediction": "flaxdigits.predict",
    "Predictor": "flaxdigits.predict",
    "create_app": "flaxdigits.serve",
    "export_model": "flaxdigits.export:export",
    "eda_figures": "flaxdigits.figures",
    "report_figures": "flaxdigits.figures",
    "save_figures": "flaxdigits.figures:save_all",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    module, _, attribute = _EXPORTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute or name)
  raise AttributeError(f"module 'flaxdigits' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
  from flaxdigits.calibration import Calibration  # noqa: F401
  from flaxdigits.calibration import fit as fit_calibration  # noqa: F401
  from flaxdigits.calibration import summary as calibration_summary  # noqa: F401
  from flaxdigits.checkpoint import CheckpointManager, load_model  # noqa: F401
  from flaxdigits.config import ModelConfig, TrainConfig, preset  # noqa: F401
  from flaxdigits.data import Split, hold_out, load_mnist, normalize  # noqa: F401
  from flaxdigits.eda import SplitSummary, summarize  # noqa: F401
  from flaxdigits.evaluation import EvalResult, cross_entropy, evaluate  # noqa: F401
  from flaxdigits.export import export as export_model  # noqa: F401
  from flaxdigits.figures import eda_figures, report_figures  # noqa: F401
  from flaxdigits.figures import save_all as save_figures  # noqa: F401
  from flaxdigits.model import CNN, build_model, count_params  # noqa: F401
  from flaxdigits.outliers import render as render_outliers  # noqa: F401
  from flaxdigits.parallel import make_mesh  # noqa: F401
  from flaxdigits.predict import Prediction, Predictor  # noqa: F401
  from flaxdigits.preprocess import NoDigitFound, to_mnist  # noqa: F401
  from flaxdigits.serve import create_app  # noqa: F401
  from flaxdigits.training import TrainResult, TrainState, train  # noqa: F401
  from flaxdigits.writers import (InMemoryWriter, MetricWriter, MultiWriter,  # noqa: F401
                                  TensorBoardWriter)
