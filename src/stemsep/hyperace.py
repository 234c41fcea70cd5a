"""unwa's HyperACE network: the convolutional part of the HyperACE mask estimators.

BS-RoFormer "HyperACE" checkpoints (unwa's BS-Roformer-HyperACE v1 and v2; MSST-WebUI's
`use_mask_estimator_hyper_ace` with `hyperace_version`) add to each stem's mask estimator a
network that sees the transformers' whole (time x band) token grid as an image, `dim`
channels deep, and returns a per-bin residual for the mask: 4 channels (2 audio channels x
re/im) at every STFT bin. It is an encoder-decoder made of YOLO-style blocks:

- a backbone of depthwise-separable convolutions and cross-stage blocks, downsampling time
  (and, in v2, bands) four times to four feature maps;
- HyperACE (hypergraph adaptive correlation enhancement): the four maps resized to the
  third's size and fused; one part of the channels goes through hypergraph blocks (each
  position joins learned, input-dependent hyperedges, which gather and scatter back
  features), one through convolutions, one unchanged;
- a decoder back up to the first map's size, each level gated with the HyperACE features;
- a head that doubles the band axis four times by moving channels onto it (pixel shuffle
  along frequency, in v2 each followed by TFC-TDF blocks), then interpolates to the bins.

Parameter names follow the modules the checkpoints were trained in, so state dicts load
strictly. Every convolution here is bias-free and followed by an affine instance norm
(eps 1e-8); feature maps are (batch, channels, time, frequency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# The backbone's four feature maps' channels, and its stem's.
STEM_CHANNELS = 64
ENCODER_CHANNELS = (256, 384, 512, 768)
BLOCKS_PER_STAGE = 2  # cross-stage bottlenecks of the first and last stages; twice that in between
HYPERGRAPH_HEADS = 8


@dataclass(frozen=True)
class Variant:
    """What tells HyperACE v1 and v2 apart."""

    hyperedges: int
    high_order_blocks: int  # hypergraph blocks side by side
    low_order_blocks: int  # cross-stage blocks in a row
    deep_stride: tuple[int, int]  # (time, band) stride into the backbone's last two stages
    head_divisors: tuple[int, int, int, int]  # the head's four blocks' widths: first map's channels / these
    tfc_tdf: bool  # each head block ends in TFC-TDF blocks
    final_kernel: int  # the last convolution's (square) kernel


VARIANTS = {
    1: Variant(hyperedges=16, high_order_blocks=3, low_order_blocks=2, deep_stride=(2, 1), head_divisors=(1, 2, 2, 4),
               tfc_tdf=False, final_kernel=1),
    2: Variant(hyperedges=32, high_order_blocks=2, low_order_blocks=1, deep_stride=(2, 2), head_divisors=(2, 4, 8, 16),
               tfc_tdf=True, final_kernel=3),
}


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True, eps=1e-8)


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:  # (b, c, *) -> (b, c, *size)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# convolution blocks --------------------------------------------------------------------------


class PointwiseConv(nn.Module):
    """1x1 convolution -> instance norm -> SiLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = instance_norm(c_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SeparableConv(nn.Module):
    """3x3 depthwise convolution (with `stride`) -> 1x1 convolution -> instance norm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, stride: int | tuple[int, int] = 1):
        super().__init__()
        self.dwconv = nn.Conv2d(c_in, c_in, 3, stride, padding=1, groups=c_in, bias=False)
        self.pwconv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = instance_norm(c_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class Bottleneck(nn.Module):
    """x + two separable convolutions of x."""

    def __init__(self, channels: int):
        super().__init__()
        self.dsconv1 = SeparableConv(channels, channels)
        self.dsconv2 = SeparableConv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dsconv2(self.dsconv1(x))


class CrossStage(nn.Module):
    """Two 1x1 branches, one through `blocks` bottlenecks, concatenated and fused by a 1x1."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.cv1 = PointwiseConv(channels, channels)
        self.cv2 = PointwiseConv(channels, channels)
        self.cv3 = PointwiseConv(2 * channels, channels)
        self.m = nn.Sequential(*(Bottleneck(channels) for _ in range(blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class NarrowCrossStage(nn.Module):
    """A cross-stage block at half the output's channels, between two 1x1 convolutions."""

    def __init__(self, c_in: int, c_out: int, blocks: int):
        super().__init__()
        narrow = c_out // 2
        self.cv1 = PointwiseConv(c_in, narrow)
        self.m = CrossStage(narrow, blocks)
        self.cv2 = PointwiseConv(narrow, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.m(self.cv1(x)))


# hypergraph ----------------------------------------------------------------------------------


class HyperedgeGeneration(nn.Module):
    """Each position's membership of `hyperedges` hyperedges: learned prototypes shifted by
    the input's pooled context, matched against the positions per head, averaged over heads."""

    def __init__(self, channels: int, hyperedges: int, heads: int):
        super().__init__()
        self.heads = heads
        self.global_proto = nn.Parameter(torch.randn(hyperedges, channels))
        self.context_mapper = nn.Linear(2 * channels, hyperedges * channels, bias=False)
        self.query_proj = nn.Linear(channels, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, n, c) -> (b, edges, n), each row a softmax over n
        context = torch.cat((x.mean(dim=1), x.amax(dim=1)), dim=-1)  # (b, 2c)
        shift = rearrange(self.context_mapper(context), "b (e c) -> b e c", c=x.shape[-1])
        prototypes = rearrange(self.global_proto + shift, "b e (h d) -> b h d e", h=self.heads)
        queries = rearrange(self.query_proj(x), "b n (h d) -> b h n d", h=self.heads)
        similarity = (queries @ prototypes) * queries.shape[-1] ** -0.5  # (b, h, n, e)
        return similarity.mean(dim=1).transpose(1, 2).softmax(dim=-1)


class HypergraphConv(nn.Module):
    """Gather the positions into hyperedges, transform, scatter back: a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.W_e = nn.Linear(channels, channels, bias=False)
        self.W_v = nn.Linear(channels, channels, bias=False)

    def forward(self, x: Tensor, membership: Tensor) -> Tensor:  # x: (b, n, c), membership: (b, e, n)
        edges = F.silu(self.W_e(membership @ x))  # (b, e, c)
        return x + F.silu(self.W_v(membership.transpose(1, 2) @ edges))


class Hypergraph(nn.Module):
    """Every (time, band) position of a feature map as a vertex of an adaptive hypergraph."""

    def __init__(self, channels: int, hyperedges: int, heads: int):
        super().__init__()
        self.adaptive_hyperedge_gen = HyperedgeGeneration(channels, hyperedges, heads)
        self.hypergraph_conv = HypergraphConv(channels)

    def forward(self, x: Tensor) -> Tensor:  # (b, c, t, f)
        vertices = rearrange(x, "b c t f -> b (t f) c")
        out = self.hypergraph_conv(vertices, self.adaptive_hyperedge_gen(vertices))
        return rearrange(out, "b (t f) c -> b c t f", t=x.shape[2])


class HypergraphBlock(nn.Module):
    """A 1x1 branch through the hypergraph beside a plain 1x1 branch, fused by a 1x1."""

    def __init__(self, channels: int, hyperedges: int, heads: int):
        super().__init__()
        self.cv1 = PointwiseConv(channels, channels)
        self.cv2 = PointwiseConv(channels, channels)
        self.ahc = Hypergraph(channels, hyperedges, heads)
        self.cv3 = PointwiseConv(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.ahc(self.cv2(x)), self.cv1(x)), dim=1))


class HyperACE(nn.Module):
    """The four feature maps fused at the third's size; half the channels through hypergraph
    blocks side by side, a quarter through cross-stage blocks, the rest unchanged; fused."""

    def __init__(self, variant: Variant):
        super().__init__()
        fused = ENCODER_CHANNELS[2]
        self.split = (fused // 2, fused // 4, fused - fused // 2 - fused // 4)  # high order, low order, unchanged
        high, low, _ = self.split
        self.fuse_conv = PointwiseConv(sum(ENCODER_CHANNELS), fused)
        self.high_order_branch = nn.ModuleList(
            HypergraphBlock(high, variant.hyperedges, HYPERGRAPH_HEADS) for _ in range(variant.high_order_blocks)
        )
        self.high_order_fuse = PointwiseConv(high * variant.high_order_blocks, high)
        self.low_order_branch = nn.Sequential(*(CrossStage(low, 1) for _ in range(variant.low_order_blocks)))
        self.final_fuse = PointwiseConv(fused, fused)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[2].shape[2:]
        x = self.fuse_conv(torch.cat([f if f.shape[2:] == size else resize(f, size) for f in features], dim=1))
        high, low, unchanged = x.split(self.split, dim=1)
        high = self.high_order_fuse(torch.cat([block(high) for block in self.high_order_branch], dim=1))
        return self.final_fuse(torch.cat((high, self.low_order_branch(low), unchanged), dim=1))


# encoder and decoder -------------------------------------------------------------------------


class Backbone(nn.Module):
    """Four stages, each a strided separable convolution then cross-stage blocks: time is
    halved at the stem and every stage; bands only in the last two stages' `deep_stride`."""

    def __init__(self, dim: int, variant: Variant):
        super().__init__()
        c2, c3, c4, c5 = ENCODER_CHANNELS
        halve_time = (2, 1)
        self.stem = SeparableConv(dim, STEM_CHANNELS, halve_time)
        self.p2 = nn.Sequential(SeparableConv(STEM_CHANNELS, c2, halve_time), NarrowCrossStage(c2, c2, BLOCKS_PER_STAGE))
        self.p3 = nn.Sequential(SeparableConv(c2, c3, halve_time), NarrowCrossStage(c3, c3, 2 * BLOCKS_PER_STAGE))
        self.p4 = nn.Sequential(SeparableConv(c3, c4, variant.deep_stride), NarrowCrossStage(c4, c4, 2 * BLOCKS_PER_STAGE))
        self.p5 = nn.Sequential(SeparableConv(c4, c5, variant.deep_stride), NarrowCrossStage(c5, c5, BLOCKS_PER_STAGE))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.p2(self.stem(x))]
        for stage in (self.p3, self.p4, self.p5):
            features.append(stage(features[-1]))
        return features


class GatedFusion(nn.Module):
    """x + gamma * h, gamma learned per channel (zero at initialization)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return x + self.gamma * h


class Decoder(nn.Module):
    """From the deepest map up to the first one's size: at each level a 1x1 of the skip
    connection (plus the upsampled level below) gated with the HyperACE features."""

    def __init__(self):
        super().__init__()
        c2, c3, c4, c5 = ENCODER_CHANNELS
        levels = {5: c5, 4: c4, 3: c3, 2: c2}  # registered deepest first, as in the checkpoints
        for level, channels in levels.items():
            setattr(self, f"h_to_d{level}", PointwiseConv(ENCODER_CHANNELS[2], channels))
        for level, channels in levels.items():
            setattr(self, f"fusion_d{level}", GatedFusion(channels))
        for level, channels in levels.items():
            setattr(self, f"skip_p{level}", PointwiseConv(channels, channels))
        self.up_d5 = NarrowCrossStage(c5, c4, 1)
        self.up_d4 = NarrowCrossStage(c4, c3, 1)
        self.up_d3 = NarrowCrossStage(c3, c2, 1)
        self.final_d2 = NarrowCrossStage(c2, c2, 1)

    def _gate(self, level: int, x: Tensor, hyperace: Tensor) -> Tensor:
        h = getattr(self, f"h_to_d{level}")(resize(hyperace, x.shape[2:]))
        return getattr(self, f"fusion_d{level}")(x, h)

    def forward(self, features: list[Tensor], hyperace: Tensor) -> Tensor:
        p2, p3, p4, p5 = features
        x = self._gate(5, self.skip_p5(p5), hyperace)
        for level, skip, up in ((4, p4, self.up_d5), (3, p3, self.up_d4), (2, p2, self.up_d3)):
            x = up(resize(x, skip.shape[2:])) + getattr(self, f"skip_p{level}")(skip)
            x = self._gate(level, x, hyperace)
        return self.final_d2(x)


# upsampling head -----------------------------------------------------------------------------


class TfcTdfBlock(nn.Module):
    """Time-frequency convolutions around a bottlenecked fully connected layer over the
    frequency axis (as in MDX23C), with a 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, freqs: int, bottleneck: int = 4):
        super().__init__()
        self.tfc1 = nn.Sequential(instance_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        self.tdf = nn.Sequential(
            instance_norm(c_out), nn.SiLU(), nn.Linear(freqs, freqs // bottleneck, bias=False),
            instance_norm(c_out), nn.SiLU(), nn.Linear(freqs // bottleneck, freqs, bias=False),
        )
        self.tfc2 = nn.Sequential(instance_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False))
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (b, c_in, t, freqs) -> (b, c_out, t, freqs)
        shortcut = self.shortcut(x)
        x = self.tfc1(x)
        return self.tfc2(x + self.tdf(x)) + shortcut


class TfcTdf(nn.Module):
    def __init__(self, channels: int, freqs: int, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TfcTdfBlock(channels, channels, freqs) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class FreqPixelShuffle(nn.Module):
    """A separable convolution to `scale` x the channels, moved onto the frequency axis
    (each channel's `scale` copies become `scale` neighbouring frequencies); in v2 then TFC-TDF."""

    def __init__(self, c_in: int, c_out: int, freqs_out: int, tfc_tdf: bool, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = SeparableConv(c_in, c_out * scale)
        self.out_conv = TfcTdf(c_out, freqs_out) if tfc_tdf else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (b, c_in, t, f) -> (b, c_out, t, f * scale)
        return self.out_conv(rearrange(self.conv(x), "b (c r) t f -> b c t (f r)", r=self.scale))


class UpsampleHead(nn.Module):
    """Four frequency pixel shuffles (bands x 16), interpolated to the bins, then to `out` channels."""

    def __init__(self, c_in: int, out: int, bands: int, bins: int, variant: Variant):
        super().__init__()
        self.bins = bins
        widths = [c_in // d for d in variant.head_divisors]
        self.block1, self.block2, self.block3, self.block4 = (
            FreqPixelShuffle(a, b, bands * 2 ** (i + 1), variant.tfc_tdf)
            for i, (a, b) in enumerate(zip([c_in, *widths[:-1]], widths))
        )
        self.final_conv = nn.Conv2d(widths[-1], out, variant.final_kernel, padding="same", bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (b, c_in, t, bands) -> (b, out, t, bins)
        x = self.block4(self.block3(self.block2(self.block1(x))))
        if x.shape[-1] != self.bins:
            x = resize(x, (x.shape[2], self.bins))
        return self.final_conv(x)


class HyperACENetwork(nn.Module):
    """Token grid (b, dim, frames, bands) -> mask residual (b, 4, frames, bins), 4 being
    (2 audio channels x re/im)."""

    def __init__(self, version: int, dim: int, bands: int, bins: int):
        super().__init__()
        variant = VARIANTS[version]
        self.backbone = Backbone(dim, variant)
        self.hyperace = HyperACE(variant)
        self.decoder = Decoder()
        self.upsample_head = UpsampleHead(ENCODER_CHANNELS[0], 4, bands, bins, variant)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        decoded = self.decoder(features, self.hyperace(features))  # (b, c, frames / 4, bands)
        return self.upsample_head(resize(decoded, (x.shape[2], decoded.shape[-1])))
