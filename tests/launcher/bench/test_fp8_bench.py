"""launcher/bench/fp8.py is GPU-only: on a machine without an FP8 GPU it prints one line and exits 2."""
from launcher.bench import fp8 as bench


def test_refuses_without_fp8_gpu_in_one_line(capsys):
    assert bench.main(["--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetron: usage error: ") and err.count("\n") == 1 and "train.precision=bf16" in err
