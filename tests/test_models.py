"""Model registry: the paper's parameter and multiply-add counts, forward+backward of every
model, timm registration and the attention slot."""
import pytest
import timm
import torch

import models
from sge import SpatialGroupEnhance
from sge.flops import conv_linear_macs, count_params, paper_macs

# DESIGN.md: exact parameter counts of the paper's models.
PAPER_PARAMS = {
    "resnet50": 25_557_032, "sge_resnet50": 25_559_080,
    "resnet101": 44_549_160, "sge_resnet101": 44_553_384,
}
# The paper's "GFLOPs" (multiply-adds, its counter's convention); within 1%.
PAPER_GMACS = {"resnet50": 4.122, "sge_resnet50": 4.127, "resnet101": 7.849,
               "sge_resnet101": 7.858, "se_resnet50": 4.130}
NARROW = dict(channels=(8, 16, 32, 64), num_classes=5)


@pytest.mark.parametrize("name,count", sorted(PAPER_PARAMS.items()))
def test_paper_parameter_counts(name, count):
    assert count_params(models.create_model(name)) == count


def test_se_resnet50_parameter_count():
    # The paper's table gives 28.09M for SE-ResNet50 (reduction 16).
    assert round(count_params(models.create_model("se_resnet50")) / 1e6, 2) == 28.09


@pytest.mark.parametrize("name", ["resnet50", "sge_resnet50"])
def test_multiply_adds_match_the_paper(name):
    model = models.create_model(name)
    assert paper_macs(model) / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.01)
    # DESIGN.md: conv/linear only is 4.089 G for both.
    assert conv_linear_macs(model) / 1e9 == pytest.approx(4.089, abs=5e-4)


def test_sge_pooling_is_what_separates_sge_from_plain_in_paper_macs():
    plain, sge = models.create_model("resnet50"), models.create_model("sge_resnet50")
    # One pooling op per element of every block output, over 3+4+6+3 blocks at 224 px.
    block_outputs = 3 * 256 * 56 ** 2 + 4 * 512 * 28 ** 2 + 6 * 1024 * 14 ** 2 + 3 * 2048 * 7 ** 2
    assert paper_macs(sge) - paper_macs(plain) == block_outputs
    # The fused SGE runs its block's add and ReLU itself: counted the same as the reference.
    reference = models.create_model("sge_resnet50", sge_impl="reference")
    assert paper_macs(reference) == paper_macs(sge)


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_forward_backward_all_params_get_grads(name):
    kwargs = dict(NARROW, groups=4) if models.is_sge(name) else dict(NARROW)
    torch.manual_seed(0)
    model = models.create_model(name, **kwargs)
    with torch.no_grad():  # gamma=0 at init gives no gradient path to nothing: randomize it
        for m in model.modules():
            if isinstance(m, SpatialGroupEnhance):
                m.weight.normal_()
    # 64 px: at 32 px layer4 is 1x1, where SGE's normalized map is 0 and gamma gets no grad.
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_paper_defaults():
    model = models.create_model("sge_resnet50")
    block = model.layer2[0]
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)  # ResNet v1.5
    assert all(b.bn3.weight.eq(1).all() for stage in (model.layer1, model.layer4) for b in stage)
    assert isinstance(block.se, SpatialGroupEnhance) and block.se.groups == 64
    assert models.create_model("sge_resnet18").layer1[0].se.channels == 64  # after bn2
    assert models.create_model("resnet50").layer1[0].se is None


def test_timm_registry_sge_and_se_only():
    model = timm.create_model("sge_resnet50", groups=32, **NARROW)
    assert model.layer1[0].se.groups == 32
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bilinear" and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert "se_resnet101" in timm.list_models("se_resnet*")
    # Importing us must not replace timm's own resnet50 (which zero-inits the last BN).
    assert timm.create_model("resnet50").layer1[0].bn3.weight.eq(0).all()


def test_timm_feature_extraction():
    feats = timm.create_model("sge_resnet18", features_only=True, groups=4, **NARROW)
    shapes = [f.shape for f in feats(torch.randn(1, 3, 64, 64))]
    assert shapes == [(1, 64, 32, 32), (1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4),
                      (1, 64, 2, 2)]


def test_unknown_model_and_bad_groups():
    with pytest.raises(ValueError, match="did you mean 'sge_resnet50'"):
        models.create_model("sge_resnet5")
    with pytest.raises(ValueError, match=r"groups=48.*channels=256"):
        models.create_model("sge_resnet50", groups=48)
