"""from-hf on hostile Hugging Face directories: each is one `moetron: ... error:` line on stderr, exit code 2, no
traceback, and nothing appears where the output would go (no output directory, no leftover temporary sibling).
Every case edits a copy of one valid sharded Qwen3-MoE directory; the unedited copy converts (the control row)."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import run_distributed

INDEX = "model.safetensors.index.json"


def _config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def _point(d: Path, target: str) -> None:
    """Point the index entry of the first tensor at ``target``."""
    index = _index(d)
    index["weight_map"][sorted(index["weight_map"])[0]] = target
    (d / INDEX).write_text(json.dumps(index))


def _first_shard(d: Path) -> Path:
    return d / sorted(set(_index(d)["weight_map"].values()))[0]


def _edit_header(d: Path, edit) -> None:
    """Rewrite the first shard's header with ``edit(header)``, keeping the header's length (space padding)."""
    path = _first_shard(d)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(data[:8] + text + b" " * (length - len(text)) + data[8 + length:])


def _tensor_entries(header: dict) -> list[dict]:
    return [v for k, v in sorted(header.items(), key=lambda kv: str(kv[1])) if k != "__metadata__"]


def _grow_first(header: dict) -> None:  # a length that does not match dtype x shape
    _tensor_entries(header)[0]["data_offsets"][1] += 4


def _overlap(header: dict) -> None:  # right lengths, but two tensors claim the same bytes
    entries = sorted(_tensor_entries(header), key=lambda e: e["data_offsets"][0])
    size = entries[1]["data_offsets"][1] - entries[1]["data_offsets"][0]
    entries[1]["data_offsets"] = [entries[0]["data_offsets"][0], entries[0]["data_offsets"][0] + size]


def _lying_length(d: Path) -> None:
    path = _first_shard(d)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])


def _symlink_entry(d: Path) -> None:
    os.symlink("/etc/passwd", d / "evil.safetensors")
    _point(d, "evil.safetensors")


def _dotdot_entry(d: Path) -> None:
    shutil.copy(_first_shard(d), d.parent / "outside.safetensors")
    _point(d, "../outside.safetensors")


def _directory_entry(d: Path) -> None:
    (d / "dir.safetensors").mkdir()
    _point(d, "dir.safetensors")


def _drop_tensor(d: Path) -> None:
    index = _index(d)
    del index["weight_map"]["model.layers.0.mlp.experts.1.up_proj.weight"]
    (d / INDEX).write_text(json.dumps(index))


def _symlinked_config(d: Path) -> None:
    (d / "config.json").unlink()
    os.symlink("/etc/passwd", d / "config.json")


def _symlinked_tokenizer(d: Path) -> None:
    os.symlink("/etc/passwd", d / "tokenizer.json")


CASES = {  # name: (edit the directory, what the one line must say)
    "unknown model_type": (lambda d: _config(d, model_type="llama4"),
                           "model_type 'llama4' is not supported; from-hf converts deepseek_v3, glm4_moe, llama, "
                           "mixtral, olmoe, qwen2_moe, qwen3, qwen3_moe"),
    "unsupported option": (lambda d: _config(d, use_sliding_window=True, hidden_act="gelu"),
                           "options moetron cannot represent: hidden_act='gelu'"),
    "unsupported rope": (lambda d: _config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
                         "rope type 'llama3' is not supported"),
    "float size": (lambda d: _config(d, hidden_size=64.5), "hidden_size is 64.5 (float); it must be an integer"),
    "string size": (lambda d: _config(d, num_hidden_layers="2"), "num_hidden_layers is '2' (str)"),
    "null size": (lambda d: _config(d, vocab_size=None), "vocab_size is None (NoneType)"),
    "absurd size": (lambda d: _config(d, hidden_size=10**12), "hidden_size=1000000000000 is outside [0, 16777216]"),
    "absurd layer count": (lambda d: _config(d, num_hidden_layers=10**6),
                           "config.json says 1000000 layers but the weights in"),
    "absurd expert count": (lambda d: _config(d, num_experts=10**6), "config.json says 1000000 experts"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}'), "not UTF-8"),
    "config huge": (lambda d: (d / "config.json").write_bytes(b" " * (65 << 20) + b"{}"), "it is not a model file"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a list, not a JSON object"),
    "config NaN": (lambda d: _config(d, rms_norm_eps=float("nan")), "NaN is not valid JSON"),
    "config symlink outside": (_symlinked_config, "points outside"),
    "tokenizer symlink outside": (_symlinked_tokenizer, "tokenizer.json: 'tokenizer.json' points outside"),
    "missing shard": (lambda d: _first_shard(d).unlink(), "does not exist in"),
    "index entry symlink to /etc/passwd": (_symlink_entry, "'evil.safetensors' points outside"),
    "index entry ../": (_dotdot_entry, "'../outside.safetensors' points outside"),
    "index entry absolute": (lambda d: _point(d, "/etc/passwd"), "'/etc/passwd' points outside"),
    "index entry directory": (_directory_entry, "'dir.safetensors' in"),
    "index not an index": (lambda d: (d / INDEX).write_text('{"weight_map": [1]}'), "has no weight_map"),
    "header lies about a length": (lambda d: _edit_header(d, _grow_first), "(the header lies)"),
    "header lies about offsets": (lambda d: _edit_header(d, _overlap), "overlapping or gapped offsets"),
    "header length beyond the file": (_lying_length, "the safetensors header claims"),
    "truncated shard": (lambda d: _first_shard(d).write_bytes(_first_shard(d).read_bytes()[:-100]), "is truncated"),
    "shape mismatch": (lambda d: _config(d, moe_intermediate_size=20),
                       "has shape [24, 32] but config.json implies [20, 32]"),
    "missing tensor": (_drop_tensor, "tensor 'model.layers.0.mlp.experts.1.up_proj.weight' is missing"),
}


def _convert_each(rank, world_size, root, names):
    """(exit code, stderr) per case; an escaping exception is recorded as its traceback (rc None)."""
    import contextlib
    import io
    import traceback

    from launcher.hf import convert

    results = {}
    for name in names:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = convert.main(["from-hf", "--hf", f"{root}/{name}/hf", "--output", f"{root}/{name}/out",
                                   "data.source=synthetic", "--quiet"])
            except BaseException:  # noqa: BLE001 - a traceback is what the test reports
                rc = None
                err.write(traceback.format_exc())
        results[name] = (rc, err.getvalue())
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.launcher.hf.test_from_hf import _qwen3_config

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    qwen = {k: v for k, v in _qwen3_config(num_hidden_layers=2, mlp_only_layers=[]).items() if k != "model_type"}
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**qwen)).save_pretrained(root / "base", max_shard_size="20KB")
    assert (root / "base" / INDEX).exists()
    for name, (edit, _) in {"control": (lambda d: None, ""), **CASES}.items():
        shutil.copytree(root / "base", root / name / "hf", symlinks=True)
        edit(root / name / "hf")
    before = {name: sorted(os.listdir(root / name)) for name in ["control", *CASES]}
    return root, before, run_distributed(_convert_each, 1, str(root), ["control", *CASES])[0]


def test_the_unedited_directory_converts(outcomes):
    root, _, results = outcomes
    assert results["control"][0] == 0, results["control"][1]
    assert (root / "control" / "out" / "step_0000000").is_dir()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_directory_is_one_line_exit_2_nothing_written(outcomes, name):
    root, before, results = outcomes
    rc, err = results[name]
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("moetron: ") and "Traceback" not in err, err
    assert CASES[name][1] in err, err
    assert sorted(os.listdir(root / name)) == before[name]  # no output, no temporary sibling
    assert "out" not in before[name]
