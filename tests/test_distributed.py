"""8 fake CPU devices and 2 processes on 127.0.0.1 agree with a single device."""

import glob
import gzip
import json
import os
import shutil
import signal
import subprocess

import pytest
from conftest import PYTHON, REPO, free_port, last_line, launch, run_python

from mfb_jax import train_lock

EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

# Loss and gradient norm of the first train step on the first batch of the tiny shards.
FIRST_STEP = """
import json, sys
import jax
from configs import tiny
from mfb_jax import input_pipeline, train
config = tiny.get_config()
config.data.train_pattern = sys.argv[1]
mesh = train.make_mesh()
model, tx = train.build(config)
shapes = train.abstract_state(config, model, tx, mesh)
state = train.create_state(config, model, tx, mesh)
step = train.jit_train_step(config, model, tx, mesh, shapes)
batch = next(input_pipeline.make_train_iterator(config, sys.argv[1], seed=0, local_batch_size=8))
state, m = step(state, input_pipeline.to_global(batch, mesh), True)
print(json.dumps({"devices": jax.device_count(), "loss": float(m["loss"]),
                  "grad_norm": float(m["grad_norm"])}))
"""


def _first_step(pattern: str, env: dict | None = None) -> dict:
  result = run_python(["-c", FIRST_STEP, pattern], env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_give_the_same_loss_as_one(tiny_data):
  one = _first_step(tiny_data["train"])
  eight = _first_step(tiny_data["train"], EIGHT_DEVICES)
  assert (one["devices"], eight["devices"]) == (1, 8)
  assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)
  assert eight["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def _start_two(workdir, args: list[str], own=((), ())) -> list[subprocess.Popen]:
  """Both processes of a run; own[i]: arguments for process i only; `workdir` may be a pair, each
  process's own (a flag given twice is refused)."""
  port = free_port()
  workdirs = workdir if isinstance(workdir, tuple) else (workdir, workdir)
  return [
    subprocess.Popen(
      [
        PYTHON,
        "launch.py",
        f"--workdir={workdirs[i]}",
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *own[i],
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    for i in range(2)
  ]


# What launch.py itself prints on stdout after training or evaluating, on process 0 only.
OWN_LINES = ("GAP@", "results: ", "checkpoints: ", "TensorBoard: ")


def _two_processes(workdir, args: list[str], timeout: float = 400) -> None:
  procs = _start_two(workdir, args)
  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    # Nothing else: gloo printed "[Gloo] Rank 0 is connected ..." on stdout.
    others = [line for line in out.splitlines() if not (i == 0 and line.startswith(OWN_LINES))]
    assert not others, out


def _gap(workdir) -> dict:
  with open(os.path.join(workdir, "eval_results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_both_processes_of_a_run_on_a_busy_workdir_stop(tiny_args, tmp_path):
  with train_lock.TrainingLock(str(tmp_path)):  # This test process is the other run.
    procs = _start_two(tmp_path, tiny_args)
    results = [(p.communicate(timeout=300)[1], p.wait()) for p in procs]
  expected = ["is in use by another training run", "refused by process 0"]
  for (err, code), words in zip(results, expected, strict=True):
    assert code == 2, err[-2000:]
    assert words in last_line(err) and "Traceback" not in err
  assert os.listdir(tmp_path) == [train_lock.LOCK_FILE]


@pytest.mark.slow
def test_two_processes_train_and_every_device_layout_evaluates_alike(tiny_args, tmp_path):
  """A run trained by 2 processes; its checkpoint evaluated on 1, 8 and 2x1 devices."""
  _two_processes(tmp_path, tiny_args)
  results = {"trained by two": _gap(tmp_path)}
  assert results["trained by two"]["step"] == 6
  for name, env in (("one", None), ("eight", EIGHT_DEVICES)):
    os.remove(tmp_path / "eval_results.json")
    result = launch(tmp_path, "--mode=eval", *tiny_args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    results[name] = _gap(tmp_path)
  os.remove(tmp_path / "eval_results.json")
  _two_processes(tmp_path, ["--mode=eval", *tiny_args])
  results["two"] = _gap(tmp_path)
  for name in ("trained by two", "eight", "two"):
    assert results[name]["num_examples"] == results["one"]["num_examples"] == 40
    assert results[name]["step"] == results["one"]["step"] == 6
    for key in ("gap", "map", "hit_at_1", "perr"):
      assert results[name][key] == pytest.approx(results["one"][key], abs=1e-6), (name, key)


@pytest.mark.slow
def test_bad_files_on_one_process_stop_both_processes(tiny_args, tiny_data, tmp_path):
  """Process 1's train file is bad, process 0's fine: both used to wait for ever (process 0 in a
  collective, process 1 in jax.distributed's shutdown barrier)."""
  data = tmp_path / "data"
  data.mkdir()
  good = sorted(glob.glob(tiny_data["train"]))
  shutil.copy(good[0], data / "train-0.tfrecord")
  # DBoF, the default config's aggregator: the other two-process tests run NetVLAD, and tracing
  # DBoF before jax.distributed.initialize once broke every multi-process DBoF run.
  args = [tiny_args[0] + ":dbof,mfb", *tiny_args[1:], f"--config.data.train_pattern={data}/train-*"]
  args.append("--config.train.num_steps=40")
  for damage, error_1, error_0 in [
    (
      "no records",
      "no records in the 1 file(s)",
      "process 1 stopped the run (its own error line says why)",
    ),
    ("corrupt", "train-1.tfrecord: corrupt or truncated", "another process of this run stopped"),
  ]:
    if damage == "no records":
      with gzip.open(data / "train-1.tfrecord", "wb"):  # An empty GZIP stream: no record.
        pass
    else:  # Found mid-run, after some steps.
      content = bytearray(open(good[1], "rb").read())
      cut = int(len(content) * 0.8)
      content[cut : cut + 50] = bytes(b ^ 0xFF for b in content[cut : cut + 50])
      (data / "train-1.tfrecord").write_bytes(bytes(content))
    procs = _start_two(tmp_path / damage.replace(" ", "_"), args)
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=240)]]
    assert results[1][0] == 2 and error_1 in last_line(results[1][1]), results[1][1][-2000:]
    assert results[0][0] != 0 and error_0 in last_line(results[0][1]), results[0][1][-2000:]


@pytest.mark.slow
def test_sigterm_to_process_0_before_the_first_step_ends_the_other_with_one_line(
  tiny_args, tmp_path
):
  """Process 0 runs JAX's coordination service: gone at once, it took process 1 down with JAX's
  fatal-error dump (exit 134 or 139, three times in three tries), unless process 1 was in a
  collective with it just then."""
  procs = _start_two(tmp_path / "work", tiny_args)
  for line in procs[0].stderr:  # Stopped before its first step: process 0 exits at once.
    if "Training netvlad+mfb+moe from step 0" in line:
      procs[0].send_signal(signal.SIGTERM)
      break
  results = [(p.communicate(timeout=240)[1], p.returncode) for p in procs]
  assert results[0][1] == 143, results[0][0][-2000:]
  assert last_line(results[0][0]).startswith("error: stopped by SIGTERM")
  assert results[1][1] == 1, results[1][0][-3000:]
  assert last_line(results[1][0]) == (
    "error: process 0 stopped the run (its own error line says why)"
  )
  assert "Terminating process" not in results[1][0]


@pytest.mark.slow
def test_a_video_in_the_files_of_two_processes_stops_eval_and_predict(
  tiny_args, tiny_data, trained_workdir, tmp_path
):
  """Each process checked only its own files: two processes evaluated the same videos twice
  (exit 0) and wrote a predictions CSV with every id twice, which the metrics CLI refuses."""
  first = sorted(glob.glob(tiny_data["eval"]))[0]
  for name in ("a", "b"):  # One file for each process, the same videos in both.
    shutil.copy(first, tmp_path / f"dup_{name}.tfrecord")
  same = f"{tmp_path}/dup_*.tfrecord"
  results = (trained_workdir / "eval_results.json").read_text()
  for mode, pattern in (("eval", "eval_pattern"), ("predict", "predict_pattern")):
    args = [f"--mode={mode}", *tiny_args, f"--config.data.{pattern}={same}"]
    procs = _start_two(trained_workdir, args)
    for i, p in enumerate(procs):
      _, err = p.communicate(timeout=240)
      assert p.returncode == 2, err[-2000:]
      assert last_line(err).startswith("error: video id '"), err[-2000:]
      assert last_line(err).endswith(
        f"appears in the files of process {i} (in {tmp_path}/dup_{'ab'[i]}.tfrecord) and of "
        f"process {1 - i} (the same videos in two "
        f"files matching {same!r}?)"
      )
  assert (trained_workdir / "eval_results.json").read_text() == results
  assert not glob.glob(f"{trained_workdir}/predictions.csv*")


@pytest.mark.slow
def test_processes_given_different_configs_stop_at_start_up(tiny_args, tmp_path):
  """A batch size on one command line only trained on with unequal batches (exit 0); another
  model on one crashed in a gloo collective without saying why."""
  own = ([], ["--config.train.batch_size=16", "--config.model.aggregator=avgpool"])
  procs = _start_two(tmp_path / "work", tiny_args, own)
  for p in procs:
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2, err[-2000:]
    assert last_line(err) == (
      "error: the processes of this run were given different values of config.model.aggregator,"
      " config.train.batch_size: every process needs the same --config and overrides"
    )
  assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.slow
def test_processes_given_different_workdirs_stop_at_start_up(tiny_args, tmp_path):
  """Each process's own folder (a local /tmp/run per host) saved checkpoints apart, and both
  hung in orbax's first save for good, deaf to SIGTERM."""
  os.environ["MFB_JAX_SHARED_WORKDIR_WAIT_S"] = "1"  # Not 10 s of looking (the default).
  try:
    procs = _start_two((tmp_path / "work", tmp_path / "elsewhere"), tiny_args)
  finally:
    del os.environ["MFB_JAX_SHARED_WORKDIR_WAIT_S"]
  for p in procs:
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2, err[-2000:]
    assert last_line(err).startswith("error: the workdir is not shared: process(es) 1 of this run")
  assert not (tmp_path / "work" / "checkpoints").exists()
