"""parallel/layout.py: which layers each virtual pipeline stage runs, default and megatron-core layout strings."""
import pytest

from parallel.layout import ChunkPlan, plan_stages, rank_chunks


def test_default_layout_splits_layers_evenly_over_virtual_stages():
    plans = plan_stages(8, 0, pp=2, virtual_pp=2)
    assert [p.layers for p in plans] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [(p.pre_process, p.post_process) for p in plans] == [(True, False), (False, False), (False, False),
                                                                (False, True)]
    # rank r runs virtual stages r, r + pp, ... (megatron-core's interleaving)
    assert [p.layers for p in rank_chunks(plans, 2, 0)] == [range(0, 2), range(4, 6)]
    assert [p.layers for p in rank_chunks(plans, 2, 1)] == [range(2, 4), range(6, 8)]


def test_megatron_layout_vocabulary_places_layers_unevenly():
    plans = plan_stages(7, 1, pp=2, virtual_pp=2, pp_layout="Et*3|(tt|)*1t|tmL")
    assert plans == [ChunkPlan(range(0, 3), True, False), ChunkPlan(range(3, 5), False, False),
                     ChunkPlan(range(5, 6), False, False), ChunkPlan(range(6, 7), False, True)]
    assert plan_stages(7, 1, 2, 2, ["Ettt", "tt", "t", "tmL"]) == plans  # one string per stage
    assert plan_stages(2, 0, 2, 1, "E|ttL") == [ChunkPlan(range(0, 0), True, False), ChunkPlan(range(0, 2), False,
                                                                                            True)]


@pytest.mark.parametrize("args,message", [
    ((6, 0, 2, 2, None), "parallel.pp * parallel.virtual_pp (2*2) must divide model.num_layers (6)"),
    ((4, 0, 1, 2, None), "parallel.virtual_pp > 1 needs parallel.pp > 1"),
    ((4, 0, 2, 1, "Ett|t|tL"), "parallel.pp_layout has 3 stages"),
    ((4, 0, 2, 1, "Ett|ttLL"), "stage 1 is 'ttLL'"),
    ((4, 1, 2, 1, "Ettm|ttL"), "the last stage must hold model.mtp_num_layers (1)"),
    ((4, 0, 2, 1, "Ett|Ett"), "E (embedding) must be in the first stage and L (head) in the last"),
])
def test_bad_layouts_name_the_key(args, message):
    with pytest.raises(ValueError, match=r"^parallel\.") as err:
        plan_stages(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_interleaving_needs_micro_batches_in_groups_of_pp():
    from launcher.config import ConfigError, load_config, validate

    cfg = load_config(None, ["data.source=synthetic", "model.num_layers=4", "parallel.pp=2", "parallel.virtual_pp=2",
                             "train.micro_batch_size=2", "train.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"micro-batches per step \(3 = .*divisible by parallel.pp \(2\)"):
        validate(cfg, world_size=2)
    validate(load_config(None, ["data.source=synthetic", "model.num_layers=4", "parallel.pp=2",
                                "parallel.virtual_pp=2", "train.micro_batch_size=2", "train.global_batch_size=8"]),
             world_size=2)


def test_interleaved_validation_batches_come_in_groups_of_pp():
    from launcher.config import ConfigError, load_config, validate

    cfg = load_config(None, ["data.source=synthetic", "model.num_layers=4", "parallel.pp=2", "parallel.virtual_pp=2",
                             "train.micro_batch_size=2", "train.eval_interval=5", "train.eval_batches=3"])
    with pytest.raises(ConfigError, match=r"train.eval_batches \(3\) / data-parallel size \(1\) must be a multiple"):
        validate(cfg, world_size=2)
