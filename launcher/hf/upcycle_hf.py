"""`moetron convert upcycle`: a dense Hugging Face model (Qwen3, Llama) -> a moetron MoE checkpoint at step 0 whose
output equals the dense model's (launcher/upcycle.py says in what sense for each option; docs/convert.md).

    moetron convert upcycle --hf DENSE_DIR --output DIR --experts E --top-k K [--granularity G]
        [--mone KEEP_RATIO] [--matryoshka K_MIN:K_MAX] [--shared-expert] [--norm-topk-prob true|false]
        [--recipe R] [key.path=value ...]

This file holds its arguments; ``launcher/hf/convert.py`` runs it: the dense model is read like from-hf reads it
(its family, validated headers, one tensor at a time) into a dense moetron model in memory, upcycled with
:func:`launcher.upcycle.upcycle_state_dict`, and written as the trainer's step-0 checkpoint plus
``DIR/config.yaml``; the printed commands tokenize text with the model's own tokenizer and continue pretraining.
"""
from __future__ import annotations

import argparse
from typing import Any

from launcher.errors import ArgumentParser


def _k_range(text: str) -> tuple[int, int]:
    try:
        k_min, k_max = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K_MIN:K_MAX (two integers, e.g. 1:4)") from None
    return k_min, k_max


def add_parser(sub) -> ArgumentParser:
    up = sub.add_parser("upcycle", help="dense Hugging Face model (qwen3, llama) -> moetron MoE checkpoint")
    up.add_argument("--hf", required=True, help="dense Hugging Face model directory (config.json + safetensors)")
    up.add_argument("--output", required=True, help="checkpoint root to create (becomes checkpoint.dir)")
    up.add_argument("--experts", type=int, required=True, help="routed experts E per MoE layer")
    up.add_argument("--top-k", type=int, required=True, help="experts per token k (a multiple of --granularity)")
    up.add_argument("--granularity", type=int, default=1, help="G: each dense MLP is split into G experts of F/G")
    up.add_argument("--mone", type=float, metavar="KEEP_RATIO", help="upcycle into MoNE with this keep ratio")
    up.add_argument("--matryoshka", type=_k_range, metavar="K_MIN:K_MAX", help="upcycle into Matryoshka MoE")
    up.add_argument("--shared-expert", action="store_true", help="add the dense MLP as a shared expert")
    up.add_argument("--norm-topk-prob", choices=("true", "false"),
                    help="renormalise the top-k gates (default: true, false with --matryoshka)")
    up.add_argument("--recipe", help="YAML recipe with the training settings; the architecture comes from HF")
    up.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep=8 train.steps=1000")
    return up


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`launcher.upcycle.upcycle_state_dict` that ``args`` sets."""
    return dict(norm_topk_prob=None if args.norm_topk_prob is None else args.norm_topk_prob == "true",
                mone_keep_ratio=args.mone, matryoshka=args.matryoshka, shared_expert=args.shared_expert)
