"""`moetron convert`: moetron checkpoints <-> Hugging Face model directories (docs/convert.md).

    moetron convert to-hf --checkpoint RUN/checkpoints --output hf_model [--tokenizer data/shards]
    moetron convert from-hf --hf HF_DIR --output ckpts [--recipe recipes/x.yaml] [key.path=value ...]
    moetron convert upcycle --hf DENSE_HF_DIR --output ckpts --experts E --top-k K [...] (launcher/hf/upcycle_hf.py)

Families (config.json model_type): launcher/hf/families/ (docs/convert.md has the table). to-hf loads a checkpoint saved
at ANY TP/PP/EP layout in one process (a 1-rank world: megatron-core's dist_checkpointing reshards it to
tp=pp=ep=1) and writes config.json, safetensors shards + index, the tokenizer and generation config, as the first
family that represents the model (or --model-type); MoNE / Matryoshka / expert-bias GQA models with moetron's own
modeling code (trust_remote_code=True). from-hf writes a step-0 moetron checkpoint (weights, zero AdamW moments)
plus ``<output>/config.yaml``: `moetron pretrain --recipe <output>/config.yaml` continues pretraining from it.
Both validate everything before reading a tensor, stream tensor by tensor, and write into a temporary sibling of
the output that is renamed when complete: a failure leaves the output as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from launcher import env, log as console
from launcher.errors import ArgumentParser, MoetronError, report
from launcher.train import checkpoint
from launcher.config import (Config, apply_override, config_from_dict, read_recipe, save_resolved,
                             to_dict)
from launcher.hf import families, hf_dir, transfer, upcycle_hf
from launcher.hf.safetensors_io import HFWeights, read_config, write_json, write_weights
from launcher.upcycle import upcycle_config, upcycle_state_dict
from parallel.model import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
READ_BATCH_BYTES = 64 << 20
"""to-hf reads the checkpoint in batches of about this many bytes, or of the largest HF tensor when that is larger:
few reads, memory bounded by about twice the largest tensor."""
log = logging.getLogger(__name__)


class ConvertError(MoetronError):
    """The conversion cannot be done as asked; the message says why and what to do."""

    kind = "convert"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="moetron convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="moetron checkpoint -> Hugging Face model directory")
    to.add_argument("--checkpoint", required=True, help="a step_XXXXXXX directory or a checkpoint root (latest)")
    to.add_argument("--output", required=True, help="new (or empty) output directory")
    to.add_argument("--tokenizer", help="tokenizer.json, or the preprocess output directory that names it")
    to.add_argument("--eos-token", help="EOS token text (default: from the preprocess index, else auto-detected)")
    to.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    to.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    to.add_argument("--model-type", choices=sorted(families.FAMILIES),
                    help="Hugging Face family to write (default: the first that represents the model)")
    fr = sub.add_parser("from-hf", help="Hugging Face directory (launcher/hf/families) -> moetron checkpoint")
    fr.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    fr.add_argument("--output", required=True, help="checkpoint root to create (becomes checkpoint.dir)")
    fr.add_argument("--recipe", help="YAML recipe with the training settings; the architecture comes from HF")
    fr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep=8 train.steps=1000")
    for direction in (to, fr, upcycle_hf.add_parser(sub)):
        console.add_verbosity_flags(direction)
    return p.parse_args(argv)


# ---------------------------------------------------------------- one-process world

@contextlib.contextmanager
def single_process_groups() -> Iterator:
    """A 1-rank gloo world with tp=pp=ep=1 (reuses an existing 1-rank default group)."""
    if env.world_size() > 1:
        raise ConvertError(f"convert runs in one process, but WORLD_SIZE={env.world_size()}; run it without "
                           "torchrun/srun -n (a single task reads any checkpoint layout)")
    with env.parallel_session(1, 1, 1, "gloo") as groups:
        yield groups


def one_rank_config(raw: dict, keep_data: bool) -> Config:
    """``raw`` at tp=pp=ep=1 in fp32 without TensorBoard. ``keep_data=False`` also drops the data section, which
    to-hf does not need (the shards need not exist where the checkpoint is converted)."""
    raw = copy.deepcopy(raw)
    raw["parallel"] = dict(raw.get("parallel", {}), tp=1, pp=1, ep=1, sequence_parallel=False, backend="gloo")
    raw.setdefault("train", {})["precision"] = "fp32"
    raw.setdefault("logging", {})["tensorboard"] = False
    if not keep_data:
        raw["data"] = {"source": "synthetic"}
    return config_from_dict(raw)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write into, renamed to ``out`` (new or empty) when the block ends
    without an error, removed otherwise: ``out`` is never left half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover, if any
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- to-hf

def resolve_checkpoint(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ConvertError(f"checkpoint '{root}' does not exist")
    if (root / "common.pt").is_file() or (root / "metadata.json").is_file():
        return root
    latest = checkpoint.find_latest(root)
    if latest is None:
        raise ConvertError(f"'{root}' holds no complete checkpoint (no step_XXXXXXX directory); pass a step "
                           "directory or the run's checkpoint root")
    return latest


def checkpoint_config(ckpt_dir: Path) -> Config:
    """The config stored in a checkpoint, at tp=pp=ep=1."""
    common = checkpoint.load_common(ckpt_dir)
    if "config" not in common:
        raise ConvertError(f"'{ckpt_dir}' has no config in its common state; was it written by moetron?")
    return one_rank_config(common["config"], keep_data=False)


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"output '{out}' exists and is not an empty directory; pass a new directory")


def export_hf(cfg: Config, source: transfer.ModelTensors | transfer.CheckpointTensors, out: Path,
              tokenizer: hf_dir.TokenizerInfo | None, dtype: torch.dtype, max_shard_bytes: int,
              model_type: str | None = None) -> dict:
    """Write the HF directory of the model whose tensors ``source`` holds (tensor by tensor, through a staging
    directory); returns the written config.json dict. ``model_type``: the family to write (None: the first that
    represents ``cfg``)."""
    _check_empty(out)
    family = families.for_export(cfg, model_type)
    tokens = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id} if tokenizer else {}
    config = dict(family.hf_config(cfg, tokens), dtype=str(dtype).removeprefix("torch."))
    plan = transfer.targets(family, cfg, source.state)
    items = transfer.export_plan(family, plan, source.fetcher(plan), dtype)
    with staging(out) as tmp:
        write_weights(tmp, items, max_shard_bytes)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", dict(tokens))
        if family.custom_code(cfg):
            hf_dir.copy_custom_code(tmp)
        if tokenizer:
            hf_dir.write_tokenizer(tmp, tokenizer, cfg.model.seq_length)
    return config


def to_hf(args: argparse.Namespace) -> None:
    _check_empty(Path(args.output))
    ckpt_dir = resolve_checkpoint(args.checkpoint)
    tokenizer = hf_dir.find_tokenizer(args.tokenizer, args.eos_token) if args.tokenizer else None
    max_shard = hf_dir.parse_size(args.max_shard_size)
    with single_process_groups() as groups:  # megatron-core's checkpoint reads need the (1-rank) process group
        cfg = checkpoint_config(ckpt_dir)
        meta = build_model(cfg, groups, torch.device("meta"))
        if tokenizer and tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConvertError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                               f"{cfg.model.vocab_size}; pass the tokenizer the model was trained with")
        if cfg.moe.capacity_factor is not None:
            log.warning(f"the model trained with moe.capacity_factor={cfg.moe.capacity_factor}; the exported model "
                        "is dropless (docs/convert.md)")
        source = transfer.CheckpointTensors(ckpt_dir, meta, READ_BATCH_BYTES)
        config = export_hf(cfg, source, Path(args.output), tokenizer, DTYPES[args.dtype], max_shard,
                           args.model_type)
    log.log(console.RESULT, f"{ckpt_dir} -> {args.output} ({config['architectures'][0]}, "
            f"{sum(p.numel() for p in meta.parameters()):,} parameters, {args.dtype})")


# ---------------------------------------------------------------- from-hf

def _recipe_raw(recipe: str | None, overrides: list[str]) -> dict:
    raw = read_recipe(recipe) if recipe is not None else {}
    for ov in overrides:
        apply_override(raw, ov)
    return raw


@dataclass
class HFSource:
    """An HF directory checked against its family and the recipe, no tensor read yet (:func:`read_hf`)."""

    path: Path
    hf: dict
    family: families.Family
    cfg: Config
    tokenizer: Path | None
    weights: HFWeights
    note: str
    """What the family's ``match_weights`` says about parts of config.json the weights lack or that it skips."""

    def plan(self, groups) -> tuple[list, dict]:
        """The transfer plan and where each HF key is read from, every tensor's shape and dtype checked (a meta
        model of the config; ``groups``: :func:`single_process_groups`'); warns once about untied embeddings and
        once with the family's note."""
        meta = build_model(one_rank_config(to_dict(self.cfg), keep_data=False), groups, torch.device("meta"))
        plan = transfer.targets(self.family, self.cfg, meta.state_dict())
        source = transfer.check_hf_tensors(self.family, self.hf, plan, self.weights)
        if self.hf.get("tie_word_embeddings"):
            log.warning(f"{self.path}: tie_word_embeddings is true; lm_head.weight is a copy of the embedding "
                        "(untied: the same logits now, trained separately from here on; to-hf writes it untied)")
        if self.note:
            log.warning(self.note)
        return plan, source


