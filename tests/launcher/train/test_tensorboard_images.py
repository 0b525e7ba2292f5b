"""Expert-load pictures and the config text in TensorBoard, read back from the event files: a layers x experts
heatmap per log step, per layer an experts x log steps heatmap of the run so far, one fixed colour scale."""
import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from launcher.train import heatmap
from launcher.train.step_reduce import LayerStepStats
from launcher.train.metrics import MetricsWriter
from tests.helpers.dist import run_distributed

E = 8
FAIR = 1 / E


def _read(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def _colour(share: float) -> tuple:
    """The colour the fixed scale gives a load share: computed here from the scale's definition (log2 of the share
    over 1/E, -2..2 onto the map, LEVELS steps), not from the image code's position helper."""
    t = (np.clip(np.log2(share * E) if share > 0 else -np.inf, -2, 2) + 2) / 4
    return tuple(heatmap.colorize(np.round(t * (heatmap.LEVELS - 1)) / (heatmap.LEVELS - 1)).tolist())


def _stats(shares_LE: np.ndarray, tokens: int = 4096) -> dict[int, LayerStepStats]:
    layer_ids = [1, 3, 5][:len(shares_LE)]
    return {idx: LayerStepStats(tokens_per_expert_E=torch.tensor(np.rint(row * tokens)), dropped_slots=0.0,
                                aux_loss=0.0, z_loss=0.0, k=2.0, mone_kept_fraction=None)
            for idx, row in zip(layer_ids, shares_LE)}


def _cells(image: np.ndarray, grid: heatmap.Grid) -> list[list[tuple]]:
    return [[tuple(image[grid.cell_center(r, c)].tolist()) for c in range(grid.cols)] for r in range(grid.rows)]


def test_colour_scale_is_fixed_and_centred_on_the_fair_share():
    white, darkest_red, darkest_blue = heatmap.colorize(np.array([0.5, 1.0, 0.0])).tolist()
    assert white == [247, 247, 247] and darkest_red == [103, 0, 31] and darkest_blue == [5, 48, 97]
    pos = heatmap.load_position(np.array([0.0, FAIR / 4, FAIR, 2 * FAIR, 4 * FAIR, 0.9, np.nan]), E)
    assert pos[:6].tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0] and np.isnan(pos[6])
    assert [label for _, label in heatmap.load_colorbar_ticks(E)] == ["<=3.12%", "6.25%", "12.5%", "25%", ">=50%"]


def test_load_history_keeps_the_whole_run_in_bounded_columns():
    hist = heatmap.LoadHistory(capacity=4)
    for step in range(0, 50, 10):  # 5 log steps into 4 columns: pairs merge, each column now holds 2 log steps
        hist.append(step, np.full((1, 2), step, dtype=np.float64))
    assert hist.steps_per_column == 2 and hist.last_steps() == [10, 30, 40]
    assert hist.shares_LEC()[0, 0].tolist() == [5.0, 25.0, 40.0]
    hist.append(50, np.full((1, 2), 50.0))  # fills the last column up to 2 log steps
    assert hist.last_steps() == [10, 30, 50] and hist.shares_LEC()[0, 0].tolist() == [5.0, 25.0, 45.0]
    assert hist.columns_created == 5
    with pytest.raises(ValueError, match="even number"):
        heatmap.LoadHistory(capacity=3)


def _hot_shares(step: int) -> np.ndarray:
    """3 layers x 8 experts: layer 1 balanced; layer 3 sends 4/E to expert (step % E) and nothing to the next
    expert; layer 5 routes nothing (no data)."""
    shares = np.full((3, E), FAIR)
    hot = step % E
    shares[1] = (1 - 4 * FAIR) / (E - 2)
    shares[1, hot], shares[1, (hot + 1) % E] = 4 * FAIR, 0.0
    shares[2] = 0.0
    return shares


def test_layers_by_experts_and_history_pictures_read_back(tmp_path):
    steps = [0, 1, 2]
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in steps:
            writer.expert_load(_stats(_hot_shares(step)), step)
    acc = _read(tmp_path / "tb")
    assert set(acc.Tags()["images"]) == {"train_moe/expert_load", "train_moe/expert_load_over_steps/layer01",
                                         "train_moe/expert_load_over_steps/layer03",
                                         "train_moe/expert_load_over_steps/layer05"}
    assert acc.Tags()["histograms"] == []  # the pictures replace the per-layer ridge plots

    # layers x experts, one per log step
    events = acc.Images("train_moe/expert_load")
    assert [e.step for e in events] == steps
    image = _decode(events[-1])
    grid = heatmap.grid_for(3, E, ["layer 1", "layer 3", "layer 5"], "step 2: share of each layer's routed tokens",
                            ["rows: MoE layers, columns: experts", "white = 1/E = 12.5%, red = hot, blue = cold"])
    assert image.shape == (grid.height, grid.width, 3) == (events[-1].height, events[-1].width, 3)
    assert (grid.cell_h, grid.cell_w) == (32, 32)  # 3 rows x 8 columns fill 96 x 256 px of cells
    cells = _cells(image, grid)
    rest = (1 - 4 * FAIR) / (E - 2)
    assert cells[0] == [_colour(FAIR)] * E  # balanced layer: white everywhere
    expected = [_colour(rest)] * E
    expected[2], expected[3] = _colour(4 * FAIR), _colour(0.0)  # step 2: expert 2 hot, expert 3 idle
    assert cells[1] == expected
    assert cells[1][2] == (103, 0, 31) and cells[1][3] == (5, 48, 97)  # darkest red / blue: obvious at a glance
    assert cells[2] == [heatmap.NO_DATA_RGB] * E

    # per layer experts x log steps: the hot expert moves one row down per step
    history = acc.Images("train_moe/expert_load_over_steps/layer03")
    assert [e.step for e in history] == [0, 1, 2]  # refreshed while the columns double (1, 2, then at close)
    image = _decode(history[-1])
    grid = heatmap.grid_for(E, len(steps), [f"expert {e}" for e in range(E)],
                            "layer 3: share of routed tokens per expert",
                            ["rows: experts, columns: steps", "white = 1/E = 12.5%, red = hot, blue = cold"])
    assert image.shape == (grid.height, grid.width, 3)
    cells = _cells(image, grid)
    for col, step in enumerate(steps):
        column = [cells[e][col] for e in range(E)]
        assert column[step] == _colour(4 * FAIR) and column[step + 1] == _colour(0.0), step
    assert _cells(_decode(acc.Images("train_moe/expert_load_over_steps/layer01")[-1]), grid) == \
        [[_colour(FAIR)] * len(steps)] * E


