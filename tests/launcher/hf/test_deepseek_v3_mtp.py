"""DeepSeek-V3 multi-token prediction through the converter: a moetron DeepSeek-V3 model with two MTP modules
(trained one step) -> to-hf -> from-hf gives bit-identical tensors and the same MTP loss; the HF directory has the
official layout (module i at model.layers.{num_hidden_layers + i}, with the embedding and head copies), loads in
stock transformers with the main model's logits, and transformers' own MTP drafter (``MtpModel``) reads the MTP
layers and computes moetron's MTP logits; from-hf refuses copies that differ from the main embedding and head."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from launcher.hf import convert
from launcher.hf.safetensors_io import HFWeights
from tests.helpers.dist import run_distributed
from tests.launcher.hf.test_from_hf import read_all

LAYERS, DEPTHS, VOCAB = 3, 2, 96
MOETRON = [f"model.vocab_size={VOCAB}", "model.hidden_size=32", f"model.num_layers={LAYERS}",
           "model.num_attention_heads=4", "model.attention=mla", "model.q_lora_rank=24", "model.kv_lora_rank=16",
           "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=12", "model.seq_length=32",
           "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4.0",
           "model.rope_scaling.original_max_position_embeddings=8", "model.dense_layers=[0]",
           "model.dense_ffn_hidden_size=48", f"model.mtp_num_layers={DEPTHS}", "moe.num_experts=8", "moe.top_k=3",
           "moe.expert_ffn_hidden_size=16", "moe.score_function=sigmoid", "moe.expert_bias=true",
           "moe.expert_bias_update_rate=0.01", "moe.num_groups=4", "moe.group_topk=2",
           "moe.routed_scaling_factor=2.5", "moe.shared_expert_ffn_hidden_size=32", "train.steps=1",
           "train.micro_batch_size=2", "train.global_batch_size=2", "optim.warmup_steps=1", "data.source=synthetic",
           "logging.tensorboard=false", "logging.log_interval=100"]
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
MTP_PARTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
             "embed_tokens.weight", "input_layernorm.weight", "self_attn.q_a_proj.weight",
             "post_attention_layernorm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
             "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight")


def _train(rank, world_size, root):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel import groups as pgroups

    cfg = load_config(None, MOETRON + [f"checkpoint.dir={root}/ckpt", f"logging.run_dir={root}/run"])
    Trainer(cfg, pgroups.initialize(1, 1, 1)).fit()


def _main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert.main(argv)
    return rc, err.getvalue()


def _convert(rank, world_size, hf, out, to_hf_from=None):
    """[to-hf of ``to_hf_from`` into ``hf``,] from-hf of ``hf`` into ``out``: (rc, stderr) each."""
    done = [_main(["to-hf", "--checkpoint", to_hf_from, "--output", hf])] if to_hf_from else []
    return done + [_main(["from-hf", "--hf", hf, "--output", out, "data.source=synthetic"])]


def _evaluate(rank, world_size, ckpt_root):
    """The checkpoint's tensors, main logits, MTP logits and MTP loss of TOKENS (next-token labels)."""
    from launcher.train import checkpoint
    from launcher.train.token_loss import mtp_loss_sums
    from parallel.model import build_model, token_losses

    ckpt = checkpoint.find_latest(ckpt_root)
    with convert.single_process_groups() as groups:
        cfg = convert.checkpoint_config(ckpt)
        model = build_model(cfg, groups, torch.device("cpu"))
        checkpoint.load(ckpt, model, None, groups)
        model.eval()
        with torch.no_grad():
            logits, mtp_logits = model(TOKENS, mtp_tokens_BS=TOKENS)
            labels = torch.cat([TOKENS[:, 1:], TOKENS[:, :1]], dim=1)
            sums = mtp_loss_sums(mtp_logits, labels, None, lambda x, y: token_losses(x, y, groups))
            counts = torch.tensor([labels[:, k:].numel() for k in range(1, DEPTHS + 1)], dtype=torch.float32)
        loss = cfg.model.mtp_loss_coeff * (sums / counts).mean()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits,
            "mtp_logits": mtp_logits, "mtp_loss": loss}


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_mtp")
    run_distributed(_train, 1, str(root))
    rcs = run_distributed(_convert, 1, str(root / "hf"), str(root / "ckpt2"), str(root / "ckpt"))[0]
    assert [rc for rc, _ in rcs] == [0, 0], rcs
    before, after = (run_distributed(_evaluate, 1, str(root / name))[0] for name in ("ckpt", "ckpt2"))
    return {"root": root, "before": before, "after": after, "from_hf_stderr": rcs[1][1]}


