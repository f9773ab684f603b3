"""The paper's Tiny ViT written the plain way, as its published code lays it out: the yardstick for
`bench/throughput.py --compare-reference`.

Separate q, k and v nn.Linear layers, attention as explicit matmul -> softmax -> matmul, nn.GELU,
timm-style DropPath; meant to run eager and in fp32. Parameter names (patch_embed, cls_token,
pos_embed, ...) follow speedrun's so that speedrun.make_optimizer groups them the same way
(weight decay on matrices only), and the parameter count equals speedrun's model's for the same
configuration. Deliberately independent of speedrun's model classes: it is the thing we compare
against.
"""
import torch
import torch.nn as nn


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PlainAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (layer(x).reshape(B, N, self.heads, -1).permute(0, 2, 1, 3)
                   for layer in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class PlainBlock(nn.Module):
    def __init__(self, width, heads, hidden, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = PlainAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PlainViT(nn.Module):
    def __init__(self, width=192, depth=9, heads=12, mlp_ratio=2.0, patch_size=4, num_cls=1,
                 drop_path=0.1, num_classes=10):
        super().__init__()
        self.num_cls = num_cls
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_cls + (32 // patch_size) ** 2, width))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(*[PlainBlock(width, heads, int(width * mlp_ratio), r)
                                      for r in rates])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width * num_cls, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x, token_keep: float = 1.0):
        assert token_keep == 1.0, "the plain layout trains on every token (layout_mismatches)"
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, :self.num_cls].flatten(1))


# config fields the plain layout cannot express, with the value it needs
PLAIN_LAYOUT = {"patch_embed": "conv", "pos_emb": "learned", "mla": "", "lsa": False,
                "cls_only_blocks": 0, "depth_token_only": 0, "pool": "cls", "whiten": False,
                "token_keep": 1.0}


def layout_mismatches(cfg) -> list:
    """Config fields (of a speedrun.Config) that the plain layout does not have."""
    return [f"{k}={getattr(cfg, k)!r}" for k, v in PLAIN_LAYOUT.items() if getattr(cfg, k) != v]


def from_config(cfg) -> PlainViT:
    return PlainViT(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.patch_size, cfg.num_cls,
                    cfg.drop_path)