def test_history_is_refreshed_sparsely_and_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(MetricsWriter, "HISTORY_COLUMNS", 8)
    monkeypatch.setattr(MetricsWriter, "HISTORY_REFRESH_COLUMNS", 4)
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in range(0, 300, 10):  # 30 log steps
            writer.expert_load(_stats(_hot_shares(step)[:1]), step)
    acc = _read(tmp_path / "tb")
    assert len(acc.Images("train_moe/expert_load")) == 30
    history = acc.Images("train_moe/expert_load_over_steps/layer01")
    # a picture when the new columns since the last one reach min(4, columns shown then): at 1, 2, 4, 8 columns
    # (steps 0-70); the 9th merges pairs (a column = 2 log steps) and new columns start at steps 80, 100, 120, 140:
    # picture; merge again at 160 (4 log steps a column), new ones at 160, 200, 240, 280: picture; and at close,
    # as step 290 joined the last column
    assert [e.step for e in history] == [0, 10, 30, 70, 140, 280, 290]
    last = _decode(history[-1])
    grid = heatmap.grid_for(E, 8, [f"expert {e}" for e in range(E)], "layer 1: share of routed tokens per expert",
                            ["rows: experts, columns: steps (mean of 4 log steps)",
                             "white = 1/E = 12.5%, red = hot, blue = cold"])
    assert last.shape == (grid.height, grid.width, 3)  # 8 columns of 4 log steps: the whole run, bounded
    assert _cells(last, grid) == [[_colour(FAIR)] * 8] * E


def test_config_text_is_the_resolved_yaml(tmp_path):
    from launcher.config import load_config, to_dict

    cfg = load_config(None, ["moe.num_experts=16", f"logging.run_dir={tmp_path}"])
    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.config_text(to_dict(cfg), 0)
    acc = _read(tmp_path / "tb")
    (event,) = acc.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml\n") and text.endswith("\n```")
    assert yaml.safe_load(text[len("```yaml\n"):-len("\n```")]) == to_dict(cfg)


def _train(rank, world, run_dir, extra):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize
    from tests.launcher.train.test_train_resume import _overrides

    cfg = load_config(None, _overrides(run_dir, 3, "checkpoint.interval=0", "checkpoint.save_at_end=false", *extra))
    Trainer(cfg, initialize(1, 1, 1)).fit()


@pytest.mark.parametrize("extra,varying", [
    ((), set()),
    (("moe.capacity_factor=1.0", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=2"),
     {"dropped_slots", "k"}),
], ids=["dropless-fixed-k", "capacity-matryoshka"])
def test_training_run_logs_pictures_config_and_no_constant_scalars(tmp_path, extra, varying):
    run_distributed(_train, 1, str(tmp_path), extra)
    acc = _read(tmp_path / "tb")
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert images == {"train_moe/expert_load", "train_moe/expert_load_over_steps/layer00",
                      "train_moe/expert_load_over_steps/layer01"}
    assert [e.step for e in acc.Images("train_moe/expert_load")] == [0, 1, 2]
    per_layer = {t.split("/")[-1] for t in scalars if t.startswith("train_moe/layer00/")}
    assert per_layer == {"load_max_over_mean", "aux_loss", "z_loss"} | varying
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    logged = yaml.safe_load(text[len("```yaml\n"):-len("\n```")])
    assert logged["moe"]["num_experts"] == 4 and logged["model"]["head_dim"] == 32 // 4  # the resolved config
    assert logged["checkpoint"]["dir"] == str(tmp_path / "checkpoints") and logged["optim"]["distributed"] is False
    # TensorBoard orders card groups by tag (digits aside, plain character order, "/" first): train comes first
    groups = {t.split("/")[0] for t in scalars | images}
    assert not any(ch.isdigit() for g in groups for ch in g)
    assert min(groups, key=lambda g: g + "/") == "train"
