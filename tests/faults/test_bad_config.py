"""Case 7 of issue 7: bad config and command-line input through ``train.py`` and ``eval.py``.

Each is one ``error:`` line naming the key (exit 1), raised before any expensive work: the
functions that would start it (process group, data, model) are replaced by tripwires here,
and no run directory appears.
"""
import pytest
import torch

import data
import eval as eval_cli
import train
from sge import builders, distributed
from tests.engine_utils import tiny_overrides
from tests.faults.tools import finish, launch, one_line_error, run_main

GPU = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(GPU, reason="checks what a machine without a GPU rejects")

# (YAML file text or None, overrides, what the error line must contain)
CASES = {
    "unknown_key_in_file": ("train:\n  epoch: 3\n", [],
                            "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    "unknown_override": (None, ["optim.lr_=0.2"], "unknown config key 'optim.lr_'"),
    "unknown_section": (None, ["modle.groups=8"], "unknown config key 'modle.groups'"),
    "wrong_type": (None, ["data.batch_size=lots"], "'data.batch_size' expects int, got str"),
    "wrong_type_in_file": ("seed: {a: 1}\n", [], "'seed' expects int, got dict"),
    "scalar_for_section": ("model: 5\n", [], "'model' must be a mapping"),
    "out_of_range": (None, ["optim.lr=-0.1"], "'optim.lr' must be >= 0.0"),
    "not_a_choice": (None, ["amp.dtype=fp8"], "'amp.dtype' must be one of"),
    "groups_not_dividing": (None, ["model.groups=3"], "'model.groups'=3 does not divide"),
    "yaml_syntax": ("model:\n  name: sge_resnet18\ntrain: [epochs: 3\n", [],
                    "YAML syntax error in {config} line 4"),
    "override_without_value": (None, ["train.epochs"], "must look like dotted.key=value"),
    "nccl_without_gpu": (None, ["dist.backend=nccl"], "'dist.backend'=nccl needs a CUDA GPU"),
    "dali_gpu_without_gpu": (None, ["data.backend=dali", "data.dali_device=gpu"],
                             "'data.dali_device'=gpu needs a CUDA GPU"),
    "sync_bn_on_cpu": (None, ["model.sync_bn=true"], "'model.sync_bn' needs CUDA GPUs"),
}
NEEDS_CPU = {"nccl_without_gpu", "dali_gpu_without_gpu", "sync_bn_on_cpu"}


@pytest.fixture
def tripwires(monkeypatch):
    """Fail loudly if an entry point gets past config validation."""
    def tripped(*args, **kwargs):
        raise AssertionError("expensive work started before the config error")
    for owner, name in ((distributed, "init"), (data, "build_loader"), (data, "resolve_root"),
                        (builders, "build_model")):
        monkeypatch.setattr(owner, name, tripped)


def _argv(case, folder, tmp_path, entry):
    text, overrides, _ = CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(text or "{}\n")
    argv = ["--config", config]
    if entry == "eval":
        argv += ["--checkpoint", tmp_path / "never_read.pt"]
    # The tiny run first, the faulty keys last (a later override wins).
    return argv + tiny_overrides(folder, tmp_path / "run") + overrides, config


@pytest.mark.parametrize("entry", ["train", "eval"])
@pytest.mark.parametrize("case", [pytest.param(c, marks=cpu_only) if c in NEEDS_CPU else c
                                  for c in CASES])
def test_bad_config_is_one_line_before_any_work(case, entry, folder, tmp_path, tripwires, capsys):
    argv, config = _argv(case, folder, tmp_path, entry)
    main = train.main if entry == "train" else eval_cli.main
    code, out, err = run_main(main, argv, capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    line = one_line_error(err)
    expected = CASES[case][2].format(config=config)
    assert expected in line, line
    assert not (tmp_path / "run").exists()  # no run directory, nothing written


def test_real_process_prints_one_line(folder, empty_yaml, tmp_path):
    proc = launch(["train.py", "--config", empty_yaml, *tiny_overrides(folder, tmp_path / "run"),
                   "train.epoch=3"])
    code, out, err = finish(proc, timeout=120)
    assert code == 1 and out == ""
    assert err.strip() == ("error: unknown config key 'train.epoch'; did you mean "
                           "'train.epochs'?")
    assert not (tmp_path / "run").exists()
