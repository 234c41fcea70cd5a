"""The RoFormer networks: BS-RoFormer (viperx's 1297) and MelBand-RoFormer (Kim's vocals model and kin).

Both map a batch of waveforms at the model's sample rate, (batch, channels, samples), to
one waveform per stem the network predicts, (batch, stems, channels, samples): STFT ->
band split -> alternating time and frequency transformers -> per stem, a per-band mask
estimator -> complex mask on the mixture's spectrum -> iSTFT. They differ in their bands:
BS-RoFormer cuts the bins into contiguous bands of given widths; MelBand-RoFormer's bands
are the (overlapping) triangles of a mel filter bank, and each bin's mask is the average of
the masks its bands estimate for it. A BS-RoFormer may have unwa's HyperACE mask estimators,
which add a convolutional network's per-bin residual to the band masks (:mod:`stemsep.hyperace`).

Module layout and parameter names follow the networks the checkpoints were trained in
(lucidrains' RoFormers as vendored by audio-separator and ZFTurbo's MSST), so real state
dicts load strictly; training-only parts (losses, dropout) are left out. Each network is
built from its config dataclass, whose defaults are the reference classes' defaults (a key
a yaml leaves out means what it means there). Autocast may run the transformers in
bf16/fp16; the STFT, iSTFT, rotary angles and mask multiply always run in float32 (float64
when the network and its input are float64, as for parity tests that must not measure rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from stemsep.hyperace import HyperACENetwork

# configs -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoformerConfig:
    """The options both networks share, named as in the yaml's `model` section."""

    model_type: ClassVar[str]  # ZFTurbo's MSST name of the architecture
    title: ClassVar[str]  # the architecture's name in messages

    dim: int
    depth: int  # (time transformer, frequency transformer) pairs
    stereo: bool = False
    num_stems: int = 1  # one mask estimator, and one output waveform, per stem
    time_transformer_depth: int = 2
    freq_transformer_depth: int = 2
    dim_head: int = 64
    heads: int = 8
    stft_n_fft: int = 2048
    stft_hop_length: int = 512
    stft_win_length: int = 2048
    stft_normalized: bool = False
    mask_estimator_depth: int = 2  # MLP layers per band; each class counts them its own way
    mlp_expansion_factor: int = 4  # mask estimators' hidden width, in multiples of dim

    @property
    def audio_channels(self) -> int:
        return 2 if self.stereo else 1

    @property
    def name(self) -> str:
        """The network in messages."""
        return self.title

    @property
    def bins(self) -> int:
        return self.stft_n_fft // 2 + 1


@dataclass(frozen=True, kw_only=True)
class BSRoformerConfig(RoformerConfig):
    model_type: ClassVar[str] = "bs_roformer"
    title: ClassVar[str] = "BS-RoFormer"

    freqs_per_bands: tuple[int, ...]  # contiguous bands' widths in bins, low to high, summing to `bins`
    # unwa's HyperACE mask estimators, as MSST-WebUI switches them on: `hyperace_version` 1 or 2
    # (see stemsep.hyperace); the version alone, without the switch, changes nothing.
    use_mask_estimator_hyper_ace: bool = False
    hyperace_version: int | None = None

    @property
    def name(self) -> str:
        if self.use_mask_estimator_hyper_ace:
            version = f" v{self.hyperace_version}" if self.hyperace_version is not None else ""
            return f"{self.title} with HyperACE{version} mask estimators"
        return self.title


@dataclass(frozen=True, kw_only=True)
class MelBandRoformerConfig(RoformerConfig):
    model_type: ClassVar[str] = "mel_band_roformer"
    title: ClassVar[str] = "MelBand-RoFormer"

    num_bands: int = 60
    sample_rate: int = 44100  # places the mel bands on the bins
    mask_estimator_depth: int = 1  # hidden layers here, where BS-RoFormer counts Linear layers


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