def read_hf(args: argparse.Namespace) -> HFSource:
    """``args.hf``'s config.json, family, tokenizer and validated headers, merged with ``args.recipe`` /
    ``args.overrides`` into the config whose ``checkpoint.dir`` is ``args.output`` (new or empty)."""
    hf_path, root = Path(args.hf), Path(args.output)
    _check_empty(root)  # never write into a run directory that holds anything (its config, its checkpoints)
    hf = read_config(hf_path)
    family = families.for_hf(hf)
    recipe = _recipe_raw(args.recipe, args.overrides)  # a bad recipe is named before the weights are looked at
    weights = HFWeights(hf_path)  # every header validated; no tensor read yet
    hf, note = family.match_weights(hf, weights.info)
    raw = family.merge_into_raw(recipe, hf)
    raw.setdefault("checkpoint", {})["dir"] = str(root)
    raw.setdefault("logging", {}).setdefault("run_dir", str(root))  # the continued run lives beside its checkpoints
    cfg = config_from_dict(raw)
    tokenizer = hf_dir.hf_tokenizer(hf_path)
    transfer.check_counts(cfg, weights)
    return HFSource(hf_path, hf, family, cfg, tokenizer, weights, note)


def write_step0(cfg: Config, groups, fill) -> tuple[Path, Path]:
    """The trainer's own step-0 checkpoint of ``cfg`` (whose ``checkpoint.dir`` is new or empty) with the weights
    ``fill(model)`` puts in, plus ``<checkpoint.dir>/config.yaml``; returns (checkpoint, recipe) paths. The
    checkpoint has exactly the structure (RNG and data-loader state included) that `moetron pretrain` resumes
    from, at any layout."""
    from launcher.train.trainer import Trainer

    root = Path(cfg.checkpoint.dir)
    with staging(root) as tmp:
        trainer = Trainer(one_rank_config(_staged(to_dict(cfg), root, tmp), keep_data=True), groups)
        fill(trainer.model)
        saved = root / trainer.save().name
        recipe = save_resolved(cfg, tmp).name
    return saved, root / recipe


