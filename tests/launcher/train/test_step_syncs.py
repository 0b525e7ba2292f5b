"""One training step reads the device from the host exactly once (issue 14): the loss, the gradient norm, the stop
flag and every MoE statistic travel in one all-reduce and one transfer (``launcher.train.step_reduce``), and nothing
in forward, backward, gradient reduction or the update reads the device (Python-level calls; on CUDA the trainer
also copies micro-batches from pinned memory without blocking, and tests/moe_core/test_cuda.py asks CUDA itself).
The bf16 run uses megatron-core's DistributedOptimizer (the GPU configuration). A failure names every call site."""
from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed

_TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.seq_length=32", "moe.num_experts=4", "moe.top_k=2",
         "moe.expert_ffn_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=3",
         "optim.warmup_steps=1", "data.source=synthetic", "checkpoint.interval=0", "checkpoint.save_at_end=false"]


def _optimizer_step_counters(optimizer) -> list:
    """torch.optim's per-parameter ``step`` tensors: host tensors on every device (not fused/capturable)."""
    subs = optimizer._sub_optimizers() if hasattr(optimizer, "_sub_optimizers") else [optimizer]
    return [state["step"] for sub in subs for state in sub.optimizer.state.values() if "step" in state]


def _count_step_syncs(rank, world_size, run_dir, extra):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize
    from tests.helpers.syncs import count_syncs

    cfg = load_config(None, [*_TINY, f"logging.run_dir={run_dir}", *extra])
    trainer = Trainer(cfg, initialize(1, 1, 1))
    trainer.train_step()  # the optimizer creates its state in the first step
    with count_syncs(host_tensors=_optimizer_step_counters(trainer.optimizer)) as log:
        loss, norm, stats, stop = trainer.train_step()
    return log.calls, log.report(), type(trainer.optimizer).__name__, loss, norm, stop


@pytest.mark.parametrize("extra", [
    ["train.precision=bf16"],
    ["train.precision=bf16", "moe.capacity_factor=0.75", "moe.mone.enabled=true", "moe.mone.balance_loss_coeff=0.01",
     "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", "moe.expert_bias=true"],
    ["train.precision=fp32", "optim.distributed=false"],
], ids=["bf16", "bf16-capacity-mone-matryoshka-bias", "fp32-local-adamw"])
def test_a_training_step_reads_the_device_once(tmp_path, extra):
    calls, report, optimizer, loss, norm, stop = run_distributed(_count_step_syncs, 1, tmp_path, extra)[0]
    assert optimizer == ("LocalAdamW" if "optim.distributed=false" in extra else "DistributedAdam")
    assert len(calls) == 1, report
    what, site = calls[0]
    assert what == "Tensor.tolist" and "step_reduce.py" in site and site.endswith("in host"), report
    assert 0 < loss < 10 and norm > 0 and stop is False