def rotary_frequencies(dim_head: int, theta: float = 10000.0) -> Tensor:  # (dim_head/2,) float32
    """The rotary table every published RoFormer was trained with (it is never trained)."""
    return 1.0 / theta ** (torch.arange(0, dim_head, 2).float() / dim_head)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over interleaved pairs of the head dimension.

    `freqs` is stored in the checkpoint (one copy per attention layer that shares it).
    Angles and the rotation are computed in float32 whatever the autocast dtype, as in
    the reference (in float64 for float64 input), then cast back to the input's dtype.

    Pair (x, y) at position p turns by p * freq: (x cos - y sin, x sin + y cos), which is
    the complex product (x + iy) e^(i p freq). Eagerly that product is one pass over the
    tensor (10x faster on the CPU than rotating with stacked halves); torch.compile has no
    code generation for complex numbers, so a compiled network rotates the real pairs,
    which it fuses into one kernel.
    """

    def __init__(self, dim_head: int):
        super().__init__()
        self.freqs = nn.Parameter(rotary_frequencies(dim_head), requires_grad=False)  # (dim_head/2,)

    def forward(self, t: Tensor) -> Tensor:  # t: (..., n, dim_head)
        precision = torch.promote_types(t.dtype, torch.float32)
        positions = torch.arange(t.shape[-2], device=t.device, dtype=precision)
        angles = torch.outer(positions, self.freqs.to(precision))  # (n, dim_head/2)
        pairs = rearrange(t.to(precision), "... (d r) -> ... d r", r=2)  # (..., n, dim_head/2, 2)
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
    """`depth` residual (attention, feed-forward) pairs over the second-to-last axis, then
    an RMSNorm if `norm_output` (MelBand-RoFormer's; BS-RoFormer norms once, at the end)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, rotary_embed: RotaryEmbedding, norm_output: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, rotary_embed), FeedForward(dim)]) for _ in range(depth)
        )
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # x: (b, n, dim)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


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


def mlp(dim_in: int, dim_hidden: int, dim_out: int, hidden_layers: int) -> nn.Sequential:
    """Linear layers with Tanh between them: `hidden_layers` hidden layers of width dim_hidden."""
    dims = (dim_in, *(dim_hidden,) * hidden_layers, dim_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """Per band, an MLP + GLU turns a token back into that band's complex mask values."""

    def __init__(self, dim: int, band_widths: Sequence[int], hidden_layers: int, expansion: int):
        super().__init__()
        self.widths = tuple(band_widths)
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, dim * expansion, 2 * w, hidden_layers), nn.GLU(dim=-1)) for w in band_widths
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


class HyperACEMaskEstimator(MaskEstimator):
    """The band MLPs' masks plus a HyperACE network's residual, which sees all the tokens at
    once as a (dim x frames x bands) image and answers with a value per (bin, channel, re/im)."""

    def __init__(self, dim: int, band_widths: Sequence[int], hidden_layers: int, expansion: int, version: int, bins: int):
        super().__init__(dim, band_widths, hidden_layers, expansion)
        self.segm = HyperACENetwork(version, dim, len(band_widths), bins)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, t, bands, dim) -> (b, t, (f s c)), s = 2 channels, c = re/im
        residual = rearrange(self.segm(rearrange(x, "b t k d -> b d t k")), "b sc t f -> b t (f sc)")
        return super().forward(x) + residual


# mel bands -----------------------------------------------------------------------------------


def mel_bands(sample_rate: int, n_fft: int, num_bands: int) -> np.ndarray:  # (num_bands, n_fft // 2 + 1) bool
    """Which STFT bins each of MelBand-RoFormer's bands covers.

    The bands are the nonzero entries of librosa's ``filters.mel(sr=sample_rate,
    n_fft=n_fft, n_mels=num_bands)`` (Slaney mel scale, Slaney area norm, 0 Hz to
    sample_rate / 2, float32 weights), with bin 0 added to the first band and the top bin
    to the last, as the network was trained. Computed here with librosa 0.11's floating-point
    steps, so that a bin at a triangle's very edge falls on the same side (a test pins the
    result against librosa); raises ValueError for a layout the network cannot use (a band
    without bins, a bin in no band).
    """
    f_sp = 200.0 / 3  # Hz per mel below 1 kHz; logarithmic above
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(hz: float) -> float:
        return min_log_mel + np.log(hz / min_log_hz) / logstep if hz >= min_log_hz else hz / f_sp

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(float(sample_rate) / 2), num_bands + 2)
    edges = f_sp * mels  # (num_bands + 2,) Hz: band i rises from edges[i], peaks at i + 1, falls to i + 2
    log_region = mels >= min_log_mel
    edges[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))

    bin_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)  # (bins,)
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, bin_hz)  # (num_bands + 2, bins)
    weights = np.zeros((num_bands, len(bin_hz)), dtype=np.float32)
    for i in range(num_bands):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, np.newaxis]  # area norm: may flush a tiny weight to 0

    bands = weights > 0
    bands[0, 0] = bands[-1, -1] = True  # both are 0 (or next to it) in the filter bank
    if not bands.any(axis=1).all():
        empty = int(np.flatnonzero(~bands.any(axis=1))[0])
        raise ValueError(f"mel band {empty} of {num_bands} gets no STFT bin (n_fft {n_fft} at {sample_rate} Hz)")
    if not bands.any(axis=0).all():
        raise ValueError(f"STFT bin {int(np.flatnonzero(~bands.any(axis=0))[0])} is in no mel band")
    return bands


