import pytest
import torch
from torch import nn

from fastcl.models.encoders import (
    BasicBlock,
    Bottleneck,
    ConvNet,
    MLPEncoder,
    ResNet,
    WrappedEncoder,
    as_encoder,
    resnet18,
    resnet34,
    resnet50,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -------------------- ResNets


@pytest.mark.parametrize(
    "factory, expected, out_dim",
    [(resnet18, 11_168_832, 512), (resnet34, 21_276_992, 512), (resnet50, 23_500_352, 2048)],
)
def test_cifar_resnet_parameter_counts(factory, expected, out_dim):
    # torchvision's ImageNet counts minus the fc layer minus (7x7 - 3x3) * 3 * 64 stem weights.
    model = factory()
    assert n_params(model) == expected
    assert model.out_dim == out_dim
    assert all(p.requires_grad for p in model.parameters())


def test_in_channels_changes_only_the_stem():
    model = resnet18(in_channels=1)
    assert n_params(model) == 11_168_832 - 2 * 64 * 3 * 3
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    model.eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 512)


def test_resnet_is_in_cifar_form():
    model = resnet18()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.bias is None
    kinds = {type(m) for m in model.modules()}
    assert nn.MaxPool2d not in kinds and nn.Linear not in kinds
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert [len(getattr(model, n)) for n in model.layer_names] == [2, 2, 2, 2]
    assert [len(getattr(resnet50(), n)) for n in ResNet.layer_names] == [3, 4, 6, 3]


def test_resnet18_spatial_sizes_on_cifar_input():
    # 32x32 input: stride-1 stem and no max-pool, so layer1 stays 32x32 and layer4 is 4x4.
    model = resnet18().eval()
    shapes = {}
    for name in ("layer1", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    h = model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (1, 64, 32, 32), "layer4": (1, 512, 4, 4)}
    assert h.shape == (1, 512)


def test_resnet50_output_shape_and_nonnegative_features():
    model = resnet50().eval()
    h = model(torch.randn(2, 3, 4, 4))
    assert h.shape == (2, 2048)
    assert (h >= 0).all()  # average of post-ReLU maps


def test_batchnorm_train_vs_eval_behaviour():
    model = resnet18()
    x = torch.randn(4, 3, 8, 8)
    before = model.bn1.running_mean.clone()

    model.train()
    out_full = model(x)
    assert not torch.equal(model.bn1.running_mean, before)  # running stats updated
    assert model.bn1.num_batches_tracked.item() == 1
    # in train mode BN uses batch statistics: a sample's output depends on its batch
    assert not torch.allclose(model(x[:2])[0], out_full[0], atol=1e-4)

    model.eval()
    stats = model.bn1.running_mean.clone()
    out_eval = model(x)
    assert torch.equal(model.bn1.running_mean, stats)  # no update in eval mode
    torch.testing.assert_close(model(x[:1])[0], out_eval[0], rtol=1e-4, atol=1e-5)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = resnet18(zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    block = blocks[0].eval()  # identity shortcut: output = relu(input) = input for non-negative input
    x = torch.rand(2, 64, 4, 4)
    torch.testing.assert_close(block(x), x)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in resnet50(zero_init_residual=True).modules()
               if isinstance(b, Bottleneck))


def test_resnet_gradients_flow_to_every_parameter():
    model = resnet18()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match="x must have shape"):
        resnet18()(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        resnet18()(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="in_channels"):
        resnet18(in_channels=0)
    with pytest.raises(TypeError, match="in_channels"):
        resnet18(in_channels=3.0)
    with pytest.raises(ValueError, match="num_blocks"):
        ResNet(BasicBlock, (2, 2, 2))
    with pytest.raises(TypeError, match="block"):
        ResNet(nn.Conv2d, (2, 2, 2, 2))


# -------------------- small encoders


def test_convnet_shapes_and_params():
    net = ConvNet(in_channels=3, widths=(8, 16))
    # conv(3->8) no bias + BN(8) + conv(8->16) no bias + BN(16)
    assert n_params(net) == 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16
    assert net.out_dim == 16
    assert net.layer_names == ("blocks.0", "blocks.1")
    assert net(torch.randn(5, 3, 16, 16)).shape == (5, 16)
    assert net(torch.randn(2, 3, 1, 1)).shape == (2, 16)  # tiny inputs skip pooling
    assert ConvNet(widths=(4,), batchnorm=False).blocks[0][0].bias is not None
    with pytest.raises(ValueError, match="widths"):
        ConvNet(widths=())
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 8, 8))


