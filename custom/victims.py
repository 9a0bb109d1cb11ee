"""
Victim segmentation networks: the architectures trained on a protected copy of a dataset and then
evaluated on clean data, to measure how unlearnable the copy is.

``build_victim(name, in_channels, out_channels, patch_size)`` returns a network that maps a batch
``(B, in_channels, *patch_size)`` to logits ``(B, out_channels, *patch_size)``, always one tensor.
The seven of ``VICTIMS`` are 3D; ``slice2d`` (``SLICE_VICTIMS``) is 2D. Their sizes (but
``unet_paper``'s, the authors') are chosen so that each one trains on 64x64x32 patches on a 2-core CPU
in minutes, while keeping the defining structure of its architecture (number of resolution levels,
skip pattern, transformer placement); a GPU run can use the same definitions.

==================  ======================================================================  ========
name                configuration                                                           multiple
==================  ======================================================================  ========
``unet``            MONAI ``UNet``: channels (16, 32, 64, 128, 256), strides (2, 2, 2, 2),  16
                    2 residual units per level, instance norm (the surrogate's topology at
                    half its widths).
``unet_paper``      MONAI ``UNet``: channels (32, 64, 128, 256, 512), strides (2, 2, 2, 2),  16
                    2 residual units, instance norm: the authors' victim (and surrogate) at
                    full width, the ``paper`` recipe's victim (configs/evaluate.json).
``attention_unet``  MONAI ``AttentionUnet`` (Oktay et al. 2018): the same channels and      16
                    strides, attention gates on every skip. MONAI hard-codes batch norm in
                    it (kept: this is what a user of MONAI's AttentionUnet trains).
``unetpp``          MONAI ``BasicUNetPlusPlus`` (Zhou et al. 2018): features                16
                    (8, 8, 16, 32, 64, 8), a quarter of MONAI's default widths (its nested
                    full-resolution convolutions make it the slowest victim per width), no
                    deep supervision, instance norm; MONAI returns a one-element list,
                    unwrapped here to a tensor.
``transunet``       ``TransUNet3D`` below (Chen et al. 2021; MONAI has no 3D TransUNet):      16
                    residual CNN encoder to 1/16 (channels 16, 32, 64, 128), hidden size
                    192, 4 heads, 4 transformer layers over the 1/16 tokens, cascaded
                    upsampling decoder (64, 32, 16, 16) with skips at 1/8, 1/4, 1/2.
``unetr``           MONAI ``UNETR`` (Hatamizadeh et al. 2022): 16^3 patches, feature size    16
                    16, hidden size 384, MLP 1536, 6 heads of 64 (MONAI fixes 12 layers):
                    a ViT-S-sized encoder instead of the paper's ViT-B (768 / 3072 / 12).
``swinunetr``       MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022): feature size 24 (half the  32
                    paper's 48), depths (2, 2, 2, 2), heads (3, 6, 12, 24), window 7,
                    patch 2.
``slice2d``         ``SliceWise`` MONAI 2D ``UNet``, the ``unet`` victim's configuration in    16 (H, W)
                    2D, over each axial slice (last axis) independently: trains on the
                    slices of the 3D crops, predicts a volume slice by slice.
==================  ======================================================================  ========

Every spatial dimension of ``patch_size`` (the first two for ``slice2d``) must be a multiple of the
number in the last column (the total downsampling of the network), and, except for ``unetr`` (whose
1/16 tokens are not normalised by a norm layer over space), the bottleneck must hold more than one
voxel for its normalisation to train, so one dimension at least must be twice that number (smallest
patches: 32x16x16, 64x32x32 for ``swinunetr``, 16x16x16 for ``unetr``). ``build_victim`` checks both
up front and raises a ``ValueError`` naming the architecture and the multiple. ``transunet`` and
``unetr`` learn one position embedding per token of ``patch_size``, so they only accept inputs of
exactly ``patch_size``: infer with a sliding window of ``roi_size=patch_size``. The others accept
any multiple of their number.

Cost of one training step (forward, cross-entropy, backward, Adam step; batch 2 of 64x64x32, 1
channel in, 2 out, median of 5 steps, torch 2.13 on a 2-core CPU, 2 threads) and parameter counts:

==================  ==========  ===========
name                parameters  s / step
==================  ==========  ===========
``unet``            4.81 M      0.15
``unet_paper``      19.2 M      not measured
``attention_unet``  5.91 M      0.69
``unetpp``          0.44 M      1.33
``transunet``       5.13 M      0.34
``unetr``           26.2 M      0.89
``swinunetr``       15.7 M      3.6
==================  ==========  ===========

(SwinUNETR with feature size 12 takes 2.3 s but leaves attention heads of 4 channels; UNETR with
hidden size 256 takes 0.73 s; UNet++ at half MONAI's widths, (16, 16, 32, 64, 128, 16), 1.75 M, takes
2.2 s, and 6.7 s per iteration of the la_mri victim recipe, batch 4: 67 minutes per victim.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import (
    Convolution,
    TransformerBlock,
    UnetBasicBlock,
    UnetResBlock,
    UpSample,
)
from monai.networks.nets import UNETR, AttentionUnet, BasicUNetPlusPlus, SwinUNETR, UNet
from torch import nn

VICTIMS = ("unet", "unet_paper", "attention_unet", "unetpp", "transunet", "unetr", "swinunetr")
# victims that segment a volume slice by slice with a 2D network
SLICE_VICTIMS = ("slice2d",)

# The multiple every spatial dimension of the patch must be (the in-plane ones for slice2d), per victim (its total downsampling).
_MULTIPLE = {"unet": 16, "unet_paper": 16, "attention_unet": 16, "unetpp": 16, "transunet": 16, "unetr": 16,
             "swinunetr": 32, "slice2d": 16}


def _check_patch(
    architecture: str, patch_size: Sequence[int], multiple: int, normalised_bottleneck: bool = True,
    downsampled_axes: int = 3,
) -> tuple[int, int, int]:
    """
    ``patch_size`` as a 3-tuple of ints, or a ValueError naming ``architecture`` and ``multiple``.

    The network downsamples the first ``downsampled_axes`` axes by ``multiple`` (3; 2 for a slice-wise
    2D network, which leaves the slice axis alone). With ``normalised_bottleneck`` the network
    normalises its bottleneck over those axes with instance norm (batch norm for AttentionUnet),
    which cannot train on a single voxel, so one of them at least must be ``2 * multiple`` or more.
    """
    size = tuple(int(s) for s in patch_size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"{architecture} segments 3D volumes: patch_size must be 3 positive ints, got {tuple(patch_size)}")
    downsampled = size[:downsampled_axes]
    which = "every spatial dimension" if downsampled_axes == 3 else f"the first {downsampled_axes} dimensions"
    if any(s % multiple for s in downsampled):
        raise ValueError(
            f"{architecture} needs {which} of patch_size to be a multiple of {multiple} "
            f"(its total downsampling), got {size}"
        )
    if normalised_bottleneck and all(s == multiple for s in downsampled):
        raise ValueError(
            f"{architecture} normalises its bottleneck (patch_size / {multiple}), which needs more than one voxel "
            f"to train: make at least one of {which} of patch_size {2 * multiple} or more, got {size}"
        )
    return size


class SliceWise(nn.Module):
    """
    A 2D network applied to every slice of a volume along its last axis (axial slices of (H, W, D)
    volumes), slices independent of each other: ``(B, C, H, W, D)`` becomes ``B * D`` slices
    ``(C, H, W)``, and the network's ``(B * D, K, H, W)`` outputs are stacked back to ``(B, K, H, W, D)``.
    Trained on 3D crops it trains on their slices; through a 3D sliding window it predicts slice by slice.

    Args:
        network: a 2D network mapping ``(N, C, H, W)`` to ``(N, K, H, W)``.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, depth = x.shape[0], x.shape[-1]
        slices = x.permute(0, 4, 1, 2, 3).reshape(batch * depth, *x.shape[1:4])
        logits = self.network(slices)
        return logits.reshape(batch, depth, *logits.shape[1:]).permute(0, 2, 3, 4, 1)


