"""Victim networks: shapes, gradients, patch-size validation, and TransUNet3D's tokens and attention."""

import math

import pytest
import torch
from torch import nn

from custom.victims import VICTIMS, TransUNet3D, build_victim

# The smallest patch each architecture accepts: a multiple of its total downsampling, with more than one
# bottleneck voxel where a norm layer normalises the bottleneck over space (all but UNETR).
SMALLEST = {"unet": (32, 16, 16), "unet_paper": (32, 16, 16), "attention_unet": (16, 32, 16), "unetpp": (16, 16, 32), "transunet": (32, 16, 16),
            "unetr": (16, 16, 16), "swinunetr": (64, 32, 32)}
MULTIPLE = {"unet": 16, "unet_paper": 16, "attention_unet": 16, "unetpp": 16, "transunet": 16, "unetr": 16, "swinunetr": 32}


def _executed_layers(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[nn.Module]]:
    """Forward ``x`` and return the output and the leaf modules holding parameters, in execution order."""
    order, handles = [], []
    for module in net.modules():
        if not list(module.children()) and list(module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, i, o: order.append(m)))
    try:
        out = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, order


def _check_layer_gradients(layer: nn.Module, where: str) -> None:
    for name, param in layer.named_parameters():
        assert param.grad is not None, f"{where} layer {layer}: {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{where} layer {layer}: {name} has a non-finite gradient"
    weight = layer.weight.grad
    assert weight.abs().sum() > 0, f"{where} layer {layer}: zero weight gradient"


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("name", VICTIMS)
def test_forward_backward(name, in_channels):
    torch.manual_seed(0)
    patch = SMALLEST[name]
    net = build_victim(name, in_channels, 3, patch)
    net.train()
    x = torch.randn(2, in_channels, *patch)
    out, layers = _executed_layers(net, x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *patch)
    assert torch.isfinite(out).all()
    target = torch.randint(0, 3, (2, *patch))
    nn.functional.cross_entropy(out, target).backward()
    first, last = layers[0], layers[-1]
    assert isinstance(first, nn.Conv3d) and first.in_channels == in_channels, first
    assert isinstance(last, nn.Conv3d) and last.out_channels == 3, last
    _check_layer_gradients(first, "first")
    _check_layer_gradients(last, "last")


def test_unknown_victim():
    with pytest.raises(ValueError) as error:
        build_victim("resnet", 1, 2, (32, 32, 32))
    assert "resnet" in str(error.value)
    assert all(name in str(error.value) for name in VICTIMS)


@pytest.mark.parametrize("name", VICTIMS)
def test_bad_patch_size(name):
    multiple = MULTIPLE[name]
    with pytest.raises(ValueError, match=rf"{name} .*multiple of {multiple}\b"):
        build_victim(name, 1, 2, (2 * multiple, 2 * multiple, multiple + 8))
    with pytest.raises(ValueError, match=rf"{name} segments 3D volumes"):
        build_victim(name, 1, 2, (2 * multiple, 2 * multiple))
    # the next multiple down is not accepted for the 32-multiple network
    if multiple == 32:
        with pytest.raises(ValueError, match="multiple of 32"):
            build_victim(name, 1, 2, (64, 64, 48))


@pytest.mark.parametrize("name", VICTIMS)
def test_single_voxel_bottleneck(name):
    """A patch equal to the total downsampling leaves one bottleneck voxel, which instance/batch norm cannot train."""
    multiple = MULTIPLE[name]
    if name == "unetr":  # no norm over the 1/16 tokens: 16^3 trains
        net = build_victim(name, 1, 2, (16, 16, 16))
        net(torch.randn(1, 1, 16, 16, 16)).sum().backward()
        return
    with pytest.raises(ValueError, match=rf"{name} normalises its bottleneck .* {2 * multiple} or more"):
        build_victim(name, 1, 2, (multiple,) * 3)


