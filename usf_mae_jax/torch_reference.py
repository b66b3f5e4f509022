"""Plain-PyTorch reference models (an optional module: it needs torch), written from docs/mae_fidelity.md.

The parity tests compare our Flax model with these, and `python -m usf_mae_jax.bench --torch` times their
train step; nothing else in the package imports torch.

`ReferenceMAE` computes the reference `MaskedAutoencoderViT` function with the reference state-dict keys
(`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.{j}`, `decoder_norm`,
`decoder_pred`). `TimmStyleViT` is an encoder with timm's `VisionTransformer` key names (learned `pos_embed`,
`norm`, optional `fc_norm` and `head`), used to check our `timm_vit` export without installing timm.

Only torch itself is used (no timm). Attention goes through `scaled_dot_product_attention`, GELU is the exact
erf form, LayerNorm eps is 1e-6, so the models are also fit for the CPU speed benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


def sincos_position_table(dim: int, grid: int) -> np.ndarray:
    """The fixed (1 + grid*grid, dim) table: column coordinate in the first half, row in the second.

    Each half embeds one coordinate as [sin(pos * w), cos(pos * w)], w_k = 10000 ** (-k / (dim / 4)),
    computed in float64 and cast to float32, with a zero row in front for the cls token.
    """
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)

    def embed(coord):
        angles = coord[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([embed(cols), embed(rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (N, L, D), row-major patch order


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceMAE(nn.Module):
    """Masked autoencoder with the reference keys; fixed position tables are frozen parameters."""

    def __init__(self, img_size, patch_size, in_chans, width, depth, heads, decoder_width, decoder_depth,
                 decoder_heads, mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__()
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_position_table(width, grid))[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_width) * 0.02)
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(sincos_position_table(decoder_width, grid))[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_width, patch_size**2 * in_chans)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch ordered (row, col, channel)."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        batch, length, width = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, width))
        mask = torch.ones(batch, length, device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder output without masking: (N, 1 + L, D) after the final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.pos_embed.shape[1] - 1, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_reference_mae(img_size, patch_size, in_chans, width, depth, heads, decoder_width, decoder_depth,
                        decoder_heads, mlp_ratio=4.0, norm_pix_loss=False) -> ReferenceMAE:
    return ReferenceMAE(img_size, patch_size, in_chans, width, depth, heads, decoder_width, decoder_depth,
                        decoder_heads, mlp_ratio, norm_pix_loss)


class TimmStyleViT(nn.Module):
    """ViT encoder with timm `VisionTransformer` key names, e.g. `vit_base_patch16_224` with num_classes=0.

    With `global_pool=False` the final `norm` is applied and `fc_norm` is absent (timm's 'token' pooling);
    with `global_pool=True` `norm` is absent and `fc_norm` follows the mean over patch tokens ('avg').
    """

    def __init__(self, img_size, patch_size, in_chans, width, depth, heads, mlp_ratio=4.0, num_classes=0,
                 global_pool=False):
        super().__init__()
        grid = img_size // patch_size
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(width, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(width, eps=LN_EPS) if global_pool else nn.Identity()
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(imgs)
        pooled = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]
        return self.head(pooled)
