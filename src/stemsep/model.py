"""The BS-RoFormer network (band-split RoPE transformer), as trained for viperx's 1297 checkpoint.

The model maps a batch of waveforms at the model's sample rate to the target stem
(vocals for 1297) of the same shape: STFT -> band split -> alternating time and frequency
transformers -> per-band mask estimator -> complex mask on the mixture's spectrum -> iSTFT.

Module layout and parameter names follow the network 1297 was trained in (lucidrains'
BS-RoFormer as vendored by audio-separator and ZFTurbo's MSST), so the real state dict
loads strictly; training-only parts (losses, dropout, linear attention) are left out.
Autocast may run the transformers in bf16/fp16; the STFT, iSTFT and mask multiply always
run in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# norm ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * gamma, i.e. l2-normalize then scale by sqrt(dim) * gamma."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # eps only keeps an all-zero vector at zero (the reference clamps its norm at 1e-12).
        return F.rms_norm(x, (x.shape[-1],), self.gamma.to(x.dtype), eps=1e-24)


# attention -----------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over interleaved pairs of the head dimension.

    `freqs` is stored in the checkpoint (one copy per attention layer that shares it).
    Angles and the rotation are computed in float32 whatever the autocast dtype, as in
    the reference, then cast back to the input's dtype.

    Pair (x, y) at position p turns by p * freq: (x cos - y sin, x sin + y cos), which is
    the complex product (x + iy) e^(i p freq). Eagerly that product is one pass over the
    tensor (10x faster on the CPU than rotating with stacked halves); torch.compile has no
    code generation for complex numbers, so a compiled network rotates the real pairs,
    which it fuses into one kernel.
    """

    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        inverse_freqs = 1.0 / theta ** (torch.arange(0, dim_head, 2).float() / dim_head)
        self.freqs = nn.Parameter(inverse_freqs, requires_grad=False)  # (dim_head/2,)

    def forward(self, t: Tensor) -> Tensor:  # t: (..., n, dim_head)
        positions = torch.arange(t.shape[-2], device=t.device, dtype=torch.float32)
        angles = torch.outer(positions, self.freqs.float())  # (n, dim_head/2)
        pairs = rearrange(t.float(), "... (d r) -> ... d r", r=2)  # (..., n, dim_head/2, 2)
        if torch.compiler.is_compiling():
            x, y = pairs.unbind(-1)
            cos, sin = angles.cos(), angles.sin()
            rotated = torch.stack((x * cos - y * sin, x * sin + y * cos), dim=-1)
        else:
            rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.polar(torch.ones_like(angles), angles))
        return rearrange(rotated, "... d r -> ... (d r)").to(t.dtype)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions and a sigmoid gate per head."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary_embed: RotaryEmbedding):
        super().__init__()
        self.heads = heads
        self.rotary_embed = rotary_embed
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False))  # [1] was Dropout

    def forward(self, x: Tensor) -> Tensor:  # x: (b, n, dim)
        x = self.norm(x)
        q, k, v = rearrange(self.to_qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        q, k = self.rotary_embed(q), self.rotary_embed(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, dim_head)
        gates = rearrange(self.to_gates(x), "b n h -> b h n 1").sigmoid()
        return self.to_out(rearrange(out * gates, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            RMSNorm(dim),
            nn.Linear(dim, dim * mult),
            nn.GELU(),
            nn.Identity(),  # Dropout during training; kept so indices match the checkpoint
            nn.Linear(dim * mult, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` residual (attention, feed-forward) pairs over the second-to-last axis."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, rotary_embed: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, rotary_embed), FeedForward(dim)]) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:  # x: (b, n, dim)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


# band split and mask estimation --------------------------------------------------------------


class BandSplit(nn.Module):
    """Projects each band's (bins x channels x re/im) features to one `dim`-wide token."""

    def __init__(self, dim: int, band_widths: Sequence[int]):
        super().__init__()
        self.band_widths = tuple(band_widths)
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(w), nn.Linear(w, dim)) for w in band_widths)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, t, sum(band_widths))
        tokens = None  # (b, t, bands, dim), filled band by band: no list of bands held for a stack
        for i, (band, to_feature) in enumerate(zip(x.split(self.band_widths, dim=-1), self.to_features)):
            feature = to_feature(band)  # (b, t, dim)
            if tokens is None:
                tokens = feature.new_empty(*feature.shape[:-1], len(self.band_widths), feature.shape[-1])
            tokens[..., i, :] = feature
        return tokens


def mlp(dim_in: int, dim_hidden: int, dim_out: int, depth: int) -> nn.Sequential:
    """Linear layers with Tanh between them: depth - 1 hidden layers of width dim_hidden."""
    dims = (dim_in, *(dim_hidden,) * (depth - 1), dim_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """Per band, an MLP + GLU turns a token back into that band's complex mask values."""

    def __init__(self, dim: int, band_widths: Sequence[int], depth: int, expansion: int = 4):
        super().__init__()
        self.widths = tuple(band_widths)
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, dim * expansion, 2 * w, depth), nn.GLU(dim=-1)) for w in band_widths
        )

    def forward(self, x: Tensor) -> Tensor:  # x: (b, t, bands, dim)
        out = None  # (b, t, sum(band_widths)), filled band by band: no list of bands held for a cat
        start = 0
        for band, to_freq in zip(x.unbind(dim=-2), self.to_freqs):
            values = to_freq(band)  # (b, t, width)
            if out is None:
                out = values.new_empty(*values.shape[:-1], sum(self.widths))
            out[..., start : start + values.shape[-1]] = values
            start += values.shape[-1]
        return out


# the network ---------------------------------------------------------------------------------


class BSRoformer(nn.Module):
    """Band-split RoPE transformer predicting one stem's waveform from the mixture's."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        freqs_per_bands: Sequence[int],
        stereo: bool = True,
        time_transformer_depth: int = 1,
        freq_transformer_depth: int = 1,
        dim_head: int = 64,
        heads: int = 8,
        stft_n_fft: int = 2048,
        stft_hop_length: int = 441,
        stft_win_length: int = 2048,
        stft_normalized: bool = False,
        mask_estimator_depth: int = 2,
        mlp_expansion_factor: int = 4,
    ):
        super().__init__()
        self.audio_channels = 2 if stereo else 1
        # The STFT window, made once (on the CPU even when the network is built on the meta
        # device; it moves with the model). Not in the state dict: the checkpoint has none.
        self.register_buffer("window", torch.hann_window(stft_win_length, periodic=True, device="cpu"), persistent=False)
        self.stft_args = dict(
            n_fft=stft_n_fft, hop_length=stft_hop_length, win_length=stft_win_length, center=True, normalized=stft_normalized
        )

        # One rotary table for all time transformers, one for all frequency transformers.
        time_rotary, freq_rotary = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Transformer(dim, time_transformer_depth, heads, dim_head, time_rotary),
                    Transformer(dim, freq_transformer_depth, heads, dim_head, freq_rotary),
                ]
            )
            for _ in range(depth)
        )
        self.final_norm = RMSNorm(dim)

        # Each band's features: bins x channels x (real, imag).
        band_widths = [2 * bins * self.audio_channels for bins in freqs_per_bands]
        self.band_split = BandSplit(dim, band_widths)
        self.mask_estimators = nn.ModuleList([MaskEstimator(dim, band_widths, mask_estimator_depth, mlp_expansion_factor)])
        # Tokens per slice of the transformers' input (None: all at once); see _by_slices.
        self.slice_tokens: int | None = None

    def _by_slices(self, transformer: Transformer, x: Tensor) -> Tensor:  # x: (sequences, n, dim)
        """The transformer over groups of about `slice_tokens` tokens' worth of whole sequences:
        each sequence is computed on its own, so this only bounds the size of the temporaries
        (the feed-forward's 4x-wide hidden layer, q/k/v) at the cost of more, smaller products.
        Sliced, each group's output overwrites its input in `x` (a tensor of the forward's own,
        never read again), so no second token-sized tensor is held (100 MB per chunk for 1297)."""
        if self.slice_tokens is None or x.shape[0] * x.shape[1] <= self.slice_tokens:
            return transformer(x)
        per_slice = max(1, self.slice_tokens // x.shape[1])
        for part in x.split(per_slice):
            part.copy_(transformer(part))
        return x

    def forward(self, audio: Tensor) -> Tensor:  # audio: (b, channels, samples), float32
        b, channels, samples = audio.shape
        window = self.window

        with torch.autocast(audio.device.type, enabled=False):
            spec = torch.stft(
                audio.reshape(b * channels, samples).float(), window=window, return_complex=True, **self.stft_args
            )  # (b*channels, freqs, frames)
        # Merge channels into the frequency axis, bin-major, so each band sees all channels.
        x = rearrange(torch.view_as_real(spec), "(b s) f t c -> b t (f s c)", s=channels)

        x = self.band_split(x)  # (b, frames, bands, dim)
        for time_transformer, freq_transformer in self.layers:
            x = rearrange(self._by_slices(time_transformer, rearrange(x, "b t f d -> (b f) t d")), "(b f) t d -> b t f d", b=b)
            x = rearrange(self._by_slices(freq_transformer, rearrange(x, "b t f d -> (b t) f d")), "(b t) f d -> b t f d", b=b)
        x = self.final_norm(x)

        mask = self.mask_estimators[0](x)  # (b, frames, freqs*channels*2)
        del x  # done with the tokens: free them before the iSTFT (peak memory)
        with torch.autocast(audio.device.type, enabled=False):
            mask = rearrange(mask.float(), "b t (f s c) -> (b s) f t c", s=channels, c=2)
            spec = spec * torch.view_as_complex(mask.contiguous())
            stem = torch.istft(spec, window=window, length=samples, **self.stft_args)  # (b*channels, samples)
        return stem.reshape(b, channels, samples)