# the networks --------------------------------------------------------------------------------


class Roformer(nn.Module):
    """What both networks share: the STFT, band-split tokens, the transformer stack, one
    mask estimator per stem and the masked iSTFT. Subclasses say which of the spectrum's
    (bin, channel) values each band reads and how the band masks go back onto the bins."""

    def __init__(self, config: RoformerConfig, band_widths: Sequence[int], mlp_hidden_layers: int, norm_each_transformer: bool):
        super().__init__()
        self.config = config
        self.audio_channels = config.audio_channels
        # The STFT window, made once (on the CPU even when the network is built on the meta
        # device; it moves with the model). Not in the state dict: the checkpoint has none.
        self.register_buffer("window", torch.hann_window(config.stft_win_length, periodic=True, device="cpu"), persistent=False)
        self.stft_args = dict(
            n_fft=config.stft_n_fft,
            hop_length=config.stft_hop_length,
            win_length=config.stft_win_length,
            center=True,
            normalized=config.stft_normalized,
        )

        # One rotary table for all time transformers, one for all frequency transformers.
        time_rotary, freq_rotary = RotaryEmbedding(config.dim_head), RotaryEmbedding(config.dim_head)
        transformer = dict(dim=config.dim, heads=config.heads, dim_head=config.dim_head, norm_output=norm_each_transformer)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Transformer(depth=config.time_transformer_depth, rotary_embed=time_rotary, **transformer),
                    Transformer(depth=config.freq_transformer_depth, rotary_embed=freq_rotary, **transformer),
                ]
            )
            for _ in range(config.depth)
        )
        # BS-RoFormer norms the tokens once after the stack, MelBand-RoFormer after each transformer.
        self.final_norm = nn.Identity() if norm_each_transformer else RMSNorm(config.dim)

        self.band_split = BandSplit(config.dim, band_widths)
        self.mask_estimators = nn.ModuleList(self._mask_estimator(band_widths, mlp_hidden_layers) for _ in range(config.num_stems))
        # Tokens per slice of the transformers' input (None: all at once); see _by_slices.
        self.slice_tokens: int | None = None

    def _mask_estimator(self, band_widths: Sequence[int], mlp_hidden_layers: int) -> MaskEstimator:
        return MaskEstimator(self.config.dim, band_widths, mlp_hidden_layers, self.config.mlp_expansion_factor)

    def _band_input(self, spec: Tensor) -> Tensor:  # spec: (b, t, (f s), c) float -> (b, t, sum(band_widths))
        raise NotImplementedError

    def _spectrum_mask(self, mask: Tensor, channels: int) -> Tensor:  # mask: (b, t, sum(band_widths)) -> ((b s), f, t) complex
        raise NotImplementedError

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
        if channels != self.audio_channels:
            raise ValueError(f"this network takes {self.audio_channels} audio channel(s), got {channels}")
        window = self.window
        precision = torch.promote_types(audio.dtype, torch.float32)

        with torch.autocast(audio.device.type, enabled=False):
            spec = torch.stft(
                audio.reshape(b * channels, samples).to(precision), window=window, return_complex=True, **self.stft_args
            )  # (b*channels, freqs, frames)
        # Merge channels into the frequency axis, bin-major, so each band sees all channels.
        x = self._band_input(rearrange(torch.view_as_real(spec), "(b s) f t c -> b t (f s) c", s=channels))

        x = self.band_split(x)  # (b, frames, bands, dim)
        for time_transformer, freq_transformer in self.layers:
            x = rearrange(self._by_slices(time_transformer, rearrange(x, "b t f d -> (b f) t d")), "(b f) t d -> b t f d", b=b)
            x = rearrange(self._by_slices(freq_transformer, rearrange(x, "b t f d -> (b t) f d")), "(b t) f d -> b t f d", b=b)
        x = self.final_norm(x)

        masks = [estimator(x) for estimator in self.mask_estimators]  # per stem (b, frames, band values)
        del x  # done with the tokens: free them before the iSTFTs (peak memory)
        stems = torch.empty(b, len(masks), channels, samples, device=audio.device, dtype=precision)
        with torch.autocast(audio.device.type, enabled=False):
            for i in range(len(masks)):
                mask, masks[i] = self._spectrum_mask(masks[i].to(precision), channels), None
                stem = torch.istft(spec * mask, window=window, length=samples, **self.stft_args)  # (b*channels, samples)
                stems[:, i] = stem.reshape(b, channels, samples)
        return stems


