"""Encoder trunk and predictor, built from timm's transformer blocks.

Both work on token sequences whose positions are given as index sets into a token grid, so the same
code serves images, spectrograms or any grid a tokenizer declares. Variable-length index sets are
padded; a boolean ``valid`` mask (True = real token) keeps padding out of attention.

Parameter names follow the reference I-JEPA checkpoints (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``norm``; ``predictor_embed``, ``mask_token``, ``predictor_blocks``, ``predictor_norm``, ``predictor_proj``),
which keeps weight import and export a renaming-free affair.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Block
from torch import nn

from ..components import Tokenizer
from ..errors import JepaError
from .pos_embed import sincos_pos_embed

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for ``x`` ``[B, N, D]`` and ``idx`` ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def key_padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, L]`` validity -> boolean attention mask ``[B, 1, 1, L]`` (None when nothing is padded)."""
    return None if valid is None else valid[:, None, None, :]


def init_weights(module: nn.Module) -> None:
    """The reference initialisation: truncated normal (std 0.02) for linear and conv weights."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_blocks(blocks: nn.ModuleList) -> None:
    """Shrink each block's residual-branch output layers by sqrt(2 * layer) (reference init)."""
    with torch.no_grad():
        for layer, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> nn.ModuleList:
    return nn.ModuleList(
        [Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=LayerNorm) for _ in range(depth)])


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, checkpointing: bool) -> torch.Tensor:
    """``block(x)``; with ``checkpointing`` (and gradients on), its activations are recomputed in the
    backward pass instead of stored (non-reentrant ``torch.utils.checkpoint``: same values, less memory)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
    return block(x, attn_mask=attn_mask)


def set_attention(module: nn.Module, backend: str) -> None:
    """Choose fused SDPA (``"sdpa"``) or plain matmul-softmax (``"math"``) in every timm attention."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = backend == "sdpa"


class PosEmbedCache(nn.Module):
    """Sin-cos position embeddings per grid, computed from coordinates once and cached."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self._cache: dict = {}

    def forward(self, coords_fn, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._cache:
            self._cache[key] = sincos_pos_embed(coords_fn(grid), self.dim).to(device)
        return self._cache[key]


def resample_grid(table: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Tensor:
    """Interpolate per-token values ``[N_src, D]`` laid out on grid ``src`` onto grid ``dst``.

    Bicubic for 2-D grids, linear for 1-D, trilinear for 3-D (learned position embeddings at a new
    input size).
    """
    if src == dst:
        return table
    modes = {1: "linear", 2: "bicubic", 3: "trilinear"}
    if len(src) not in modes or len(src) != len(dst):
        raise ValueError(f"cannot resample a {len(src)}-D grid {src} to {dst}")
    x = table.T.reshape(1, table.shape[1], *src).float()
    x = F.interpolate(x, size=dst, mode=modes[len(src)], align_corners=False)
    return x.reshape(table.shape[1], -1).T.to(table.dtype)


class Encoder(nn.Module):
    """A ViT trunk over a tokenizer: tokens + positions -> blocks -> final LayerNorm.

    No [cls] token. ``keep`` restricts the sequence to a subset of tokens (the context encoder).
    Positions are fixed sin-cos embeddings computed from the token coordinates of any grid (the
    default, as in I-JEPA), or learned embeddings stored for ``pos_grid`` and interpolated to other
    grids (for imported weights whose position embeddings are not sin-cos).

    Args:
        tokenizer: turns a batch into ``[B, N, D]`` tokens and declares the grid.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embedding width.
        qkv_bias: bias on the q, k, v projections.
        pos_grid: if given, learn position embeddings on this grid instead of using sin-cos.
    """

    def __init__(self, tokenizer: Tokenizer, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, pos_grid: tuple[int, ...] | None = None):
        super().__init__()
        self.embed_dim = tokenizer.embed_dim
        self.num_heads = num_heads
        self.patch_embed = tokenizer
        self.pos = PosEmbedCache(self.embed_dim)
        self.pos_grid = tuple(pos_grid) if pos_grid else None
        if self.pos_grid:
            init = sincos_pos_embed(tokenizer.coords(self.pos_grid), self.embed_dim)
            self.pos_embed_learned = nn.Parameter(init.unsqueeze(0))
        self.blocks = make_blocks(self.embed_dim, depth, num_heads, mlp_ratio, qkv_bias)
        self.grad_checkpointing = False  # timm's name: recompute block activations in backward
        self.norm = LayerNorm(self.embed_dim)
        init_weights(self)
        tokenizer.init_weights()
        rescale_blocks(self.blocks)

    def grid(self, x: torch.Tensor) -> tuple[int, ...]:
        return self.patch_embed.grid(tuple(x.shape[1:]))

    def pos_embed(self, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Position embeddings ``[N, D]`` for ``grid``."""
        if self.pos_grid:
            return resample_grid(self.pos_embed_learned[0], self.pos_grid, tuple(grid))
        return self.pos(self.patch_embed.coords, grid, device)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, keep_valid: torch.Tensor | None = None,
                return_layers: int = 0) -> torch.Tensor | list[torch.Tensor]:
        """Encode a batch.

        Args:
            x: input batch (``[B, C, H, W]`` for images).
            keep: ``[B, K]`` token indices to encode (None: every token).
            keep_valid: ``[B, K]`` True for real entries of a padded ``keep``.
            return_layers: if > 0, return the normed outputs of the last ``return_layers`` blocks.

        Returns:
            ``[B, N or K, D]`` tokens after the final norm (or a list of them).
        """
        tokens = self.patch_embed(x)
        tokens = tokens + self.pos_embed(self.grid(x), tokens.device).to(tokens.dtype)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        attn_mask = key_padding_mask(keep_valid)
        outs = []
        for i, blk in enumerate(self.blocks):
            tokens = run_block(blk, tokens, attn_mask, self.grad_checkpointing)
            if return_layers and i >= len(self.blocks) - return_layers:
                outs.append(self.norm(tokens))
        return outs if return_layers else self.norm(tokens)


