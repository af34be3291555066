"""Inference-only CLIP towers (ViT image tower + causal text tower) in the OpenAI / open_clip state-dict layout.

Why not open_clip's own module at inference: importing ``open_clip`` imports torchvision (which pulls in
torch._dynamo) and transformers, 4.7 s on the 2-core CPU, more than everything else a cold
``python -m engine generate`` with the embedded model does (measured: torch 2.5 s, open_clip 4.7 s, loading 0.3 s,
first generation 1.8 s). This module is the same network with the same parameter names, so the same files load
strictly into either; ``tests/engine/test_clip.py`` checks it against open_clip's ``CLIP`` (keys, shapes and
outputs) and the official ``clip_tiny`` fixture. Training keeps open_clip (engine/training/train_clip.py).

Network (OpenAI CLIP): pre-norm residual blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with
``mlp = c_proj(act(c_fc(x)))``, act QuickGELU (x·sigmoid(1.702x)) for the OpenAI weights, else exact GELU.
Text: token + positional embedding, causal attention, ``ln_final``, the EOT token's features (highest token id)
@ ``text_projection``. Image: patch conv (no bias), class token, positional embedding, ``ln_pre``, blocks,
``ln_post``, class token @ ``proj``; heads = width // 64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ClipConfig


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.batch_first = True
        self.resblocks = nn.ModuleList([_Block(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTower(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w, g = cfg.vision_width, cfg.image_size // cfg.vision_patch_size
        scale = w ** -0.5  # random init as OpenAI's / open_clip's (weights normally come from a file)
        self.conv1 = nn.Conv2d(3, w, cfg.vision_patch_size, stride=cfg.vision_patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(g * g + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(w, cfg.vision_layers, w // 64, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + g², width) tokens after the blocks, before ``ln_post``."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, g², W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.tokens(pixels)[:, 0]) @ self.proj


class ClipModel(nn.Module):
    """``encode_text`` (B, 77) tokens -> (B, embed_dim); ``encode_image`` pixels -> (B, embed_dim); ``visual``."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.visual = VisionTower(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.text_width))
        self.transformer = _Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(cfg.text_width ** -0.5 * torch.randn(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask.to(x.dtype)))
        return x[torch.arange(len(x), device=x.device), tokens.argmax(-1)] @ self.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def build_clip(cfg: ClipConfig, *, device: torch.device | str | None = None) -> ClipModel:
    """Random-weight towers for ``cfg`` (``device='meta'``: nothing allocated, for ``load_state_dict(assign=True)``;
    the causal mask is then rebuilt on the CPU)."""
    with torch.device(device if device is not None else "cpu"):
        model = ClipModel(cfg)
    if model.attn_mask.device.type == "meta":
        model.attn_mask = torch.full((cfg.context_length,) * 2, float("-inf")).triu_(1)
    return model


__all__ = ["ClipModel", "build_clip", "QuickGELU"]
