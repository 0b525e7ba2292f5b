"""Matryoshka MoE fidelity: one M-MoE model against specialists trained alone at each k, on two corpora.

    python -m launcher.bench.matryoshka [--steps 400] [--seeds 1234 1235] [--specialists 1 2 3 4]
                                        [--corpora reference docstrings] [--set moe.matryoshka.tau=0.5 ...] [--json FILE]

The paper's claim (arXiv 2509.26520): one Matryoshka model, k drawn per layer and step from [k_min, k_max], matches
a suite of specialists, each trained at one fixed k, at every k. For each seed and corpus this trains the
specialists (top-k models for every ``--specialists`` k) and the M-MoE model (k in [1, 4]) on the same batches in
the same order, evaluates every model at every k in [1, 4] on the same held-out batches, and prints:
- the gap table: M-MoE's validation loss minus the specialist's at that specialist's k, mean ± sample standard
  deviation over seeds (paired: same init of shared weights, same batches), per corpus;
- the full loss table (every model at every inference k), which also shows what a specialist does away from its
  trained k (the gate rule: ``MoEConfig.renormalise_gates``).
``--set`` overrides apply to every model (to compare candidate gate rules or training details side by side).

Corpora (held-out 20% of the documents; byte-level BPE of 512 tokens, 64-token samples):
- ``reference``: the shipped Python Language Reference (recipes/data/python_reference.jsonl);
- ``docstrings``: made here from the docstrings of a fixed list of standard-library modules (API documentation:
  a different register and vocabulary; deterministic for a given Python version).
Model: 4 layers, hidden 64, 16 experts of width 64, 8 x 64 tokens per step. A CPU budget: differences of
0.01-0.02 nats are within seed noise at this scale.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

from launcher.bench.variants import BASE as VARIANTS_BASE
from launcher.bench.variants import CORPUS, _mean_sd, add_run_arguments, make_shards, write_json
from launcher.errors import ArgumentParser

K_MAX = 4
BASE = [*VARIANTS_BASE, "model.num_layers=4", "moe.num_experts=16", "moe.expert_ffn_hidden_size=64"]
MMOE = ["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", f"moe.matryoshka.k_max={K_MAX}"]
DOC_MODULES = ("argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
               "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
               "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
               "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
               "lzma", "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
               "queue", "random", "re", "secrets", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics",
               "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
               "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree",
               "zipfile")


def make_docstring_corpus(path: Path) -> Path:
    """JSONL, one document per module of :data:`DOC_MODULES`: its docstring and those of its public members."""
    with path.open("w") as f:
        for name in DOC_MODULES:
            mod = importlib.import_module(name)
            parts = [inspect.getdoc(mod) or ""]
            for attr, obj in sorted(vars(mod).items()):
                if not attr.startswith("_") and getattr(obj, "__module__", None) == name:
                    doc = inspect.getdoc(obj)
                    parts += [f"{name}.{attr}\n{doc}"] if doc else []
            f.write(json.dumps({"id": name, "text": "\n\n".join(p for p in parts if p)}) + "\n")
    return path


def models(specialists: list[int]) -> dict[str, list[str]]:
    return {**{f"top{k}": [f"moe.top_k={k}"] for k in specialists}, "mmoe": MMOE}


def train_and_eval_at_every_k(overrides: list[str]) -> dict:
    """Train one model in this process (one rank, no checkpoint); its validation loss at every k in [1, K_MAX]."""
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import ParallelGroups

    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ParallelGroups.single())
    trainer.fit()
    return {"train_s": time.perf_counter() - t0,
            "valid_loss_at_k": {k: trainer.evaluate(k, cfg.train.eval_batches) for k in range(1, K_MAX + 1)}}


def format_tables(runs: dict[str, list[dict]], specialists: list[int]) -> str:
    """``runs[corpus][seed_index][model]``: the gap table, then every model at every k (mean ± sd over seeds)."""
    def at_k(corpus: str, model: str, k: int) -> list[float]:
        return [run[model]["valid_loss_at_k"][k] for run in runs[corpus]]

    lines = ["| corpus | " + " | ".join(f"k={k}: M-MoE - top-{k}" for k in specialists) + " |",
             "|---|" + "---|" * len(specialists)]
    for corpus in runs:
        gaps = [_mean_sd([m - s for m, s in zip(at_k(corpus, "mmoe", k), at_k(corpus, f"top{k}", k))], signed=True)
                for k in specialists]
        lines.append(f"| {corpus} | " + " | ".join(gaps) + " |")
    lines += ["", "| corpus | model | " + " | ".join(f"k={k}" for k in range(1, K_MAX + 1)) + " |",
              "|---|---|" + "---|" * K_MAX]
    for corpus in runs:
        for model in models(specialists):
            lines.append(f"| {corpus} | {model} | "
                         + " | ".join(_mean_sd(at_k(corpus, model, k)) for k in range(1, K_MAX + 1)) + " |")
    return "\n".join(lines)


def parse_args(argv):
    p = ArgumentParser(prog="python -m launcher.bench.matryoshka", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per model (8 sequences x 64 tokens)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235], help="train.seed of each repeat")
    p.add_argument("--specialists", type=int, nargs="+", default=[1, 2, 3, 4], choices=range(1, K_MAX + 1),
                   help="k of the specialists trained alone (each in [1, 4])")
    p.add_argument("--corpora", nargs="+", default=["reference", "docstrings"], choices=["reference", "docstrings"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every model (a candidate gate rule, aux settings, ...)")
    add_run_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="moetron-bench-") as tmp:
        for corpus in args.corpora:
            text = CORPUS if corpus == "reference" else make_docstring_corpus(Path(tmp) / "docstrings.jsonl")
            data = make_shards(Path(tmp) / f"data_{corpus}", text)
            runs[corpus] = []
            for seed in args.seeds:
                run = {}
                for name, extra in models(args.specialists).items():
                    run[name] = train_and_eval_at_every_k([
                        *BASE, f"data.path={data}", f"train.seed={seed}", f"train.steps={args.steps}",
                        f"train.eval_batches={args.eval_batches}", f"logging.run_dir={Path(tmp) / 'run'}",
                        f"logging.log_interval={args.steps}", *extra, *args.set])
                    losses = " ".join(f"{v:.4f}" for v in run[name]["valid_loss_at_k"].values())
                    print(f"[bench] {corpus} seed {seed} {name}: val loss at k=1..{K_MAX} {losses} "
                          f"({run[name]['train_s']:.0f} s)", flush=True)
                runs[corpus].append(run)
    print(f"\n{args.steps} steps x 8 x 64 tokens per model, seeds {args.seeds}, overrides {args.set or 'none'}, "
          f"validation on {args.eval_batches} x 8 x 64 held-out tokens, {time.perf_counter() - start:.0f} s\n")
    print(format_tables(runs, args.specialists))
    write_json(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
