"""sge.checkpoint.load_model_weights on every format users hold, and its errors."""
import os
import pickle

import pytest
import torch

import models
from sge import SpatialGroupEnhance
from sge.checkpoint import CheckpointError, load_model_weights

NARROW = dict(channels=(8, 16, 32, 64), num_classes=7)


def _model(name="sge_resnet50", groups=4, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(NARROW, groups=groups) if models.is_sge(name) else dict(NARROW)
    model = models.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpatialGroupEnhance):
                m.weight.normal_()
                m.bias.normal_()
    return model


def _logits(model):
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32))


def test_released_pytorchinsight_format(tmp_path):
    src = _model(seed=1)
    # The released files: DataParallel prefixes and the SGE slot named `sge`.
    state = {"module." + k.replace(".se.", ".sge."): v for k, v in src.state_dict().items()}
    assert any(k.endswith("layer1.0.sge.weight") for k in state)
    path = tmp_path / "sge_resnet50.pth.tar"
    torch.save({"epoch": 100, "state_dict": state, "best_acc": 77.5, "acc": 77.4,
                "optimizer": {}}, path)
    dst = _model(seed=2)
    assert not torch.equal(_logits(dst), _logits(src))
    load_model_weights(dst, path)
    assert torch.equal(_logits(dst), _logits(src))


@pytest.mark.parametrize("fmt", ["plain", "ours", "compiled", "safetensors"])
def test_other_formats(tmp_path, fmt):
    src = _model("resnet50", seed=3)
    state = src.state_dict()
    path = tmp_path / "w.pt"
    if fmt == "plain":
        torch.save(state, path)
    elif fmt == "ours":
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "compiled":
        torch.save({"_orig_mod." + k: v for k, v in state.items()}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    dst = _model("resnet50", seed=4)
    load_model_weights(dst, path)
    assert torch.equal(_logits(dst), _logits(src))


def test_torchvision_resnet_weights_into_baseline(tmp_path):
    import torchvision
    tv = torchvision.models.resnet50(num_classes=7).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = models.create_model("resnet50", num_classes=7).eval()
    load_model_weights(ours, tmp_path / "tv.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_mismatches_name_the_model_and_keys(tmp_path):
    path = tmp_path / "g4.pt"
    torch.save(_model(groups=4).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(_model(groups=8), path)
    msg = str(err.value)
    assert "sge_resnet50 (groups=4)" in msg and "groups=8" in msg and "layer1.0.se.weight" in msg
    with pytest.raises(CheckpointError, match=r"(?s)looks like sge_resnet50.*missing keys"):
        load_model_weights(_model("sge_resnet101"), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(32\): layer1.0.se.weight"):
        load_model_weights(_model("resnet50"), path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _RunsCode()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_model_weights(_model(), path)
    assert not marker.exists()
    # The fault is real: unpickling without weights_only would have run the command.
    with open(path, "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "missing", "nan"])
def test_broken_files(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    model = _model()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:4096])
    elif kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "nan":
        state = model.state_dict()
        state["fc.weight"][0, 0] = float("nan")
        torch.save(state, path)
    with pytest.raises(CheckpointError, match=str(path).replace("\\", "\\\\")):
        load_model_weights(model, path)
