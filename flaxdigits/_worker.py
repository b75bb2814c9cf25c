"""What runs in `batching.Batcher`'s preprocessing processes besides `to_mnist`.

Kept apart from `batching` (which imports JAX, through `predict`) so that the processes import
only the preprocessing's NumPy, SciPy and Pillow.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading

import numpy as np

from flaxdigits.preprocess import MIN_SIDE, to_mnist


def exit_with_parent() -> None:
  """The processes' initializer: ends the process as soon as the server's is gone, even if that
  was killed and never shut its pool down."""
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def watch() -> None:
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(0)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name="flaxdigits-watch-parent").start()


def warm_up() -> None:
  """Preprocesses a blank image once: imports and first calls, before the first request."""
  try:
    to_mnist(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8))
  except ValueError:
    pass  # "no digit found", as expected
