"""The non-weight files of Hugging Face model directories (config and tokenizer JSON, the moetron flavour's code);
weights are read and written by safetensors_io.py (safetensors only: nothing is ever unpickled).

Written layout::

    config.json                         architecture (the family's hf_config, launcher/hf/family.py)
    generation_config.json              eos/pad token ids when a tokenizer was given
    model-0000i-of-0000n.safetensors    weights, split at --max-shard-size (metadata {"format": "pt"})
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}
    tokenizer.json, tokenizer_config.json   when a tokenizer was given
    configuration_moetron.py, modeling_moetron.py   moetron flavour only (auto_map)
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.data.format import TOKENIZER_NAME, read_index
from launcher.data.tokenizer import find_eos, load_tokenizer
from launcher.hf.safetensors_io import HFDirError, inside, write_json

CUSTOM_CODE = ("configuration_moetron.py", "modeling_moetron.py")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise HFDirError(f"size {text!r} is not understood; use e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


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


def hf_tokenizer(hf_dir: Path) -> Optional[Path]:
    """The HF directory's tokenizer.json (a regular file inside it), or None when it has none."""
    if not (hf_dir / TOKENIZER_NAME).exists() and not (hf_dir / TOKENIZER_NAME).is_symlink():
        return None
    return inside(hf_dir, TOKENIZER_NAME, TOKENIZER_NAME)
