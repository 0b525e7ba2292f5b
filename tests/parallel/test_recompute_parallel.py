"""Activation recompute on 4 gloo ranks with PP=2 x EP=2 (DP=2), MoNE + Matryoshka + LLEP on its rebalancing path, a
shared expert, the global-batch aux loss and megatron-core's distributed optimizer: two trainer steps with each
recompute option leave the losses and every parameter bit-identical to the same steps without recompute (fp32; the
distributed optimizer's state included).
``moe_act`` adds no all-to-all; ``moe`` and ``full`` run each MoE layer's dispatch and combine again in backward.
(tests/parallel/test_model_parallel.py compares a recomputing PP x EP model with the single-process reference.)"""
import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.helpers.recompute import OPTIONS, TINY_MOE

LAYOUT = ["parallel.pp=2", "parallel.ep=2", "model.num_layers=4", "model.seq_length=16",
          "train.global_batch_size=8", "moe.mone.enabled=true", "moe.matryoshka.enabled=true",
          "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", "moe.dispatcher=llep",
          "moe.llep.imbalance_threshold=1.0", "moe.llep.min_tokens_per_gemm=1", "moe.aux_loss_scope=global_batch",
          "moe.shared_expert_ffn_hidden_size=40", "optim.distributed=true", "logging.tensorboard=false"]
CHECKED = ("full", "moe", "selective")


def _train(rank, world, run_dir):
    import parallel.dispatch
    import parallel.llep.dispatcher
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    calls = [0]

    def counting(module):
        inner = module.all_to_all

        def all_to_all(*args, **kwargs):
            calls[0] += 1
            return inner(*args, **kwargs)

        module.all_to_all = all_to_all

    counting(parallel.dispatch)
    counting(parallel.llep.dispatcher)
    out = {}
    for name in ("none", *CHECKED):
        cfg = load_config(None, [*TINY_MOE, *LAYOUT, *OPTIONS.get(name, []), f"logging.run_dir={run_dir}/{name}"])
        trainer = Trainer(cfg, initialize(1, 2, 2))
        calls[0] = 0
        losses = [trainer.train_step()[0] for _ in range(2)]
        state = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        moments = {kind: trainer.optimizer.canonical_state(kind) for kind in ("exp_avg", "exp_avg_sq", "main_param")}
        out[name] = {"losses": losses, "params": state, "all_to_alls": calls[0], "opt": moments}
    return out


@pytest.mark.timeout(900)
def test_recompute_leaves_every_parameter_bit_identical_under_pp_ep_llep(tmp_path):
    results = run_distributed(_train, 4, str(tmp_path), timeout=900)
    for rank, res in enumerate(results):
        base = res["none"]
        for name in CHECKED:
            got = res[name]
            assert got["losses"] == base["losses"], (rank, name)
            diff = [n for n in base["params"] if not torch.equal(got["params"][n], base["params"][n])]
            assert not diff, (rank, name, diff)
            for kind, tensors in base["opt"].items():  # fp32 main weights and Adam moments of this rank's slice
                assert all(torch.equal(got["opt"][kind][n], t) for n, t in tensors.items()), (rank, name, kind)
        # moe_act recomputes inside the experts' compute phase: no all-to-all beyond the run without recompute
        assert res["selective"]["all_to_alls"] == base["all_to_alls"], rank
        if base["all_to_alls"]:  # an EP stage with MoE layers: the whole-layer options dispatch again
            assert res["moe"]["all_to_alls"] > base["all_to_alls"] and res["full"]["all_to_alls"] > base["all_to_alls"]
    assert any(r["none"]["all_to_alls"] for r in results)
