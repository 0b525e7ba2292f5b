"""parallel/optim/optimizer.py: bf16 training through megatron-core's distributed optimizer against a single-process
reference, the operand dtypes of every GEMM of a bf16 step, per-rank optimizer memory under DP, and optimizer
state that reshards between DP sizes and between the two implementations."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.dist import run_distributed

E, K = 6, 3  # experts and top-k: no other GEMM dimension of the tiny model is 6 or 3, which tells GEMMs apart
TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.seq_length=16", f"moe.num_experts={E}", f"moe.top_k={K}",
        "moe.expert_ffn_hidden_size=32", "train.micro_batch_size=2", "optim.warmup_steps=2", "optim.lr=0.01",
        "data.source=synthetic", "logging.tensorboard=false", "checkpoint.save_at_end=false"]


def _trainer(overrides, groups=None):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, [*TINY, *overrides])
    return Trainer(cfg, groups or initialize(1, 1, 1))


def _global_batches(steps: int, global_batch: int):
    """The same global batches for every layout: sample i of step s is the same tensor everywhere."""
    from launcher.data.synthetic import SyntheticSource

    source = SyntheticSource(128, 16, 1, 4321, "train", 0)
    return [[source.batch(s * global_batch + i) for i in range(global_batch)] for s in range(steps)]


def _feed(trainer, steps: int, global_batch: int, micro: int) -> None:
    """Replace the loader: each global batch is cut into micro-batches of ``micro`` samples, and DP rank r takes
    micro-batches r, r + dp, ...; so every layout forms the same micro-batches (the MoE aux loss is per
    micro-batch) and only their placement differs."""
    dp, r = trainer.groups.dp_size, trainer.groups.dp_rank
    per_rank = []
    for batch in _global_batches(steps, global_batch):
        micro_batches = [{k: torch.cat([b[k] for b in batch[i:i + micro]]) for k in batch[0]}
                         for i in range(0, global_batch, micro)]
        per_rank += micro_batches[r::dp]
    trainer.loader = iter(per_rank)


def _losses(rank, world, steps, precision, *extra):
    trainer = _trainer([f"train.precision={precision}", f"train.steps={steps}", "train.micro_batch_size=2",
                        "train.global_batch_size=4", "logging.run_dir=/nonexistent-unused", *extra])
    _feed(trainer, steps, global_batch=4, micro=2)
    losses, norms = [], []
    for _ in range(steps):
        loss, norm, _, _ = trainer.train_step()
        trainer.step += 1
        losses.append(loss)
        norms.append(norm)
    kind = type(trainer.optimizer).__name__
    return {"losses": losses, "norms": norms, "optimizer": kind,
            "dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()})}


# (precision, DP=1 optimizer, bound on max |loss difference| over 20 steps). Observed: bf16 5.1e-3 (bf16 rounding
# of activations and gradients compounds over the steps at lr 0.01), fp32 3.6e-7 (only the order of sums differs).
CASES = [("bf16", "DistributedAdam", 1e-2), ("fp32", "LocalAdamW", 1e-5)]


@pytest.mark.parametrize("precision,dp1_optimizer,tolerance", CASES, ids=[c[0] for c in CASES])
def test_dp2_distributed_optimizer_matches_dp1_with_accumulation(precision, dp1_optimizer, tolerance):
    steps = 20
    dp1 = run_distributed(_losses, 1, steps, precision)[0]
    dp2 = run_distributed(_losses, 2, steps, precision)
    assert (dp1["optimizer"], dp2[0]["optimizer"]) == (dp1_optimizer, "DistributedAdam")
    expected = ["torch.bfloat16", "torch.float32"] if precision == "bf16" else ["torch.float32"]
    assert dp2[0]["dtypes"] == expected  # bf16 run: bf16 parameters, fp32 router
    assert dp2[0]["losses"] == dp2[1]["losses"]
    diff = max(abs(a - b) for a, b in zip(dp1["losses"], dp2[0]["losses"]))
    assert diff < tolerance, (diff, dp1["losses"], dp2[0]["losses"])
    assert dp1["losses"][-1] < dp1["losses"][0] - 0.5  # it trains
    # same weights at step 0: the global norm (clipping included) differs only by the order of the sums
    assert abs(dp1["norms"][0] - dp2[0]["norms"][0]) < 1e-3 * dp1["norms"][0]


def _tp2_ep2_steps(rank, world, distributed):
    from parallel.groups import initialize

    trainer = _trainer(["train.precision=fp32", "train.steps=3", "train.global_batch_size=4", "parallel.tp=2",
                        "parallel.ep=2", f"optim.distributed={distributed}", "logging.run_dir=/nonexistent-unused"],
                       groups=initialize(2, 1, 2))
    _feed(trainer, 3, global_batch=4, micro=2)
    out = []
    for _ in range(3):
        loss, norm, _, _ = trainer.train_step()
        trainer.step += 1
        out.append((loss, norm))
    return out


def test_distributed_optimizer_norm_counts_every_shard_once_at_tp2_dp2():
    """TP2 x EP2 x DP2: the distributed optimizer's global norm (and so clipping and the losses) equals the replicated
    AdamW's. It was 1.161 against 1.540 on the smoke recipe: megatron-core's TP-duplicate filter dropped every
    non-TP parameter's shard (experts included) on TP rank 1."""
    distributed = run_distributed(_tp2_ep2_steps, 4, "true")
    replicated = run_distributed(_tp2_ep2_steps, 4, "false")
    assert all(rank == distributed[0] for rank in distributed)
    for (loss_d, norm_d), (loss_r, norm_r) in zip(distributed[0], replicated[0]):
        assert abs(norm_d - norm_r) < 1e-5 * norm_r, (distributed[0], replicated[0])
        assert abs(loss_d - loss_r) < 1e-5, (distributed[0], replicated[0])


