"""Every kind of bad input ends in exit code 2, exactly one line on stderr and no traceback (issue 15, items 9-11).

Rows call the real entry points in-process (``launcher.pretrain.main``, ``launcher.data.preprocess.main``) and
capture stderr; the last tests run a few rows as subprocesses to show the same contract at the process boundary
(Python warnings included). Config rows are also generated from the range declared next to every numeric field,
so a field added later is covered the day it is declared.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import pytest

from launcher import pretrain
from launcher.config import Config, load_config
from launcher.data import preprocess
from launcher.data.format import read_index
from moe_core.config_fields import Range
from tests.helpers.dist import free_port, run_distributed
from tests.launcher.data.helpers import SEQ, corpus_docs, preprocess as make_shards, write_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.source=synthetic", "model.vocab_size=320", "model.hidden_size=16", "model.num_layers=1",
        "model.num_attention_heads=2", "model.num_query_groups=1", f"model.seq_length={SEQ}", "moe.num_experts=2",
        "moe.top_k=1", "moe.expert_ffn_hidden_size=8", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.steps=2", "optim.warmup_steps=1", "logging.tensorboard=false", "checkpoint.save_at_end=false",
        "checkpoint.resume=never"]
"""A model that trains in well under a second, so a row the code wrongly accepts fails fast instead of hanging."""


def _one_error_line(capsys, entry: Callable[[list[str]], int], argv: list[str]) -> str:
    """Run an entry point; assert exit code 2, one non-empty stderr line and no traceback; return that line."""
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def run_pretrain(tmp_path, capsys, monkeypatch):
    """``pretrain.main`` in a fresh one-rank world; returns its one error line."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")

    def run(*overrides: str, recipe_path: Path = recipe) -> str:
        argv = ["--recipe", str(recipe_path), *TINY, f"logging.run_dir={tmp_path / 'run'}", *overrides]
        return _one_error_line(capsys, pretrain.main, argv)
    return run


# ---------------------------------------------------------------- 9. config: ranges declared next to each field

def _numeric_leaves(cls: type, prefix: str = "") -> list[tuple[str, bool, type, typing.Any]]:
    """(key path, is a list item, int/float, its Range or None) for every numeric field of the config tree,
    including the items of list fields and the non-null members of Optional/Union fields."""
    out = []
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        path = f"{prefix}{name}"
        pending = [(tp, False)]
        while pending:
            t, in_list = pending.pop()
            origin = typing.get_origin(t)
            if origin is Annotated:
                base, *meta = typing.get_args(t)
                ranges = [m for m in meta if isinstance(m, Range)]
                if base in (int, float):
                    out.append((path, in_list, base, ranges[0] if ranges else None))
                else:
                    pending.append((base, in_list))
            elif origin in (typing.Union, list):
                pending.extend((a, in_list or origin is list) for a in typing.get_args(t) if a is not type(None))
            elif t in (int, float):
                out.append((path, in_list, t, None))
            elif dataclasses.is_dataclass(t):  # a list of sections (data.paths): its first item's fields
                out += _numeric_leaves(t, f"{path}[0]." if in_list else f"{path}.")
    return out


LEAVES = _numeric_leaves(Config)


def test_every_numeric_field_declares_its_range():
    assert len(LEAVES) > 50  # the walk really reaches every section
    assert [path for path, _, _, rng in LEAVES if rng is None] == []


def _outside(base: type, rng: Range) -> list:
    """Values just outside each bound of ``rng`` (and nan/inf for floats)."""
    values = []
    if rng.ge is not None:
        values.append(rng.ge - 1 if base is int else rng.ge - 0.5)
    if rng.gt is not None:
        values.append(rng.gt)
    if rng.le is not None:
        values.append(rng.le + 1 if base is int else rng.le + 0.5)
    if rng.lt is not None:
        values.append(rng.lt)
    return values + (["nan", "-inf"] if base is float else [])


def _override(path: str, in_list: bool, value) -> str:
    """The override setting ``path`` to ``value``; a field of a list of sections (``data.paths[0].weight``) is set
    as a one-item list (``data.paths=[{weight: V}]``)."""
    if "[0]." in path:
        head, leaf = path.split("[0].")
        return f"{head}=[{{{leaf}: {value}}}]"
    return f"{path}=[{value}]" if in_list else f"{path}={value}"