def from_hf(args: argparse.Namespace) -> None:
    src = read_hf(args)
    with single_process_groups() as groups:
        plan, source = src.plan(groups)
        saved, recipe = write_step0(src.cfg, groups, lambda model: transfer.load_hf(model, plan, source, src.weights))
    log.log(console.RESULT, f"{src.path} -> {saved}")
    log.log(console.RESULT, "\n".join(follow_up_commands(src.cfg, src.path, src.tokenizer, recipe, Path(args.output))))


def upcycle(args: argparse.Namespace) -> None:
    """`convert upcycle` (launcher/hf/upcycle_hf.py): the arguments are checked against the dense model's config
    before a tensor is read."""
    kwargs = upcycle_hf.options(args)
    src = read_hf(args)
    upcycle_config(src.cfg, args.experts, args.top_k, args.granularity, **kwargs)
    with single_process_groups() as groups:
        plan, source = src.plan(groups)
        dense = build_model(one_rank_config(to_dict(src.cfg), keep_data=False), groups, torch.device("cpu"))
        transfer.load_hf(dense, plan, source, src.weights)
        cfg, state = upcycle_state_dict(src.cfg, dense.state_dict(), args.experts, args.top_k, args.granularity,
                                        **kwargs)
        del dense
        saved, recipe = write_step0(cfg, groups, lambda model: model.load_state_dict(state, strict=True))
    log.log(console.RESULT, f"{src.path} -> {saved} (upcycled: {args.experts} experts, top-{args.top_k}, "
                            f"granularity {args.granularity})")
    log.log(console.RESULT, "\n".join(follow_up_commands(cfg, src.path, src.tokenizer, recipe, Path(args.output))))


def _staged(raw: dict, root: Path, tmp: Path) -> dict:
    """``raw`` with every directory the trainer writes (checkpoints, a run directory at ``root``) in ``tmp``."""
    raw["checkpoint"]["dir"] = str(tmp)
    if Path(raw["logging"]["run_dir"]) == root:
        raw["logging"]["run_dir"] = str(tmp)
    return raw


def follow_up_commands(cfg: Config, hf_path: Path, tokenizer: Path | None, recipe: Path, root: Path) -> list[str]:
    """What to run next to continue pretraining the converted model: tokenize text with the model's own tokenizer
    (unless the recipe already names shards), then pretrain from the step-0 checkpoint on those shards."""
    if cfg.data.source == "shards":
        return ["continue pretraining on the recipe's shards:", f"  moetron pretrain --recipe {recipe}"]
    data = Path("data") / root.name
    if tokenizer is None:
        return [f"{hf_path} has no tokenizer.json: tokenize your text with the tokenizer this model was "
                f"trained with (moetron preprocess --tokenizer PATH --output {data} "
                f"--seq-length {cfg.model.seq_length}), then:",
                f"  moetron pretrain --recipe {recipe} data.source=shards data.path={data}"]
    return ["continue pretraining on your text with the model's own tokenizer:",
            f"  moetron preprocess --input YOUR_TEXT.jsonl --output {data} --tokenizer {hf_path / 'tokenizer.json'} "
            f"--seq-length {cfg.model.seq_length} --valid-fraction 0.05",
            f"  moetron pretrain --recipe {recipe} data.source=shards data.path={data}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console.setup(args.quiet, args.verbose)
    try:
        {"to-hf": to_hf, "from-hf": from_hf, "upcycle": upcycle}[args.direction](args)
    except MoetronError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
