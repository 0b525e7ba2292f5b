"""launcher/bench/recompute.py end to end on a small model: one printed row per option; the measured activation peak
of selective and full is below none's, each option's within 10% of the dry-run estimate."""
from launcher.bench import recompute

SMALL = ["--layers", "2", "--hidden", "128", "--ffn", "128", "--experts", "4", "--top-k", "2", "--vocab", "256",
         "--seq", "64", "--batch", "2", "--steps", "1"]


def test_recompute_bench_measures_less_activation_memory(capsys):
    assert recompute.main(SMALL) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == list(recompute.OPTIONS)
    overrides = recompute.model_overrides(recompute.parse_args(SMALL))
    rows = {o: recompute.measure(o, overrides, steps=1) for o in ("none", "selective", "full")}
    assert rows["full"]["activations"] < rows["selective"]["activations"] < rows["none"]["activations"]
    for option, row in rows.items():
        assert abs(row["estimate"] - row["activations"]) <= 0.1 * row["activations"], (option, row)
