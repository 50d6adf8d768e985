"""SIGTERM and Ctrl-C: deferred to a checkpoint save in the training loop, one line elsewhere."""

import os
import signal
import time

import pytest
from conftest import free_port, last_line, run_python

from mfb_jax import signals, workdir_files

# A program that installs the handlers, then gets a signal while it writes a file with
# atomic_file (a write cut short must leave neither the file nor its .tmp).
WRITE_WHEN_SIGNALLED = """
import os, signal, sys, time
from mfb_jax import signals, workdir_files
signals.install()
path, signum = sys.argv[1], int(sys.argv[2])
with workdir_files.atomic_file(path) as f:
  f.write("half of it")
  os.kill(os.getpid(), signum)
  time.sleep(30)
  f.write("the other half")
print("not reached")
"""

# A signal that arrives where Python prints and drops exceptions: in a garbage-collection callback
# (jax registers one) or in a __del__. Raised from there, the run would go on.
SIGNALLED_WHERE_EXCEPTIONS_ARE_DROPPED = """
import gc, os, signal, sys, time
from mfb_jax import signals
signals.install()
def signalled():
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.05)  # The handler runs here.
def callback(phase, info):
  if phase == "start":
    gc.callbacks.remove(callback)
    signalled()
class Dropped:
  def __del__(self):
    signalled()
if sys.argv[1] == "gc":
  gc.callbacks.append(callback)
  gc.collect()
else:
  Dropped()
time.sleep(30)
print("not reached")
"""


# A stop in the training loop, then a late signal (a second `kill`, or Ctrl-C pressed twice) while
# the process exits: ignored, also during the interpreter's shutdown.
SIGNALLED_AGAIN_AFTER_A_STOP = """
import atexit, os, signal, time
from mfb_jax import signals
signals.install()
with signals.deferred():
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.05)
  assert signals.requested()
print(signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.05)
print("exiting", flush=True)
atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # During the shutdown.
"""


# A signal in the middle of an import (of jaxlib's native module, in the reviews that found this:
# raised there, the exception aborted the interpreter or was lost). ARGV: how many signals.
SIGNALLED_DURING_AN_IMPORT = """
import os, signal, sys, time
from mfb_jax import signals
signals.install()
module = os.path.join(sys.argv[1], "slow_module.py")
with open(module, "w") as f:
  f.write(
    "import os, signal, time\\n"
    f"for _ in range({sys.argv[2]}):\\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\\n"
    "  time.sleep(0.05)\\n"
    "print('import finished', flush=True)\\n"
  )
sys.path.insert(0, sys.argv[1])
import slow_module
print("not reached", flush=True)
"""


# A signal while another thread imports (tensorstore's and the file listing's pools do): the handler
# runs in the main thread, which must stop; the importing thread is left alone.
SIGNALLED_WHILE_A_THREAD_IMPORTS = """
import os, signal, sys, threading, time
from mfb_jax import signals
signals.install()
with open(os.path.join(sys.argv[1], "slow_module.py"), "w") as f:
  f.write("import time\\ntime.sleep(1)\\n")
sys.path.insert(0, sys.argv[1])
def worker():
  try:
    import slow_module
  except BaseException as e:
    print("worker got", type(e).__name__, flush=True)
threading.Thread(target=worker).start()
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not reached", flush=True)
"""


def test_a_signal_while_another_thread_imports_stops_the_main_thread(tmp_path):
  result = run_python(["-c", SIGNALLED_WHILE_A_THREAD_IMPORTS, str(tmp_path)], timeout=60)
  assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr[-2000:]
  assert "worker got" not in result.stdout and "not reached" not in result.stdout
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM")


# jax.distributed.initialize puts a C-level SIGTERM handler of its own in place of ours (found in a
# 2-process run: SIGTERM was ignored until the first train step, and in eval and predict).
SIGNALLED_AFTER_JAX_DISTRIBUTED = """
import os, signal, sys, time
from mfb_jax import signals
signals.install()
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 1, 0)
signals.reclaim()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("not reached", flush=True)
"""