GENERATED = [(_override(path, in_list, value), path, rng)
             for path, in_list, base, rng in LEAVES if rng is not None for value in _outside(base, rng)]


@pytest.mark.parametrize("override, path, rng", GENERATED, ids=[row[0] for row in GENERATED])
def test_each_declared_range_is_enforced(run_pretrain, override, path, rng):
    line = run_pretrain(override)
    assert line.startswith(f"moetron: config error: {path}") and f"is outside the allowed range {rng}" in line, line


@pytest.mark.parametrize("overrides, message", [
    # the examples, each a kind: key, value and allowed range on one line
    (["train.micro_batch_size=0"], "train.micro_batch_size: 0 is outside the allowed range [1, inf)"),
    (["train.global_batch_size=-8"], "train.global_batch_size: -8 is outside the allowed range [1, inf)"),
    (["optim.lr=-1e-4"], "optim.lr: -0.0001 is outside the allowed range [0, 10]"),
    (["optim.lr=nan"], "optim.lr: nan is outside the allowed range [0, 10]"),
    (["optim.lr=.inf"], "optim.lr: inf is outside the allowed range [0, 10]"),
    (["optim.lr=1e999"], "optim.lr: inf is outside the allowed range [0, 10]"),
    (["optim.beta1=1"], "optim.beta1: 1.0 is outside the allowed range [0, 1)"),
    (["optim.beta2=-0.5"], "optim.beta2: -0.5 is outside the allowed range [0, 1)"),
    (["moe.expert_ffn_hidden_size=0"], "moe.expert_ffn_hidden_size: 0 is outside the allowed range [1, inf)"),
    (["train.seed=-1"], "train.seed: -1 is outside the allowed range [0, inf)"),
    (["data.num_workers=-2"], "data.num_workers: -2 is outside the allowed range [0, inf)"),
    (["logging.log_interval=0"], "logging.log_interval: 0 is outside the allowed range [1, inf)"),
    (["checkpoint.interval=-1"], "checkpoint.interval: -1 is outside the allowed range [0, inf)"),
    (["train.eval_interval=-1"], "train.eval_interval: -1 is outside the allowed range [0, inf)"),
    (["model.rope_theta=0"], "model.rope_theta: 0.0 is outside the allowed range (0, inf)"),
    (["model.norm_eps=-1e-6"], "model.norm_eps: -1e-06 is outside the allowed range (0, inf)"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last: -1 is outside the allowed range [0, inf)"),
    (["optim.grad_clip=-1"], "optim.grad_clip: -1.0 is outside the allowed range [0, inf)"),
    # Optional and list fields carry the range of their items
    (["model.head_dim=0"], "model.head_dim: 0 is outside the allowed range [1, inf)"),
    (["moe.capacity_factor=-1"], "moe.capacity_factor: -1.0 is outside the allowed range (0, inf)"),
    (["moe.matryoshka.eval_k=[1,0]"], "moe.matryoshka.eval_k[1]: 0 is outside the allowed range [1, inf)"),
    # types: bools stay bools, integers stay integers and fit in 64 bits, huge numbers are not a crash
    (["optim.lr=true"], "optim.lr: expected a number, got True"),
    (["train.steps=1e3"], "train.steps: expected an integer, got '1e3'"),
    (["train.steps=99999999999999999999"], "train.steps: 99999999999999999999 does not fit in 64 bits"),
    (["optim.lr=" + "9" * 400], "is too large for a float"),
    (["moe.capacity_factor=many"], "moe.capacity_factor: expected a number or null, got 'many'"),
    # cross-field rules stay in validate()
    (["optim.lr=1e-4", "optim.min_lr=3e-4"], "optim.min_lr (0.0003) must be <= optim.lr (0.0001)"),
    (["moe.top_k=3"], "moe.top_k (3) must be in [1, moe.num_experts=2]"),
    (["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=2", "moe.matryoshka.k_max=1"],
     "moe.matryoshka needs 1 <= k_min (2) <= k_max (1)"),
    (["model.hidden_size=6"], "the head width (3: model.head_dim"),
    (["model.head_dim=8", "model.partial_rotary_factor=0.2"], "gives 1 rotary channels: they must be even and >= 2"),
    (["model.partial_rotary_factor=1.5"], "model.partial_rotary_factor: 1.5 is outside the allowed range (0, 1]"),
    (["model.qk_norm=layer"], "model.qk_norm: must be one of ['head', 'projection', 'none'], got 'layer'"),
    (["model.attention=mla", "model.qkv_bias=true"], "model.qkv_bias is used by model.attention=gqa only"),
    (["model.dense_layers=[1]"], "model.dense_layers: layer 1 is outside [0, 1)"),
    # attention: MLA fields and RoPE scaling (moe_core ModelConfig.validate_attention)
    (["model.attention=mha"], "model.attention: must be one of ['gqa', 'mla'], got 'mha'"),
    (["model.rope_scaling.type=linear"], "model.rope_scaling.type: must be one of ['default', 'yarn'], got 'linear'"),
    (["model.rope_scaling.factor=0.5"], "model.rope_scaling.factor: 0.5 is outside the allowed range [1, inf)"),
    (["model.rope_scaling.scale=2"], "unknown key 'model.rope_scaling.scale'"),
    (["model.attention=mla", "model.q_lora_rank=0"], "model.q_lora_rank: 0 is outside the allowed range [1, inf)"),
    (["model.attention=mla", "model.qk_rope_head_dim=3"], "model.qk_rope_head_dim (3) must be even"),
    (["model.kv_lora_rank=64"], "model.kv_lora_rank is used by model.attention=mla only"),
    (["model.attention=mla", "model.head_dim=32"], "model.head_dim is used by model.attention=gqa only"),
    (["moe.top_k=2", "moe.top1_gate=straight_through"], "moe.top1_gate=straight_through applies to top-1 models"),
    (["moe.score_function=relu"], "moe.score_function: must be one of ['softmax', 'sigmoid'], got 'relu'"),
    (["moe.num_groups=3"], "moe.num_groups (3) must divide moe.num_experts (2)"),
    (["moe.num_experts=8", "moe.num_groups=4", "moe.group_topk=1", "moe.top_k=4"],
     "hold only 2: raise moe.group_topk or lower k"),
    (["moe.routed_scaling_factor=0"], "moe.routed_scaling_factor: 0.0 is outside the allowed range (0, inf)"),
    (["model.rope_scaling.factor=4"], "model.rope_scaling: fields other than type are used with "
                                      "model.rope_scaling.type=yarn only"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.beta_fast=0.5"],
     "model.rope_scaling.beta_fast (0.5) must be >= model.rope_scaling.beta_slow (1.0)"),
    (["model.attention=mla", "model.num_attention_heads=3", "parallel.tp=2"],
     "parallel.tp (2) must divide model.num_attention_heads (3)"),
    (["train.global_batch_size=3"], "train.global_batch_size (3) must be divisible"),
    (["parallel.virtual_pp=2"], "parallel.virtual_pp > 1 needs parallel.pp > 1"),
    (["parallel.pp_layout=Et|L"], "parallel.pp_layout has 2 stages, parallel.pp * parallel.virtual_pp = 1*1 = 1"),
    (["parallel.pp_layout=EtXL"], "parallel.pp_layout: unknown symbol(s) 'X' in 'EtXL'"),
    (["parallel.pp_layout=tEL"], "parallel.pp_layout: stage 0 is 'tEL'; a stage is E? t* m* L? in this order"),
    (["parallel.pp_layout=Et*2L"], "parallel.pp_layout places 2 layers (t), model.num_layers is 1"),
    (["parallel.pp_layout=EtmL"], "parallel.pp_layout: the last stage must hold model.mtp_num_layers (0) MTP"),
    (["parallel.pp_layout=tL"], "parallel.pp_layout: E (embedding) must be in the first stage"),
    (["data.source=shards", "data.path=/no/such/shards"], "data.path '/no/such/shards' does not exist"),
    (["data.source=shards", f"data.path={REPO}", "data.valid_path=/no/such/valid"],
     "data.valid_path '/no/such/valid' does not exist"),
])
def test_bad_config_is_one_line(run_pretrain, overrides, message):
    line = run_pretrain(*overrides)
    assert line.startswith("moetron: config error: ") and message in line, line


@pytest.mark.parametrize("spelling", ["1e-4", "1E-4", "1.0e-4", "1e-04", "+1e-4", ".0001", "0.0001", "1.e-4"])
def test_every_float_spelling_is_a_number(tmp_path, spelling):
    cfg = load_config(None, [f"optim.min_lr={spelling}", f"moe.capacity_factor={spelling}"])
    assert cfg.optim.min_lr == cfg.moe.capacity_factor == 1e-4
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"optim:\n  lr: {spelling}\n  min_lr: 0\n")  # YAML 1.1 leaves most of these as strings
    assert load_config(recipe).optim.lr == 1e-4
    assert load_config(None, ["optim.lr=3.", "optim.min_lr=.5"]).optim.min_lr == 0.5


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 4, "is not a text file (byte 128 is not UTF-8)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text file (byte 0 is not UTF-8)"),
    (b"train:\n  steps: 3\x00\n", "is not valid YAML: unacceptable character #x0000"),
    (b"optim:\n  lr: [1, 2\n", "is not valid YAML: "),
    (b"optim:\n  lr: -1e-4\n", "optim.lr: -0.0001 is outside the allowed range [0, 10]"),
    (b"- train\n- optim\n", "must be a mapping of sections"),
    (b"[" * 1000, "is nested too deeply"),
    (b"fp8: 3\n", "fp8: expected a mapping of FP8Config fields, got 3"),
    (b"model:\n  vocab_size: 1024\nmodel:\n  hidden_size: 64\n", "key 'model' is given twice at line 3"),
    (b"optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice at line 3"),
    (b"", "is empty: a recipe is one complete YAML file"),
    (b"# only a comment\n", "is empty: a recipe is one complete YAML file"),
], ids=["random bytes", "png", "NUL byte", "unclosed list", "range in a recipe", "a list", "deep nesting",
        "section not a mapping", "repeated section", "repeated key", "empty file", "only comments"])
