"""The FiLM EfficientNet-B0 against independent implementations built with the same random weights
(efficientnet-pytorch's B0 = LITE's source, timm's tf_efficientnet_b0), FiLM placement, and weight files."""

from __future__ import annotations

import pytest
import torch

from lite_train.model import FILM_CHANNELS, LiteModel, identity_film, load_backbone_weights
from lite_train.model.efficientnet import FilmEfficientNet, same_padding

SIZE = 32  # every stride-2 conv input is even at 32 px, so TF's dynamic "same" padding equals the static one


def _randomise(net: torch.nn.Module, forward, generator: torch.Generator) -> None:
    """A non-degenerate random network: convs ~ N(0, 2 / fan_out), SE biases ~ N(0, 0.1^2), BN affine
    parameters random and BN statistics from one batch (train-mode pass). With default initialisation the
    features hardly depend on the image, and a comparison of two implementations would test nothing."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
                m.reset_running_stats()
                m.momentum = None
        net.train()
        forward(net, torch.rand(8, 3, SIZE, SIZE, generator=generator) * 2 - 1)
        net.eval()


def _assert_image_dependent(features: torch.Tensor) -> None:
    assert features.std(dim=0).mean() > 0.05 * features.abs().mean(), "degenerate network: test premise fails"


@pytest.fixture(scope="module")
def reference_b0():
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-b0")  # static padding for 224 px, as LITE; no download
    _randomise(net, lambda n, x: n.extract_features(x), torch.Generator().manual_seed(1))
    return net


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _reference_features(net, x):
    with torch.no_grad():
        return torch.nn.functional.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)  # (n, 1280)


def test_same_padding_matches_lite_table():
    # lite.md §1.3: stride-2 convs at 224 get (0, 1) for k3 and (1, 2) for k5; stride 1 is symmetric.
    assert same_padding(224, 3, 2) == (0, 1, 0, 1)
    assert same_padding(56, 5, 2) == (1, 2, 1, 2)
    assert same_padding(14, 5, 1) == (2, 2, 2, 2)
    assert same_padding(7, 1, 1) == (0, 0, 0, 0)


def test_identity_film_backbone_equals_efficientnet_pytorch(tmp_path, reference_b0, images):
    path = tmp_path / "efficientnet-b0-355c32eb.pth"
    torch.save(reference_b0.state_dict(), path)  # the release file's layout (with a 1000-way _fc)
    model = LiteModel()
    assert load_backbone_weights(model, path) == "efficientnet_pytorch"
    # float64: the eval path folds each BN into its convolution and fuses FiLM and Swish (other roundings of
    # the same function), and a random B0 amplifies float32 rounding to ~1 at the output.
    import copy

    reference, x = copy.deepcopy(reference_b0).double(), images.double()
    with torch.no_grad():
        ours = model.double().features(x, identity_film(torch.float64))
    _assert_image_dependent(ours)
    torch.testing.assert_close(ours, _reference_features(reference, x), rtol=0, atol=1e-7)


def test_film_sits_after_each_bn_before_swish(reference_b0, images):
    """FiLM after a BN = that BN with weight gamma·w and bias gamma·b + beta: fold random FiLM parameters
    into the reference's 18 BNs (stem _bn0, each block's depthwise _bn1, head _bn1) and compare. In float64:
    a random B0 amplifies float32 rounding of the fold (~1e-7) to ~1 at the output."""
    import copy

    reference = copy.deepcopy(reference_b0).double()
    backbone = FilmEfficientNet().double()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("_fc.")}
    assert backbone.load_state_dict(state, strict=False).missing_keys == ["_fc.weight", "_fc.bias"]
    gen = torch.Generator().manual_seed(3)
    film = [(1 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64),
             0.3 * torch.randn(c, generator=gen, dtype=torch.float64)) for c in FILM_CHANNELS]
    bns = [reference._bn0, *(b._bn1 for b in reference._blocks), reference._bn1]
    with torch.no_grad():
        for bn, (gamma, beta) in zip(bns, film):
            bn.bias.copy_(gamma * bn.bias + beta)
            bn.weight.mul_(gamma)
        ours = backbone.eval()(images.double(), film)
    _assert_image_dependent(ours)
    torch.testing.assert_close(ours, _reference_features(reference, images.double()), rtol=0, atol=1e-7)


def test_timm_key_mapping_gives_timm_features(tmp_path, images):
    import timm

    torch.manual_seed(4)
    net = timm.create_model("tf_efficientnet_b0", pretrained=False)
    _randomise(net, lambda n, x: n.forward_features(x), torch.Generator().manual_seed(5))
    path = tmp_path / "tf_efficientnet_b0.pth"
    torch.save(net.state_dict(), path)
    model = LiteModel()
    assert load_backbone_weights(model, path) == "timm"
    # float64: timm orders some ops differently, and a random B0 amplifies float32 rounding to ~1e-4.
    model, net, x = model.double(), net.double(), images.double()
    with torch.no_grad():
        ours = model.features(x, identity_film(torch.float64))
        theirs = net.forward_head(net.forward_features(x), pre_logits=True)  # (n, 1280)
    _assert_image_dependent(ours)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_backbone_from_a_lite_checkpoint(tmp_path):
    torch.manual_seed(6)
    source = LiteModel()
    path = tmp_path / "lite.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(7)
    model = LiteModel()
    film_before = {k: v.clone() for k, v in model.feature_adaptation_network.state_dict().items()}
    assert load_backbone_weights(model, path) == "lite"
    for key, value in source.feature_extractor.state_dict().items():
        assert torch.equal(model.feature_extractor.state_dict()[key], value), key
    for key, value in model.feature_adaptation_network.state_dict().items():
        assert torch.equal(value, film_before[key]), key  # only the backbone is replaced


def test_bad_weight_files_raise_one_line_errors(tmp_path, reference_b0):
    model = LiteModel()
    with pytest.raises(ValueError, match="no such weights file"):
        load_backbone_weights(model, tmp_path / "missing.pth")
    state = reference_b0.state_dict()
    wrong = dict(state)
    wrong["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(wrong, tmp_path / "wrong_shape.pth")
    before = model.feature_extractor._conv_stem.weight.clone()
    with pytest.raises(ValueError, match=r"wrong_shape.pth: _conv_head.weight has shape"):
        load_backbone_weights(model, tmp_path / "wrong_shape.pth")
    assert torch.equal(model.feature_extractor._conv_stem.weight, before)  # nothing copied
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    torch.save(missing, tmp_path / "missing_key.pth")
    with pytest.raises(ValueError, match="1 missing"):
        load_backbone_weights(model, tmp_path / "missing_key.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: neither"):
        load_backbone_weights(model, tmp_path / "other.pth")