def test_a_signal_after_jax_distributed_starts_is_still_ours():
  result = run_python(["-c", SIGNALLED_AFTER_JAX_DISTRIBUTED, str(free_port())], timeout=120)
  assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr[-2000:]
  assert "not reached" not in result.stdout
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM")


@pytest.mark.parametrize("signals_sent", [1, 2])
def test_a_signal_during_an_import_waits_for_it_unless_sent_twice(tmp_path, signals_sent):
  args = ["-c", SIGNALLED_DURING_AN_IMPORT, str(tmp_path), str(signals_sent)]
  result = run_python(args, timeout=60)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "not reached" not in result.stdout
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM")
  # One signal: the import runs to its end first; a second one stops the process at once.
  assert ("import finished" in result.stdout) == (signals_sent == 1), result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_outside_training_is_one_line_and_leaves_no_half_file(tmp_path, signum):
  path = tmp_path / "results.json"
  start = time.time()
  quiet = {"TF_ENABLE_ONEDNN_OPTS": "0"}  # TensorFlow's notice on import, as launch.py sets it.
  args = ["-c", WRITE_WHEN_SIGNALLED, str(path), str(int(signum))]
  result = run_python(args, env=quiet, timeout=60)
  assert result.returncode == 128 + signum, result.stderr[-2000:]
  assert time.time() - start < 25  # It stopped at once, not after the sleep.
  assert "not reached" not in result.stdout and "Traceback" not in result.stderr
  name = signal.Signals(signum).name
  assert result.stderr.strip().splitlines() == [last_line(result.stderr)], result.stderr
  assert last_line(result.stderr).startswith(f"error: stopped by {name}; no file was left")
  assert os.listdir(tmp_path) == []  # Neither results.json nor results.json.tmp.


@pytest.mark.parametrize("where", ["gc", "__del__"])
def test_a_signal_where_python_drops_exceptions_still_stops_the_process(where):
  result = run_python(["-c", SIGNALLED_WHERE_EXCEPTIONS_ARE_DROPPED, where], timeout=60)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
  assert "not reached" not in result.stdout
  assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
  assert last_line(result.stderr).startswith("error: stopped by SIGTERM")


def test_deferred_signals_only_request_a_stop_and_are_restored_after():
  before = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
  with signals.deferred():
    assert not signals.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # The handler runs; it must not raise.
    assert signals.requested()
    os.kill(os.getpid(), signal.SIGINT)  # A second signal while stopping: still no exception.
    time.sleep(0.05)
    assert signals.requested()
  assert not signals.requested()  # Acted on when the loop ended.
  assert {sig: signal.getsignal(sig) for sig in signals.SIGNALS} == before


