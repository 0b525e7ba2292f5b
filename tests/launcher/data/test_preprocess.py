"""preprocess: text -> shards is lossless, reproducible across worker counts, and loud about bad input."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from launcher.data.build import build_loader
from launcher.data.format import read_index
from launcher.data.preprocess import main as preprocess_main
from tests.launcher.data.helpers import CORPUS, SEQ, corpus_docs, preprocess, shard_config, write_jsonl

REPO = Path(__file__).resolve().parents[3]


def _stream_from_loader(path: Path) -> np.ndarray:
    """Read every train sample in shard order (the valid loader over a directory with no valid split) and undo
    the one-token overlap: concat(inputs of each sample) + the very last label."""
    cfg = shard_config(path, valid_path=str(path))
    cfg.train.micro_batch_size = 1
    n = read_index(path)["splits"]["train"]["num_samples"]
    loader = build_loader(cfg, "valid", 0, 1)
    parts, last = [], None
    for _ in range(n):
        batch = next(loader)
        real = batch["loss_mask"][0].bool()
        parts.append(batch["tokens"][0][real].numpy())
        last = batch["labels"][0][real][-1:].numpy()
    return np.concatenate(parts + [last])


def test_round_trip_text_to_loader_gives_the_token_stream(shards, docs):
    index = read_index(shards)
    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    eos = index["tokenizer"]["eos_id"]
    expected = np.concatenate([np.array(tok.encode(d, add_special_tokens=False).ids + [eos]) for d in docs])
    assert index["splits"]["train"]["stream_tokens"] == len(expected)
    np.testing.assert_array_equal(_stream_from_loader(shards), expected)
    # the tokenizer trained by preprocess is lossless on the text itself
    assert tok.decode(tok.encode(docs[0], add_special_tokens=False).ids) == docs[0]
    # only the last sample may be short; it is padded with EOS and masked out of the loss
    sizes = [s["num_samples"] for s in index["splits"]["train"]["shards"]]
    assert sum(sizes) == -(-(len(expected) - 1) // SEQ) and all(s == 64 for s in sizes[:-1])


def test_parallel_workers_write_identical_shards(tmp_path, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs[:6])
    one = preprocess([src], tmp_path / "w1")
    two = preprocess([src], tmp_path / "w2", "--workers", "2")
    assert one["splits"] == two["splits"]  # same samples, token counts and sha256 per shard
    assert one["tokenizer"]["id"] == two["tokenizer"]["id"]


def test_given_tokenizer_and_valid_split(tmp_path, shards, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    index = preprocess([src], tmp_path / "out", "--tokenizer", str(shards / "tokenizer.json"),
                       "--valid-fraction", "0.25")
    assert index["tokenizer"]["id"] == read_index(shards)["tokenizer"]["id"] and not index["tokenizer"]["trained_here"]
    train, valid = index["splits"]["train"], index["splits"]["valid"]
    assert valid["num_documents"] == len(docs) // 4 and train["num_documents"] + valid["num_documents"] == len(docs)
    cfg = shard_config(tmp_path / "out")
    batch = next(build_loader(cfg, "valid", 0, 1))
    assert batch["tokens"].shape == (4, SEQ)


def test_bad_inputs_are_counted_not_silent(tmp_path, capsys, docs):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") + docs[0].encode())
    (tmp_path / "mixed.jsonl").write_text('{"text": "ok"}\nnot json\n{"body": "x"}\n{"text": "   "}\n')
    index = preprocess([tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "mixed.jsonl"],
                       tmp_path / "out")
    stats = index["inputs"]
    assert (stats["files"], stats["documents"], stats["empty_files"], stats["invalid_utf8_documents"],
            stats["bad_json_lines"], stats["records_without_text"], stats["empty_documents"]) == (3, 2, 1, 1, 1, 1, 1)
    err = capsys.readouterr().err
    assert "latin1.txt: not valid UTF-8" in err and "mixed.jsonl:2: not JSON" in err and "mixed.jsonl:3" in err


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/x.jsonl"], "does not exist"),
    (["--input", "{empty}"], "no text found"),
    (["--input", "{csv}"], "unsupported file type"),
    (["--input", "{jsonl}", "--tokenizer", "/nope/tokenizer.json"], "nothing is downloaded"),
    (["--input", "{jsonl}", "--vocab-size", "100"], "too small"),
])
def test_clear_errors(tmp_path, capsys, argv, message):
    files = {"empty": tmp_path / "e.txt", "csv": tmp_path / "a.csv", "jsonl": tmp_path / "a.jsonl"}
    files["empty"].write_text("")
    files["csv"].write_text("a,b\n")
    files["jsonl"].write_text('{"text": "hello world"}\n')
    argv = [a.format(**files) for a in argv] + ["--output", str(tmp_path / "out")]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parquet_input(tmp_path, capsys, docs):
    """With pyarrow a parquet text column gives the same shards as the same text in jsonl and a damaged file is a
    clear error; without pyarrow the error says to install it."""
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert preprocess_main(["--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        assert "pip install pyarrow" in err
        return
    assert "bad.parquet: not a readable parquet file" in err and "Traceback" not in err
    pq.write_table(pa.table({"text": docs[:5] + [None]}), tmp_path / "d.parquet", row_group_size=2)
    from_parquet = preprocess([tmp_path / "d.parquet"], tmp_path / "pq")
    from_jsonl = preprocess([write_jsonl(tmp_path / "d.jsonl", docs[:5])], tmp_path / "js")
    assert from_parquet["splits"] == from_jsonl["splits"] and from_parquet["inputs"]["records_without_text"] == 1


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_same_command_twice_is_up_to_date_anything_else_refuses_without_overwrite(tmp_path, capsys, docs):
    """Re-running the same command is a no-op that exits 0 (a quick start can be repeated); other settings or other
    inputs keep the refusal until --overwrite; shard files preprocess did not write, even with --overwrite."""
    src = write_jsonl(tmp_path / "d.jsonl", docs[:4])
    out = tmp_path / "out"
    first = preprocess([src], out)
    before = _mtimes(out)
    capsys.readouterr()
    assert preprocess([src], out, "--workers", "2") == first  # the worker count does not change the output
    assert f"up to date: {out} (4 documents" in capsys.readouterr().out.strip().splitlines()[-1]
    assert _mtimes(out) == before  # nothing rewritten
    for extra in [("--seq-length", "16"), ("--valid-fraction", "0.5")]:
        with pytest.raises(AssertionError):
            preprocess([src], out, *extra)
        assert "pass --overwrite to replace it" in capsys.readouterr().err
    write_jsonl(src, docs[:3])  # the input changed
    with pytest.raises(AssertionError):
        preprocess([src], out)
    write_jsonl(src, docs[:4])
    (out / "train-000099.tar").write_bytes(b"")  # a shard file it did not write: refused even with --overwrite
    for extra in [(), ("--overwrite",)]:
        with pytest.raises(AssertionError):
            preprocess([src], out, *extra)
        assert "train-000099.tar, which no preprocess index there accounts for" in capsys.readouterr().err
    assert (out / "train-000099.tar").exists()
    (out / "train-000099.tar").unlink()
    assert preprocess([src], out, "--overwrite")["splits"] == first["splits"]


def test_smoke_corpus_command_is_fast_and_complete(tmp_path):
    """The exact command the smoke recipe uses, on the shipped corpus, as a subprocess (its CLI entry point)."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "launcher.preprocess", "--input", str(CORPUS), "--output", str(out),
           "--vocab-size", "1024", "--seq-length", "128", "--samples-per-shard", "128", "--valid-fraction", "0.05"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 20
    assert "tokens/s" in proc.stdout
    index = read_index(out)
    n_docs = sum(1 for _ in CORPUS.open())
    assert index["inputs"]["documents"] == n_docs == len(corpus_docs(10 ** 9))
    assert index["tokenizer"]["vocab_size"] == 1024 and index["splits"]["valid"]["num_samples"] > 0
    assert preprocess_main(["--verify", str(out)]) == 0
