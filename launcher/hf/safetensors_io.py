"""Streaming, validating access to the safetensors weights and config.json of a Hugging Face model directory.

Reading (:class:`HFWeights`): everything is checked BEFORE any tensor data is read, and every problem is one
:class:`HFDirError` line: the weight files are ``model.safetensors`` or the shards ``model.safetensors.index.json``
names; each named file must be a regular file inside the directory once symlinks are resolved (no ``..``, no
absolute paths, no directories, nothing missing); each file's header (8-byte little-endian length + UTF-8 JSON) must
fit the file, name known dtypes and non-negative int shapes, and its data offsets must tile the data region exactly
(a header that lies about lengths/offsets, or a truncated file, is refused). Tensors are then read one at a time
with plain reads at those validated offsets, so memory holds one tensor, not the model (``safetensors.safe_open``
memory-maps the whole file, and every page it touches stays in the resident set until the file is closed).

Writing (:func:`write_weights`): shards of at most ``max_shard_bytes`` (a larger tensor gets its own shard) plus
the index; each shard's header is computed from the planned shapes and dtypes first, then every tensor is produced,
written and dropped in turn: peak memory is the largest tensor, not a shard. The files are standard safetensors
(``{"format": "pt"}`` metadata, 8-byte aligned header) that ``safe_open`` and transformers read (the tests read
them back with ``safe_open``); the safetensors library itself writes a file from tensors all in memory at once.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from launcher.errors import MoetronError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_JSON_BYTES = 64 << 20
"""Largest config.json / index / safetensors header accepted (real ones are kilobytes to a few megabytes)."""

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""What a weight may be stored as to be converted exactly (fp8 checkpoints must be dequantized first)."""


class HFDirError(MoetronError):
    """A Hugging Face directory cannot be read or written; the message says what to do."""

    kind = "convert"


# ---------------------------------------------------------------- paths and JSON

def inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` as a regular file that stays inside ``root`` once symlinks are resolved."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise HFDirError(f"{what}: {name!r} is not a file name")
    base = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(base):
        raise HFDirError(f"{what}: '{name}' points outside '{root}' (to '{path}'); refusing to read it")
    if not path.exists():
        raise HFDirError(f"{what}: '{name}' does not exist in '{root}'")
    if not path.is_file():
        raise HFDirError(f"{what}: '{name}' in '{root}' is not a regular file")
    return path


def read_json(path: Path, what: str) -> Any:
    """A UTF-8 JSON file of at most :data:`MAX_JSON_BYTES`; NaN/Infinity are refused."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise HFDirError(f"{what} '{path}' is {size:,} bytes (more than {MAX_JSON_BYTES:,}); it is not a model file")
    return _parse_json(path.read_bytes(), f"{what} '{path}'")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise HFDirError(f"{what} is not UTF-8 text (byte {e.start}); is it the right file?") from None
    except (ValueError, RecursionError) as e:
        raise HFDirError(f"{what} is not valid JSON: {str(e).splitlines()[0]}") from None


def read_config(hf_dir: Path) -> dict:
    """config.json of ``hf_dir`` as a dict (sizes are checked by the family, launcher/hf/family.py)."""
    if not (hf_dir / "config.json").exists():
        raise HFDirError(f"'{hf_dir / 'config.json'}' not found: pass a Hugging Face model directory (with "
                         "config.json)")
    config = read_json(inside(hf_dir, "config.json", "config.json"), "config.json")
    if not isinstance(config, dict):
        raise HFDirError(f"config.json in '{hf_dir}' holds a {type(config).__name__}, not a JSON object")
    return config


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Where its bytes start in the file."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(path: Path) -> dict[str, TensorInfo]:
    """The validated header of one safetensors file (module docstring)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFDirError(f"'{path}' is {size} bytes: too short for a safetensors file (truncated?)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_JSON_BYTES, size - 8):
            raise HFDirError(f"'{path}': the safetensors header claims {length:,} bytes but the file has "
                             f"{size - 8:,} after the length field (truncated or not safetensors)")
        header = _parse_json(f.read(length), f"the safetensors header of '{path}'")
    if not isinstance(header, dict):
        raise HFDirError(f"'{path}': the safetensors header is not a JSON object")
    data_bytes, spans, out = size - 8 - length, [], {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        info, span = _entry(path, key, entry, 8 + length)
        out[key] = info
        spans.append((*span, key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise HFDirError(f"'{path}': tensor '{key}' starts at byte {begin} of the data but the previous one "
                             f"ends at {end} (overlapping or gapped offsets: the header lies)")
        end = stop
    if end != data_bytes:
        state = "truncated: the header needs" if end > data_bytes else "the header accounts for"
        raise HFDirError(f"'{path}' is {state} {end:,} data bytes and the file holds {data_bytes:,}")
    return out


def _entry(path: Path, key: str, entry: Any, data_start: int) -> tuple[TensorInfo, tuple[int, int]]:
    where = f"'{path}': tensor '{key}'"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise HFDirError(f"{where}: the header entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise HFDirError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise HFDirError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HFDirError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise HFDirError(f"{where}: data_offsets span {offsets[1] - offsets[0]:,} bytes but {dtype} {shape} needs "
                         f"{nbytes:,} (the header lies)")
    return TensorInfo(path, DTYPES[dtype], tuple(shape), data_start + offsets[0]), (offsets[0], offsets[1])


def _weight_files(hf_dir: Path) -> tuple[dict[str, Path], Optional[dict[str, str]]]:
    """{file name: resolved path} of the weight files, and the index's weight map (None for one file)."""
    if (hf_dir / INDEX_NAME).exists():
        index = read_json(inside(hf_dir, INDEX_NAME, INDEX_NAME), INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFDirError(f"{INDEX_NAME} in '{hf_dir}' has no weight_map of tensor name -> file name")
        return {name: inside(hf_dir, name, f"{INDEX_NAME} entry") for name in set(weight_map.values())}, weight_map
    if (hf_dir / SINGLE_NAME).exists():
        return {SINGLE_NAME: inside(hf_dir, SINGLE_NAME, SINGLE_NAME)}, None
    pickled = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    hint = (f" (found {pickled}: pickle files can run code and are never read; re-save the model with "
            "save_pretrained(..., safe_serialization=True) in a trusted environment)") if pickled else ""
    raise HFDirError(f"no {INDEX_NAME} or {SINGLE_NAME} in '{hf_dir}'{hint}")


class HFWeights:
    """The tensors of a Hugging Face directory, validated on construction (module docstring); ``info`` maps each
    tensor name to its file, dtype and shape, and :meth:`read` returns one tensor (CPU, its stored dtype)."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        files, weight_map = _weight_files(hf_dir)
        headers = {name: _header(path) for name, path in sorted(files.items())}
        if weight_map is None:
            self.info = headers[SINGLE_NAME]
        else:
            self.info = {}
            for key, name in weight_map.items():
                if key not in headers[name]:
                    raise HFDirError(f"{INDEX_NAME} says tensor '{key}' is in '{name}', but that file does not hold "
                                     "it (damaged or mixed-up shards)")
                self.info[key] = headers[name][key]

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (CPU, its stored dtype), read from its validated offsets with plain file reads: memory
        holds this tensor only (a memory map would keep every page read in the process's resident set)."""
        info = self.info[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
        if got != info.nbytes:
            raise HFDirError(f"'{info.file}' changed while it was read (tensor '{key}' got {got} of {info.nbytes} "
                             "bytes)")
        return out


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class PlannedTensor:
    """One tensor to write: its name, shape and dtype are known before ``produce()`` makes its values."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plan_shards(items: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _write_shard(path: Path, items: list[PlannedTensor], bar) -> int:
    """One safetensors file, tensor by tensor; returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.key] = {"dtype": NAMES[item.dtype], "shape": list(item.shape),
                            "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for item in items:
            tensor = item.produce().detach().to(dtype=item.dtype).contiguous()
            if tuple(tensor.shape) != item.shape:
                raise RuntimeError(f"{item.key}: produced shape {tuple(tensor.shape)}, planned {item.shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            bar.update(1)
    return offset


def write_weights(out_dir: Path, items: list[PlannedTensor], max_shard_bytes: int) -> dict:
    """Write ``items`` as ``model-0000i-of-0000n.safetensors`` shards + the index; returns the index. Reports
    progress per tensor written (launcher/progress.py)."""
    from launcher.progress import progress

    shards = _plan_shards(items, max_shard_bytes)
    weight_map, total = {}, 0
    with progress(len(items), "write weights", unit="tensor") as bar:
        for n, members in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(out_dir / name, members, bar)
            weight_map.update(dict.fromkeys((item.key for item in members), name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / INDEX_NAME, index)
    return index


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