class _FirstOutput(nn.Module):
    """Wraps a network that returns a list of outputs (MONAI's BasicUNetPlusPlus) and returns the first."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]


class _CupBlock(nn.Module):
    """
    One block of TransUNet's cascaded upsampler: trilinear x2 upsampling, concatenation of the encoder
    skip (if any) and two 3x3x3 conv-norm-ReLU layers (MONAI ``UnetBasicBlock``).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm_name: str | tuple) -> None:
        super().__init__()
        self.upsample = UpSample(3, in_channels, in_channels, scale_factor=2, mode="nontrainable",
                                 interp_mode="trilinear", align_corners=False)
        self.conv = UnetBasicBlock(3, in_channels + skip_channels, out_channels, kernel_size=3, stride=1,
                                   norm_name=norm_name, act_name="relu")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.upsample(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class TransUNet3D(nn.Module):
    """
    A 3D TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image
    Segmentation"), built from MONAI blocks: a CNN encoder, a transformer over the tokens of its
    lowest-resolution feature map, and a cascaded upsampler (CUP) fed with the encoder's skips.

    With ``n = len(encoder_channels)`` stages and ``x`` of shape ``(B, in_channels, D, H, W)``:

    1. CNN encoder. Stage ``i`` (``i = 0 .. n-1``) is a stride-2 MONAI ``UnetResBlock`` followed by a
       stride-1 one, giving ``e_i`` of shape ``(B, encoder_channels[i], D/2^(i+1), H/2^(i+1), W/2^(i+1))``.
       (The paper's R50 encoder stops at 1/16 too, with skips at 1/2, 1/4 and 1/8.)
    2. Tokens. ``e_{n-1}`` at ``(d, h, w) = (D, H, W) / 2^n`` is flattened to ``N = d*h*w`` positions and
       linearly projected to ``hidden_size`` (the paper's hybrid patch embedding with patch size 1),
       plus a learned position embedding of shape ``(1, N, hidden_size)``: ``(B, N, hidden_size)``.
    3. ``num_layers`` MONAI ``TransformerBlock`` (pre-norm multi-head self-attention + MLP, qkv bias as
       in ViT), then a LayerNorm: every token attends to every other, so the bottleneck sees the whole
       patch.
    4. Reshape back to ``(B, hidden_size, d, h, w)``; a 3x3x3 conv-norm-ReLU maps it to
       ``head_channels`` (the paper's ``conv_more``).
    5. Cascaded upsampler: ``n`` blocks of trilinear x2 upsampling, concatenation of ``e_{n-2-j}`` (no
       skip for the last block, which reaches full resolution), two 3x3x3 conv-norm-ReLU layers, with
       ``decoder_channels[j]`` channels.
    6. A 1x1x1 conv to ``out_channels`` logits: ``(B, out_channels, D, H, W)``.

    The position embedding fixes the input size to ``img_size``; infer with a sliding window of that
    ROI size. Dropout is off by default (the paper's ViT uses 0.1), batch norm is replaced by instance
    norm (small 3D batches), and widths are far below the paper's R50-ViT-B (hidden 768, 12 layers) so
    that the network trains on a CPU.

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels (logits, e.g. classes including background).
        img_size: the 3D input size ``(D, H, W)``; every dimension must be a multiple of ``2**n``, and one
            at least ``2**(n+1)`` or more (the normalised bottleneck needs more than one voxel).
        encoder_channels: channels of the CNN encoder stages; its length ``n`` is the number of stride-2
            stages (total stride ``2**n``).
        hidden_size: transformer width (token dimension); a multiple of ``num_heads``.
        mlp_dim: hidden width of each transformer block's MLP.
        num_heads: number of attention heads.
        num_layers: number of transformer blocks.
        head_channels: channels of the conv between the transformer and the decoder.
        decoder_channels: channels of the ``n`` decoder blocks, coarsest first.
        dropout_rate: dropout of the token embedding and inside the transformer blocks.
        norm_name: normalisation of the convolutional blocks (MONAI name, e.g. ``"instance"``).

    Raises:
        ValueError: if ``img_size`` is not 3D, not divisible by ``2**n`` or reduces to one bottleneck voxel, if ``decoder_channels`` and
            ``encoder_channels`` differ in length, or if ``hidden_size`` is not a multiple of ``num_heads``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int],
        encoder_channels: Sequence[int] = (16, 32, 64, 128),
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_heads: int = 4,
        num_layers: int = 4,
        head_channels: int = 128,
        decoder_channels: Sequence[int] = (64, 32, 16, 16),
        dropout_rate: float = 0.0,
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__()
        stages = len(encoder_channels)
        if stages < 1:
            raise ValueError("TransUNet3D needs at least one encoder stage")
        if len(decoder_channels) != stages:
            raise ValueError(
                f"TransUNet3D needs one decoder block per encoder stage: got {len(encoder_channels)} encoder "
                f"and {len(decoder_channels)} decoder channels"
            )
        if hidden_size % num_heads:
            raise ValueError(f"TransUNet3D hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        self.total_stride = 2**stages
        self.img_size = _check_patch("transunet", img_size, self.total_stride)
        self.grid_size = tuple(s // self.total_stride for s in self.img_size)
        self.num_tokens = math.prod(self.grid_size)
        self.hidden_size = hidden_size

        encoder = []
        previous = in_channels
        for channels in encoder_channels:
            encoder.append(nn.Sequential(
                UnetResBlock(3, previous, channels, kernel_size=3, stride=2, norm_name=norm_name, act_name="relu"),
                UnetResBlock(3, channels, channels, kernel_size=3, stride=1, norm_name=norm_name, act_name="relu"),
            ))
            previous = channels
        self.encoder = nn.ModuleList(encoder)

        self.patch_embedding = nn.Linear(encoder_channels[-1], hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.embedding_dropout = nn.Dropout(dropout_rate)
        self.transformer = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate=dropout_rate, qkv_bias=True)
            for _ in range(num_layers)
        )
        self.transformer_norm = nn.LayerNorm(hidden_size)

        self.conv_more = Convolution(3, hidden_size, head_channels, kernel_size=3, act="relu", norm=norm_name)
        skips = list(encoder_channels[-2::-1]) + [0]  # e_{n-2}, ..., e_0, then none at full resolution
        decoder = []
        previous = head_channels
        for skip, channels in zip(skips, decoder_channels):
            decoder.append(_CupBlock(previous, skip, channels, norm_name))
            previous = channels
        self.decoder = nn.ModuleList(decoder)
        self.segmentation_head = Convolution(3, previous, out_channels, kernel_size=1, conv_only=True)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder features ``[e_0, ..., e_{n-1}]``, finest first."""
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def tokenize(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w)`` bottleneck features to ``(B, N, hidden_size)`` embedded tokens (position-wise)."""
        tokens = self.patch_embedding(features.flatten(2).transpose(1, 2))
        return self.embedding_dropout(tokens + self.position_embedding)

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer stack and its final LayerNorm: ``(B, N, hidden_size)`` to the same shape."""
        for block in self.transformer:
            tokens = block(tokens)
        return self.transformer_norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"TransUNet3D was built for inputs of spatial size {self.img_size} (its position embedding), "
                f"got {tuple(x.shape[2:])}; use a sliding window of that size"
            )
        features = self.encode(x)
        tokens = self.transform(self.tokenize(features[-1]))
        x = tokens.transpose(1, 2).reshape(x.shape[0], self.hidden_size, *self.grid_size)
        x = self.conv_more(x)
        skips = features[-2::-1] + [None]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.segmentation_head(x)


