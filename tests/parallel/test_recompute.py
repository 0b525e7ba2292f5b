"""Activation recompute (train.recompute, moe_core/recompute.py) on one device: every option gives gradients
bit-identical to the run without it (fp32, torch.equal), with MoNE, Matryoshka, MLA (or GQA with an MTP module), a
gated shared expert, a dense layer and the global-batch aux loss (whose cross-micro-batch counts the recomputation
must replay, not redo); the regions really drop what they cover; bad settings are refused in one line naming the
key."""
import pytest
import torch

from tests.helpers.recompute import OPTIONS, TINY_MOE

S = 16
MLA = ["model.attention=mla", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
       "model.v_head_dim=6", "model.q_lora_rank=12"]
ALL = ["moe.mone.enabled=true", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3",
       "moe.shared_expert_ffn_hidden_size=40", "moe.shared_expert_gate=true", "moe.aux_loss_scope=global_batch"]


def _cfg(*overrides):
    from launcher.config import load_config

    return load_config(None, [*TINY_MOE, f"model.seq_length={S}", "model.num_layers=3", *overrides])


def _grads_and_saved(overrides, fp8=False):
    """Two micro-batches of one step (so the global-batch counts accumulate): every gradient, and the elements
    autograd saves outside recompute regions. ``fp8``: a bf16 config switched to fp8 past the config's check
    for an FP8 GPU (CPU runs torchao's modules and the emulated grouped GEMM)."""
    from parallel.groups import ParallelGroups
    from parallel.model import build_model, token_losses

    cfg, single = _cfg(*overrides), ParallelGroups.single()
    if fp8:
        cfg.train.precision = "fp8"
    model = build_model(cfg, single)
    model.set_step(3)
    gen, saved = torch.Generator().manual_seed(7), []
    for i in range(2):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, S + 1), generator=gen)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if cfg.model.mtp_num_layers:  # MTP: the depths' logits too (their blocks recompute like the others)
                logits, mtp_logits = model(tokens[:, :-1], tokens[:, :-1])
                loss = sum(token_losses(lg, tokens[:, 1:], single).mean() for lg in [logits, *mtp_logits])
            else:
                loss = token_losses(model(tokens[:, :-1]), tokens[:, 1:], single).mean()
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_every_option_gives_bit_identical_gradients_and_saves_less(attention):
    extra = (MLA if attention == "mla" else ["model.mtp_num_layers=1"]) + ALL
    ref, ref_saved = _grads_and_saved(extra)
    for name, option in OPTIONS.items():
        if "mla_up_proj" in name and attention != "mla":
            continue
        grads, saved = _grads_and_saved([*extra, *option])
        assert grads.keys() == ref.keys()
        different = [n for n in ref if not torch.equal(grads[n], ref[n])]
        assert not different, (name, different)
        assert saved < ref_saved, (name, saved, ref_saved)  # the covered part's saved tensors are gone


def test_a_recomputing_model_needs_set_step():
    from parallel.groups import ParallelGroups
    from parallel.model import build_model

    model = build_model(_cfg("train.recompute=full", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1",
                             "moe.matryoshka.k_max=2"), ParallelGroups.single())
    with pytest.raises(RuntimeError, match="needs MoELayer.set_step"):
        model(torch.zeros(1, S, dtype=torch.long))


def test_first_pass_value_replays_inside_a_recomputation_only():
    from moe_core.recompute import checkpointed_replaying, first_pass_value

    calls = []

    def region(x):
        return x * first_pass_value(lambda: calls.append(1) or float(len(calls)))

    x = torch.ones(3, requires_grad=True)
    y = checkpointed_replaying(lambda t: region(t).sin(), x)
    y.sum().backward()  # the recomputation reuses the first pass's value: one call, gradient of sin(1 * x)
    assert calls == [1]
    torch.testing.assert_close(x.grad, torch.cos(x.detach()), rtol=0, atol=0)
    assert first_pass_value(lambda: 5) == 5  # outside any region: just computed


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_modules=[attn]"], "train.recompute_modules[0]: must be one of ['core_attn', 'moe_act'"),
    (["train.recompute=selective"], "train.recompute=selective needs train.recompute_modules"),
    (["train.recompute=full", "train.recompute_modules=[norm]"], "train.recompute_modules is only read with"),
    (["train.recompute=selective", "train.recompute_modules=[moe,moe_act]"], "'moe' already recomputes"),
    (["train.recompute=selective", "train.recompute_modules=[norm,norm]"], "lists a module twice"),
    (["train.recompute=selective", "train.recompute_modules=[mla_up_proj]"], "mla_up_proj needs model.attention=mla"),
    (["train.recompute=selective", "train.recompute_modules=[mlp]", "model.dense_layers=[]"], "model.dense_layers"),
    (["train.recompute=selective", "train.recompute_modules=[shared_experts]"], "shared_expert_ffn_hidden_size > 0"),
    (["train.recompute=full", "train.precision=fp8", "fp8.backend=te"], "not supported"),
    (["train.recompute=bogus"], "train.recompute: must be one of ['none', 'selective', 'full']"),
])
def test_bad_recompute_settings_are_one_line_naming_the_key(overrides, message):
    from launcher.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mone", [False, True])
def test_fp8_recompute_gives_bit_identical_gradients(mone):
    """torchao FP8 (CPU: torchao's Float8Linear and the emulated grouped FP8 GEMM of the experts): dynamic scales
    are recomputed from the same tensors, so recompute changes no bit."""
    fp8 = ["train.precision=bf16", "fp8.keep_first_last_bf16=false", "moe.expert_ffn_hidden_size=32",
           "moe.shared_expert_ffn_hidden_size=48",
           *(["moe.mone.enabled=true"] if mone else [])]
    ref, _ = _grads_and_saved(fp8, fp8=True)
    for name in ("full", "selective"):
        grads, _ = _grads_and_saved([*fp8, *OPTIONS[name]], fp8=True)
        assert not [n for n in ref if not torch.equal(grads[n], ref[n])], name
