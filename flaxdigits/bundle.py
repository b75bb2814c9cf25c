"""Inference bundles: a checkpoint's classifier as a serialized jax.export program and its weights.

Every checkpoint save also writes `inference.npz` beside the step folders. Loading it needs only
JAX and NumPy (no Flax, no Orbax), which is most of what a cold `digits predict` would spend
importing. The program maps float32 images (N, 28, 28) in [0, 1], N any size, to class
probabilities (N, 10); it is the model's own forward pass, traced and serialized by JAX for every
platform in PLATFORMS. A bundle without this platform is refused (ValueError), and callers fall
back to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BUNDLE_NAME = "inference.npz"
# 2: the header holds each weight's digest, checked on every load; 3: calibrated probabilities,
# and the calibration in the header.
FORMAT_VERSION = 3
# One program for all of them, so a checkpoint trained on a GPU predicts on a laptop and back.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


@dataclasses.dataclass(frozen=True)
class Bundle:
  """A loaded bundle: `probabilities(images_Nx28x28) -> probs_Nx10` plus where it came from."""

  step: int
  model_config: dict[str, Any]
  probabilities: Callable[[jax.Array], jax.Array]
  calibration: dict[str, Any] | None  # flaxdigits.calibration.Calibration.to_dict(), if fitted


def write(directory: str | os.PathLike, model: Any, step: int, model_config: dict[str, Any],
          calibration: dict[str, Any] | None = None) -> Path:
  """Exports `model` (an NNX module) as the bundle for checkpoint `step`; replaces it atomically.

  The program computes probabilities at the calibration's temperature (1 without one).
  """
  temperature = float(calibration["temperature"]) if calibration else 1.0
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from flaxdigits import model as model_lib  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)

  def probabilities(leaves, images_Nx28x28):
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return model_lib.probabilities(module, images_Nx28x28[..., None], temperature)

  n, = jax.export.symbolic_shape("n")
  exported = _export(jax.jit(probabilities),
                     [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
                     jax.ShapeDtypeStruct((n, 28, 28), jnp.float32))
  weights = [np.asarray(x) for x in leaves]
  header = {"format": FORMAT_VERSION, "step": int(step), "model": model_config,
            "calibration": calibration,
            "num_weights": len(weights), "digests": [array_digest(w) for w in weights]}
  path = Path(directory) / BUNDLE_NAME
  partial = path.with_name(path.name + ".partial")
  with open(partial, "wb") as f:
    np.savez(f, header=_bytes(json.dumps(header).encode()),
             program=_bytes(exported.serialize()),
             **{f"weight_{i}": w for i, w in enumerate(weights)})
  os.replace(partial, path)
  return path


def _export(fn: Callable, *args: Any) -> jax.export.Exported:
  """`fn` lowered for every platform in PLATFORMS that lowering allows (this one always)."""
  try:
    return jax.export.export(fn, platforms=PLATFORMS)(*args)
  except Exception:  # pylint: disable=broad-except  # a platform whose lowering fails here
    here = jax.export.default_export_platform()
    usable = []
    for platform in PLATFORMS:
      try:
        jax.export.export(fn, platforms=(platform,))(*args)
        usable.append(platform)
      except Exception:  # pylint: disable=broad-except
        if platform == here:
          raise
    return jax.export.export(fn, platforms=tuple(usable))(*args)


def find(checkpoint_dir: str | os.PathLike) -> Path | None:
  """The bundle of the latest checkpoint in `checkpoint_dir`, or None if absent or stale.

  Stale means written for another step than the newest finished step folder (Orbax names
  finished checkpoints by their step; unfinished ones carry a temporary suffix).
  """
  directory = Path(checkpoint_dir)
  path = directory / BUNDLE_NAME
  if not path.is_file():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
  try:
    with np.load(path) as archive:
      header = _header(archive)
  except _UNREADABLE:
    return None
  return path if steps and header.get("step") == max(steps) else None


def load(path: str | os.PathLike) -> Bundle:
  """Reads a bundle; ValueError if it is unreadable or from another format version."""
  try:
    with np.load(path) as archive:
      header = _header(archive)
      if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {header.get('format')}, this flaxdigits reads {FORMAT_VERSION}")
      exported = jax.export.deserialize(bytearray(archive["program"].tobytes()))
      weights = [archive[f"weight_{i}"] for i in range(header["num_weights"])]
  except _UNREADABLE as e:
    raise ValueError(f"inference bundle {path} is unreadable: {e}") from None
  here = jax.export.default_export_platform()
  if here not in exported.platforms:
    raise ValueError(f"inference bundle {path} was exported for {', '.join(exported.platforms)}, "
                     f"not {here}")
  if [array_digest(w) for w in weights] != header["digests"]:
    raise ValueError(f"inference bundle {path} is damaged: its weights differ from their digests")
  weights = jax.device_put(weights)
  call = jax.jit(exported.call)
  return Bundle(header["step"], header["model"], lambda images: call(weights, images),
                header.get("calibration"))


def array_digest(array: np.ndarray) -> str:
  """sha256 of an array's dtype, shape and bytes: what checkpoints and bundles verify on load."""
  array = np.ascontiguousarray(array)
  h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
  h.update(array.tobytes())
  return h.hexdigest()


def _header(archive) -> dict[str, Any]:
  return json.loads(archive["header"].tobytes().decode())


def _bytes(data: bytes) -> np.ndarray:
  return np.frombuffer(data, np.uint8)