def build_victim(name: str, in_channels: int, out_channels: int, patch_size: Sequence[int]) -> nn.Module:
    """
    A victim network by name (one of ``VICTIMS`` or ``SLICE_VICTIMS``; configurations in this module's
    docstring).

    Args:
        name: the architecture, one of ``VICTIMS`` or ``SLICE_VICTIMS``.
        in_channels: input channels (modalities).
        out_channels: output logit channels (classes including background).
        patch_size: the 3D training patch ``(D, H, W)``; every dimension must be a multiple of the
            architecture's total downsampling (16, or 32 for ``swinunetr``; for ``slice2d`` the
            in-plane dimensions only). ``transunet`` and ``unetr`` are built for exactly this input size.

    Returns:
        a module mapping ``(B, in_channels, *patch_size)`` to ``(B, out_channels, *patch_size)`` logits.

    Raises:
        ValueError: for an unknown ``name`` (the message lists every victim) or a ``patch_size`` that is
            not 3D or not a multiple of what the architecture needs (the message names both).
    """
    if name not in _MULTIPLE:
        raise ValueError(f"unknown victim {name!r}; choose one of {', '.join(VICTIMS + SLICE_VICTIMS)}")
    size = _check_patch(name, patch_size, _MULTIPLE[name], normalised_bottleneck=name != "unetr",
                        downsampled_axes=2 if name in SLICE_VICTIMS else 3)
    if name == "slice2d":
        return SliceWise(UNet(2, in_channels, out_channels, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                              num_res_units=2, norm="INSTANCE"))
    if name in ("unet", "unet_paper"):
        channels = (16, 32, 64, 128, 256) if name == "unet" else (32, 64, 128, 256, 512)
        return UNet(3, in_channels, out_channels, channels=channels, strides=(2, 2, 2, 2), num_res_units=2, norm="INSTANCE")
    if name == "attention_unet":
        return AttentionUnet(3, in_channels, out_channels, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    if name == "unetpp":
        return _FirstOutput(BasicUNetPlusPlus(3, in_channels, out_channels, features=(8, 8, 16, 32, 64, 8),
                                              deep_supervision=False))
    if name == "transunet":
        return TransUNet3D(in_channels, out_channels, size)
    if name == "unetr":
        return UNETR(in_channels, out_channels, img_size=size, feature_size=16, hidden_size=384, mlp_dim=1536,
                     num_heads=6, norm_name="instance")
    return SwinUNETR(in_channels, out_channels, feature_size=24)
