"""SIGTERM and Ctrl-C (SIGINT) from the first line of launch.py to its exit.

Two phases:
- stop now (the default): the signal raises `Interrupted`, which unwinds the run (closing files,
  the checkpointer, the workdir lock) and ends it with one line on stderr and exit code
  128 + signal number (130 for Ctrl-C, 143 for SIGTERM). Nothing that this could break is being
  written then: start-up, compilation, evaluation and prediction write their files whole or not at
  all. A signal while the first one unwinds exits at once.
- stop at the next step (`deferred()`, the training loop from the end of its first step through
  its last checkpoint save): the signal only sets a flag; the loop gives up an evaluation it is
  running, saves a checkpoint after the step it is running and stops, exit 0. Further signals
  are logged and otherwise ignored until that save has finished, so a second Ctrl-C cannot cut
  it short (kill -9 still can; the checkpoints before it stay intact), and ignored after it, up
  to the exit.

A signal whose exception Python would print and drop (one that arrives inside a garbage-collection
callback or a __del__) is raised again 10 ms later, and `deferred()` raises any signal still
pending. A signal during an import is held until the outermost import statement has finished
(a second one exits at once): raised inside a native module's initialisation (jaxlib's, while
`import jax` runs), the exception aborted the interpreter or was lost. So is a signal that arrives
while JAX's own code is running (tracing, lowering, compiling a step): raised inside a Python
callback of jaxlib's MLIR bindings it cannot cross their C++ frames, and the interpreter aborted
(exit 134, a fatal-error dump); it is raised once the main thread is back outside JAX, retried
every 10 ms (a second signal exits at once); a signal held during an import that finishes inside
JAX's code (jit tracing imports) is retried the same way. A library that turns the
raised `Interrupted` into an error of its own (tensorstore, while a checkpoint is restored) is
covered by `stopped_by()`: launch.py then reports the signal, not that error.
"""

import builtins
import contextlib
import os
import signal
import sys
import threading

from mfb_jax.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
  received: int | None = None  # The first signal not yet acted on.
  deferring = False
  unwinding = False  # An Interrupted has been raised.
  importing = 0  # Depth of the import statements running.
  before_exit = None  # What report() runs before the exit (before_exit()).


_state = _State()


def name(signum: int) -> str:
  """SIGTERM, SIGINT, ...; "signal N" for one without a name (a real-time signal)."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def _unwind(signum: int) -> Interrupted:
  """The Interrupted to raise for `signum`, marking the process as unwinding. A retry still
  pending (_retry_soon) is called off: fired while this one unwinds, or inside sys.excepthook
  before it reported, it raised a second Interrupted there, and the run ended with two
  tracebacks and exit 1."""
  _state.unwinding = True
  signal.setitimer(signal.ITIMER_REAL, 0)
  return Interrupted(signum)


def _inside_jax(frame) -> bool:
  """Whether the main thread is running JAX's or TensorFlow's code: some frame of its stack is
  in the jax, jaxlib or tensorflow package (whose Python code may sit on top of C++ frames that
  cannot pass an exception on: tf.data's C++ imports modules as it iterates, and it dropped the
  Interrupted raised at the end of such an import, over and over, while the bench kept running)."""
  names = ("jax", "jaxlib", "tensorflow")
  paths = [getattr(sys.modules.get(name), "__file__", None) for name in names]
  packages = tuple(os.path.dirname(path) + os.sep for path in paths if path)
  while packages and frame is not None:
    if frame.f_code.co_filename.startswith(packages):
      return True
    frame = frame.f_back
  return False


def _retry_soon() -> None:
  signal.signal(signal.SIGALRM, _raise_later)
  signal.setitimer(signal.ITIMER_REAL, 0.01)


def _raise_later(signum, frame) -> None:
  del signum
  if _state.importing or _state.unwinding:  # Raised when that import has finished (_import), or
    return  # already raised.
  if _state.received is not None and not _state.deferring:
    if _inside_jax(frame):
      _retry_soon()
      return
    raise _unwind(_state.received)


def _handle(signum, frame) -> None:
  first = _state.received is None
  if first:
    _state.received = signum
  if _state.importing and not _state.deferring:
    if not first:  # Pressed again during a long import: stop now.
      report(Interrupted(signum))
    return  # Raised when the import has finished (_import).
  if not _state.deferring:
    inside_jax = _inside_jax(frame)
    if _state.unwinding or (inside_jax and not first):  # Taking long: stop now.
      report(Interrupted(signum))
    if inside_jax:  # Raised once the main thread has left JAX's code.
      _retry_soon()
      return
    raise _unwind(signum)
  from absl import logging

  if first:
    logging.warning("Received %s: saving a checkpoint after this step and stopping", name(signum))
  else:
    logging.warning(
      "Received %s again: still stopping, waiting for the checkpoint save to finish (kill -9 "
      "abandons it; the checkpoints saved before it stay intact)",
      name(signum),
    )


def _unraisablehook(unraisable) -> None:
  """An Interrupted raised where Python drops exceptions (a garbage-collection callback, which
  jax registers, a __del__, a weakref callback) is raised again 10 ms later, in ordinary code."""
  if not isinstance(unraisable.exc_value, Interrupted):
    _previous_unraisablehook(unraisable)
    return
  _state.unwinding = False
  _retry_soon()


_previous_unraisablehook = sys.unraisablehook


def _excepthook(kind, value, tb) -> None:
  if isinstance(value, Interrupted):
    report(value)
  _previous_excepthook(kind, value, tb)


_previous_excepthook = sys.excepthook


def _import(*args, **kwargs):
  """builtins.__import__ with signals held until the main thread's outermost import statement
  has finished (signal handlers run in the main thread only; other threads import as before)."""
  if threading.get_ident() != threading.main_thread().ident:
    return _original_import(*args, **kwargs)
  _state.importing += 1
  try:
    return _original_import(*args, **kwargs)
  finally:
    _state.importing -= 1
    if not _state.importing and _state.received is not None:
      if not (_state.deferring or _state.unwinding):
        if _inside_jax(sys._getframe(1)):  # An import inside JAX's code (jit tracing does some).
          _retry_soon()
        else:
          raise _unwind(_state.received)  # Instead of the import's result or error.


_original_import = builtins.__import__


def install() -> None:
  """Handles SIGTERM/SIGINT as above for the rest of the process (launch.py calls it first)."""
  for sig in SIGNALS:
    signal.signal(sig, _handle)
  sys.excepthook = _excepthook
  sys.unraisablehook = _unraisablehook
  builtins.__import__ = _import


def reclaim() -> None:
  """Registers the handlers again where install() was called: jax.distributed.initialize puts a
  C-level SIGTERM handler of its own in their place (signal.getsignal still names ours), which
  left a SIGTERM unanswered from then until the training loop's first step, and in eval and
  predict altogether."""
  if builtins.__import__ is _import:  # install() was called.
    for sig in SIGNALS:
      signal.signal(sig, _handle)


def stopped_by() -> Interrupted | None:
  """The signal's Interrupted if one has been raised outside the training loop: an error caught
  after it is the signal's doing (a library wrapped the Interrupted), whatever its message."""
  if _state.unwinding and _state.received is not None:
    return Interrupted(_state.received)
  return None


