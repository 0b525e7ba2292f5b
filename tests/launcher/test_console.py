"""What moetron commands print (launcher/log.py, launcher/errors.py): ``--quiet`` leaves warnings, errors and the
result lines, ``--verbose`` adds debug lines, ranks other than 0 print errors only, and a bad recipe or input is
one ``moetron: <kind> error: <message>`` line with exit code 2 on every command."""
from __future__ import annotations

import logging
import re

import pytest
import yaml

from launcher import cli, log as console
from launcher.config import ConfigError
from tests.helpers.dist import free_port, run_distributed
from tests.launcher.hf.test_from_hf import _qwen3_config
from tests.launcher.test_bad_inputs import TINY, _one_error_line

ERROR_LINE = re.compile(r"^moetron: (usage|config|data|checkpoint|convert) error: \S")


@pytest.fixture(autouse=True)
def default_console(monkeypatch):
    """A one-rank world on a fresh port; the default verbosity again afterwards (other tests share the process)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    yield
    console.setup()


def _pretrain(capsys, tmp_path, *flags: str) -> tuple[str, str]:
    argv = ["pretrain", "--recipe", "recipes/smoke_cpu.yaml", *TINY, "checkpoint.save_at_end=true",
            f"logging.run_dir={tmp_path / 'run'}", *flags]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_default_prints_the_run_block_progress_and_done_line(capsys, tmp_path):
    out, err = _pretrain(capsys, tmp_path)
    assert out.startswith("[moetron] run\n  layout ") and re.search(r"^step +0/2 \| loss ", out, re.M), out
    assert re.search(r"^\[moetron\] done: step 2, checkpoint \S+step_0000002; ", out, re.M), out
    assert "saved " not in out and err == ""


def test_quiet_prints_only_the_result_line(capsys, tmp_path):
    out, err = _pretrain(capsys, tmp_path, "--quiet")
    assert re.fullmatch(r"\[moetron\] done: step 2, checkpoint \S+step_0000002; [^\n]+\n", out), out
    assert err == ""


def test_verbose_adds_debug_lines(capsys, tmp_path):
    out, _ = _pretrain(capsys, tmp_path, "--verbose")
    assert re.search(r"^\[moetron\] 1 rank\(s\), backend gloo, TP 1 x PP 1 x DP 1, EP 1; ", out, re.M), out
    assert re.search(r"^\[moetron\] saved \S+step_0000002; training stalled \d+\.\d{3} s for it$", out, re.M), out
    assert "[moetron] run\n" in out and "[moetron] done: step 2" in out


def test_quiet_and_verbose_exclude_each_other(capsys):
    line = _one_error_line(capsys, cli.main, ["pretrain", "--recipe", "r.yaml", "--quiet", "--verbose"])
    assert line == ("moetron: usage error: argument -v/--verbose: not allowed with argument -q/--quiet "
                    "(see moetron pretrain --help)")


def test_levels_by_rank(capsys, monkeypatch):
    log = logging.getLogger("launcher.test")
    for rank, printed in (("0", ("info", "result", "warning", "error")), ("3", ("error",))):
        monkeypatch.setenv("RANK", rank)
        log.debug("debug")
        log.info("info")
        log.log(console.RESULT, "result")
        log.warning("warning")
        log.error("error")
        out, err = capsys.readouterr()
        shown = [line.removeprefix("[moetron] ").removeprefix("moetron: warning: ").removeprefix("moetron: ")
                 for line in (out + err).splitlines()]
        assert shown == list(printed), (rank, out, err)
        assert console.shows(logging.INFO) == (rank == "0") and console.shows(logging.ERROR)


def test_third_party_loggers_keep_their_handling_and_filters(capsys, caplog):
    """The console handler is moetron's own: megatron-core's records still go to Python's root handling (here
    pytest's), minus the notices parallel/__init__.py filters, and never through the ``[moetron]`` format."""
    import parallel  # noqa: F401 - installs the filters on megatron-core's and torchao's loggers

    megatron = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    megatron.warning("MCore's async save is deprecated and will be removed")  # filtered: nobody can act on it
    megatron.warning("a notice that is not filtered")
    assert [r.getMessage() for r in caplog.records] == ["a notice that is not filtered"]
    assert capsys.readouterr() == ("", "")