def test_round_trip_is_bit_identical_with_the_same_mtp_loss(trip):
    before, after = trip["before"], trip["after"]
    assert sum(k.startswith(f"mtp.{DEPTHS - 1}.block.mlp.experts.") for k in before["state"]) == 3
    assert before["state"].keys() == after["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][key]), key
    assert before["state"]["mtp.1.block.mlp.router.expert_bias"].abs().max() > 0  # trained: not the zero init
    assert torch.equal(before["logits"], after["logits"])
    for got, want in zip(after["mtp_logits"], before["mtp_logits"]):
        assert torch.equal(got, want)
    assert before["mtp_loss"] > 0 and torch.equal(after["mtp_loss"], before["mtp_loss"])
    assert "MTP" not in trip["from_hf_stderr"]  # the MTP layers were read, not dropped


def test_export_has_the_official_layout_with_bit_equal_copies(trip):
    hf = trip["root"] / "hf"
    tensors = read_all(hf)
    assert json.loads((hf / "config.json").read_text())["num_nextn_predict_layers"] == DEPTHS
    for i in range(DEPTHS):
        layer = f"model.layers.{LAYERS + i}."
        assert all(layer + part in tensors for part in MTP_PARTS), sorted(k for k in tensors if layer in k)
        assert torch.equal(tensors[layer + "embed_tokens.weight"], tensors["model.embed_tokens.weight"])
        assert torch.equal(tensors[layer + "shared_head.head.weight"], tensors["lm_head.weight"])
        assert tensors[layer + "mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(k.startswith(f"model.layers.{LAYERS + DEPTHS}.") or "mtp" in k for k in tensors)


def test_stock_transformers_loads_it_and_its_mtp_drafter_computes_moetron_mtp_logits(trip):
    """DeepseekV3ForCausalLM leaves layers >= num_hidden_layers unused (main logits as moetron's); transformers'
    MtpModel (its MTP drafter, which finds the MTP layers through ``_keys_to_ignore_on_load_unexpected``, written
    for the official 61 layers, hence the patch) reads them and gives moetron's MTP logits at both depths when fed
    moetron's inputs (shifted tokens, the previous depth's normed hidden states)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    from moe_core.mtp import shift_left

    hf, before = trip["root"] / "hf", trip["before"]
    model = DeepseekV3ForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        out = model(TOKENS, output_hidden_states=True)
    torch.testing.assert_close(out.logits, before["logits"], rtol=0, atol=1e-5)
    pattern = rf"model\.layers\.[{LAYERS}-{LAYERS + DEPTHS - 1}]\."
    model._keys_to_ignore_on_load_unexpected = [pattern]
    drafter = MtpModel.from_pretrained(model).eval()
    h, positions = out.hidden_states[-1], torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        for depth in range(1, DEPTHS + 1):
            h = drafter.forward_layer(depth - 1, h, positions, None, input_ids=shift_left(TOKENS, depth))
            torch.testing.assert_close(drafter.shared_head(h), before["mtp_logits"][depth - 1], rtol=0, atol=1e-5)


def _flip_first_byte(hf, key: str) -> None:
    info = HFWeights(hf).info[key]
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        byte = f.read(1)
        f.seek(info.offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("key, named", [
    (f"model.layers.{LAYERS}.embed_tokens.weight", "differs from 'model.embed_tokens.weight'"),
    (f"model.layers.{LAYERS + 1}.shared_head.head.weight", "differs from 'lm_head.weight'")])
def test_copies_that_differ_from_the_main_tensors_are_refused_in_one_line(trip, tmp_path, key, named):
    shutil.copytree(trip["root"] / "hf", tmp_path / "hf")
    _flip_first_byte(tmp_path / "hf", key)
    (rc, err), = run_distributed(_convert, 1, str(tmp_path / "hf"), str(tmp_path / "out"))[0]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"tensor '{key}' {named}" in err, err
    assert not (tmp_path / "out").exists()


def test_an_mtp_layer_missing_a_tensor_is_refused(trip, tmp_path):
    shutil.copytree(trip["root"] / "hf", tmp_path / "hf")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][f"model.layers.{LAYERS + 1}.hnorm.weight"]
    index_path.write_text(json.dumps(index))
    (rc, err), = run_distributed(_convert, 1, str(tmp_path / "hf"), str(tmp_path / "out"))[0]
    assert rc == 2 and f"tensor 'model.layers.{LAYERS + 1}.hnorm.weight' is missing" in err, err