def before_exit(hook) -> None:
  """`hook()` runs in `report`, after its line and before the exit (peer_stop.on_error_exit)."""
  _state.before_exit = hook


_exiting = threading.Lock()
_exit_owner: list[int] = []  # The thread that ends the process: one line, one exit code.


def claim_exit() -> bool:
  """Whether the calling thread is the one to end the process: the first to ask, asked again
  (a signal during its own exit) or not. False: another thread (peer_stop's watcher) is."""
  with _exiting:
    if not _exit_owner:
      _exit_owner.append(threading.get_ident())
    return _exit_owner[0] == threading.get_ident()


def exit_claimed() -> bool:
  return bool(_exit_owner)


def own_exit() -> None:
  """Returns if the calling thread is the one to end the process (claim_exit); else waits for
  the thread that is (peer_stop's watcher) to end it."""
  if not claim_exit():
    threading.Event().wait()


def received() -> int | None:
  """The first signal this process received, if any (acted on or not)."""
  return _state.received


def stop_message(signum: int) -> str:
  return (
    f"stopped by {name(signum)}; no file was left half-written (rerun the same command to "
    "start again)"
  )


def report(error: Interrupted) -> None:
  """Ends the process after an Interrupted: one line on stderr, the `before_exit` hook, exit
  128 + signal number. Further signals are ignored from here (the hook may wait a few seconds:
  a second Ctrl-C printed a second line and waited again)."""
  with contextlib.suppress(Exception):  # Only the main thread may set handlers.
    ignore_until_exit()
  own_exit()
  message = stop_message(error.signum)
  with contextlib.suppress(Exception):
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
  if _state.before_exit is not None:
    with contextlib.suppress(Exception):
      _state.before_exit()
  os._exit(128 + error.signum)


def ignore_until_exit() -> None:
  """The run's work is done and written: SIGTERM/SIGINT from here to the exit are ignored.
  Otherwise the interpreter's shutdown resets the handlers to the default first, and a signal
  in the last second of a finished run ended it with -15 or -2 (no line, no exit code 0)."""
  for sig in SIGNALS:
    signal.signal(sig, signal.SIG_IGN)


def work_done() -> None:
  """The run's work is done and written (training's last save and evaluation, eval's results,
  predict's CSV): under install(), in a one-process run, SIGTERM/SIGINT are ignored from here to
  the exit, as after a stop, and a signal still held (during an import) is dropped. Acted on, a
  signal there ended a finished run with exit 143 and "rerun", and the rerun evaluated the last
  step again."""
  if builtins.__import__ is not _import or _state.unwinding:  # Not installed, or already stopping.
    return
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1:
    return  # Only process 0 writes the results; ignoring, the others could wait on a stopped one.
  ignore_until_exit()
  signal.setitimer(signal.ITIMER_REAL, 0)  # A retry of a held signal (_retry_soon) is called off.
  _state.received = None


def requested() -> bool:
  """Whether a signal asked this process to stop."""
  return _state.received is not None


@contextlib.contextmanager
def deferred():
  """Within: SIGTERM/SIGINT only set requested(). Installs the handlers for its duration where
  install() was not called (train_and_evaluate used as a library), restoring them after;
  under install(), a stop leaves them ignoring signals."""
  if _state.received is not None:
    raise _unwind(_state.received)
  previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
  for sig in SIGNALS:
    signal.signal(sig, _handle)
  _state.deferring = True
  try:
    yield
  finally:
    _state.deferring = False
    stopped, _state.received = _state.received is not None, None
    for sig, handler in previous.items():
      # After a stop, under install(), the run has saved and only its exit is left: a further
      # signal is ignored, also during the interpreter's shutdown (which resets handlers it set
      # itself to the default, so a late SIGTERM would end a clean stop with -15).
      signal.signal(sig, signal.SIG_IGN if stopped and handler is _handle else handler)