def test_bad_recipe_file_is_one_line(run_pretrain, tmp_path, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    line = run_pretrain(recipe_path=recipe)
    assert line.startswith("moetron: config error: ") and message in line, line


# ---------------------------------------------------------------- 10. data faults

@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs_shards")
    make_shards([write_jsonl(root / "docs.jsonl", corpus_docs(20_000))], root / "out")
    return root / "out"


@pytest.fixture
def shards(good_shards, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(good_shards, tmp_path / "shards"))


def _edit_index(path: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((path / "index.json").read_text())
    edit(index)
    (path / "index.json").write_text(json.dumps(index))


def _first_token_offset(tar: bytes) -> int:
    """Byte offset of the first token of the first sample (tar header 512 bytes, then the .npy header)."""
    assert tar[512:518] == b"\x93NUMPY"
    return 512 + 10 + int.from_bytes(tar[520:522], "little")


def _corrupt_payloads(path: Path) -> None:
    """Change one token id of every shard to another valid id: same size, tar and .npy headers intact."""
    for shard in read_index(path)["splits"]["train"]["shards"]:
        data = bytearray((path / shard["name"]).read_bytes())
        at = _first_token_offset(bytes(data))
        data[at] ^= 1  # 16-bit ids below 300: flipping the lowest bit keeps the id valid
        (path / shard["name"]).write_bytes(bytes(data))


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        *parents, last = key.split(".")
        node = index
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return edit


DATA_FAULTS = {
    "index without splits": (lambda p: _edit_index(p, lambda i: i.pop("splits")),
                             "index.json' is damaged or incomplete: 'splits' is missing"),
    "shard entry without sha256": (lambda p: _edit_index(p, lambda i: i["splits"]["train"]["shards"][0].pop("sha256")),
                                   "'splits.train.shards[0].sha256' is missing"),
    "index with a float dtype": (lambda p: _edit_index(p, _set("dtype", "float64")),
                                 "'dtype' is 'float64', not one of"),
    "index with a negative count": (lambda p: _edit_index(p, _set("splits.train.num_samples", -4)),
                                    "'splits.train.num_samples' is -4, not a non-negative integer"),
    "shard name outside the directory": (
        lambda p: _edit_index(p, _set("splits.train.shards.0.name", "../../etc/passwd")),
        "shard name '../../etc/passwd' is not a file name inside the directory"),
    "index that is not JSON": (lambda p: (p / "index.json").write_text("{'format': 1"), "is not valid JSON"),
    "index that is binary": (lambda p: (p / "index.json").write_bytes(b"\xff\xfe\x00\x01" * 64), "is not valid JSON"),
    "index that is a list": (lambda p: (p / "index.json").write_text("[]"), "has format None"),
    "no index (unfinished preprocess)": (lambda p: (p / "index.json").unlink(), "is not a finished preprocess output"),
    "missing shard": (lambda p: (p / "train-000001.tar").unlink(), "train-000001.tar' listed in index.json is missing"),
    "truncated shard": (lambda p: (p / "train-000000.tar").write_bytes((p / "train-000000.tar").read_bytes()[:5000]),
                        "train-000000.tar' has 5000 bytes"),
    "same-size corrupt shards": (_corrupt_payloads, "does not match its sha256 in index.json"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_data_fault_is_one_line(run_pretrain, shards, fault):
    damage, message = DATA_FAULTS[fault]
    damage(shards)
    line = run_pretrain("data.source=shards", f"data.path={shards}")
    assert line.startswith("moetron: data error: ") and message in line, line
    if fault == "same-size corrupt shards":
        assert "re-run `moetron preprocess` or restore the file" in line  # the fix, on the same line


def test_corrupt_shard_found_by_a_dataloader_worker_is_one_line(run_pretrain, shards):
    _corrupt_payloads(shards)
    line = run_pretrain("data.source=shards", f"data.path={shards}", "data.num_workers=2")
    assert line.startswith("moetron: data error: shard ") and "does not match its sha256" in line, line


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_size=256"], "model.vocab_size (256) is smaller than the tokenizer's vocabulary (300)"),
    ([f"model.seq_length={2 * SEQ}"], f"re-run preprocess with --seq-length {2 * SEQ}"),
])
def test_config_that_does_not_fit_the_shards_is_one_line(run_pretrain, good_shards, overrides, message):
    line = run_pretrain("data.source=shards", f"data.path={good_shards}", *overrides)
    assert line.startswith("moetron: config error: ") and message in line, line


# ---------------------------------------------------------------- 11. preprocess inputs

def _gzip_jsonl() -> bytes:
    return gzip.compress(b'{"text": "hello"}\n' * 200)


@pytest.mark.parametrize("name, content, extra, message", [
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8, [],
     "image.txt' is a binary file (NUL byte at offset 8), not text"),
    ("docs.jsonl", _gzip_jsonl(), [], "docs.jsonl' is a binary file"),
    ("utf16.txt", "some text in UTF-16".encode("utf-16"), [], "utf16.txt' is a binary file (NUL byte"),
    ("noise.md", bytes(range(128, 256)) * 64, [], "noise.md' is a binary file (8192 of its first 8192 bytes"),
    ("data.csv", b"a,b\n", [], "unsupported file type '.csv'"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--seq-length", "0"], "--seq-length must be in [1, 1,048,576], got 0"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--valid-fraction", "nan"], "--valid-fraction must be in [0, 1)"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--samples-per-shard", "0"], "--samples-per-shard must be in [1, 1,048,576], got 0"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--seq-length", "many"], "argument --seq-length: invalid int value"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--vocab-size", "100"], "--vocab-size 100 is too small"),
    ("ok.jsonl", b'{"text": "hello world"}\n', ["--tokenizer", "/no/tokenizer.json"], "nothing is downloaded"),
], ids=["png as .txt", "gzip as .jsonl", "utf-16", "non-utf-8 noise", "csv", "seq-length 0", "valid-fraction nan",
        "samples-per-shard 0", "seq-length not an int", "vocab too small", "missing tokenizer"])
