"""What runs in `batching.Batcher`'s preprocessing processes.

Kept apart from `batching` (which imports JAX, through `predict`) so that the processes import
only the preprocessing's NumPy, SciPy and Pillow.
"""

from __future__ import annotations

import multiprocessing.connection
import pickle
import signal

import numpy as np

from flaxdigits.preprocess import MIN_SIDE, to_mnist

# A failure's message is cut to this many characters, so that every answer stays one short write.
MAX_MESSAGE = 500


def serve(connection: multiprocessing.connection.Connection) -> None:
  """A preprocessing process's life: warm up, then answer requests until the server is gone.

  Each request is a pickled (preprocess or None for `to_mnist`, source); each answer a pickled
  ("image", array), ("error", message) for what the caller answers as a refusal (ValueError:
  not an image, no digit; FileNotFoundError), or ("failed", what) for anything else. The server
  writes a request only to an idle process, so no request waits in the pipe. When the server's
  end closes (it shut the pool, or it died, even by SIGKILL), the next read ends the process.
  Ctrl-C reaches the whole process group: only the server acts on it (it then closes the pipes).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  warm_up()
  connection.send_bytes(pickle.dumps(("ready", None)))
  while True:
    try:
      preprocess, source = pickle.loads(connection.recv_bytes())
    except (EOFError, OSError):
      return
    try:
      answer = ("image", (preprocess or to_mnist)(source))
    except (ValueError, FileNotFoundError) as e:
      answer = ("error", str(e)[:MAX_MESSAGE])
    except Exception as e:  # pylint: disable=broad-except  # noqa: BLE001 (every request is answered)
      answer = ("failed", type(e).__name__)
    try:
      connection.send_bytes(pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
    except OSError:
      return


def warm_up() -> None:
  """Preprocesses a blank image once: imports and first calls, before the first request."""
  try:
    to_mnist(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8))
  except ValueError:
    pass  # "no digit found", as expected