class Predictor(nn.Module):
    """Narrow ViT that predicts target-token representations from context tokens.

    For each target set ``m`` and sample ``b`` it reads the context tokens of ``b`` plus one shared
    learned mask token per target position (with that position's embedding), exactly as the
    reference: one sequence per (target set, sample), target-set major. With ``joint`` it reads
    one sequence per sample: the context once, then the mask tokens of every target set.

    Args:
        embed_dim: encoder width (input and output).
        predictor_dim: internal width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / predictor width.
        qkv_bias: bias on q, k, v.
        joint: one sequence per sample for all target sets (see above).
    """

    def __init__(self, embed_dim: int, predictor_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, joint: bool = False):
        super().__init__()
        self.joint = joint
        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.predictor_blocks = make_blocks(predictor_dim, depth, num_heads, mlp_ratio, qkv_bias)
        self.grad_checkpointing = False
        self.predictor_norm = LayerNorm(predictor_dim)
        self.predictor_proj = nn.Linear(predictor_dim, embed_dim)
        self.pos = PosEmbedCache(predictor_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rescale_blocks(self.predictor_blocks)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor, pos: torch.Tensor,
                context_valid: torch.Tensor | None = None, target_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Predict target tokens.

        Args:
            context: ``[B, Nc, D]`` context-encoder outputs.
            context_idx: ``[B, Nc]`` their token indices.
            target_idx: ``[M, B, Kt]`` target token indices per target set.
            pos: ``[N, Dp]`` position embeddings of the grid at the predictor's width.
            context_valid, target_valid: validity of padded entries (``[B, Nc]``, ``[M, B, Kt]``) or None.

        Returns:
            ``[M * B, Kt, D]`` predictions, target-set major (row ``m * B + b``).
        """
        m, b, kt = target_idx.shape
        x = self.predictor_embed(context) + pos[context_idx].to(context.dtype)
        if self.joint:  # [B, M * Kt]: sample-major, target set m at columns m * Kt ...
            tgt = target_idx.transpose(0, 1).reshape(b, m * kt)
            tv = target_valid.transpose(0, 1).reshape(b, m * kt) if target_valid is not None else None
            cv = context_valid
        else:  # [M * B, Kt]: one sequence per (target set, sample)
            x = x.repeat(m, 1, 1)
            tgt = target_idx.reshape(m * b, kt)
            tv = target_valid.reshape(m * b, kt) if target_valid is not None else None
            cv = context_valid.repeat(m, 1) if context_valid is not None else None
        queries = self.mask_token.to(x.dtype) + pos[tgt].to(x.dtype)
        n_ctx = x.shape[1]
        x = torch.cat([x, queries], dim=1)
        valid = None
        if cv is not None or tv is not None:
            rows = x.shape[0]
            cv = cv if cv is not None else x.new_ones(rows, n_ctx, dtype=torch.bool)
            tv = tv if tv is not None else x.new_ones(rows, tgt.shape[1], dtype=torch.bool)
            valid = torch.cat([cv, tv], dim=1)
        attn_mask = key_padding_mask(valid)
        for blk in self.predictor_blocks:
            x = run_block(blk, x, attn_mask, self.grad_checkpointing)
        x = self.predictor_proj(self.predictor_norm(x[:, n_ctx:]))
        if self.joint:
            x = x.reshape(b, m, kt, -1).transpose(0, 1).reshape(m * b, kt, -1)
        return x


def layer_norm_targets(h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, (h.shape[-1],))


def batch_standardize(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise ``[B, N, D]`` features over the batch, separately at each position and channel."""
    if h.shape[0] < 2:
        raise JepaError("loss.target_batch_norm needs a per-device batch of at least 2 samples")
    h = h.float()
    var, mean = torch.var_mean(h, dim=0, unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + eps)