@pytest.mark.parametrize("encoder_channels", [(8, 16, 16, 32), (8, 16, 32)])
def test_transunet_tokens(encoder_channels):
    stride = 2 ** len(encoder_channels)
    patch = (3 * stride, 2 * stride, stride)
    net = TransUNet3D(1, 2, patch, encoder_channels=encoder_channels, hidden_size=32, mlp_dim=64, num_heads=4,
                      num_layers=1, head_channels=16, decoder_channels=(8,) * len(encoder_channels))
    assert net.total_stride == stride
    assert net.num_tokens == math.prod(s // stride for s in patch) == 6
    x = torch.randn(2, 1, *patch)
    tokens = net.tokenize(net.encode(x)[-1])
    assert tokens.shape == (2, 6, 32)
    assert net.position_embedding.shape == (1, 6, 32)
    assert net(x).shape == (2, 2, *patch)
    with pytest.raises(ValueError, match="built for inputs of spatial size"):
        net(torch.randn(1, 1, *(2 * s for s in patch)))
    with pytest.raises(ValueError, match=f"multiple of {stride}"):
        TransUNet3D(1, 2, (patch[0] + 2, *patch[1:]), encoder_channels=encoder_channels,
                    decoder_channels=(8,) * len(encoder_channels))


def test_transunet_attention_mixes_all_tokens():
    """
    Perturbing the bottleneck feature of one position changes only that position's token after the
    (position-wise) embedding, but every token after the transformer: the bottleneck is global. A gradient
    check then shows the transformer's attention weights are trained through the full network.
    """
    torch.manual_seed(0)
    net = build_victim("transunet", 1, 2, (64, 64, 32)).eval()
    assert net.num_tokens == 4 * 4 * 2
    with torch.no_grad():
        features = net.encode(torch.randn(1, 1, 64, 64, 32))[-1]
        perturbed = features.clone()
        perturbed[..., 0, 0, 0] += 1.0  # the region that produces token 0
        before, after = net.tokenize(features), net.tokenize(perturbed)
        embedding_change = (after - before).abs().amax(dim=-1)[0]
        mixed_change = (net.transform(after) - net.transform(before)).abs().amax(dim=-1)[0]
    assert embedding_change[0] > 0 and torch.all(embedding_change[1:] == 0)
    assert torch.all(mixed_change > 1e-4), mixed_change  # the farthest token, (3, 3, 1), included

    net.train()
    out = net(torch.randn(2, 1, 64, 64, 32))
    out.square().mean().backward()
    for block in net.transformer:
        grad = block.attn.qkv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert net.position_embedding.grad.abs().sum() > 0


def test_slice2d_segments_each_axial_slice_on_its_own():
    torch.manual_seed(0)
    net = build_victim("slice2d", 1, 3, (32, 16, 8)).eval()
    x = torch.randn(2, 1, 32, 16, 8)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 3, 32, 16, 8)
        # slice z of the output is the 2D UNet's output for slice z of the input (up to float error: the
        # convolutions' algorithms depend on the batch size)
        torch.testing.assert_close(out[1, :, :, :, 5], net.network(x[1:2, :, :, :, 5])[0], atol=1e-4, rtol=0)
        changed = x.clone()
        changed[..., 3] = torch.randn(2, 1, 32, 16)
        difference = (net(changed) - out).abs().amax(dim=(0, 1, 2, 3))
    assert difference[3] > 0.01 and (difference[[0, 1, 2, 4, 5, 6, 7]] < 1e-5).all()
    assert isinstance(net.network.model[0].conv.unit0.conv, nn.Conv2d)


def test_slice2d_patch_size():
    assert build_victim("slice2d", 1, 2, (32, 16, 3))(torch.randn(1, 1, 32, 16, 3)).shape == (1, 2, 32, 16, 3)
    with pytest.raises(ValueError, match=r"slice2d needs the first 2 dimensions of patch_size to be a multiple of 16"):
        build_victim("slice2d", 1, 2, (24, 16, 16))
    with pytest.raises(ValueError, match=r"slice2d normalises its bottleneck .* first 2 dimensions of patch_size 32"):
        build_victim("slice2d", 1, 2, (16, 16, 32))
    with pytest.raises(ValueError) as error:
        build_victim("resnet", 1, 2, (32, 32, 32))
    assert "slice2d" in str(error.value)


def test_unet_paper_is_the_authors_victim():
    """MONAI UNet 32..512, strides 2, 2 residual units, instance norm (the authors' surrogate and victim)."""
    net = build_victim("unet_paper", 1, 2, (32, 32, 32))
    assert tuple(net.channels) == (32, 64, 128, 256, 512) and tuple(net.strides) == (2, 2, 2, 2)
    assert net.num_res_units == 2 and str(net.norm).upper() == "INSTANCE"
    assert all(not isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
