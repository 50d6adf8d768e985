"""The step profiler: HLO parsing, per-step sums from a trace, and a real traced tiny step."""

import pytest
from conftest import run_python
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from mfb_jax import step_profile

HLO = """
ENTRY %main.1 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %dot.2 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  multiply_add_fusion.7 = f32[8,2]{1,0} fusion(p1, dot.2, %p0), kind=kLoop, calls=%fused.7
  ROOT %tuple.3 = (f32[4,2]{1,0}) tuple(%dot.2)
}
"""


def test_hlo_instructions_reads_names_shapes_and_operands():
  found = step_profile.hlo_instructions(HLO)
  assert found["dot.2"] == ("f32[4,2]{1,0}", ("p0", "p1"))
  assert found["multiply_add_fusion.7"] == ("f32[8,2]{1,0}", ("p1", "dot.2", "p0"))
  assert found["tuple.3"] == ("(f32[4,2]{1,0})", ("dot.2",))
  assert "main.1" not in found  # A computation header is not an instruction.


def test_op_times_sums_threads_divides_by_steps_and_skips_other_events():
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  for i, name in enumerate(["dot.2", "multiply_add_fusion.7", "ThunkExecutor::Execute"], 1):
    plane.event_metadata[i].name = name
  first, second = plane.lines.add(name="worker-0"), plane.lines.add(name="worker-1")
  first.events.add(metadata_id=1, duration_ps=3_000_000_000)  # 3 ms
  second.events.add(metadata_id=1, duration_ps=1_000_000_000)
  first.events.add(metadata_id=2, duration_ps=6_000_000_000)
  second.events.add(metadata_id=3, duration_ps=90_000_000_000)  # Not an HLO instruction.
  rows = step_profile.op_times(space.SerializeToString(), step_profile.hlo_instructions(HLO), 2)
  assert [(r.name, r.ms_per_step) for r in rows] == [
    ("multiply_add_fusion.7", pytest.approx(3.0)),
    ("dot.2", pytest.approx(2.0)),
  ]
  assert rows[0].shape == "f32[8,2]{1,0}" and rows[0].operands == ("p1", "dot.2", "p0")
  table = step_profile.format_table(rows, wall_ms=4.0, top=1, cores=2)
  assert "multiply_add_fusion.7" in table and "dot.2  " not in table
  assert "5.00 thread-ms per step attributed to 2 operations (shown: 1)" in table
  assert "on 2 cores = 8 core-ms" in table


def test_profile_step_attributes_the_tiny_models_adam_update():
  from configs import tiny

  config = tiny.get_config()  # netvlad,mfb: MFB's U kernel is [2 x 1024, factor x output].
  rows, wall_ms = step_profile.profile_step(config, steps=2)
  assert wall_ms > 0 and all(r.ms_per_step > 0 for r in rows)
  u_shape = f"f32[{2 * 1024},{2 * 16}]"
  adam = [
    r for r in rows if r.shape.startswith(u_shape) and any("opt_state" in o for o in r.operands)
  ]
  assert adam, [(r.name, r.shape, r.operands) for r in rows[:20]]


def test_profile_step_rejects_zero_steps():
  from configs import tiny
  from mfb_jax.errors import ConfigError

  with pytest.raises(ConfigError, match="--steps=0"):
    step_profile.profile_step(tiny.get_config(), steps=0)


def test_command_line_errors_are_one_line_with_exit_code_2():
  missing = run_python(["-m", "mfb_jax.step_profile", "--config=configs/missing.py"])
  assert missing.returncode == 2
  assert missing.stderr.strip() == "error: config file not found: configs/missing.py"
  bad = run_python(["-m", "mfb_jax.step_profile", "--config=configs/tiny.py", "--steps=0"])
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == "error: --steps=0; it must be at least 1"
  top = run_python(["-m", "mfb_jax.step_profile", "--config=configs/tiny.py", "--top=-2"])
  assert top.returncode == 2
  assert top.stderr.strip() == "error: --top=-2; it must be at least 1"