class _GemmSpy(TorchDispatchMode):
    GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]  # not offsets
            self.calls.append((name, tuple(t.dtype for t in tensors), tuple(tuple(t.shape) for t in tensors)))
        return func(*args, **(kwargs or {}))


def _spy_one_step(rank, world, mone):
    trainer = _trainer(["train.precision=bf16", "train.steps=1", "train.global_batch_size=2",
                        f"moe.mone.enabled={str(mone).lower()}", "logging.run_dir=/nonexistent-unused"])
    with _GemmSpy() as spy:
        trainer.train_step()
    return spy.calls


@pytest.mark.parametrize("mone", [False, True], ids=["moe", "mone"])
def test_bf16_step_feeds_every_gemm_bf16_and_takes_the_grouped_path(mone):
    calls = run_distributed(_spy_one_step, 1, mone)[0]
    router = [c for c in calls if c[0] != "_grouped_mm" and any(E in shape for shape in c[2])]
    combine = [c for c in calls if c not in router and any(K in shape for shape in c[2])]
    others = [c for c in calls if c not in router and c not in combine]
    assert others and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _ in others), others
    # fp32 by design: the router (moe_core/router.py) and the K-term weighted combine (moe_core/permute.py)
    assert router and all(set(dtypes) == {torch.float32} for _, dtypes, _ in router), router
    assert combine and all(set(dtypes) == {torch.float32} for _, dtypes, _ in combine), combine
    # experts: gate, up and down of each of the 2 MoE layers as single grouped GEMMs (never the per-expert loop)
    grouped = [c for c in others if c[0] == "_grouped_mm"]
    assert len(grouped) >= 3 * 2, calls


def _canonical(trainer) -> dict:
    """Every optimizer-state kind of every parameter, whole and fp32, plus the weights (the checkpoint form)."""
    opt = trainer.optimizer
    state = {kind: opt.canonical_state(kind) for kind in ("exp_avg", "exp_avg_sq", "main_param")}
    state["weights"] = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    state["optimizer"] = type(opt).__name__
    return state


def _train_save(rank, world, root, precision, steps=3):
    trainer = _trainer([f"train.precision={precision}", f"train.steps={steps}", "train.global_batch_size=4",
                        f"checkpoint.dir={root}", f"logging.run_dir={root}/run"])
    for _ in range(steps):
        trainer.train_step()
        trainer.step += 1
    trainer.save()
    return _canonical(trainer)


def _resume(rank, world, root, precision):
    trainer = _trainer([f"train.precision={precision}", "train.steps=3", "train.global_batch_size=4",
                        f"checkpoint.dir={root}", f"logging.run_dir={root}/run"])
    from launcher.train import checkpoint

    assert trainer.maybe_resume(checkpoint.find_latest(root)) is not None
    return {**_canonical(trainer), "updates": trainer.optimizer.updates()}


@pytest.mark.parametrize("precision,save_dp,load_dp", [("fp32", 2, 1), ("fp32", 1, 2), ("bf16", 2, 1), ("bf16", 1, 2)])
def test_optimizer_state_reshards_between_dp_sizes(tmp_path, precision, save_dp, load_dp):
    saved = run_distributed(_train_save, save_dp, str(tmp_path), precision)[0]
    loaded = run_distributed(_resume, load_dp, str(tmp_path), precision)
    for rank_state in loaded:
        assert rank_state["updates"] == 3
        for kind in ("exp_avg", "exp_avg_sq", "main_param", "weights"):
            for name, tensor in saved[kind].items():
                assert torch.equal(rank_state[kind][name], tensor), (kind, name)
    kinds = {saved["optimizer"], loaded[0]["optimizer"]}
    assert kinds == ({"LocalAdamW", "DistributedAdam"} if precision == "fp32" else {"DistributedAdam"})


def _nan_step(rank, world, precision):
    trainer = _trainer([f"train.precision={precision}", "train.steps=3", "train.global_batch_size=4",
                        "logging.run_dir=/nonexistent-unused"])
    forward = trainer._forward

    def nan_at_step_1(model, mb, x):
        out = forward(model, mb, x)
        return out * float("nan") if trainer.step == 1 and out.dim() == 0 else out

    trainer._forward = nan_at_step_1
    weights, norms = [], []
    for _ in range(3):
        _, norm, _, _ = trainer.train_step()
        trainer.step += 1
        norms.append(norm)
        trainer.optimizer.sync_params()  # updated shards are otherwise all-gathered during the next forward
        weights.append({n: p.detach().float().clone() for n, p in trainer.model.named_parameters()})
    return {"norms": norms, "weights": weights, "updates": trainer.optimizer.updates(),
            "optimizer": type(trainer.optimizer).__name__}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_distributed_optimizer_skips_a_nonfinite_step(precision):
    for out in run_distributed(_nan_step, 2, precision):
        assert out["optimizer"] == "DistributedAdam"
        assert math.isfinite(out["norms"][0]) and math.isnan(out["norms"][1]) and math.isfinite(out["norms"][2])
        assert out["updates"] == 2
        after_0, after_1, after_2 = out["weights"]
        assert all(torch.equal(after_0[n], after_1[n]) for n in after_0)  # the NaN step changed nothing
        assert any(not torch.equal(after_1[n], after_2[n]) for n in after_1)  # and training went on
