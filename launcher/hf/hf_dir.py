"""Write and read Hugging Face model directories. Weights are safetensors only: nothing is ever unpickled.

Written layout::

    config.json                         architecture (see mapping.hf_config)
    generation_config.json              eos/pad token ids when a tokenizer was given
    model-0000i-of-0000n.safetensors    weights, split at --max-shard-size (metadata {"format": "pt"})
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}
    tokenizer.json, tokenizer_config.json   when a tokenizer was given
    configuration_moetron.py, modeling_moetron.py   moetron flavour only (auto_map)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from launcher.data.format import TOKENIZER_NAME, read_index
from launcher.data.tokenizer import find_eos, load_tokenizer
from launcher.errors import MoetronError
from launcher.hf.mapping import export_dtype

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CUSTOM_CODE = ("configuration_moetron.py", "modeling_moetron.py")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class HFDirError(MoetronError):
    """A Hugging Face directory cannot be read or written; the message says what to do."""

    kind = "convert"


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise HFDirError(f"size {text!r} is not understood; use e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


# ---------------------------------------------------------------- writing

def _plan_shards(items: list[tuple[str, torch.Tensor]], max_bytes: int, dtype: torch.dtype) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (key, tensor) in enumerate(items):
        nbytes = tensor.numel() * export_dtype(key, dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_weights(out_dir: Path, items: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                  dtype: torch.dtype) -> dict:
    """Write the tensors as safetensors shards + index, each in ``mapping.export_dtype(key, dtype)`` (the export
    dtype, fp32 for what the model keeps in fp32); only one shard's copy is in memory at a time. Reports progress
    per shard written (launcher/progress.py)."""
    from launcher.progress import progress

    items = list(items)
    shards = _plan_shards(items, max_shard_bytes, dtype)
    weight_map, total = {}, 0
    with progress(len(items), "write weights", unit="tensor") as bar:
        for n, members in enumerate(shards, start=1):
            total += _write_shard(out_dir, f"model-{n:05d}-of-{len(shards):05d}.safetensors",
                                  [items[i] for i in members], dtype, weight_map)
            bar.update(len(members))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / INDEX_NAME, index)
    return index


def _write_shard(out_dir: Path, name: str, items: list[tuple[str, torch.Tensor]], dtype: torch.dtype,
                 weight_map: dict) -> int:
    """One safetensors shard; records its tensors in ``weight_map``; returns its bytes."""
    from safetensors.torch import save_file

    # copy=True: expert weights are views of one stacked tensor and safetensors refuses shared storage
    tensors = {key: tensor.detach().to(dtype=export_dtype(key, dtype), copy=True).contiguous()
               for key, tensor in items}
    save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    follow_umask(out_dir / name)
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def follow_umask(path: Path) -> None:
    """Give ``path`` the mode every other new file gets (0666 less the umask): safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_custom_code(out_dir: Path) -> None:
    here = Path(__file__).parent
    for name in CUSTOM_CODE:
        shutil.copyfile(here / name, out_dir / name)


@dataclass
class TokenizerInfo:
    path: Path
    eos_token: str
    eos_id: int
    vocab_size: int


def find_tokenizer(source: str, eos_token: Optional[str]) -> TokenizerInfo:
    """``source``: a tokenizer.json file, or a preprocess output directory (its index.json names the tokenizer)."""
    path = Path(source)
    if path.is_dir():
        index = read_index(path)
        tok_path = path / index["tokenizer"]["file"]
        eos_token = eos_token or index["tokenizer"]["eos_token"]
    else:
        tok_path = path
    tok = load_tokenizer(str(tok_path))  # DataError: a tokenizer is input data, as in preprocess
    name, eos_id = find_eos(tok, eos_token)
    return TokenizerInfo(tok_path, name, eos_id, tok.get_vocab_size())


def write_tokenizer(out_dir: Path, tok: TokenizerInfo, model_max_length: int) -> None:
    shutil.copyfile(tok.path, out_dir / TOKENIZER_NAME)
    write_json(out_dir / "tokenizer_config.json",
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "pad_token": tok.eos_token,
                "model_max_length": model_max_length, "clean_up_tokenization_spaces": False})


# ---------------------------------------------------------------- reading

def read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFDirError(f"'{path}' not found: pass a Hugging Face model directory (with config.json)")
    return json.loads(path.read_text())


def weight_reader(hf_dir: Path) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """(all tensor keys, read(key) -> tensor) over the directory's safetensors files, read lazily."""
    from safetensors import safe_open

    index_path, single = hf_dir / INDEX_NAME, hf_dir / SINGLE_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    elif single.is_file():
        with safe_open(str(single), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
    else:
        pickled = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
        hint = (f" (found {pickled}: pickle files can run code and are never read; re-save the model with "
                "save_pretrained(..., safe_serialization=True) in a trusted environment)") if pickled else ""
        raise HFDirError(f"no {INDEX_NAME} or {SINGLE_NAME} in '{hf_dir}'{hint}")
    handles: dict[str, object] = {}

    def read(key: str) -> torch.Tensor:
        if key not in weight_map:
            raise HFDirError(f"tensor '{key}' is missing from '{hf_dir}' (is this the architecture config.json "
                             "describes?)")
        file = weight_map[key]
        if file not in handles:
            handles[file] = safe_open(str(hf_dir / file), framework="pt")
        return handles[file].get_tensor(key)

    return set(weight_map), read
