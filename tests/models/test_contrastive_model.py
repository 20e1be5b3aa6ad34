import pytest
import torch
from torch import nn

from fastcl.models.contrastive import ContrastiveModel, LayerTaps, collect_representations
from fastcl.models.encoders import ConvNet, MLPEncoder
from fastcl.models.heads import FixedReweightingHead, IdentityHead, LinearHead, MLPHead


def small_model() -> ContrastiveModel:
    return ContrastiveModel(MLPEncoder(6, (10, 8)), MLPHead(8, 8, 4))


def warm_up_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give the BN layers non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)


# -------------------- ContrastiveModel


def test_forward_returns_pre_and_post_projection():
    model = small_model()
    x = torch.randn(5, 6)
    warm_up_bn(model, x)
    model.eval()
    h, z = model(x)
    assert h.shape == (5, 8) and z.shape == (5, 4)
    torch.testing.assert_close(h, model.encoder(x))
    torch.testing.assert_close(z, model.head(h))
    torch.testing.assert_close(model.embed(x), h)
    torch.testing.assert_close(model.project(h), z)
    assert (model.rep_dim, model.out_dim) == (8, 4)


def test_default_head_is_identity_and_dims_are_checked():
    model = ContrastiveModel(MLPEncoder(6, (8,), batchnorm=False))
    assert isinstance(model.head, IdentityHead)
    h, z = model(torch.randn(3, 6))
    assert z is h and model.out_dim == 8
    with pytest.raises(ValueError, match="in_dim=16"):
        ContrastiveModel(MLPEncoder(6, (8,)), LinearHead(16, 4))
    with pytest.raises(TypeError, match="encoder"):
        ContrastiveModel(lambda x: x)
    with pytest.raises(TypeError, match="head"):
        ContrastiveModel(MLPEncoder(6, (8,)), head="mlp")


def test_plain_module_encoder_without_out_dim():
    model = ContrastiveModel(nn.Linear(4, 3), FixedReweightingHead(3, kappa=2.0))
    assert model.rep_dim is None and model.out_dim == 3
    x = torch.randn(2, 4)
    h, z = model(x)
    torch.testing.assert_close(z, h * torch.tensor([1.0, 0.5, 0.25]))


def test_forward_views_layout_and_shared_batchnorm():
    model = small_model()
    v1, v2 = torch.randn(4, 6), torch.randn(4, 6)
    h, z = model.forward_views([v1, v2])
    assert h.shape == (4, 2, 8) and z.shape == (4, 2, 4)
    h_all, z_all = model(torch.cat([v1, v2]))  # one pass over both views: same BN batch statistics
    torch.testing.assert_close(h[:, 0], h_all[:4])
    torch.testing.assert_close(z[:, 1], z_all[4:])
    with pytest.raises(ValueError, match=r"views\[1\]"):
        model.forward_views([v1, torch.randn(3, 6)])
    with pytest.raises(TypeError, match="views"):
        model.forward_views(v1)


def test_gradients_reach_encoder_through_head():
    model = small_model()
    _, z = model(torch.randn(5, 6))
    z.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


# -------------------- representations


def test_collect_representations_matches_direct_computation_across_batches():
    model = small_model()
    x = torch.randn(10, 6)
    warm_up_bn(model, x)
    model.eval()
    with torch.no_grad():
        layer0 = model.encoder.layers[0](x)
        h, z = model(x)
    reps = collect_representations(model, x, ["encoder.layers.0", "encoder", "head"], batch_size=3)
    assert list(reps) == ["encoder.layers.0", "encoder", "head"]
    torch.testing.assert_close(reps["encoder.layers.0"], layer0)
    torch.testing.assert_close(reps["encoder"], h)
    torch.testing.assert_close(reps["head"], z)
    assert not reps["encoder"].requires_grad