def test_signals_after_a_completed_stop_are_ignored_up_to_the_exit():
  result = run_python(["-c", SIGNALLED_AGAIN_AFTER_A_STOP], timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["True", "exiting"]
  assert "Received SIGTERM: saving a checkpoint" in result.stderr


# A signal while JAX's own code runs (here jax.tree.map calling back into the program; in a run,
# the lowering of a step, where jaxlib's C++ frames aborted the interpreter): raised once the
# program is back outside JAX, so JAX's call completes first. Then, after the work: ignored.
SIGNALLED_INSIDE_JAX = """
import os, signal, sys, time
from mfb_jax import signals
signals.install()
import jax

def callback(x):
  if x == 0:
    os.kill(os.getpid(), int(sys.argv[1]))
    sum(range(10**6))  # Bytecode runs: the handler has run by now.
    import json  # An import inside JAX's call (jit tracing makes some) must not raise it either.
  return x

print(jax.tree.map(callback, [0, 1, 2]), flush=True)  # Not cut short: [0, 1, 2].
time.sleep(30)
print("not reached")
"""

# The same inside TensorFlow's code: tf.data's C++ imports modules as it iterates and dropped the
# Interrupted raised at the end of such an import, again and again (a bench run kept going).
SIGNALLED_INSIDE_TENSORFLOW = SIGNALLED_INSIDE_JAX.replace("import jax", "import tensorflow as tf")
SIGNALLED_INSIDE_TENSORFLOW = SIGNALLED_INSIDE_TENSORFLOW.replace(
  "jax.tree.map", "tf.nest.map_structure"
)

# The same, then an import at once outside JAX raises the held signal while its 10 ms retry is
# still pending, and the exit is slow (a loaded machine): the retry fired inside sys.excepthook,
# whose second Interrupted ended the run with two tracebacks and exit 1 (seen in CI, eval mode).
SIGNALLED_INSIDE_JAX_THEN_AN_IMPORT = """
import os, signal, time
from mfb_jax import signals
signals.install()
report = signals.report
signals.report = lambda error: (time.sleep(0.2), report(error))
import jax

def callback(x):
  if x == 0:
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(10**4))
  return x

jax.tree.map(callback, [0, 1])
import json
print("not reached")
"""

SIGNALLED_AT_THE_EXIT = """
import atexit, os, signal
from mfb_jax import signals
signals.install()
signals.ignore_until_exit()
os.kill(os.getpid(), signal.SIGTERM)
atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))  # During the shutdown.
print("finished", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_jax_takes_effect_when_jax_returns(signum):
  result = run_python(["-c", SIGNALLED_INSIDE_JAX, str(int(signum))], timeout=60)
  assert result.returncode == 128 + signum, result.stderr[-2000:]
  assert result.stdout.split("\n")[0] == "[0, 1, 2]" and "not reached" not in result.stdout
  assert last_line(result.stderr).startswith(f"error: stopped by {signal.Signals(signum).name}")
  assert "Traceback" not in result.stderr


def test_a_signal_inside_tensorflow_takes_effect_when_it_returns():
  result = run_python(["-c", SIGNALLED_INSIDE_TENSORFLOW, str(int(signal.SIGINT))], timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert result.stdout.split("\n")[0] == "[0, 1, 2]" and "not reached" not in result.stdout
  assert last_line(result.stderr).startswith("error: stopped by SIGINT")


def test_a_signal_raised_with_its_retry_pending_is_reported_once():
  result = run_python(["-c", SIGNALLED_INSIDE_JAX_THEN_AN_IMPORT], timeout=60)
  assert result.returncode == 130, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "not reached" not in result.stdout
  assert last_line(result.stderr).startswith("error: stopped by SIGINT")


def test_signals_once_the_work_is_done_are_ignored_to_the_exit():
  # A finished run that got a signal in its last second ended by the signal itself (-15 or -2).
  result = run_python(["-c", SIGNALLED_AT_THE_EXIT], timeout=60)
  assert (result.returncode, result.stdout) == (0, "finished\n"), result.stderr[-2000:]


def test_atomic_file_keeps_the_old_file_when_a_write_fails(tmp_path):
  path = str(tmp_path / "eval_results.json")
  workdir_files.write_text(path, "old")
  with pytest.raises(RuntimeError, match="disk full"):
    with workdir_files.atomic_file(path) as f:
      f.write("new, half")
      raise RuntimeError("disk full")
  assert open(path).read() == "old"
  assert sorted(os.listdir(tmp_path)) == ["eval_results.json"]
  workdir_files.write_text(path, "new")
  assert open(path).read() == "new" and sorted(os.listdir(tmp_path)) == ["eval_results.json"]


def test_one_thread_ends_the_process_and_may_claim_it_again():
  """peer_stop's watcher and the main thread could both end a process: two error lines, or
  the watcher's exit code for the main thread's own error. The claim is the first thread's; it
  may ask again (a signal during its own exit) without waiting for itself."""
  import threading

  fresh = signals  # No test ends its own process through it: the claim is free, and freed.
  assert not fresh.exit_claimed()
  others = []
  try:
    assert fresh.claim_exit() and fresh.claim_exit() and fresh.exit_claimed()
    thread = threading.Thread(target=lambda: others.append(fresh.claim_exit()))
    thread.start()
    thread.join()
    assert others == [False]
  finally:
    fresh._exit_owner.clear()
