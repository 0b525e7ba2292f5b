"""Interleaved pipeline training (megatron-core's interleaved 1F1B, PP=2 x VPP=2, with MoE and multi-token
prediction) end to end on CPU: it gives the PP=1 run's losses, resumes bit-exactly, and its checkpoint loads at
PP=1 (parameter names and checkpoint keys do not depend on the pipeline layout)."""
import shutil

import pytest

from tests.launcher.train.test_train_resume import _overrides, _run

VPP = ("parallel.pp=2", "parallel.virtual_pp=2")
MODEL = ("model.num_layers=4", "model.mtp_num_layers=1", "checkpoint.interval=3", "train.eval_interval=3",
         "train.eval_batches=2")


def test_interleaved_pipeline_matches_pp1_resumes_exactly_and_loads_at_pp1(tmp_path):
    full = _run(2, _overrides(tmp_path / "full", 6, *VPP, *MODEL))
    single = _run(1, _overrides(tmp_path / "single", 6, *MODEL))
    steps = range(6)
    assert [full["losses"][s] for s in steps] == pytest.approx([single["losses"][s] for s in steps], rel=1e-5,
                                                               abs=1e-5)
    first = _run(2, _overrides(tmp_path / "split", 6, "train.exit_interval=3", *VPP, *MODEL))
    assert first["final_step"] == 3 and first["checkpoint"].endswith("step_0000003")
    shutil.copytree(tmp_path / "split", tmp_path / "to_pp1")
    second = _run(2, _overrides(tmp_path / "split", 6, *VPP, *MODEL))
    assert {**first["losses"], **second["losses"]} == full["losses"]  # bit-identical on CPU
    at_pp1 = _run(1, _overrides(tmp_path / "to_pp1", 6, *MODEL))
    assert sorted(at_pp1["losses"]) == [3, 4, 5]
    assert [at_pp1["losses"][s] for s in (3, 4, 5)] == pytest.approx([full["losses"][s] for s in (3, 4, 5)],
                                                                      rel=1e-5)


def test_bf16_interleaved_pipeline_sends_bf16_and_equals_plain_1f1b(tmp_path):
    """Activations cross stages in the compute dtype: megatron-core receives into bf16 buffers (an fp32 send would
    not fit them), and the stage boundaries move without changing a bit of the bf16 run's losses."""
    extra = ("model.num_layers=4", "train.precision=bf16", "parallel.pp=2")
    plain = _run(2, _overrides(tmp_path / "pp2", 3, *extra))
    interleaved = _run(2, _overrides(tmp_path / "vpp2", 3, *extra, "parallel.virtual_pp=2"))
    assert interleaved["losses"] == plain["losses"]