def _pretrain_rank(rank, world_size, run_dir):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["pretrain", "--recipe", "recipes/smoke_cpu.yaml", *TINY, "train.global_batch_size=4",
                       f"logging.run_dir={run_dir}"])
    return rc, out.getvalue(), err.getvalue()


def test_ranks_other_than_0_are_silent(tmp_path):
    (rc0, out0, err0), (rc1, out1, err1) = run_distributed(_pretrain_rank, 2, str(tmp_path / "run"))
    assert rc0 == rc1 == 0
    assert "[moetron] run\n  layout      2 rank(s) = TP 1 x PP 1 x DP 2" in out0 and "[moetron] done: step 2" in out0
    assert (out1, err1) == ("", ""), (out1, err1)


# ---------------------------------------------------------------- one error line on every command

@pytest.fixture
def bad_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    return path


def test_bad_recipe_is_the_same_line_on_pretrain_and_convert(capsys, tmp_path, bad_recipe):
    """from-hf checks the HF directory first (config, weight headers), then the recipe: a complete HF directory."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    qwen = {k: v for k, v in _qwen3_config().items() if k != "model_type"}
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**qwen)).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar
    expected = f"moetron: config error: recipe '{bad_recipe}' is not valid YAML: key 'lr' is given twice at line 3"
    for argv in (["pretrain", "--recipe", str(bad_recipe)],
                 ["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "o"), "--recipe",
                  str(bad_recipe)]):
        line = _one_error_line(capsys, cli.main, argv)
        assert line.startswith(expected), (argv, line)


@pytest.mark.parametrize("argv, kind, message", [
    (["evaluate", "--checkpoint", "{tmp}/none"], "config", "no checkpoint found at '{tmp}/none'"),
    (["evaluate", "--checkpoint", "{tmp}", "--k", "0"], "usage", "argument --k: k values must be >= 1"),
    (["preprocess", "--input", "{tmp}/none.jsonl", "--output", "{tmp}/o"], "data", "{tmp}/none.jsonl"),
    (["preprocess", "--verify", "{tmp}"], "data", "is not a finished preprocess output"),
    (["convert", "to-hf", "--checkpoint", "{tmp}/none", "--output", "{tmp}/o"], "convert", "does not exist"),
    (["convert", "from-hf", "--hf", "{tmp}/none", "--output", "{tmp}/o"], "convert", "'{tmp}/none/config.json'"),
    (["config", "optim.beta1=2"], "config", "optim.beta1: 2.0 is outside the allowed range [0, 1)"),
    (["pretrain"], "usage", "the following arguments are required: --recipe (see moetron pretrain --help)"),
    (["train"], "usage", "unknown command 'train'"),
])
def test_every_command_reports_bad_input_in_one_line(capsys, tmp_path, argv, kind, message):
    line = _one_error_line(capsys, cli.main, [a.format(tmp=tmp_path) for a in argv])
    assert ERROR_LINE.match(line) and line.startswith(f"moetron: {kind} error: "), line
    assert message.format(tmp=tmp_path) in line, line


def test_an_error_under_quiet_still_prints(capsys, tmp_path):
    line = _one_error_line(capsys, cli.main, ["pretrain", "--quiet", "--recipe", str(tmp_path / "none.yaml")])
    assert line.startswith("moetron: config error: recipe ")


def test_config_errors_before_the_world_exists_print_on_rank_0_only(capsys, monkeypatch, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"lr": -1}}))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["pretrain", "--recipe", str(recipe)]) == 2
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert _one_error_line(capsys, cli.main, ["pretrain", "--recipe", str(recipe)]).startswith(
        "moetron: config error: optim.lr: -1")


def test_messages_stay_one_line():
    assert str(ConfigError("a\nb")) == "a\\nb"