def test_collect_representations_restores_modes_and_removes_hooks():
    model = small_model()
    model.train()
    model.head.eval()  # e.g. a frozen submodule
    x = torch.randn(8, 6)
    running = model.encoder.layers[0][1].running_mean.clone()
    collect_representations(model, x, ["encoder"])
    assert model.training and model.encoder.training and not model.head.training
    assert torch.equal(model.encoder.layers[0][1].running_mean, running)  # ran in eval mode
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_feature_maps_are_pooled_or_flattened():
    model = ContrastiveModel(ConvNet(widths=(4, 8)), LinearHead(8, 2)).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        fmap = model.encoder.blocks[0](x)  # [3, 4, 8, 8]
    avg = collect_representations(model, x, ["encoder.blocks.0"])["encoder.blocks.0"]
    flat = collect_representations(model, x, ["encoder.blocks.0"], pool="flatten")["encoder.blocks.0"]
    torch.testing.assert_close(avg, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(flat, fmap.flatten(1))
    assert flat.shape == (3, 4 * 8 * 8)


def test_collect_representations_from_batches_with_targets():
    model = small_model()
    loader = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 3])), (torch.randn(2, 6), torch.tensor([4, 5]))]
    reps, targets = collect_representations(model, loader, ["encoder"], return_targets=True)
    assert reps["encoder"].shape == (6, 8)
    assert torch.equal(targets, torch.arange(6))
    with pytest.raises(ValueError, match="return_targets"):
        collect_representations(model, torch.randn(4, 6), ["encoder"], return_targets=True)


def test_taps_record_values_before_later_inplace_ops():
    model = small_model().eval()  # each encoder layer is Linear -> BatchNorm1d -> ReLU(inplace=True)
    x = torch.randn(16, 6)
    with torch.no_grad():
        layer = model.encoder.layers[0]
        pre_relu = layer[1](layer[0](x))
    rep = collect_representations(model, x, ["encoder.layers.0.1"])["encoder.layers.0.1"]
    assert (pre_relu < 0).any()
    torch.testing.assert_close(rep, pre_relu)


def test_layer_taps_context_manager():
    model = small_model().eval()
    x = torch.randn(2, 6)
    with LayerTaps(model, ["encoder.layers.1"]) as taps:
        model(x)
        out = taps.outputs["encoder.layers.1"]
    torch.testing.assert_close(out, model.embed(x))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bad_layer_specs():
    model = small_model()
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="not found"):
        collect_representations(model, x, ["encoder.layer9"])
    with pytest.raises(ValueError, match="duplicates"):
        collect_representations(model, x, ["encoder", "encoder"])
    with pytest.raises(ValueError, match="pool"):
        collect_representations(model, x, ["encoder"], pool="max")
    with pytest.raises(ValueError, match="batch_size"):
        collect_representations(model, x, ["encoder"], batch_size=0)
    with pytest.raises(TypeError, match="returned tuple"):
        collect_representations(model, x, [""])  # the model itself returns (h, z)

    shared = nn.Linear(6, 6)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(RuntimeError, match="more than once"):
        collect_representations(twice, x, ["0"])


def test_empty_batch_in_eval_mode():
    model = small_model().eval()
    h, z = model.forward_views([torch.randn(0, 6), torch.randn(0, 6)])
    assert h.shape == (0, 2, 8) and z.shape == (0, 2, 4)
    conv = ContrastiveModel(ConvNet(widths=(4, 8)), LinearHead(8, 2))
    reps = collect_representations(conv, torch.randn(0, 3, 5, 5), ["encoder.blocks.0", "encoder", "head"])
    assert {n: tuple(r.shape) for n, r in reps.items()} == {"encoder.blocks.0": (0, 4), "encoder": (0, 8),
                                                             "head": (0, 2)}
    flat = collect_representations(conv, torch.randn(0, 3, 5, 5), ["encoder.blocks.0"], pool="flatten")
    assert flat["encoder.blocks.0"].shape == (0, 4 * 5 * 5)


def test_collect_representations_single_sample_batches_with_scalar_targets():
    model = small_model()
    x = torch.randn(3, 6)
    loader = [(x[i:i + 1], torch.tensor(7 - i)) for i in range(3)]  # one sample per batch, 0-d target
    reps, targets = collect_representations(model, loader, ["encoder"], return_targets=True)
    assert torch.equal(targets, torch.tensor([7, 6, 5]))
    torch.testing.assert_close(reps["encoder"], collect_representations(model, x, ["encoder"])["encoder"])
