"""Multi-token prediction on one device: the module and the loss against a hand-written reference of DeepSeek-V3's
formula (embedding shift, [enorm(emb); hnorm(h)] concatenation order, masking of targets past the sample), the
parameter names the checkpoint keys and the HF converter rely on, and the config checks."""
import pytest
import torch
import torch.nn.functional as F

from launcher.config import load_config
from launcher.train import token_loss
from moe_core.mtp import depth_targets, shift_left
from moe_core.transformer import MoETransformer

S, B, V, D = 12, 2, 40, 16


def tiny_cfg(*overrides):
    return load_config(None, [f"model.vocab_size={V}", f"model.hidden_size={D}", "model.num_layers=2",
                              "model.num_attention_heads=2", "model.num_query_groups=1", f"model.seq_length={S}",
                              "model.dense_layers=[0]", "model.dense_ffn_hidden_size=24", "moe.num_experts=4",
                              "moe.top_k=2", "moe.expert_ffn_hidden_size=8", "moe.aux_loss_coeff=0.01",
                              "model.mtp_num_layers=2", "model.mtp_loss_coeff=0.3", "data.source=synthetic",
                              *overrides])


def _model(cfg):
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe, cfg.train.seed)
    with torch.no_grad():  # non-trivial norm weights, so a swapped enorm/hnorm or concat order shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    model.set_step(3)
    return model


def _rms(x, w, eps):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def _reference_mtp_loss(model, cfg, tokens_BS, labels_BS, mask_BS):
    """DeepSeek-V3 eq. 21-25, written out: h^0 = final-normed main hidden; depth k embeds t_{i+k} (0 past the
    sample), h'^k = W_eh [enorm(emb); hnorm(h^{k-1})], h^k = norm(Block(h'^k)), logits = W_head h^k, target
    t_{i+k+1} = labels[i+k], only for i + k < S (and the sample's loss mask); L = coeff * mean_k(sum/count)."""
    eps, E_VD, W_head = cfg.model.norm_eps, model.embed_tokens.weight, model.lm_head.weight
    cos, sin = model.rope_cos[:S], model.rope_sin[:S]
    h = E_VD[tokens_BS]
    for block in model.layers.values():
        h = block(h, cos, sin)
    h = _rms(h, model.norm.weight, eps)
    per_depth = []
    for k, module in enumerate(model.mtp, start=1):
        future = torch.zeros_like(tokens_BS)
        future[:, :S - k] = tokens_BS[:, k:]
        x = torch.cat([_rms(E_VD[future], module.enorm.weight, eps), _rms(h, module.hnorm.weight, eps)], dim=-1)
        h = _rms(module.block(x @ module.eh_proj.weight.T, cos, sin), module.norm.weight, eps)
        logits = h @ W_head.T
        total, count = 0.0, 0.0
        for b in range(B):
            for i in range(S - k):
                w = mask_BS[b, i + k]
                total = total + w * F.cross_entropy(logits[b, i], labels_BS[b, i + k])
                count += float(w)
        per_depth.append(total / count)
    return cfg.model.mtp_loss_coeff * sum(per_depth) / len(per_depth)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "loss-mask"])
def test_mtp_loss_matches_hand_written_formula(masked):
    cfg = tiny_cfg()
    model = _model(cfg)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randint(0, V, (B, S + 1), generator=gen)
    tokens, labels = sample[:, :-1], sample[:, 1:]
    mask = (torch.rand(B, S, generator=gen) > 0.3).float() if masked else torch.ones(B, S)
    mb = {"tokens": tokens, "labels": labels, **({"loss_mask": mask} if masked else {})}

    expected = _reference_mtp_loss(model, cfg, tokens, labels, mask)
    ref_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)

    logits, mtp_logits = model(tokens, tokens)
    assert logits.shape == (B, S, V) and [t.shape for t in mtp_logits] == [(B, S, V)] * 2
    sums_K = token_loss.mtp_loss_sums(mtp_logits, labels, mb.get("loss_mask"),
                                      lambda lg, lb: F.cross_entropy(lg.flatten(0, 1), lb.flatten(),
                                                                     reduction="none").view_as(lb))
    counts_K = torch.tensor(token_loss.mtp_label_tokens([mb], 2), dtype=torch.float64)
    assert counts_K.tolist() == [float(mask[:, k:].sum()) for k in (1, 2)]
    got = cfg.model.mtp_loss_coeff * (sums_K / counts_K).mean()
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    checked = 0
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:  # the main model's LM-head path is not in the MTP loss
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 20


def test_main_logits_unchanged_by_mtp_modules():
    """The main output with MTP equals the same weights' model without MTP (the MTP modules only add)."""
    with_mtp, without = _model(tiny_cfg()), _model(tiny_cfg("model.mtp_num_layers=0"))
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(with_mtp(tokens, tokens)[0], without(tokens), rtol=0, atol=0)
    torch.testing.assert_close(with_mtp(tokens), without(tokens), rtol=0, atol=0)


def test_parameter_names_and_layer_indices():
    model = _model(tiny_cfg())
    names = {n for n, _ in model.named_parameters() if n.startswith("mtp.1.")}
    assert {"mtp.1.enorm.weight", "mtp.1.hnorm.weight", "mtp.1.eh_proj.weight", "mtp.1.norm.weight",
            "mtp.1.block.input_layernorm.weight", "mtp.1.block.mlp.router.weight"} <= names
    assert model.mtp[0].eh_proj.weight.shape == (D, 2 * D)
    assert sorted(model.moe_layers()) == [1, 2, 3]  # layer 0 dense; the MTP blocks are MoE layers 2 and 3
    assert model.moe_layers()[3] is model.mtp[1].block.mlp


def test_matryoshka_draws_key_on_mtp_layer_index():
    """Each MTP block routes with the k drawn for its own layer index (num_layers + k - 1), like a main layer."""
    cfg = tiny_cfg("moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=4")
    model = _model(cfg)
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    differ = False
    for step in range(6):
        model.set_step(step)
        model(tokens, tokens)
        ks = {idx: layer.last_stats.k for idx, layer in model.moe_layers().items()}
        assert ks == {idx: model.k_schedule.k_for(idx, step, training=True) for idx in (1, 2, 3)}
        differ |= ks[2] != ks[3]
    assert differ


def test_shift_and_depth_targets():
    x = torch.arange(10).view(2, 5)
    assert shift_left(x, 2).tolist() == [[2, 3, 4, 0, 0], [7, 8, 9, 0, 0]]
    labels, mask = depth_targets(x, None, 1)
    assert labels.tolist() == [[1, 2, 3, 4, 0], [6, 7, 8, 9, 0]] and mask.sum() == 8
    with pytest.raises(ValueError, match="k=5 must be in"):
        shift_left(x, 5)


@pytest.mark.parametrize("override,message", [
    ("model.mtp_num_layers=12", "model.mtp_num_layers (12) must be < model.seq_length (12)"),
    ("model.mtp_loss_coeff=-0.1", "model.mtp_loss_coeff"),
])
def test_config_checks(override, message):
    from launcher.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_cfg(override).model.validate()
