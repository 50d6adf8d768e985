"""How the other processes of a multi-process run learn that process 0 stopped with an error.

Process 0 runs JAX's coordination service. Once it has exited, JAX's client ends every other
process with a fatal-error dump (exit 134) that Python cannot catch, unless that process failed
on its own first (in a collective with process 0: the "another process of this run stopped"
line). A process still compiling or starting when process 0 stopped (a SIGTERM before the first
step, a start-up error that was not an agreed check) met the dump about half the time.

So, on an error exit, process 0 sets a key in the service's key-value store and waits, up to
_WAIT_S, for the others to answer; each of them watches for that key in a daemon thread
(`watch`), writes one line (`error: process 0 stopped the run ...`, exit 1; or, where it has
received a signal of its own not yet acted on, that signal's line and exit code) and answers
before it exits; its main thread, if it is ending the process already, comes first. A process
exiting with an error of its own answers before it is asked. One that has died does not answer:
process 0 then exits after _WAIT_S.

Like cluster.py, nothing heavy is imported at import time.
"""

import contextlib
import os
import sys
import threading
import time

from mfb_jax import signals

_STOPPED = "mfb_jax/process_0_stopped"
_LINE = "process 0 stopped the run (its own error line says why)"
_LEFT = "mfb_jax/left/{}"
_POLL_MS = 1000  # The watcher's wait per call: it wakes at once when the key is set.
_WAIT_S = 5.0  # How long process 0 waits for the others' answers.
# After the last answer: the time a process takes from its answer to its exit. Process 0 gone
# sooner, the answering process could still meet the dump (seen on a 2-core Zen 5).
_GRACE_S = 0.5
# How long the watcher leaves this process's main thread to end it first: on an error that every
# process meets at once (errors.agreed), each exits with its own line and code.
_CLAIM_GRACE_S = 1.0


def _client():
  """JAX's distributed runtime client, or None in a one-process run (or a JAX without one)."""
  import jax

  if jax.process_count() == 1:
    return None
  try:
    from jax._src import distributed
  except ImportError:
    return None
  return getattr(distributed.global_state, "client", None)


def watch() -> None:
  """On a process other than 0 of a multi-process run, a daemon thread that ends this process
  with one line when process 0 stops with an error (`on_error_exit`): exit code 1, or its own
  signal's line and code where it has received one."""
  import jax

  client = _client()
  if client is None or jax.process_index() == 0:
    return
  me = jax.process_index()

  def wait_for_process_0():
    while True:
      try:
        client.blocking_key_value_get(_STOPPED, _POLL_MS)
        break
      except Exception as e:  # noqa: BLE001 - JaxRuntimeError; a time-out just means no news.
        if "DEADLINE_EXCEEDED" not in str(e):
          return  # The run has finished (the client shut down), or the service is gone.
    deadline = time.monotonic() + _CLAIM_GRACE_S
    while time.monotonic() < deadline and not signals.exit_claimed():
      time.sleep(0.01)
    if not signals.claim_exit():  # The main thread is ending this process with its own line.
      _answer(client, me)
      return
    signum = signals.received()  # This process's own signal, not yet acted on, comes first.
    line = signals.stop_message(signum) if signum else _LINE
    try:
      with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
      os.write(2, f"error: {line}\n".encode())
    finally:
      _answer(client, me)
      os._exit(128 + signum if signum else 1)

  threading.Thread(target=wait_for_process_0, name="mfb_jax.peer_stop", daemon=True).start()


def _answer(client, me: int) -> None:
  try:
    client.key_value_set(_LEFT.format(me), "1")
  except Exception:  # noqa: BLE001 - process 0 gone already: nothing left to tell.
    pass


def on_error_exit() -> None:
  """Before a process of a multi-process run exits with an error: process 0 tells the others
  and waits (at most _WAIT_S in all) for each to answer that it is exiting; any other process
  answers before it is asked, so that process 0 need not wait for it."""
  import jax

  client = _client()
  if client is None:
    return
  if jax.process_index() != 0:
    _answer(client, jax.process_index())
    return
  try:
    client.key_value_set(_STOPPED, "1")
  except Exception:  # noqa: BLE001 - the service is failing: nobody can be told.
    return
  deadline, answered = time.monotonic() + _WAIT_S, 0
  for i in range(1, jax.process_count()):
    left_ms = int(max(deadline - time.monotonic(), 0.0) * 1000)
    try:
      client.blocking_key_value_get(_LEFT.format(i), max(left_ms, 1))
      answered += 1
    except Exception:  # noqa: BLE001 - no answer in time (a process that has died).
      pass
  if answered:
    time.sleep(_GRACE_S)
