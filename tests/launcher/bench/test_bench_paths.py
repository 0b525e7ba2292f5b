"""Benchmarks that read the shipped corpus or recipes find them from any working directory (they once looked in
launcher/ after the package moved one level down)."""
import importlib

import pytest


@pytest.mark.parametrize("module", ["launcher.bench.data_loader", "launcher.bench.variants"])
def test_benchmark_finds_the_repository_files(module):
    bench = importlib.import_module(module)
    assert (bench.REPO / "recipes" / "data" / "python_reference.jsonl").is_file()
    assert (bench.REPO / "recipes" / "smoke_cpu.yaml").is_file()
