"""Exports the classifier for other runtimes: ONNX (ONNX Runtime) and TFLite (LiteRT).

Both files take float32 images (N, 28, 28, 1) in [0, 1], the output of `to_mnist` with a channel
axis, N dynamic, and return class probabilities (N, 10) (softmax included, at the checkpoint's
fitted temperature). A JSON sidecar beside each file states that contract, with the not-a-digit
threshold on the largest probability. Export-only packages (jax2onnx, TensorFlow, the
runtimes) are imported here only, inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

import flaxdigits
from flaxdigits.model import probabilities

FORMATS = ("onnx", "tflite")
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
TOLERANCE = 1e-4  # max |probability difference| allowed between an export and JAX


@dataclasses.dataclass(frozen=True)
class Exported:
  path: Path
  sidecar: Path
  size_bytes: int
  max_abs_diff: float  # on the verification batch, against the JAX model


def probabilities_fn(model: Any, temperature: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """The exported computation: images (N, 28, 28, 1) -> softmax probabilities (N, 10) at the
  checkpoint's temperature (the calibrated probabilities)."""
  return functools.partial(probabilities, model, temperature=temperature)


def temperature(meta: dict[str, Any]) -> float:
  """The temperature a checkpoint's probabilities are scaled by (1.0 if it has no calibration)."""
  return float((meta.get("calibration") or {}).get("temperature", 1.0))


def export(model: Any, meta: dict[str, Any], fmt: str, path: str | os.PathLike,
           *, overwrite: bool = False) -> Exported:
  """Writes `model` as `fmt` to `path` and its sidecar to `path` + `.json`.

  The file is written beside `path` under a temporary name, run in its own runtime on a
  verification batch and checked against JAX; only a file that passes is moved into place (an
  atomic rename), so `path` never holds an unchecked export and a failed export leaves nothing
  behind.

  Raises:
    ValueError: unknown format, an existing file without `overwrite`, or an export that
      disagrees with JAX by more than TOLERANCE.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
  path = Path(path)
  sidecar = path.with_name(path.name + ".json")
  for existing in (path, sidecar):
    if existing.exists() and not overwrite:
      raise ValueError(f"{existing} exists; pass overwrite=True (--force) to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  fn = probabilities_fn(model, temperature(meta))
  data = _to_onnx(fn) if fmt == "onnx" else _to_tflite(fn)
  # The runtime picks its loader by suffix: the temporary name keeps it.
  staged = path.with_name(f".{path.stem}.partial{path.suffix}")
  staged_sidecar = sidecar.with_name(f".{sidecar.name}.partial")
  try:
    staged.write_bytes(data)
    staged_sidecar.write_text(json.dumps(contract(meta, fmt, path.name), indent=2))
    images = _verification_images()
    diff = float(np.abs(run(staged, images) - np.asarray(jax.jit(fn)(images))).max())
    if not diff <= TOLERANCE:
      raise ValueError(f"the {fmt} export disagrees with the JAX model by {diff:.2g} "
                       f"(> {TOLERANCE}); nothing was written to {path}")
    os.replace(staged, path)
    os.replace(staged_sidecar, sidecar)
  finally:
    staged.unlink(missing_ok=True)
    staged_sidecar.unlink(missing_ok=True)
  return Exported(path, sidecar, path.stat().st_size, diff)


def contract(meta: dict[str, Any], fmt: str, file_name: str) -> dict[str, Any]:
  """The sidecar: what goes in, what comes out, and where the model came from."""
  history = meta.get("history") or [{}]
  calibration = meta.get("calibration")
  return {
      "file": file_name,
      "format": {"onnx": "ONNX (opset 17)", "tflite": "TFLite / LiteRT flatbuffer"}[fmt],
      "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 28, 28, 1],
                "layout": "NHWC", "range": [0.0, 1.0]},
      "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", 10],
                 "meaning": "class probabilities (softmax applied); argmax is the digit",
                 "calibrated": calibration is not None},
      "calibration": None if calibration is None else {
          "temperature": calibration["temperature"],
          "method": "temperature scaling, fitted on held-out training images (already applied "
                    "to the output)"},
      "reject": None if calibration is None else {
          "score": "the largest output probability", "threshold": calibration["threshold"],
          "rule": "an input whose score is below the threshold is not a digit",
          "keeps": f"{100 * calibration['keep']:g}% of held-out digits"},
      "classes": [str(d) for d in range(10)],
      "preprocessing": (
          "MNIST format, as flaxdigits.to_mnist makes it: white ink on black, the digit cropped "
          "to its ink and scaled (aspect ratio kept, anti-aliased) into a 20x20 box, centred by "
          "centre of mass in 28x28, pixel values divided by 255. Photos need the full to_mnist "
          "pipeline (background removal, polarity, stroke width); a plain resize of a photo "
          "to 28x28 gives wrong answers."),
      "source": {"step": meta.get("step"), "model": meta.get("model"),
                 "test_accuracy": history[-1].get("test_accuracy"),
                 "flaxdigits": flaxdigits.__version__, "jax": jax.__version__},
  }


def run(path: str | os.PathLike, images_Nx28x28x1: np.ndarray) -> np.ndarray:
  """Runs an exported file in its own runtime (onnxruntime or the LiteRT interpreter)."""
  path = Path(path)
  images = np.asarray(images_Nx28x28x1, np.float32)
  if path.suffix == ".onnx":
    import onnxruntime  # pylint: disable=import-outside-toplevel
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
  if path.suffix == ".tflite":
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    interpreter = Interpreter(model_path=str(path))
    [source], [sink] = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(sink["index"]).copy()
  raise ValueError(f"cannot run {path}: expected a .onnx or .tflite file")


def _to_onnx(fn) -> bytes:
  import onnx  # pylint: disable=import-outside-toplevel
  from jax2onnx import to_onnx  # pylint: disable=import-outside-toplevel
  # jax2onnx's own conv lowering adds the bias by rank promotion; allow it even where the caller
  # made promotion an error (as the tests do).
  with jax.numpy_rank_promotion("allow"):
    proto = to_onnx(fn, [("N", 28, 28, 1)], model_name="flaxdigits", opset=17,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  onnx.checker.check_model(proto, full_check=True)
  return proto.SerializeToString()  # weights inside: one file to ship


def _to_tflite(fn) -> bytes:
  """jax2tf (StableHLO inside a SavedModel), then the TFLite converter."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  signature = tf.TensorSpec([None, 28, 28, 1], tf.float32, name=INPUT_NAME)
  converted = jax2tf.convert(fn, polymorphic_shapes=["(n, 28, 28, 1)"], with_gradient=False)
  serve = tf.function(lambda images: {OUTPUT_NAME: converted(images)},
                      input_signature=[signature], autograph=False)
  module = tf.Module()
  module.serve = serve
  with tempfile.TemporaryDirectory(prefix="flaxdigits-savedmodel-") as saved:
    tf.saved_model.save(module, saved, signatures={"serving_default": serve})
    return tf.lite.TFLiteConverter.from_saved_model(saved).convert()


def _verification_images(n: int = 64) -> np.ndarray:
  """Synthetic check inputs: uniform noise raised to the 4th power (mostly dark, a few bright
  pixels, like ink on black), one blank image and one saturated."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32) ** 4
  images[0], images[1] = 0.0, 1.0
  return images
