"""launcher/progress.py and its users: a bar that moves through one large file, lines instead of a bar off a
terminal, and convert reporting per tensor."""
import io

from launcher.data.inputs import InputStats, iter_documents
from launcher.progress import progress
from tests.launcher.data.helpers import CORPUS


class _Recorder:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_one_large_jsonl_advances_per_document_and_ends_at_its_size():
    bar = _Recorder()
    docs = list(iter_documents([CORPUS], "text", InputStats(), bar))
    assert len(bar.updates) == len(docs) + 1 > 50  # not one jump from 0% to 100%
    assert sum(bar.updates) == CORPUS.stat().st_size
    assert max(bar.updates) < CORPUS.stat().st_size / 5  # the largest document is 13%


def test_off_a_terminal_it_prints_periodic_lines():
    out = io.StringIO()
    with progress(1000, "tokenize", unit="B", interval_s=0.0, stream=out) as bar:
        bar.update(250)
        bar.update(750)
    lines = out.getvalue().splitlines()
    assert lines == ["tokenize: 25% (250/1k B)", "tokenize: 100% (1k/1k B)"]


def test_on_a_terminal_it_is_a_tqdm_bar():
    from tqdm import tqdm

    assert isinstance(progress(10, "x", stream=io.StringIO(), terminal=True), tqdm)


def test_convert_reports_weights_written(tmp_path, capsys):
    import torch

    from launcher.hf.safetensors_io import PlannedTensor, write_weights

    write_weights(tmp_path, [PlannedTensor(f"model.layers.{i}.input_layernorm.weight", (4,), torch.float32,
                                           lambda: torch.ones(4)) for i in range(3)], 1 << 20)
    assert capsys.readouterr().err.splitlines() == ["write weights: 100% (3/3 tensor)"]
