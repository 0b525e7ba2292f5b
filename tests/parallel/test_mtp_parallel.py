"""Multi-token prediction under PP / TP / EP / DP (gloo, 4 ranks) equals the single-process model: the training
objective (main loss + mtp_loss_coeff * mean over depths, both token-weighted over the global batch with loss
masks) and every gradient, the last stage's embedding copy included; and whole training steps through the trainer
(distributed optimizer, PP=2 x DP=2) give the single-process run's losses, MTP losses and gradient norms while the
two embedding copies stay bit-identical.

Each rank builds the single-device reference from the same seed (init is layout-independent) and runs every DP
rank's micro-batches through it; the MoE aux-loss scale is 1/(all micro-batches), as the pipeline schedule
(1/micro-batches) and the DP gradient average give.
"""
import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.parallel.test_model_parallel import tiny_cfg
from tests.parallel.test_optimizer import _feed, _trainer

S, MB = 16, 2
MTP = ("model.mtp_num_layers=2", "model.mtp_loss_coeff=0.3")


def _micro_batches(cfg, dp_size):
    """Micro-batches with loss masks (so depths and micro-batches hold different label-token counts); as many per
    DP rank as train.global_batch_size gives."""
    gen = torch.Generator().manual_seed(11)
    micro = cfg.train.global_batch_size // (MB * dp_size)
    tokens = torch.randint(0, cfg.model.vocab_size, (dp_size, micro, MB, S + 1), generator=gen)
    masks = (torch.rand(dp_size, micro, MB, S, generator=gen) > 0.25).float()
    return [[{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": m} for t, m in zip(tokens[d], masks[d])]
            for d in range(dp_size)]


def _objective_parts(logits, mtp_logits, mb, ce):
    """(main loss sum, [K] MTP loss sums) of one micro-batch."""
    from launcher.train import token_loss

    main = (ce(logits, mb["labels"]) * mb["loss_mask"]).sum()
    return main, token_loss.mtp_loss_sums(mtp_logits, mb["labels"], mb["loss_mask"], ce)


def _reference_grads(cfg, micro_by_dp):
    from launcher.train import token_loss
    from moe_core.aux_loss import AuxLossAutoScaler
    from parallel.groups import ParallelGroups
    from parallel.model import build_model, token_losses

    single = ParallelGroups.single()
    ref = build_model(cfg, single)
    ref.set_step(0)
    every = [mb for batches in micro_by_dp for mb in batches]
    AuxLossAutoScaler.set_loss_scale(1.0 / len(every))
    n = token_loss.label_tokens(every)
    n_K = torch.tensor(token_loss.mtp_label_tokens(every, cfg.model.mtp_num_layers))
    coeff, total = cfg.model.mtp_loss_coeff, 0.0
    for mb in every:
        main, sums_K = _objective_parts(*ref(mb["tokens"], mb["tokens"]), mb, lambda a, b: token_losses(a, b, single))
        total = total + main / n + coeff * (sums_K / n_K).mean()
    total.backward()
    return {name: p.grad for name, p in ref.named_parameters()}, float(total)


def _compare(rank, world_size, overrides):
    from launcher.train import token_loss
    from parallel.groups import initialize
    from parallel.model import activation_shape, build_model, token_losses
    from parallel.optim.grads import sync_grads
    from parallel.schedule import PipelineSchedule
    from parallel.sharding import get_spec, local_slices

    cfg = tiny_cfg(*MTP, *overrides)
    g = initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    micro_by_dp = _micro_batches(cfg, g.dp_size)
    ref_grads, ref_objective = _reference_grads(cfg, micro_by_dp)

    model = build_model(cfg, g)
    model.set_step(0)
    micro = micro_by_dp[g.dp_rank]
    device = torch.device("cpu")
    loss_scale = token_loss.gradient_scale(token_loss.label_tokens(micro), g, device)
    mtp_scale = (token_loss.mtp_gradient_scales(token_loss.mtp_label_tokens(micro, cfg.model.mtp_num_layers),
                                                cfg.model.mtp_loss_coeff, g, device) if g.is_last_stage else None)
    extras = []

    def forward(chunk, mb, x):
        inp = mb["tokens"] if chunk.pre_process else x
        if not chunk.post_process:
            return chunk(inp)
        main, sums_K = _objective_parts(*chunk(inp, mb["tokens"]), mb, lambda a, b: token_losses(a, b, g))
        extras.append((main * loss_scale + (sums_K * mtp_scale).sum()).detach())
        return main, (sums_K * mtp_scale).sum()

    schedule = PipelineSchedule(g, cfg.parallel.virtual_pp, activation_shape(cfg, MB), torch.float32)
    schedule(model.chunks, micro, forward, loss_scale=loss_scale)
    sync_grads(model, g)
    checked = []
    for name, p in model.named_parameters():
        expected = ref_grads[name][local_slices(get_spec(p), g)]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
        if cfg.parallel.virtual_pp > 1:  # the interleaved schedule: losses and gradients equal to 1e-5
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        checked.append(name)
    # this DP rank's share of the objective (summed over DP below): dp * its micro-batches' part, averaged by DP
    share = float(sum(extras)) / g.dp_size if g.is_last_stage and g.tp_rank == 0 else 0.0
    return {"checked": checked, "reference": sorted(ref_grads), "objective": ref_objective, "share": share,
            "first": g.is_first_stage, "last": g.is_last_stage,
            "embedding": "embed_tokens.weight" in dict(model.named_parameters())}


@pytest.mark.parametrize("overrides", [
    ("parallel.pp=2", "parallel.ep=2", "train.global_batch_size=8"),
    ("parallel.tp=2", "parallel.pp=2", "model.mtp_num_layers=1"),
    # everything composes: MoNE experts and Matryoshka k draws in the main and the MTP MoE blocks, TP and EP
    ("parallel.tp=2", "parallel.ep=2", "moe.mone.enabled=true", "moe.matryoshka.enabled=true",
     "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3"),
    # sequence parallelism: MTP's embedding, norms and block on the token shard, eh_proj on the gathered sequence
    ("parallel.tp=2", "parallel.pp=2", "model.mtp_num_layers=1", "parallel.sequence_parallel=true"),
    ("parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true", "moe.aux_loss_scope=sequence"),
    # interleaved 1F1B: PP=2 x VPP=2, an uneven layout (megatron-core vocabulary) with the MTP module by the head
    ("parallel.pp=2", "parallel.virtual_pp=2", "parallel.ep=2", "train.global_batch_size=16",
     "model.mtp_num_layers=1", "parallel.pp_layout=Et|t|tt|mL"),
], ids=["pp2-ep2-dp2", "tp2-pp2", "tp2-ep2-mone-mmoe", "tp2-pp2-sp", "tp2-ep2-sp-sequence", "pp2-vpp2-ep2-dp2-uneven"])
def test_mtp_matches_single_process(overrides):
    results = run_distributed(_compare, 4, overrides)
    checked = set().union(*(r["checked"] for r in results))
    assert checked == set(results[0]["reference"]) and any(n.startswith("mtp.0.eh_proj") for n in checked)
    assert sum(r["share"] for r in results) == pytest.approx(results[0]["objective"], rel=1e-5)
    if "parallel.pp=2" in overrides:  # the last stage holds its own embedding copy; its gradient matched too
        assert all(r["embedding"] for r in results if r["last"] and not r["first"])


def _trainer_steps(rank, world, steps, *extra):
    from parallel.groups import initialize

    pp = 2 if "parallel.pp=2" in extra else 1
    trainer = _trainer(["train.precision=fp32", f"train.steps={steps}", "train.global_batch_size=4",
                        "optim.distributed=true", "logging.run_dir=/nonexistent-unused", "model.mtp_num_layers=2",
                        *extra], groups=initialize(1, pp, 1))
    _feed(trainer, steps, global_batch=4, micro=2)
    expected = _step0_mtp_loss(trainer.cfg, steps) if world == 1 else None
    out = []
    for _ in range(steps):
        loss, norm, _, _ = trainer.train_step()
        trainer.step += 1
        out.append((loss, trainer.mtp_loss, norm))
    trainer.optimizer.sync_params()  # the last update's parameter all-gather (optim.overlap_param_gather)
    emb = dict(trainer.model.named_parameters()).get("embed_tokens.weight")
    return {"steps": out, "embedding": None if emb is None else emb.detach().clone(),
            "stage": trainer.groups.pp_rank, "expected_mtp_loss": expected}


def _step0_mtp_loss(cfg, steps):
    """coeff * mean over depths of (sum of masked CE over the step's micro-batches / their depth label tokens),
    from the initial weights: what ``train/mtp_loss`` must report for step 0."""
    from launcher.train import token_loss
    from parallel.groups import ParallelGroups
    from parallel.model import build_model, token_losses
    from tests.parallel.test_optimizer import _global_batches

    single = ParallelGroups.single()
    model = build_model(cfg, single)
    model.set_step(0)
    batch = _global_batches(steps, 4)[0]
    micro = [{k: torch.cat([b[k] for b in batch[i:i + 2]]) for k in batch[0]} for i in (0, 2)]
    with torch.no_grad():
        sums = sum(_objective_parts(*model(mb["tokens"], mb["tokens"]),
                                    {**mb, "loss_mask": mb.get("loss_mask", torch.ones(mb["labels"].shape))},
                                    lambda a, b: token_losses(a, b, single))[1] for mb in micro)
    counts = torch.tensor(token_loss.mtp_label_tokens(micro, cfg.model.mtp_num_layers))
    return float(cfg.model.mtp_loss_coeff * (sums / counts).mean())


def test_trainer_pp2_dp2_matches_single_process_and_keeps_embedding_copies_identical():
    steps = 3
    single = run_distributed(_trainer_steps, 1, steps)[0]
    assert single["steps"][0][1] == pytest.approx(single["expected_mtp_loss"], rel=1e-5)
    pp2 = run_distributed(_trainer_steps, 4, steps, "parallel.pp=2")
    for (loss, mtp_loss, norm), (loss_p, mtp_loss_p, norm_p) in zip(single["steps"], pp2[0]["steps"]):
        assert mtp_loss is not None and mtp_loss > 0
        assert loss_p == pytest.approx(loss, rel=1e-5) and mtp_loss_p == pytest.approx(mtp_loss, rel=1e-5)
        assert norm_p == pytest.approx(norm, rel=1e-4)  # the embedding copy is counted once in the norm
    first = [r["embedding"] for r in pp2 if r["stage"] == 0]
    last = [r["embedding"] for r in pp2 if r["stage"] == 1]
    assert len(first) == len(last) == 2
    for copy in first + last:  # updated three times, still bit-identical on both stages and DP ranks
        assert torch.equal(copy, first[0])
    torch.testing.assert_close(first[0], single["embedding"], rtol=1e-4, atol=1e-6)