class BSRoformer(Roformer):
    """Band-split RoPE transformer: contiguous bands of `freqs_per_bands` bins each.
    Its mask estimators' `mask_estimator_depth` counts Linear layers; they may be HyperACE ones."""

    def __init__(self, config: BSRoformerConfig):
        # Each band's features: bins x channels x (real, imag).
        band_widths = [2 * bins * config.audio_channels for bins in config.freqs_per_bands]
        super().__init__(config, band_widths, config.mask_estimator_depth - 1, norm_each_transformer=False)

    def _mask_estimator(self, band_widths: Sequence[int], mlp_hidden_layers: int) -> MaskEstimator:
        c = self.config
        if not c.use_mask_estimator_hyper_ace:
            return super()._mask_estimator(band_widths, mlp_hidden_layers)
        return HyperACEMaskEstimator(c.dim, band_widths, mlp_hidden_layers, c.mlp_expansion_factor, c.hyperace_version, c.bins)

    def _band_input(self, spec: Tensor) -> Tensor:  # (b, t, (f s), c) -> (b, t, (f s c))
        return rearrange(spec, "b t fs c -> b t (fs c)")

    def _spectrum_mask(self, mask: Tensor, channels: int) -> Tensor:  # (b, t, (f s c)) -> ((b s), f, t) complex
        mask = rearrange(mask, "b t (f s c) -> (b s) f t c", s=channels, c=2)
        return torch.view_as_complex(mask.contiguous())


class MelBandRoformer(Roformer):
    """Mel-band RoPE transformer: `num_bands` overlapping mel bands (see :func:`mel_bands`).

    Each band reads its bins' values of all channels, in bin order; a bin two bands share is
    read by both, and its mask is the mean of their two estimates. Its mask estimators'
    `mask_estimator_depth` counts hidden layers (depth 1 = BS-RoFormer's depth 2)."""

    def __init__(self, config: MelBandRoformerConfig):
        bands = mel_bands(config.sample_rate, config.stft_n_fft, config.num_bands)  # (bands, bins)
        channels = config.audio_channels
        band_widths = [2 * int(bins) * channels for bins in bands.sum(axis=1)]
        super().__init__(config, band_widths, config.mask_estimator_depth, norm_each_transformer=True)
        # The (bin, channel) rows of the spectrum each band reads, band after band: indices
        # into its (f s) axis. Buffers, not state: the checkpoint has none (CPU; see window).
        band_bins = np.nonzero(bands)[1]  # (band values / channels,) bins, band-major
        rows = rearrange(band_bins[:, None] * channels + np.arange(channels), "g s -> (g s)")
        self.register_buffer("rows", torch.from_numpy(rows), persistent=False)
        self.register_buffer(
            "bands_per_row", torch.from_numpy(repeat(bands.sum(axis=0), "f -> (f s)", s=channels).astype(np.float32)),
            persistent=False,
        )  # ((f s),) how many bands read each row: the divisor of its summed masks

    def _band_input(self, spec: Tensor) -> Tensor:  # (b, t, (f s), c) -> (b, t, (g c)), g = self.rows
        return rearrange(spec.index_select(2, self.rows), "b t g c -> b t (g c)")

    def _spectrum_mask(self, mask: Tensor, channels: int) -> Tensor:  # (b, t, (g c)) -> ((b s), f, t) complex
        mask = rearrange(mask, "b t (g c) -> b g t c", c=2)
        summed = mask.new_zeros(mask.shape[0], self.bands_per_row.shape[0], *mask.shape[2:])  # (b, (f s), t, c)
        averaged = summed.index_add_(1, self.rows, mask) / self.bands_per_row[:, None, None]
        return torch.view_as_complex(rearrange(averaged, "b (f s) t c -> (b s) f t c", s=channels).contiguous())


def build_network(config: BSRoformerConfig | MelBandRoformerConfig) -> Roformer:
    """The network `config` describes, with freshly initialized weights."""
    return MelBandRoformer(config) if isinstance(config, MelBandRoformerConfig) else BSRoformer(config)
