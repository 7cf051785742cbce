"""A PyTorch reference of LlamaGen's image tokenizer in its published layout (test-only).

Written from the architecture as published (Sun et al. 2024; FoundationVision/LlamaGen,
``tokenizer/tokenizer_image/vq_model.py``): module names are chosen so that ``state_dict()``
has exactly LlamaGen's keys, independently of vqgan_jax's own mapping. What differs from
taming's layout (tests/taming_reference.py, whose blocks are the same computation and are
reused here): levels are ``conv_blocks.{i}`` with ModuleLists ``res`` and ``attn``, the decoder
lists its levels deepest first, the middle is a ModuleList ``mid`` (ResnetBlock, AttnBlock,
ResnetBlock), attention sits at the lowest-resolution level only, GroupNorm has 32 groups, and
the quantizer l2-normalizes encoder outputs and codes and keeps a ``codebook_used`` buffer of
65536 recent indices. NCHW throughout; eval-mode forward passes only (no losses).
"""

import torch
import torch.nn.functional as F
from torch import nn

from taming_reference import AttnBlock, Downsample, ResnetBlock, Upsample, normalize, swish

GROUPS = 32


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            last = i == len(ch_mult) - 1
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(c, ch * mult, GROUPS))
                c = ch * mult
                if last:
                    level.attn.append(AttnBlock(c, GROUPS))
            if not last:
                level.downsample = Downsample(c)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(c, c, GROUPS), AttnBlock(c, GROUPS),
                                  ResnetBlock(c, c, GROUPS)])
        self.norm_out = normalize(c, GROUPS)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels=3):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, GROUPS), AttnBlock(c, GROUPS),
                                  ResnetBlock(c, c, GROUPS)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):  # deepest level first, as it runs
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.res.append(ResnetBlock(c, ch * ch_mult[i], GROUPS))
                c = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    level.attn.append(AttnBlock(c, GROUPS))
            if i != 0:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = normalize(c, GROUPS)
        self.conv_out = nn.Conv2d(c, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by squared distance between the l2-normalized encoder output and the
    l2-normalized codebook; returns the normalized code."""

    def __init__(self, n_e, e_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_e, e_dim)
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self):
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def forward(self, z):
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)         # b h w c
        flat = z.reshape(-1, z.shape[-1])
        e = self.codebook()
        d = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * flat @ e.t()
        idx = d.argmin(1)
        z_q = e[idx].view(z.shape)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), idx.view(z.shape[:-1])

    def lookup(self, idx):
        return self.codebook()[idx].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """LlamaGen's VQModel; VQ-16 is ``VQModel()``, VQ-8 ``ch_mult=(1, 2, 2, 4)``."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                 codebook_size=16384, codebook_embed_dim=8):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def encode(self, x):
        """``x [B, 3, H, W] -> (h = quant_conv(encoder(x)), z_q, indices [B, H/f, W/f])``."""
        h = self.quant_conv(self.encoder(x))
        z_q, idx = self.quantize(h)
        return h, z_q, idx

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, idx):
        return self.decode(self.quantize.lookup(idx))