def test_bad_preprocess_input_is_one_line(tmp_path, capsys, name, content, extra, message):
    (tmp_path / name).write_bytes(content)
    argv = ["--input", str(tmp_path / name), "--output", str(tmp_path / "out"), "--workers", "1", *extra]
    line = _one_error_line(capsys, preprocess.main, argv)
    assert re.match(r"moetron: (data|usage) error: ", line) and message in line, line


def test_output_that_is_a_file_and_missing_verify_dir_are_one_line(tmp_path, capsys):
    (tmp_path / "ok.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "out").write_text("a file")
    line = _one_error_line(capsys, preprocess.main, ["--input", str(tmp_path / "ok.jsonl"), "--output",
                                                     str(tmp_path / "out")])
    assert "--output '" in line and "is a file; pass a directory" in line
    line = _one_error_line(capsys, preprocess.main, ["--verify", str(tmp_path)])
    assert "is not a finished preprocess output" in line


def test_bad_records_are_skipped_and_counted_not_fatal(tmp_path, capsys):
    """A lone surrogate, nesting deeper than the JSON parser goes and an integer over Python's digit limit each
    cost one record (counted, warned about), never the run."""
    good = corpus_docs(3000)
    lines = [json.dumps({"text": d}) for d in good]
    lines.insert(1, '{"text": "broken \\ud800 surrogate"}')
    lines.insert(2, '{"text": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    lines.insert(3, '{"text": "x", "n": ' + "7" * 5000 + "}")
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    index = make_shards([src], tmp_path / "out")
    stats = index["inputs"]
    assert stats["documents"] == len(good)
    assert (stats["invalid_unicode_records"], stats["bad_json_lines"]) == (1, 2)
    err = capsys.readouterr().err
    assert "mixed.jsonl:2: 'text' is not Unicode text (lone surrogate '\\ud800' at character 7)" in err
    assert "mixed.jsonl:3: JSON this parser cannot read (RecursionError" in err
    assert "mixed.jsonl:4: JSON this parser cannot read (ValueError" in err


# ---------------------------------------------------------------- 12. checkpoints read from disk (issue 27)

def _train_tiny(rank, world_size, run_dir):
    pretrain.main(["--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY, "model.num_layers=2",
                   "checkpoint.save_at_end=true", f"logging.run_dir={run_dir}", "--quiet"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-layer TINY run (checkpoints/step_0000002), copied by each row before it is damaged."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    run_distributed(_train_tiny, 1, run)
    assert (run / "checkpoints" / "step_0000002" / "metadata.json").is_file()
    return run


def _tree(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (links not followed): a link's target, a file's bytes, or "dir"."""
    out: dict[str, object] = {}
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(parent) / name
            out[str(path.relative_to(root))] = (os.readlink(path) if path.is_symlink() else
                                                "dir" if path.is_dir() else path.read_bytes())
    return out


def _latest(text: bytes):
    return lambda root, outside: (root / "latest").write_bytes(text)


def _latest_link(target: str):
    def make(root, outside):
        (root / "latest").unlink()
        (root / "latest").symlink_to(target)
    return make


def _latest_dir(root, outside):
    (root / "latest").unlink()
    (root / "latest").mkdir()


def _step_link(root, outside):
    """`latest` names a step directory that is a link to another run's checkpoint outside the root."""
    shutil.copytree(root / "step_0000002", outside / "other_run_step")
    (root / "step_0000005").symlink_to(outside / "other_run_step")
    (root / "latest").write_text("step_0000005\n")


def _stale_tmp(root, outside):
    shutil.copytree(root / "step_0000002", root / "step_0000003.tmp")
    (root / "latest").write_text("step_0000003.tmp\n")


def _incomplete(root, outside):
    shutil.copytree(root / "step_0000002", root / "step_0000004")
    (root / "step_0000004" / "metadata.json").unlink()
    (root / "latest").write_text("step_0000004\n")


def _damage(name: str, how: str):
    def make(root, outside):
        path = root / "step_0000002" / name
        data = path.read_bytes()
        if how == "truncate":
            path.write_bytes(data[:len(data) // 2])
        elif how == "flip":
            path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
        elif how == "binary":
            path.write_bytes(b"\x00\xff\xfe" * 50)
        else:
            path.unlink()
    return make


C = "step_0000002"
HOSTILE = {  # how the checkpoint root is damaged -> what the one line says
    "latest-dotdot": (_latest(b"../../important\n"), "holds b'../../important\\n', not a checkpoint name"),
    "latest-absolute": (lambda root, outside: (root / "latest").write_text(str(outside / "important")),
                        "not a checkpoint name"),
    "latest-binary": (_latest(bytes(range(256))), "not a checkpoint name"),
    "latest-empty": (_latest(b""), "/latest' is empty"),
    "latest-dot": (_latest(b".\n"), "not a checkpoint name"),
    "latest-directory": (_latest_dir, "/latest' is a directory"),
    "latest-dangling-link": (_latest_link("/nonexistent/step_0000002"), "/latest' is a symbolic link"),
    "latest-link-outside": (_latest_link("../../important/thesis.txt"), "/latest' is a symbolic link"),
    "latest-stale-tmp": (_stale_tmp, "holds b'step_0000003.tmp\\n', not a checkpoint name"),
    "latest-missing-step": (_latest(b"step_0000009\n"), "names 'step_0000009', which does not exist"),
    "latest-step-is-link": (_step_link, "names 'step_0000005', which is a symbolic link, not a checkpoint directory"),
    "latest-incomplete-step": (_incomplete, "names 'step_0000004', which is not a complete checkpoint"),
    "distcp-truncated": (_damage("__0_0.distcp", "truncate"), f"{C}' is damaged: '__0_0.distcp' has "),
    "distcp-altered": (_damage("__0_0.distcp", "flip"), f"{C}' is damaged: '__0_0.distcp' has CRC-32 "),
    "distcp-missing": (_damage("__0_0.distcp", "delete"), f"{C}' is damaged: '__0_0.distcp' is missing"),
    "metadata-truncated": (_damage(".metadata", "truncate"), f"{C}' is damaged: '.metadata' has "),
    "manifest-binary": (_damage("moetron.json", "binary"), "moetron.json' is not a moetron checkpoint manifest"),
}


@pytest.fixture
def entry(capsys, monkeypatch):
    """``entry(main, argv)``: one entry point in a fresh one-rank world; returns its one error line."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)

    def run(main: Callable[[list[str]], int], argv: list[str]) -> str:
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        return _one_error_line(capsys, main, argv)
    return run


@pytest.mark.parametrize("fault", list(HOSTILE))
def test_hostile_checkpoint_is_one_line_and_touches_nothing(tiny_run, tmp_path, entry, fault):
    """Resume, `evaluate` and `convert to-hf` of a damaged checkpoint root: one line, exit 2, and not one file of
    the run, of its neighbours or outside it (`important/thesis.txt`) is changed."""
    from launcher.hf import convert
    from launcher.train import evaluate

    run, outside = tmp_path / "work" / "run", tmp_path / "work"
    shutil.copytree(tiny_run, run)
    (outside / "important").mkdir()
    (outside / "important" / "thesis.txt").write_text("four years of work")
    (run / "notes.txt").write_text("next to the checkpoint root")
    mutate, message = HOSTILE[fault]
    mutate(run / "checkpoints", outside)
    before = _tree(tmp_path)
    lines = [entry(pretrain.main, ["--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY, "model.num_layers=2",
                                   "train.steps=4", "checkpoint.resume=auto", f"logging.run_dir={run}"]),
             entry(evaluate.main, ["--checkpoint", str(run), "--batches", "1"]),
             entry(convert.main, ["to-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(tmp_path / "hf")])]
    for line in lines:
        assert line.startswith("moetron: checkpoint error: ") and message in line, line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("override, message", [
    ("model.num_layers=1", "(model.num_layers 2 -> 1)"),
    ("moe.mone.enabled=true", "(moe.mone.enabled False -> True)"),
    ("model.hidden_size=32", "model.hidden_size 16 -> 32"),
])
def test_evaluate_refuses_overrides_that_change_the_model(tiny_run, entry, override, message):
    from launcher.train import evaluate

    line = entry(evaluate.main, ["--checkpoint", str(tiny_run), "--batches", "1", override])
    assert line.startswith("moetron: config error: the overrides change the checkpoint's model ") and message in line


def test_evaluate_takes_settings_that_may_differ(tiny_run, tmp_path, monkeypatch, capsys):
    from launcher.train import evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    assert evaluate.main(["--checkpoint", str(run), "--batches", "2", "train.micro_batch_size=1",
                          "moe.dispatcher=alltoall", "--quiet"]) == 0
    assert "validation loss over 2 micro-batches of 1x" in capsys.readouterr().out


# ---------------------------------------------------------------- the same contract at the process boundary

def _cli(*argv: str) -> subprocess.CompletedProcess:
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_NUM_THREADS": "1"})


def _assert_one_line(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_binary_recipe(tmp_path):
    (tmp_path / "recipe.yaml").write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line(_cli("launcher.pretrain", "--recipe", str(tmp_path / "recipe.yaml")), "is not a text file")


def test_cli_range_violation():
    proc = _cli("launcher.pretrain", "--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), "optim.beta2=1.5")
    _assert_one_line(proc, "moetron: config error: optim.beta2: 1.5 is outside the allowed range [0, 1)")


def test_cli_corrupt_shard_during_training(shards, tmp_path):
    _corrupt_payloads(shards)
    proc = _cli("launcher.pretrain", "--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY,
                "data.source=shards", f"data.path={shards}", "data.num_workers=1", f"logging.run_dir={tmp_path}")
    _assert_one_line(proc, "does not match its sha256 in index.json")


def test_cli_binary_preprocess_input(tmp_path):
    (tmp_path / "a.txt").write_bytes(_gzip_jsonl())
    _assert_one_line(_cli("launcher.preprocess", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o")),
                     "a.txt' is a binary file")