def test_mlp_encoder_flattens_and_has_expected_params():
    enc = MLPEncoder(12, hidden_dims=(32, 16))
    assert n_params(enc) == 12 * 32 + 2 * 32 + 32 * 16 + 2 * 16
    assert enc.out_dim == 16
    h = enc(torch.randn(4, 3, 4))
    assert h.shape == (4, 16) and (h >= 0).all()
    no_bn = MLPEncoder(12, hidden_dims=(8,), batchnorm=False)
    assert n_params(no_bn) == 12 * 8 + 8
    with pytest.raises(ValueError, match="12 features"):
        enc(torch.randn(4, 13))
    with pytest.raises(ValueError, match="in_dim"):
        MLPEncoder(0)
    with pytest.raises(ValueError, match="hidden_dims"):
        MLPEncoder(4, hidden_dims=())


# -------------------- wrapping


def test_wrapped_encoder_pools_feature_maps_and_infers_out_dim():
    backbone = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7))
    backbone.train()
    enc = WrappedEncoder(backbone, input_shape=(3, 8, 8))
    assert enc.out_dim == 7
    assert backbone.training and backbone[1].training  # dry run restored the modes
    assert backbone[1].num_batches_tracked.item() == 0  # and did not touch BN statistics
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(enc(x), backbone(x).mean(dim=(2, 3)))

    flat = WrappedEncoder(nn.Conv2d(3, 2, 3), input_shape=(3, 5, 5), pool=False)
    assert flat.out_dim == 2 * 3 * 3
    assert flat(torch.randn(4, 3, 5, 5)).shape == (4, 18)


def test_wrapped_encoder_lazy_out_dim_and_mismatch():
    enc = WrappedEncoder(nn.Linear(5, 3))
    assert enc.out_dim is None
    enc(torch.randn(2, 5))
    assert enc.out_dim == 3
    with pytest.raises(ValueError, match="out_dim=4"):
        WrappedEncoder(nn.Linear(5, 3), out_dim=4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="backbone"):
        WrappedEncoder(lambda x: x)


def test_as_encoder_passthrough_and_wrap():
    enc = MLPEncoder(4, (8,))
    assert as_encoder(enc) is enc
    with pytest.raises(ValueError, match="out_dim"):
        as_encoder(enc, out_dim=3)
    wrapped = as_encoder(nn.Linear(4, 6), out_dim=6)
    assert isinstance(wrapped, WrappedEncoder) and wrapped.out_dim == 6


def test_mlp_encoder_empty_batch_in_eval_mode():
    enc = MLPEncoder(12, hidden_dims=(8, 4)).eval()
    h = enc(torch.randn(0, 3, 4))
    assert h.shape == (0, 4)
    with pytest.raises(ValueError, match="12 features"):
        enc(torch.randn(0, 13))


def test_mlp_encoder_single_sample_needs_eval_mode():
    enc = MLPEncoder(6, hidden_dims=(8,))
    with pytest.raises(ValueError, match="MLPEncoder needs at least 2 samples per batch in train mode"):
        enc(torch.randn(1, 6))
    x = torch.randn(4, 6)
    enc(x)  # train mode: batch statistics, running statistics updated
    enc.eval()
    torch.testing.assert_close(enc(x[:1]), enc(x)[:1])
    assert enc.train()(x[:2]).shape == (2, 8)
    assert MLPEncoder(6, hidden_dims=(8,), batchnorm=False)(x[:1]).shape == (1, 8)  # no BatchNorm: any batch
