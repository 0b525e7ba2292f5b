"""`moetron` itself: one name per command (the module's), `--version`, one line for an unknown command, and the
run summary a person reads at the start and the end of `moetron pretrain`."""
import re

from launcher import cli
from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


def test_commands_map_one_to_one_to_modules():
    assert {name: module for name, (module, _) in cli.COMMANDS.items()} == \
        {name: f"launcher.{name}" for name in ("pretrain", "preprocess", "evaluate", "convert", "config", "torchrun")}


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"moetron \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'eval'" in err and "evaluate" in err


def _pretrain(rank, world, run_dir):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["pretrain", "--recipe", "recipes/smoke_cpu.yaml",
                       *_overrides(run_dir, 3, "logging.tensorboard=true", "data.source=synthetic")])
    return rc, out.getvalue()


def test_pretrain_prints_a_summary_before_and_after(tmp_path):
    rc, out = run_distributed(_pretrain, 1, str(tmp_path))[0]
    assert rc == 0, out
    block = out[out.index("[moetron] run"):out.index("step 0/3")]
    for pattern in (r"layout +1 rank\(s\) = TP 1 x PP 1 x DP 1; EP 1, expert-DP 1",
                    r"parameters +[\d,]+ total, [\d,]+ activated per token",
                    r"training +3 steps \(from scratch\), 256 tokens per step \(8 x 32\), fp32, AdamW replicated",
                    r"data +synthetic tokens", rf"run dir +{re.escape(str(tmp_path))}",
                    rf"tensorboard tensorboard --logdir {re.escape(str(tmp_path / 'tb'))}"):
        assert re.search(pattern, block), (pattern, block)
    assert re.search(r"\[moetron\] done: step 3, checkpoint \S+step_0000003; final loss \d+\.\d{4}, 768 tokens this run, "
                     r"wall \d:\d\d:\d\d", out), out


def test_config_lists_every_key_with_type_default_range_and_doc(capsys):
    from launcher.config import Config
    from launcher.config_doc import fields

    # data.source=synthetic: the recipe's shards need not exist (a fresh clone has not run preprocess)
    assert cli.main(["config", "--recipe", "recipes/smoke_cpu.yaml", "data.source=synthetic", "optim.beta1=0.8"]) == 0
    out = capsys.readouterr().out
    leaves = list(fields(Config()))
    assert len(leaves) > 60 and all(fd.doc for fd in leaves), [fd.key for fd in leaves if not fd.doc]
    for fd in leaves:
        assert f"\n{fd.key} = " in f"\n{out}", fd.key
    assert "optim.beta1 = 0.8   (float, default 0.9, range [0, 1))   # set by the recipe or an override" in out
    assert "moe.mone.score = post_act   (post_act | pre_act, default post_act)" in out


def test_config_rejects_a_bad_override_in_one_line(capsys):
    assert cli.main(["config", "optim.beta1=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.beta1: 2.0 is outside the allowed range [0, 1)" in err
