"""launcher/bench/matryoshka.py end to end at a toy budget: both corpora are made and preprocessed, every model
is evaluated at every k, and the gap table pairs M-MoE with the specialist of each k."""
import json

from launcher.bench import matryoshka as bench


def test_docstring_corpus_is_one_document_per_module(tmp_path):
    docs = [json.loads(line) for line in bench.make_docstring_corpus(tmp_path / "d.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == list(bench.DOC_MODULES)
    assert sum(len(d["text"]) for d in docs) > 300_000  # a corpus, not a handful of lines
    assert "json.dumps" in docs[bench.DOC_MODULES.index("json")]["text"]


def test_the_benchmark_prints_the_gap_table(tmp_path, capsys):
    out = tmp_path / "runs.json"
    assert bench.main(["--steps", "2", "--seeds", "7", "--specialists", "1", "2", "--corpora", "docstrings",
                       "--eval-batches", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| corpus | k=1: M-MoE - top-1 | k=2: M-MoE - top-2 |" in printed and "| docstrings | mmoe |" in printed
    run = json.loads(out.read_text())["runs"]["docstrings"][0]
    assert set(run) == {"top1", "top2", "mmoe"}
    assert all(len(model["valid_loss_at_k"]) == bench.K_MAX for model in run.values())
    gap = run["mmoe"]["valid_loss_at_k"]["2"] - run["top2"]["valid_loss_at_k"]["2"]
    assert f"{gap:+.4f}" in printed
