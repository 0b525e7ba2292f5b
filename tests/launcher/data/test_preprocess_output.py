"""Preprocess output safety (issue 27, launcher/data/output.py): a new output replaces the old one only when it is
complete, files preprocess did not write are never replaced or deleted, and an output directory holding shards no
index accounts for is refused. Every refusal is one line, exit code 2, and leaves every file as it was."""
from __future__ import annotations

from pathlib import Path

import pytest

from launcher.data import preprocess
from launcher.data.format import read_index
from tests.launcher.data.helpers import SEQ, corpus_docs, preprocess as make_shards, write_jsonl
from tests.launcher.test_bad_inputs import _one_error_line


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _failed(capsys, argv: list[str]) -> str:
    """Run preprocess on input that fails mid-way (warnings about skipped records may come first): exit code 2,
    one error line, no traceback; returns the error line."""
    code = preprocess.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " error: " in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(src), "--output", str(out), "--seq-length", str(SEQ), "--vocab-size", "300",
            "--samples-per-shard", "64", "--workers", "1", *extra]


@pytest.fixture
def src(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", corpus_docs(3000))


FOREIGN = {
    "a shard named like ours": ("train-000000.tar", b"someone else's shard"),
    "another tool's tar": ("web-000000.tar", b"tar bytes"),
    "a half-written shard": ("valid-000003.tar.tmp", b""),
    "a tokenizer without an index": ("tokenizer.json", b'{"model": "the user\'s"}'),
    "an index that is not ours": ("index.json", b'{"format": "other"}'),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("case", list(FOREIGN))
def test_files_preprocess_did_not_write_are_refused_and_kept(tmp_path, capsys, src, case, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    name, content = FOREIGN[case]
    (out / name).write_bytes(content)
    (out / "train-notes.tar.md").write_text("my notes")
    before = _snapshot(out)
    line = _one_error_line(capsys, preprocess.main, _argv(src, out, *(["--overwrite"] if overwrite else [])))
    assert line.startswith("moetron: data error: ") and f"holds {name}, which no preprocess index" in line, line
    assert _snapshot(out) == before


def test_user_files_survive_writes_and_overwrites(tmp_path, src, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-notes.tar.md").write_text("my notes")
    (out / "README").write_text("about this data")
    first = make_shards([src], out)
    second = make_shards([src], out, "--overwrite", "--samples-per-shard", "128")  # fewer, larger shards
    assert len(second["splits"]["train"]["shards"]) < len(first["splits"]["train"]["shards"])
    names = {p.name for p in out.iterdir()}
    shards = {s["name"] for split in ("train", "valid") for s in second["splits"][split]["shards"]}
    assert names == shards | {"index.json", "tokenizer.json", "train-notes.tar.md", "README"}  # old extras gone
    assert (out / "train-notes.tar.md").read_text() == "my notes" and (out / "README").read_text() == "about this data"


FAILING_INPUTS = {
    "binary input": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00" * 100), "is a binary file"),
    "no text": (lambda p: p.write_text('{"other": "x"}\n' * 10), "no text found"),
    "empty documents": (lambda p: p.write_text('{"text": ""}\n' * 10), "no text found"),
}


@pytest.mark.parametrize("case", list(FAILING_INPUTS))
def test_overwrite_with_a_failing_input_keeps_the_previous_output(tmp_path, capsys, src, case):
    out = tmp_path / "out"
    make_shards([src], out)
    (out / "train-notes.tar.md").write_text("my notes")
    before = _snapshot(out)
    damage, message = FAILING_INPUTS[case]
    damage(src)
    line = _failed(capsys, _argv(src, out, "--overwrite"))
    assert message in line, line
    assert _snapshot(out) == before  # the previous dataset, whole, and no staging directory left behind
    read_index(out)


def test_a_failed_first_run_leaves_no_output_directory(tmp_path, capsys, src):
    FAILING_INPUTS["no text"][0](src)
    out = tmp_path / "new" / "out"
    assert "no text found" in _failed(capsys, _argv(src, out))
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--workers", "-3"], "--workers must be in [1, 1,024], got -3"),
    (["--workers", "0"], "--workers must be in [1, 1,024], got 0"),
    (["--seq-length", "1000000000"], "--seq-length must be in [1, 1,048,576], got 1,000,000,000"),
    (["--seq-length", "1e9"], "argument --seq-length: invalid int value: '1e9'"),
    (["--samples-per-shard", "-1"], "--samples-per-shard must be in [1, 1,048,576], got -1"),
    (["--vocab-size", str(10 ** 12)], "--vocab-size must be in [1, 4,194,304], got 1,000,000,000,000"),
    (["--valid-fraction", "-0.1"], "--valid-fraction must be in [0, 1)"),
])
def test_option_out_of_range_is_one_line(tmp_path, capsys, src, extra, message):
    out = tmp_path / "out"
    line = _one_error_line(capsys, preprocess.main, _argv(src, out, *extra))
    assert message in line, line
    assert not out.exists()
