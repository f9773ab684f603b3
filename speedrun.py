"""Speedrun trainer for the Tiny ViT of "Powerful Design of Small Vision Transformer on CIFAR10".

One file, read top to bottom: config and variants -> model -> optimisation -> training loop -> CLI.
The data set lives on the training device as uint8 and is augmented there (data_gpu.py); fused
kernels sit behind one dispatch point (kernels/). `python speedrun.py --help` lists every flag.
"""
import argparse
import collections
import contextlib
import ctypes
import dataclasses
import difflib
import functools
import glob
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data_gpu
import kernels
from kernels._triton import interpret_enabled

NUM_CLASSES = 10
SIDE = data_gpu.IMAGE_SIDE  # image side in pixels


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Config and variants

def _f(default, help, **meta):
    """A config field whose help text becomes its --flag's help."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Config:
    # model (REFERENCE.md's baseline "Tiny ViT")
    variant: str = _f("baseline", "preset name(s), comma-separated; later presets win", cli=False)
    fitted_because: str = _f("", "why a preset that fits itself to the CPU (cpu-speedrun) chose "
                             "its tuning there, e.g. the probe's figures", cli=False)
    width: int = _f(192, "token width (embedding dimension)")
    depth: int = _f(9, "number of transformer blocks")
    heads: int = _f(12, "attention heads per block")
    mlp_ratio: float = _f(2.0, "MLP hidden width / token width")
    patch_size: int = _f(4, "patch side in pixels (32/patch_size patches per side)")
    num_cls: int = _f(1, "number of CLS tokens; the head reads all their final states concatenated")
    drop_path: float = _f(0.1, "stochastic depth rate of the last block (rises linearly from 0)")
    pos_emb: str = _f("learned", "position embedding", choices=("learned", "sin"))
    patch_embed: str = _f("conv", "patch embedding: a conv per patch (see --patch-context), or "
                          "Shifted Patch Tokenization", choices=("conv", "spt"))
    patch_context: int = _f(0, "pixels beyond its own patch, on every side, that each conv patch "
                            "filter also reads (overlapping patches: filters patch+2c wide at "
                            "stride patch, the image zero-padded by c); 0: the patch alone")
    whiten: bool = _f(False, "initialise patch filters from the whitening eigenvectors of patches")
    whiten_from: str = _f("augmented", "--whiten's patch statistics: augmented = the paper's code "
                          "(every stride-1 patch of the first 5,120 training images as augmented "
                          "for training, uncentred covariance, largest eigenvalue first); raw = ours "
                          "(64 non-overlapping patches of the first 5,000 raw images, mean-centred, "
                          "smallest eigenvalue first)", choices=("augmented", "raw"))
    mla: str = _f("", "projections made low-rank (any of q, k, v), e.g. 'q' or 'qkv'")
    latent_dim: int = _f(64, "latent width of the low-rank (MLA) projections")
    lsa: bool = _f(False, "Locality Self-Attention: mask self-attention, learnable temperature")
    depth_token_only: int = _f(0, "class-attention blocks appended after the --depth blocks, as "
                               "the paper code's ViT option of this name (not the CaiT "
                               "architecture): CLS tokens attend to every token, patch tokens pass "
                               "through a projection of their own, then all through the MLP")
    cls_only_blocks: int = _f(0, "ours: the last N of the --depth blocks update only the CLS "
                              "tokens (they alone attend), patch tokens pass unchanged")
    token_keep: float = _f(1.0, "share of patch tokens each training image keeps, drawn at random "
                           "(PatchDropout: cheaper steps); evaluation sees them all")
    full_token_tail: float = _f(0.0, "the last share of the run trains on every patch token "
                                "(--token-keep before it), so the model ends on what evaluation sees")
    full_token_ramp: float = _f(0.0, "the share of the run before --full-token-tail over which the "
                                "token share rises from --token-keep to all tokens, an eighth of the "
                                "tokens at a time (a graph each when compiled)")
    pool: str = _f("cls", "what the head reads: CLS tokens, or the mean of patch tokens",
                   choices=("cls", "gap"))
    # data and augmentation (data_gpu.py)
    crop_pad: int = _f(4, "random crops from the image zero-padded by this many pixels (0: none)")
    autoaugment: bool = _f(True, "AutoAugment CIFAR-10 policy, per image")
    erase_prob: float = _f(0.25, "random-erasing probability per image")
    mix_prob: float = _f(0.5, "probability that a batch is mixed (CutMix or MixUp)")
    mix_partner: str = _f("randperm", "whose image each mixed image takes in: a random "
                          "permutation of the batch (the paper's code), or the batch in reverse "
                          "order (fixed pairs i, B-1-i)", choices=("randperm", "flip"))
    mixup: bool = _f(True, "allow MixUp for mixed batches")
    cutmix: bool = _f(True, "allow CutMix for mixed batches")
    passes_per_epoch: int = _f(3, "an epoch is this many times the 50k images (the paper's "
                               "sampler: len_factor 3)")
    repeat_aug: int = _f(1, "copies of each image put into its batch in a row, each augmented on "
                         "its own (batch augmentation, as the paper's 4-GPU bs1024 and Lion rows: "
                         "3); an epoch still holds passes_per_epoch x 50k samples")
    drop_last: bool = _f(True, "each epoch's stream drops its last partial batch, as the paper's "
                         "loader (585 steps of 256 an epoch, 58,500 in 100); off: one endless "
                         "stream (58,593)")
    # optimisation
    optimizer: str = _f("adamw", "optimizer (muon: Muon for the blocks' weight matrices, AdamW for "
                        "the rest, at AdamW's lr and weight decay)", choices=("adamw", "lion", "muon"))
    lr: float = _f(2e-3, "peak learning rate (the paper's text: 2e-3)")
    weight_decay: float = _f(0.05, "decoupled weight decay (on --decay-params)")
    decay_params: str = _f("all", "what weight decay acts on: all parameters (the paper's code), "
                           "or matrices (>= 2-D weights; biases, norms, CLS and position "
                           "embedding stay free)", choices=("all", "matrices"))
    batch_size: int = _f(256, "global batch size (split across processes under torchrun)")
    epochs: float = _f(100.0, "epochs, each passes_per_epoch passes over the training set")
    warmup_epochs: float = _f(10.0, "linear warm-up length, as a share of epochs")
    lr_decay: str = _f("cosine", "the decay after warm-up: cosine (the paper's) or linear, each "
                       "down to min_lr at the end", choices=("cosine", "linear"))
    min_lr: float = _f(1e-6, "learning rate at the end of the decay")
    label_smoothing: float = _f(0.1, "label smoothing")
    # run
    max_steps: int = _f(0, "stop after this many steps (0: run all epochs); schedule spans them")
    time_budget: float = _f(0.0, "seconds for the whole run incl. start-up and final eval (0: none)")
    seed: int = _f(0, "random seed (model init, data order, augmentation)")
    device: str = _f("auto", "cuda, cpu, or auto (CUDA when present)")
    precision: str = _f("auto", "compute precision; auto: bf16 autocast on CUDA and on CPUs with "
                                "AMX/AVX512-BF16, fp32 elsewhere",
                        choices=("auto", "fp32", "bf16"))
    compile: str = _f("auto", "torch.compile the model; auto: on for CUDA; on CPU only for runs "
                                "planned >= 30 min, where its ~40 s compile pays back",
                      choices=("auto", "on", "off"))
    kernels: str = _f("auto", "attention/low-rank kernels: Triton on CUDA (auto), PyTorch autograd "
                              "(torch), or the kernels' PyTorch references (same saved tensors)",
                      choices=("auto", "triton", "torch", "reference"))
    tta_flip: bool = _f(False, "test-time augmentation: score each test image and its mirror "
                               "image, averaging the logits (evaluation costs twice as much)")
    eval_every: float = _f(5.0, "evaluate on the 10k test images every N epochs, the first after "
                                "min(N, 1): at 5 after epochs 1, 6, ..., 96, as the paper's code "
                                "(its epochs 0, 5, ..., 95); the best of these is the summary's "
                                "best_test_acc, the paper's statistic. 0: none. The end of the "
                                "run is evaluated too (test_acc)")
    log_every: int = _f(50, "log loss/throughput every N steps (the only host syncs)")
    data: str = _f("", "cifar-10-python.tar.gz or cifar-10-batches-py/ (default: ./data, "
                       "downloaded if missing)")
    out: str = _f("", "output folder (default: runs/<variant>-<time>)")
    nan_policy: str = _f("stop", "on a non-finite loss: stop, or skip the step (syncs every step)",
                         choices=("stop", "skip"))
    deterministic: bool = _f(False, "CUDA: bit-reproducible runs via torch.use_deterministic_algorithms, "
                                    "CUBLAS_WORKSPACE_CONFIG=:4096:8 and no cuDNN autotuning; slower, "
                                    "as scatter/index backward passes lose their atomic adds and cuBLAS "
                                    "its free choice of kernels (CPU runs are deterministic anyway)")

    @property
    def num_patches(self) -> int:
        """Patch tokens of a whole image."""
        return (SIDE // self.patch_size) ** 2


@dataclass(frozen=True)
class Variant:
    about: str
    overrides: dict
    paper_acc: float = None      # Table 2/3 of the paper, 100 epochs
    paper_runtime_s: float = None  # RTX 3090


# the cpu-speedrun recipe (its reasons are beside its entry below), shared by its fp32 retuning
CPU_SPEEDRUN = {"width": 128, "depth": 7, "heads": 2, "batch_size": 128, "optimizer": "muon",
                "whiten": True, "whiten_from": "raw", "patch_context": 2,
                "decay_params": "matrices", "drop_last": False,
                "token_keep": 0.25, "full_token_ramp": 0.3, "full_token_tail": 0.1,
                "crop_pad": 0, "autoaugment": False, "mix_prob": 0.0, "erase_prob": 0.0,
                "label_smoothing": 0.0, "drop_path": 0.0, "epochs": 30.0,
                "warmup_epochs": 1.5, "tta_flip": True, "eval_every": 0.0,
                "time_budget": 600.0}

# what cpu-speedrun changes for each precision: fp32 steps cost twice bf16's where bf16 has
# matrix units, so fp32 buys cheaper images (fit_cpu_speedrun picks one by measuring)
CPU_TUNING = {"bf16": {"precision": "bf16"},
              "fp32": {"precision": "fp32", "width": 96, "depth": 4, "token_keep": 0.125}}
# bf16 is chosen where it trains at least this much faster than fp32: on the AMX Xeon its lead
# for this small model is only 1.05-1.4x, yet bf16 with the preset's tuning beat fp32 with
# cheaper images by 4 points at 1.27x; without bf16 units it is far below 1
CPU_BF16_LEAD = 1.0

VARIANTS = {
    "baseline": Variant("the paper's Tiny ViT: width 192, depth 9, 12 heads, 1 CLS", {}, 93.65, 4658),
    "no-aa": Variant("no AutoAugment", {"autoaugment": False}, 92.14, 4684),
    "no-mixup": Variant("no MixUp (CutMix alone at p 0.5)", {"mixup": False}, 93.68, 4656),
    "no-cutmix": Variant("no CutMix (MixUp alone at p 0.5)", {"cutmix": False}, 92.77, 4651),
    "sin": Variant("fixed 2-D sin-cos position embedding", {"pos_emb": "sin"}, 93.43, 4687),
    "whiten": Variant("patch filters from patch-whitening eigenvectors", {"whiten": True},
                      93.28, 4676),
    "mla-q": Variant("low-rank q projection", {"mla": "q"}, 93.32, 4716),
    "mla-k": Variant("low-rank k projection", {"mla": "k"}, 92.50, 4711),
    "mla-qk": Variant("low-rank q and k", {"mla": "qk"}, 92.42, 4785),
    "mla-kv": Variant("low-rank k and v", {"mla": "kv"}, 92.43, 4756),
    "mla-qkv": Variant("low-rank q, k and v", {"mla": "qkv"}, 91.80, 4805),
    # the paper ran these two on 4 GPUs, whose sampler put each image 3 times into the batch
    "bs1024": Variant("batch 1024 of 3 copies per image, lr kept at 2e-3 (the paper's DDP rows "
                      "kept the recipe; linear scaling to 8e-3 destabilises AdamW ViTs)",
                      {"batch_size": 1024, "repeat_aug": 3}, 92.09, 1371),
    "lion": Variant("Lion optimizer, batch 1024 of 3 copies per image, lr 2e-4 (/10) and wd 0.5 "
                    "(x10) per the Lion paper",
                    {"optimizer": "lion", "batch_size": 1024, "repeat_aug": 3, "lr": 2e-4,
                     "weight_decay": 0.5}, 92.38, 1545),
    "dim96": Variant("width 96 (head dim 8), 1 CLS", {"width": 96}, 90.41),
    "mcls": Variant("width 96, 2 CLS tokens concatenated into the head",
                    {"width": 96, "num_cls": 2}, 93.95),
    "spt": Variant("Shifted Patch Tokenization (Lee et al.)", {"patch_embed": "spt"}),
    "lsa": Variant("Locality Self-Attention: no self-attention, learnable temperature",
                   {"lsa": True}),
    "depth-token-only": Variant("2 class-attention blocks appended after the 9, as the paper "
                                "code's ViT option depth_token_only=2 (not the CaiT architecture)",
                                {"depth_token_only": 2}),
    "cls-only-last2": Variant("ours: the last 2 of the 9 blocks update only the CLS tokens "
                              "(neither the paper code's form nor CaiT)", {"cls_only_blocks": 2}),
    "gap": Variant("head reads the mean of patch tokens, no CLS (BinaryViT)",
                   {"pool": "gap", "num_cls": 0}),
    # ten minutes are too few for regularisation to pay, so every choice buys images/s, faster
    # fitting or depth (the measurements: bench/README.md, CPU speedrun); 30 epochs is a cap the
    # time budget always meets first
    "cpu-speedrun": Variant("10-minute CPU preset: width 128, depth 7, 2 heads, whitened 8x8 "
                            "patch filters at stride 4, Muon, a quarter of the tokens rising to "
                            "all over 60-90 % of the run, flips only, flip TTA, schedule fitted "
                            "to --time-budget (600 s)",
                            CPU_SPEEDRUN),
    # fp32 runs at about half the images/s of bf16, so the same ten minutes favour cheaper
    # images still (bench/README.md, CPU without bf16 units)
    "cpu-speedrun-fp32": Variant("cpu-speedrun for CPUs without bf16 units (fp32): width 96, "
                                 "depth 4, an eighth of the tokens before the rise",
                                 {**CPU_SPEEDRUN, **CPU_TUNING["fp32"]}),
}

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# fields that shape the model or recipe: a resumed run may not change them
RUN_FIELDS = {"max_steps", "time_budget", "device", "precision", "compile", "kernels", "eval_every",
              "log_every", "data", "out", "nan_policy", "deterministic", "tta_flip"}


def resolve_config(variant: str = "baseline", **overrides) -> Config:
    """Presets compose left to right ('mcls,mla-q'), then explicit overrides win."""
    names = [v.strip() for v in variant.split(",") if v.strip()] or ["baseline"]
    values = {}
    for name in names:
        if name not in VARIANTS:
            close = difflib.get_close_matches(name, VARIANTS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown variant {name!r}{hint} (see --list-variants)")
        values.update(VARIANTS[name].overrides)
    unknown = set(overrides) - set(CONFIG_FIELDS)
    if unknown:
        raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    cfg = Config(variant=",".join(names), **values)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse a config that could not run, with the first failing check's one-line message."""
    for ok, message in config_checks(cfg, world_size):
        if not ok:
            raise UsageError(message)


# every numeric flag's valid range, as its error message states it; a bound may name another flag.
# Finite values only: NaN and infinities are refused with the rest
RANGES = {"width": "[1, inf)", "depth": "[1, inf)", "heads": "[1, inf)", "mlp_ratio": "(0, inf)",
          "patch_size": "[2, 32]", "patch_context": "[0, --patch-size]", "num_cls": "[0, inf)",
          "drop_path": "[0, 1)", "latent_dim": "[1, inf)", "cls_only_blocks": "[0, --depth]",
          "depth_token_only": "[0, inf)", "repeat_aug": "[1, inf)", "token_keep": "(0, 1]",
          "full_token_tail": "[0, 1]", "full_token_ramp": "[0, 1]", "crop_pad": "[0, 16]",
          "erase_prob": "[0, 1]", "mix_prob": "[0, 1]", "passes_per_epoch": "[1, inf)", "lr": "[0, inf)",
          "weight_decay": "[0, inf)", "batch_size": "[1, inf)", "epochs": "(0, inf)",
          "warmup_epochs": "[0, inf)", "min_lr": "[0, --lr]", "label_smoothing": "[0, 1)",
          "max_steps": "[0, inf)", "time_budget": "[0, inf)",
          "seed": "[0, 4294967295]",  # NumPy takes no negative seed
          "eval_every": "[0, inf)", "log_every": "[1, inf)"}


def range_error(flag: str, value, interval: str, named: dict = None) -> Optional[str]:
    """Why `value` lies outside `interval` ('(0, 1]', '[1, inf)'; a bound may name a flag, whose
    value `named` gives: '[0, --lr]'), or None when it is inside; NaN is outside every range."""
    bounds = [t.strip() for t in interval[1:-1].split(",")]
    low, high = (named[t] if t.startswith("--") else float(t) for t in bounds)
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (low < value if interval[0] == "(" else low <= value)
            and (value < high if interval[-1] == ")" else value <= high)):
        return None
    said = "".join(f"; {t} is {named[t]}" for t in bounds if t.startswith("--"))
    return f"{flag} must be in {interval} (got {value}{said})"


def config_checks(cfg: Config, world_size: int = 1):
    """Every check of a config, in order; a generator, so that each check is evaluated only once
    those before it passed and may rely on them (the divisions by --heads or --patch-size)."""
    for name, f in CONFIG_FIELDS.items():
        choices = f.metadata.get("choices")
        if choices:
            yield getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be one of " \
                                                 f"{', '.join(choices)} (got {getattr(cfg, name)!r})"
    flags = {"--" + name.replace("_", "-"): value for name, value in dataclasses.asdict(cfg).items()}
    for name, interval in RANGES.items():
        flag = "--" + name.replace("_", "-")
        error = range_error(flag, flags[flag], interval, flags)
        yield error is None, error
    yield (cfg.batch_size % world_size == 0,
           f"--batch-size {cfg.batch_size} is not divisible by the {world_size} processes")
    yield cfg.width % cfg.heads == 0, f"--width {cfg.width} is not divisible by --heads {cfg.heads}"
    yield (SIDE % cfg.patch_size == 0 and cfg.patch_size % 2 == 0,
           f"--patch-size must be even and divide {SIDE} (got {cfg.patch_size})")
    yield (int(cfg.width * cfg.mlp_ratio) >= 1,
           f"--mlp-ratio {cfg.mlp_ratio} leaves the MLP of width {cfg.width} without a unit")
    yield set(cfg.mla) <= set("qkv"), f"--mla takes letters from 'qkv' (got {cfg.mla!r})"
    yield cfg.num_cls >= (0 if cfg.pool == "gap" else 1), "--num-cls must be >= 1 with CLS pooling"
    yield (cfg.cls_only_blocks + cfg.depth_token_only == 0 or cfg.num_cls >= 1,
           "class-attention blocks need a CLS token")
    yield cfg.pos_emb != "sin" or cfg.width % 4 == 0, "sin position embedding needs width % 4 == 0"
    yield (cfg.full_token_ramp + cfg.full_token_tail <= 1,
           "--full-token-ramp and --full-token-tail add up to more than the run")
    yield not cfg.whiten or cfg.patch_embed == "conv", "--whiten sets conv patch filters: it " \
                                                        "needs --patch-embed conv"
    yield (not cfg.patch_context or cfg.patch_embed == "conv",
           "--patch-context widens conv patch filters: it needs --patch-embed conv")


# ----------------------------------------------------------------------------------------------
# Model: Tiny ViT (timm-style modules, names as in the paper)

class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class LowRank(nn.Module):
    """MLA projection: down to latent_dim without bias, up to width with bias."""

    def __init__(self, width: int, latent_dim: int):
        super().__init__()
        self.down = nn.Linear(width, latent_dim, bias=False)
        self.up = nn.Linear(latent_dim, width)

    def forward(self, x):
        return kernels.lowrank_linear(x, self.down.weight, self.up.weight, self.up.bias)


class Attention(nn.Module):
    def __init__(self, width, heads, mla="", latent_dim=64, lsa=False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.dense_names = [n for n in "qkv" if n not in mla]
        # dense projections share one matmul (same parameters as separate q/k/v Linears)
        self.qkv = nn.Linear(width, width * len(self.dense_names)) if self.dense_names else None
        self.low_rank = nn.ModuleDict({n: LowRank(width, latent_dim) for n in "qkv" if n in mla})
        self.proj = nn.Linear(width, width)
        self.lsa = lsa
        if lsa:  # LSA: learnable temperature, initialised at the usual 1/sqrt(head_dim)
            self.scale = nn.Parameter(torch.tensor(self.head_dim ** -0.5))
        else:
            self.scale = self.head_dim ** -0.5

    def forward(self, x, num_query: int = 0):
        """num_query > 0: only the first num_query tokens ask (class attention)."""
        B, N, C = x.shape
        proj = dict(zip(self.dense_names, self.qkv(x).chunk(len(self.dense_names), -1))) \
            if self.qkv is not None else {}
        # mla-q: the kernel builds the queries from the 64-wide latent, so q is never stored
        fused_q = "q" in self.low_rank
        proj.update({n: m(x) for n, m in self.low_rank.items() if not (fused_q and n == "q")})
        k, v = (proj[n].view(B, N, self.heads, self.head_dim).transpose(1, 2) for n in "kv")
        if fused_q:
            q_proj = self.low_rank["q"]
            out = kernels.lowrank_q_attention(x, q_proj.down.weight, q_proj.up.weight, q_proj.up.bias,
                                              k, v, self.scale, diag_mask=self.lsa,
                                              num_query=num_query)
        else:
            q = proj["q"].view(B, N, self.heads, self.head_dim).transpose(1, 2)
            out = kernels.attention(q[:, :, :num_query] if num_query else q, k, v, self.scale,
                                    diag_mask=self.lsa)
        return self.proj(out.transpose(1, 2).reshape(B, out.shape[2], C))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block. With cls_only (ours, --cls-only-blocks) only the CLS tokens attend and are
    updated; patch tokens pass unchanged."""

    def __init__(self, cfg: Config, drop_path: float, cls_only: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads, cfg.mla, cfg.latent_dim, cfg.lsa)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.num_query = cfg.num_cls if cls_only else 0

    def forward(self, x):
        if self.num_query:
            cls = x[:, :self.num_query]
            cls = cls + self.drop_path(self.attn(self.norm1(x), self.num_query))
            cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
            return torch.cat([cls, x[:, self.num_query:]], 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AppendedClassAttentionBlock(nn.Module):
    """The paper code's class-attention block (its ViT option depth_token_only), appended after
    the self-attention blocks: the CLS tokens attend to every token, each patch token passes
    through a projection of its own instead, and every token then goes through the MLP. Its
    attention is always dense, as the code's (no MLA, no LSA)."""

    def __init__(self, cfg: Config, drop_path: float):
        super().__init__()
        self.num_cls = cfg.num_cls
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.patch_proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        h = self.norm1(x)
        update = torch.cat([self.attn(h, self.num_cls), self.patch_proj(h[:, self.num_cls:])], 1)
        x = x + self.drop_path(update)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ShiftedPatchTokenization(nn.Module):
    """SPT: the image and its 4 diagonal half-patch shifts (15 channels), patch-flattened,
    LayerNorm, linear."""

    def __init__(self, width, patch_size):
        super().__init__()
        self.p = patch_size
        dim = 15 * patch_size * patch_size
        self.norm, self.proj = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, width)

    def forward(self, x):
        s, (H, W) = self.p // 2, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))
        shifts = [padded[..., dy:dy + H, dx:dx + W] for dy, dx in ((0, 0), (0, 2 * s), (2 * s, 0),
                                                                   (2 * s, 2 * s))]
        x = torch.cat([x] + shifts, 1)  # (B, 15, H, W)
        return self.proj(self.norm(patchify(x, self.p)))


def patchify(x, p: int):
    """(B, C, H, W) -> (B, H/p · W/p, C·p·p): each p×p patch flattened as a stride-p conv reads it."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)


def patch_windows(x, p: int, context: int):
    """(B, C, H, W) -> (B, H/p · W/p, C·(p+2·context)²): what each patch filter of the conv reads,
    its patch and `context` pixels of its (zero-padded) neighbours on every side, flattened as the
    conv reads it."""
    if not context:
        return patchify(x, p)
    return F.unfold(x, p + 2 * context, padding=context, stride=p).transpose(1, 2)


def sincos_pos_embed(width: int, grid: int, num_cls: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding: half the channels encode the row, half the column; CLS rows 0."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (ys, xs):
        angle = coord.reshape(-1, 1).double() * omega
        parts += [angle.sin(), angle.cos()]
    pe = torch.cat(parts, 1).float()
    return torch.cat([torch.zeros(num_cls, width), pe]).unsqueeze(0)


class ViT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        grid = SIDE // cfg.patch_size
        if cfg.patch_embed == "spt":
            self.patch_embed = ShiftedPatchTokenization(cfg.width, cfg.patch_size)
        else:
            c = cfg.patch_context
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size + 2 * c, cfg.patch_size,
                                         padding=c)
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.num_cls, cfg.width))
        num_tokens = cfg.num_cls + cfg.num_patches
        if cfg.pos_emb == "sin":  # a buffer: never trained, saved with the model
            self.register_buffer("pos_embed", sincos_pos_embed(cfg.width, grid, cfg.num_cls))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, cfg.width))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        first_cls_only = cfg.depth - cfg.cls_only_blocks
        self.blocks = nn.ModuleList(Block(cfg, r, cls_only=i >= first_cls_only)
                                    for i, r in enumerate(rates))
        # the paper's code gives appended block i the drop-path rate of block i
        self.blocks.extend(AppendedClassAttentionBlock(cfg, rates[i % cfg.depth])
                           for i in range(cfg.depth_token_only))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        head_in = cfg.width * (cfg.num_cls if cfg.pool == "cls" else 1)
        self.head = nn.Linear(head_in, NUM_CLASSES)
        self.apply(_init_weights)
        for p in (self.cls_token, self.pos_embed):
            if isinstance(p, nn.Parameter):
                nn.init.trunc_normal_(p, std=0.02)

    def patch_tokens(self, images, token_keep: float = 1.0):
        """Embedded patches plus positions, (B, P, C); while training with token_keep < 1 only a
        random share of each image's patches (PatchDropout), embedded after the draw: a conv
        whose stride is its kernel is one Linear per patch, so dropped patches cost nothing."""
        pos = self.pos_embed[:, self.cfg.num_cls:]
        if not (self.training and token_keep < 1):
            x = self.patch_embed(images)
            return (x.flatten(2).transpose(1, 2) if x.dim() == 4 else x) + pos
        B, P = images.shape[0], pos.shape[1]
        keep = torch.rand(B, P, device=images.device).argsort(1)[:, :kept_patches(P, token_keep)]
        pick = lambda t: t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        if isinstance(self.patch_embed, nn.Conv2d):
            patches = pick(patch_windows(images, self.cfg.patch_size, self.cfg.patch_context))
            x = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        else:  # SPT mixes neighbouring pixels and normalises: embed every patch, then draw
            x = pick(self.patch_embed(images))
        return x + pick(pos.expand(B, -1, -1))

    def forward(self, x, token_keep: float = 1.0):
        """token_keep < 1: train on that share of each image's patch tokens (PatchDropout)."""
        x = self.patch_tokens(x, token_keep)
        n = self.cfg.num_cls
        x = torch.cat([(self.cls_token + self.pos_embed[:, :n]).expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        feats = x[:, :n].flatten(1) if self.cfg.pool == "cls" else x[:, n:].mean(1)
        return self.head(feats)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_model(cfg: Config) -> ViT:
    return ViT(cfg)


def patch_covariance(images: torch.Tensor, p: int, every_patch: bool) -> torch.Tensor:
    """Covariance of the p×p patches of float images, flattened as the patch conv reads them.
    every_patch: all stride-1 patches, uncentred (the paper's code); else the non-overlapping
    patches, mean-centred."""
    if not every_patch:
        patches = patchify(images.double(), p).reshape(-1, 3 * p * p)
        patches = patches - patches.mean(0)
        return patches.T @ patches / (patches.shape[0] - 1)
    cov, count = 0, 0
    for chunk in images.split(256):  # 29x29 patches per image: chunks bound the memory
        patches = F.unfold(chunk.float(), p)  # (B, 3p², patches)
        # fp32 sums within an image, fp64 across: 3x faster on a CPU than fp64 throughout, and
        # the smallest eigenvalue (~6e-5 of ~35) moves by under 0.1 %
        cov = cov + torch.bmm(patches, patches.transpose(1, 2)).double().sum(0)
        count += patches.shape[0] * patches.shape[2]
    return cov / count


@torch.no_grad()
def whiten_patch_embed(model: ViT, images: torch.Tensor, every_patch: bool = False,
                       eps: float = 5e-4) -> None:
    """Set the first 48 patch filters to the whitening eigenvectors of 4x4x3 patches of normalised
    images, scaled by 1/sqrt(eigenvalue + eps): their outputs over such patches are decorrelated
    from step 0. every_patch: the paper code's statistics (patch_covariance), largest eigenvalue
    first; else ours, smallest first."""
    conv = model.patch_embed
    p = model.cfg.patch_size
    eigval, eigvec = torch.linalg.eigh(patch_covariance(images, p, every_patch))
    if every_patch:
        eigval, eigvec = eigval.flip(0), eigvec.flip(1)
    filters = (eigvec / (eigval + eps).sqrt()).T  # row i: eigenvector i, scaled
    n, c = min(filters.shape[0], conv.out_channels), model.cfg.patch_context
    conv.weight[:n] = 0  # with --patch-context the whitening fills each filter's centre
    conv.weight[:n, :, c:c + p, c:c + p] = filters[:n].reshape(n, 3, p, p).to(conv.weight)


# ----------------------------------------------------------------------------------------------
# Optimisation: AdamW/Lion/Muon, warm-up + cosine or linear decay, soft-target cross-entropy

def zeros_state(state: dict, name: str, like: torch.Tensor) -> torch.Tensor:
    """An optimizer's state tensor, zeros when first asked for (setdefault would build a fresh
    zeros tensor on every step only to drop it)."""
    if name not in state:
        state[name] = torch.zeros_like(like)
    return state[name]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): step along the sign of momentum and gradient interpolated, then
    update the momentum; decoupled weight decay. Foreach over all tensors, and lr may be a device
    tensor: nothing in the step needs the host, so a CUDA graph can hold it."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            momenta = [zeros_state(self.state[p], "exp_avg", p) for p in params]
            (beta1, beta2), lr = group["betas"], group["lr"]
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            updates = torch._foreach_lerp(momenta, grads, 1 - beta1)
            torch._foreach_sign_(updates)
            torch._foreach_mul_(updates, lr)
            torch._foreach_sub_(params, updates)
            torch._foreach_lerp_(momenta, grads, 1 - beta2)


# Polar Express (Amsel et al. 2025, arXiv:2505.16932): a quintic per iteration, each fitted for
# the singular values the previous ones leave; their 5-step table for a 2 % safety factor
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each of the (n, r, c) stack G of wide matrices
    (r <= c: XX^T is then the small product), approximately: five Newton-Schulz iterations with
    Polar Express's coefficients, which leave a gradient's spread of singular values nearer 1
    than the one fixed quintic of Jordan et al. 2024 did (median 0.93 against 0.74) in the
    same five steps; bf16 where matmuls are fast in it."""
    X = G / (G.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-7)  # singular values <= 1/1.02
    for a, b, c in POLAR_EXPRESS:  # X <- aX + (bA + cA^2)X, A = XX^T: scalings fused into products
        A = X @ X.transpose(-2, -1)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the tensors in `orthogonalised` (the blocks' weight
    matrices): Nesterov momentum, then the update orthogonalised (newton_schulz) and scaled to
    AdamW's update RMS, 0.2 * sqrt(max(rows, cols)) (Liu et al. 2025), so that AdamW's lr and
    weight decay carry over. Every other tensor (patch embedding, head, norms, biases, tokens)
    takes AdamW. Foreach, and lr may be a device tensor, as in Lion. `stacked` maps a matrix that
    holds several maps stacked by rows (attention's q, k and v in one Linear) to their number:
    each is orthogonalised on its own, as it would be in a Linear of its own (modded-nanogpt does
    the same)."""

    def __init__(self, params, lr, orthogonalised, momentum=0.95, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, ns_dtype=torch.float32, stacked=()):
        super().__init__(params, {"lr": lr, "momentum": momentum, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.orthogonalised, self.ns_dtype = {id(p) for p in orthogonalised}, ns_dtype
        self.stacked = {id(p): n for p, n in stacked}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["weight_decay"]:  # the free group: nothing to decay
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for muon, part in ((True, [p for p in params if id(p) in self.orthogonalised]),
                               (False, [p for p in params if id(p) not in self.orthogonalised])):
                if part:
                    (self._muon if muon else self._adamw)(part, group)

    def _muon(self, params, group):
        grads = [p.grad for p in params]
        momenta = [zeros_state(self.state[p], "momentum_buffer", p) for p in params]
        torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, momenta, group["momentum"])  # Nesterov
        # one batched iteration per shape, a tall matrix taken as its transpose (newton_schulz
        # wants the short side first; the wide and tall MLP matrices share one batch)
        by_shape = collections.defaultdict(list)
        for whole, whole_update in zip(params, updates):
            n = self.stacked.get(id(whole), 1)  # views: the update lands in the whole matrix
            for p, u in zip(whole.chunk(n), whole_update.chunk(n)):
                tall = u.shape[0] > u.shape[1]
                by_shape[u.shape[::-1] if tall else u.shape].append((p, u.T if tall else u, tall))
        for shape, items in by_shape.items():
            ortho = newton_schulz(torch.stack([u for _, u, _ in items]).to(self.ns_dtype))
            ortho = ortho.float() * (group["lr"] * 0.2 * max(shape) ** 0.5)
            torch._foreach_sub_([p for p, _, _ in items],
                                [o.T if tall else o for o, (_, _, tall) in zip(ortho.unbind(), items)])

    def _adamw(self, params, group):
        (beta1, beta2), eps = group["betas"], group["eps"]
        state = [self.state[p] for p in params]
        for s, p in zip(state, params):
            if not s:
                s.update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                         exp_avg_sq=torch.zeros_like(p))
        grads = [p.grad for p in params]
        torch._foreach_add_([s["step"] for s in state], 1)
        step = state[0]["step"]  # the tensors of a group step together
        torch._foreach_lerp_([s["exp_avg"] for s in state], grads, 1 - beta1)
        torch._foreach_mul_([s["exp_avg_sq"] for s in state], beta2)
        torch._foreach_addcmul_([s["exp_avg_sq"] for s in state], grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt([s["exp_avg_sq"] for s in state])
        torch._foreach_div_(denom, (1 - beta2 ** step).sqrt())
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div([s["exp_avg"] for s in state], denom)
        torch._foreach_mul_(updates, group["lr"] / (1 - beta1 ** step))
        torch._foreach_sub_(params, updates)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                   lr: Optional[torch.Tensor] = None):
    """lr: a device tensor the step writes, so the schedule needs no host (default: cfg.lr)."""
    lr = torch.tensor(cfg.lr, device=device) if lr is None else lr
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.decay_params == "all":  # the paper's code: AdamW(model.parameters(), weight_decay=...)
        decay = [p for n, p in named]
    else:  # weight matrices only: biases, norms, CLS and position tokens stay free
        decay = [p for n, p in named if p.dim() >= 2 and "token" not in n and "pos_embed" not in n]
    rest = [p for n, p in named if not any(p is d for d in decay)]
    # two groups always (the free one empty under "all"): a checkpoint's optimizer has this layout
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "lion":
        return Lion(groups, lr=lr)
    if cfg.optimizer == "muon":
        matrices = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")]
        qkv = [(p, p.shape[0] // p.shape[1]) for n, p in named if n.endswith(".attn.qkv.weight")]
        fast_bf16 = pick_precision(cfg.precision, device) == torch.bfloat16
        return Muon(groups, lr=lr, orthogonalised=matrices, stacked=qkv,
                    ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    # fused: one kernel over all tensors, on CPU too (about 5x faster than foreach there);
    # capturable: its step count and lr stay on the GPU, as a CUDA graph needs
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu"),
                             capturable=device.type == "cuda")


def lr_at(progress, cfg: Config):
    """Linear warm-up for warmup_epochs/epochs of the run, then --lr-decay down to min_lr at 1.0.
    progress: a float (the host's log) or a device tensor (the step's own schedule)."""
    warm = min(cfg.warmup_epochs / cfg.epochs, 0.5)
    p = torch.as_tensor(progress, dtype=torch.float64)
    t = ((p - warm) / max(1e-12, 1 - warm)).clamp(0.0, 1.0)
    left = 1 - t if cfg.lr_decay == "linear" else 0.5 * (1 + torch.cos(math.pi * t))
    decay = cfg.min_lr + (cfg.lr - cfg.min_lr) * left
    lr = torch.where(p < warm, cfg.lr * p / max(warm, 1e-12), decay)
    return lr if torch.is_tensor(progress) else lr.item()


def keep_at(progress: float, cfg: Config) -> float:
    """Share of patch tokens a training image keeps: --token-keep, rising over the
    --full-token-ramp before the tail an eighth at a time, then all of them over the last
    --full-token-tail of the run."""
    tail = 1 - cfg.full_token_tail
    if progress >= tail:
        return 1.0
    rise = (progress - tail + cfg.full_token_ramp) / cfg.full_token_ramp if cfg.full_token_ramp else 0
    eighths = math.floor((cfg.token_keep + (1 - cfg.token_keep) * rise) * 8 + 1e-9)  # 1e-9: rounding
    return max(cfg.token_keep, eighths / 8)


def kept_patches(num_patches: int, keep: float) -> int:
    """Patch tokens an image keeps at token share `keep`: at least one."""
    return max(1, round(num_patches * keep))


def keep_levels(cfg: Config) -> list:
    """Every token share keep_at gives over a run: the graphs to build before it."""
    return sorted({keep_at(i / 1000, cfg) for i in range(1001)})


def soft_cross_entropy(logits, targets, smoothing: float):
    """CE against (mixed) soft targets with label smoothing; linear in the targets, so it equals
    lam*CE(y_a) + (1-lam)*CE(y_b) of the paper's code."""
    targets = targets * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(targets * F.log_softmax(logits.float(), -1)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# Devices, precision, processes

def nvidia_device_files() -> list:
    return glob.glob("/dev/nvidia[0-9]*")


def unusable_gpu_reason() -> Optional[str]:
    """Why torch sees no CUDA device on a machine that has an NVIDIA GPU (None: no such GPU, or
    it works). Without this a too-old driver means a silent run on the CPU."""
    if torch.cuda.is_available() or not nvidia_device_files():
        return None
    if torch.version.cuda is None:
        return (f"an NVIDIA GPU is present but torch {torch.__version__} is a CPU-only build; "
                f"install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "an NVIDIA GPU is present but CUDA_VISIBLE_DEVICES hides it"
    return (f"an NVIDIA GPU is present but torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) cannot use it: the NVIDIA driver is too old for CUDA "
            f"{torch.version.cuda} or not loaded (see nvidia-smi); install a driver for CUDA "
            f"{torch.version.cuda} or newer, or a torch build for the driver's CUDA version")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = unusable_gpu_reason()
        if reason:
            print(f"warning: {reason}; training on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"unknown --device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = unusable_gpu_reason()
        raise UsageError(f"--device {name}: {reason}" if reason
                         else "--device cuda requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return device


def check_kernels(name: str, device: torch.device) -> None:
    """--kernels triton where it cannot run is refused before anything is loaded or written."""
    if name == "triton" and not kernels.HAVE_TRITON:
        raise UsageError("--kernels triton needs the triton package (pip install triton)")
    if name == "triton" and device.type != "cuda" and not interpret_enabled():
        raise UsageError(f"--kernels triton runs on CUDA; on {device.type} only in Triton's "
                         f"interpreter (TRITON_INTERPRET=1, slow)")


def cpu_has_bf16_units(flags: set = None) -> bool:
    """AMX-BF16 or AVX512-BF16: there a bf16 matmul runs ~7x faster than fp32 (Linux flags)."""
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")),
                             set())
        except OSError:
            flags = set()
    return bool(set(flags) & {"amx_bf16", "avx512_bf16"})


def pick_precision(requested: str, device: torch.device, cpu_flags: set = None):
    """Autocast dtype, or None for fp32. auto: bf16 on CUDA and on CPUs with bf16 matrix units
    (weights and optimizer state stay fp32 under autocast), fp32 elsewhere."""
    if requested == "auto":
        bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units(cpu_flags))
        requested = "bf16" if bf16 else "fp32"
    return torch.bfloat16 if requested == "bf16" else None


# on a 2-core CPU torch.compile costs ~40 s and gains ~9 %: it pays back only in long runs
CPU_COMPILE_PAYBACK_S = 1800
CPU_IMG_PER_S = 150  # rough baseline speed on such a CPU, to turn planned steps into seconds


COMPILE = {"dynamic": False}  # torch.compile's options (tests pick a cheaper backend here)


def pick_compile(requested: str, device: torch.device, planned_s: float = 0.0) -> bool:
    """auto: always on CUDA; on CPU only for runs planned to last CPU_COMPILE_PAYBACK_S or more."""
    if requested != "auto":
        return requested == "on"
    return device.type == "cuda" or (device.type == "cpu" and planned_s >= CPU_COMPILE_PAYBACK_S)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """A CPU step allocates and frees the same few-MB activations every step. glibc hands such
    blocks back to the kernel (mmap'd, or trimmed off the heap), so each step faults every page
    in again, which in a virtual machine costs a tenth or more of a two-thread step (figures in
    bench/README.md). Serve them from the heap and keep what is freed (peak memory unchanged).
    False where the C library has no mallopt (not glibc) or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # newer glibc take any threshold; older ones at most 32 MiB (half their heap size)
    mapped = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and mallopt(M_TRIM_THRESHOLD, 1 << 30))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """This process's place as torchrun's WORLD_SIZE/RANK/LOCAL_RANK give it (no process
        group needed: choices made before the rendezvous read it too)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_name: str) -> Dist:
    """torchrun's processes join one group: NCCL on CUDA, Gloo on CPU."""
    dist = Dist.from_env()
    if dist.world_size == 1:
        return Dist()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        pick_device(device_name)  # refuses, saying why
    if use_cuda and dist.local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {dist.local_rank} but this machine shows "
                         f"{torch.cuda.device_count()} CUDA device(s): start at most that many "
                         f"processes per machine (torchrun --nproc-per-node), or use --device cpu")
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
    if not torch.distributed.is_initialized():  # a second run in the same processes reuses it
        # NCCL bound to this rank's GPU up front, so barriers and collectives know their device
        torch.distributed.init_process_group(
            "nccl" if use_cuda else "gloo",
            device_id=torch.device("cuda", dist.local_rank) if use_cuda else None)
    return dist


# ----------------------------------------------------------------------------------------------
# Training step and evaluation

class Trainer:
    """Holds everything a step needs; `step(s)` is the whole hot path (no host syncs).
    Its decisions are attributes for benchmarks to read: amp_dtype, compiled, kernels, graphs.
    model: another nn.Module to train in the same loop (a benchmark's plain reference model).

    The step reads nothing from the host. A step counter on the device picks the batch from the
    run's sample stream, keys its random draws and sets the learning rate; the step increments
    it. So the step is one function of device tensors: compiled as one graph (per token share),
    and on CUDA recorded once as a CUDA graph that each step replays."""

    def __init__(self, cfg: Config, data: dict, device: torch.device, dist: Dist = Dist(),
                 model: Optional[nn.Module] = None):
        self.cfg, self.device, self.dist = cfg, device, dist
        if device.type == "cpu":
            keep_freed_memory()
        kernels.set_backend(cfg.kernels)
        self.kernels = kernels.backend_for(device)
        torch.manual_seed(cfg.seed)
        self.data = {k: v.to(device) for k, v in data.items()}  # whole set resident as uint8
        self.model = (model or build_model(cfg)).to(device)
        n_train = self.data["train_x"].shape[0]
        epoch_samples = n_train * cfg.passes_per_epoch
        if cfg.drop_last and epoch_samples < cfg.batch_size:
            raise UsageError(f"--batch-size {cfg.batch_size} exceeds an epoch of {epoch_samples} "
                             f"samples; pass --no-drop-last")
        self.sampler = data_gpu.RepeatedPassSampler(
            n_train, cfg.batch_size, cfg.seed, device, dist.rank, dist.world_size, cfg.repeat_aug,
            epoch_samples if cfg.drop_last else None)
        self.steps_per_epoch = (epoch_samples // cfg.batch_size if cfg.drop_last
                                else epoch_samples / cfg.batch_size)
        if cfg.whiten:
            whiten_patch_embed(self.model, self.whitening_images(),
                               every_patch=cfg.whiten_from == "augmented")
        scalar = functools.partial(torch.zeros, (), device=device)
        self.step_t, self.share_t = scalar(dtype=torch.int64), scalar(dtype=torch.float64)
        self.lr_t, self.loss_sum = scalar(dtype=torch.float32), scalar(dtype=torch.float32)
        self.host_step, self.host_share = 0, 0.0  # what the counters hold, as the host knows
        self.optimizer = make_optimizer(self.model, cfg, device, self.lr_t)
        self.amp_dtype = pick_precision(cfg.precision, device)
        self.net = self.model
        if dist.world_size > 1:
            ids = [dist.local_rank] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.total_steps = data_gpu.steps_for(cfg.epochs, cfg.batch_size, n_train,
                                              cfg.passes_per_epoch, cfg.drop_last)
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.stream = self.sampler.stream(self.total_steps)
        self.seed_key = data_gpu.seed_key_for(cfg.seed, dist.rank, device)
        data_gpu.device_constants(device)  # built before a compiled graph reads them
        self.planned_s = cfg.time_budget or self.total_steps * cfg.batch_size / CPU_IMG_PER_S
        self.compiled = pick_compile(cfg.compile, device, self.planned_s)
        self.forward_loss = self._forward_loss
        if self.compiled:  # static shapes; one graph per token share
            self.forward_loss = torch.compile(self._forward_loss, fullgraph=True, **COMPILE)
            self.net = torch.compile(self.net, **COMPILE)  # evaluation's graph
        self.graphs = {}  # token share -> (CUDA graph, its loss tensor), filled by prepare()
        # one evaluation batch size per run (a compiled run pads the last batch up to it)
        self.eval_batch = min(1000, -(-self.data["test_x"].shape[0] // dist.world_size))
        torch.manual_seed(cfg.seed * 1000 + dist.rank + 1)  # drop-path and token-drop draws

    def whitening_images(self) -> torch.Tensor:
        """What --whiten's statistics are taken over, normalised. augmented: as the paper's code,
        the first batches of the training stream until they hold over 5,000 images (5,120 at
        batch 128, 256 or 1,024), augmented as for training (not mixed); drawn the same on
        every rank, from draws of their own (a key no training step uses).
        raw: the first 5,000 training images."""
        cfg, train_x = self.cfg, self.data["train_x"]
        if cfg.whiten_from == "raw":
            return data_gpu.normalize(train_x[:5000])
        stream = data_gpu.RepeatedPassSampler(train_x.shape[0], cfg.batch_size, cfg.seed,
                                              self.device, repeats=cfg.repeat_aug)
        idx = torch.cat([stream.indices(s) for s in range(5000 // cfg.batch_size + 1)])
        draws = data_gpu.Draws(data_gpu.seed_key_for(cfg.seed, -1, self.device))
        return data_gpu.augment(train_x[idx], draws, crop_pad=cfg.crop_pad,
                                autoaugment=cfg.autoaugment, erase_prob=cfg.erase_prob)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batch(self, step: torch.Tensor):
        """The augmented, mixed batch of the step the device counter holds."""
        cfg = self.cfg
        idx = self.sampler.indices_at(self.stream, step)
        draws = data_gpu.Draws(data_gpu.step_key(self.seed_key, step))
        x = data_gpu.augment(self.data["train_x"][idx], draws, crop_pad=cfg.crop_pad,
                             autoaugment=cfg.autoaugment, erase_prob=cfg.erase_prob)
        return data_gpu.mix(x, self.data["train_y"][idx], NUM_CLASSES, draws,
                            mix_prob=cfg.mix_prob, cutmix=cfg.cutmix, mixup=cfg.mixup,
                            partner=cfg.mix_partner)

    def _forward_loss(self, token_keep: float):
        rf = torch.profiler.record_function
        with rf("data"):
            x, targets = self.batch(self.step_t)
        with rf("forward"), self.autocast():
            return soft_cross_entropy(self.net(x, token_keep=token_keep), targets,
                                      self.cfg.label_smoothing)

    def update(self, loss):
        """The learning rate from the counter (and the budget's time share), the optimizer
        step, the loss summed for the log, the counter advanced: all on the device."""
        progress = torch.maximum((self.step_t + 1) / self.total_steps, self.share_t).clamp(max=1.0)
        self.lr_t.copy_(lr_at(progress, self.cfg))
        self.optimizer.step()
        self.loss_sum += loss.detach()
        self.step_t += 1

    def step(self, s: int, share: float = 0.0, token_keep: Optional[float] = None,
             skip_nonfinite: bool = False) -> bool:
        """Optimisation step s (the loss is summed into loss_sum); False if it was skipped.
        share: the time budget's spent share, which the schedule follows when it runs ahead of
        the steps (the only value the host writes, and only under a budget)."""
        keep = self.cfg.token_keep if token_keep is None else token_keep
        if s != self.host_step:  # a resumed run, or a benchmark's own step numbers
            self.step_t.fill_(s)
        if share != self.host_share:
            self.share_t.fill_(share)
        self.host_step, self.host_share = s + 1, share
        if keep in self.graphs:
            self.graphs[keep].replay()
            return True
        self.net.train()
        loss = self.forward_loss(keep)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            # a sync, only under --nan-policy skip; the gradients too, as a NaN can hide behind
            # a finite loss
            if skip_nonfinite and not self.all_finite(
                    [loss] + [p.grad for p in self.model.parameters() if p.grad is not None]):
                self.optimizer.zero_grad(set_to_none=True)
                self.step_t += 1
                return False
            self.update(loss)
            self.optimizer.zero_grad(set_to_none=True)
        return True

    def training_state(self) -> list:
        """Every tensor a step changes (weights, optimizer state, counters), in a fixed order."""
        state = [t for v in self.optimizer.state.values() for t in v.values() if torch.is_tensor(t)]
        return [*self.model.parameters(), *self.model.buffers(), *state,
                self.step_t, self.share_t, self.lr_t, self.loss_sum]

    @contextlib.contextmanager
    def rehearsal(self):
        """Steps run inside leave no trace: what they change is restored in place (the same
        tensors, as a recorded graph holds their addresses), random state included."""
        saved = {id(t): t.detach().clone() for t in self.training_state()}
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device)
                                      if self.device.type == "cuda" else None)
        host = self.host_step, self.host_share
        try:
            yield
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for t in self.training_state():
                    # optimizer state born in the rehearsal: zeros, as a first step starts from
                    t.copy_(saved[id(t)]) if id(t) in saved else t.zero_()
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], self.device)
            self.host_step, self.host_share = host

    def prepare(self, keeps, skip_nonfinite: bool = False) -> None:
        """Before the timed run: compile every graph the run will use (a step per token share,
        and evaluation), and on CUDA record each step as a CUDA graph; none of it changes the
        training. If recording fails, say why in one line and train on the unrecorded step."""
        if not self.compiled:
            return
        with self.rehearsal():
            for keep in keeps:
                self.step(self.host_step, self.host_share, keep, skip_nonfinite)
            self.evaluate(limit=self.eval_batch)
            if self.records_graphs(skip_nonfinite):
                try:
                    self.graphs = {keep: self.record(keep) for keep in keeps}
                except Exception as e:  # noqa: BLE001  any failure: train unrecorded
                    self.graphs = {}
                    print(f"warning: recording the step as a CUDA graph failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''}); training on the "
                          f"compiled step without it", file=sys.stderr)

    def records_graphs(self, skip_nonfinite: bool) -> bool:
        """CUDA graphs hold one process's step; --nan-policy skip decides on the host each step."""
        return self.device.type == "cuda" and self.dist.world_size == 1 and not skip_nonfinite

    def record(self, keep: float):
        """One step as a CUDA graph (warmed up on a side stream first, as graphs need)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(self.host_step, self.host_share, keep)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self.net.train()
            loss = self.forward_loss(keep)
            loss.backward()
            self.update(loss)
        return graph

    def all_finite(self, tensors) -> bool:
        """Whether every value is finite, on every rank (a host sync): ranks decide alike."""
        return self.everywhere(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def everywhere(self, ok) -> bool:
        """Whether `ok` (a bool, or a bool tensor on the device) holds on every rank (a sync)."""
        ok = torch.as_tensor(ok, device=self.device).float()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(ok, torch.distributed.ReduceOp.MIN)
        return bool(ok)

    def sync(self, loss_sum, loss_count: int, stop: bool, time_share: float):
        """The host sync of a log step -> (mean loss, stop?, time share). Under torchrun: the loss
        over all ranks, whether any rank was signalled (a signal may reach ranks a step apart),
        and rank 0's share of the time budget, so that every rank takes the same decisions."""
        values = torch.tensor([0.0, loss_count, stop, time_share if self.dist.main else 0.0],
                              dtype=torch.float64, device=self.device)
        values[0] = loss_sum
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(values)
        total, count, stops, share = values.tolist()
        return (total / count if count else float("nan")), stops > 0, share

    def fitting_batch(self) -> int:
        """After running out of memory: the largest halving of this process's batch whose forward
        and backward fit beside the model and optimizer state (0: not even one image); with every
        token, the dearest step of any run."""
        batch = self.cfg.batch_size // self.dist.world_size // 2
        self.model.train()
        while batch >= 1:
            try:
                with self.autocast():
                    self.model(data_gpu.normalize(self.data["train_x"][:batch])).float().sum().backward()
                return batch
            except torch.cuda.OutOfMemoryError:
                batch //= 2
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return 0

    def out_of_memory_advice(self) -> str:
        fits, batch, world = self.fitting_batch(), self.cfg.batch_size, self.dist.world_size
        per = " per process" if world > 1 else ""
        said = f"out of memory at --batch-size {batch}" + (f" ({batch // world}{per})" if per else "")
        if not fits:
            return f"{said}; not even one image{per} fits on {self.device}"
        return f"{said}; a batch of {fits}{per} fits: try --batch-size {fits * world}"

    @torch.no_grad()
    def evaluate(self, batch_size: Optional[int] = None, limit: Optional[int] = None):
        """Test accuracy and loss; under torchrun each rank takes a slice, counts are summed.
        limit: only the first `limit` images of each rank's slice (to time an evaluation)."""
        self.net.eval()
        batch_size = batch_size or self.eval_batch
        xs = self.data["test_x"][self.dist.rank::self.dist.world_size][:limit]
        ys = self.data["test_y"][self.dist.rank::self.dist.world_size][:limit]
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)  # correct, loss, count
        for i in range(0, xs.shape[0], batch_size):
            x, y = data_gpu.normalize(xs[i:i + batch_size]), ys[i:i + batch_size]
            n = x.shape[0]
            if self.compiled and n < batch_size:  # the compiled graph's one shape: pad, then drop
                x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
            with self.autocast():
                logits = self.tta_logits(x)[:n]
            totals += torch.stack([(logits.argmax(-1) == y).sum().double(),
                                   F.cross_entropy(logits, y, reduction="sum").double(),
                                   torch.tensor(float(y.numel()), device=self.device,
                                                dtype=torch.float64)])
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(totals)
        correct, loss, count = totals.tolist()
        return {"test_acc": 100.0 * correct / count, "test_loss": loss / count}

    def tta_logits(self, x):
        """Logits, averaged with the mirror image's under --tta-flip (a mirrored CIFAR image is
        as likely as the image itself)."""
        logits = self.net(x).float()
        return (logits + self.net(x.flip(-1)).float()) / 2 if self.cfg.tta_flip else logits

    def time_eval(self, clock=time.monotonic) -> float:
        """Seconds an evaluation of the test set will take, from the faster of two timings of its
        first batch (of every rank): one timing alone is 2-3x slow now and then, which a run
        pays for in training time it keeps back and never uses."""
        world, n_test = self.dist.world_size, self.data["test_x"].shape[0]
        n = max(1, min(self.eval_batch, n_test // world))
        fastest = float("inf")
        for _ in range(2):
            t = clock()
            self.evaluate(limit=n)  # in eval_batch-sized batches: the graph prepare() built
            fastest = min(fastest, clock() - t)
        return fastest * n_test / (n * world)

    # -- checkpoints: everything needed for a bit-exact continuation ---------------------------
    def random_states(self) -> dict:
        """This process's random streams (drop path, token dropping: augmentation and mixing
        are a function of seed, rank and step) as tensors, numbers and strings only: a checkpoint
        must load with torch.load(weights_only=True), which can run no code."""
        _, python_mt, python_gauss = random.getstate()
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
        rng = {"python": torch.tensor(python_mt), "python_gauss": python_gauss,
               "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "numpy_pos": int(numpy_pos), "numpy_gauss": [int(numpy_has_gauss), float(numpy_gauss)],
               "torch": torch.get_rng_state(), "device": self.device.type}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def set_random_states(self, rng: dict) -> None:
        random.setstate((3, tuple(rng["python"].tolist()), rng["python_gauss"]))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"],
                             *rng["numpy_gauss"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self, step: int, elapsed: float, extra: dict):
        """Call on every rank: it gathers each rank's random streams (only rank 0 saves)."""
        rng = self.random_states()
        ranks = [rng]
        if self.dist.world_size > 1:
            ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(ranks, rng)
        return {"config": dataclasses.asdict(self.cfg), "step": step, "elapsed": elapsed,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": ranks, **extra}

    def resume(self, state: Optional[dict], log=print):
        """Continue from a checkpoint (None: a fresh run) -> (step, elapsed seconds, skipped)."""
        if state is None:
            return 0, 0.0, 0
        reseeded = self.load_state_dict(state)
        if reseeded:
            log(reseeded)
        return state["step"], state["elapsed"], state.get("skipped", 0)

    def load_state_dict(self, state: dict) -> Optional[str]:
        """Restore a checkpoint (load_checkpoint has checked its layout); returns a line to tell
        the user when the random streams could not carry over."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # loading replaced the lr tensor the step writes: keep its value (the checkpoint's
        # state, rewritten as it is by a resumed run that has no step left), not the tensor
        self.lr_t.copy_(torch.as_tensor(self.optimizer.param_groups[0]["lr"]))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_t
        saved_on = state["rng"][0]["device"]
        if len(state["rng"]) == self.dist.world_size and saved_on == self.device.type:
            self.set_random_states(state["rng"][self.dist.rank])
            return None
        # another number of processes, or another kind of device (whose generator's state does
        # not fit: a CPU one is 5,056 bytes, a CUDA one 16): weights, optimizer, data order and
        # augmentation carry over exactly, the random streams start afresh from (seed, rank,
        # step), so the run is not bit-identical
        torch.manual_seed(self.cfg.seed * 1000 + self.dist.rank + 1 + 7919 * state["step"])
        if saved_on != self.device.type:
            return (f"the checkpoint was saved on {saved_on}, this run is on {self.device.type}: "
                    f"its random streams (drop path, token dropping) are re-seeded")
        return (f"the checkpoint was saved by {len(state['rng'])} processes, this run has "
                f"{self.dist.world_size}: the random streams are re-seeded")


def save_checkpoint(state: dict, path: str) -> Optional[str]:
    """Write to a temporary file, then rename: the last good checkpoint survives any crash.
    Returns why the file could not be written (the old one is then as it was), else None."""
    try:
        with data_gpu.atomic_write(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save's writer raises RuntimeError
        return data_gpu.one_line(e)
    return None


RNG_KEYS = {"python", "python_gauss", "numpy", "numpy_pos", "numpy_gauss", "torch", "device"}


def checkpoint_mismatch(state) -> Optional[str]:
    """Why `state` is not a checkpoint this version can resume (None when it is): every key and
    type, and weights whose names and shapes are those of the saved config's model. Checked at
    load, so that a checkpoint of another version is one line, not a load_state_dict traceback."""
    if not (isinstance(state, dict) and {"config", "step", "elapsed", "model", "optimizer", "rng"}
            <= state.keys()):
        return "keys missing"
    saved = state["config"]
    if not isinstance(saved, dict) or not set(saved) <= set(CONFIG_FIELDS):
        return "config fields this version does not know"
    for name, value in saved.items():
        kind = type(CONFIG_FIELDS[name].default)
        if not (type(value) is kind or (kind is float and type(value) is int)):
            return f"config field {name} is {type(value).__name__}, expected {kind.__name__}"
    try:
        cfg = Config(**saved)
        validate(cfg)
    except UsageError as e:
        return f"its config is invalid ({e})"
    with torch.random.fork_rng(devices=[]):  # building initialises: leave the caller's RNG be
        expected = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    weights = state["model"]
    if not (isinstance(weights, dict) and weights.keys() == expected.keys()
            and all(isinstance(v, torch.Tensor) and v.shape == expected[k] for k, v in weights.items())):
        return "weights that do not match its config's model"
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= optimizer.keys()
            and isinstance(optimizer["param_groups"], list) and len(optimizer["param_groups"]) == 2):
        return "an optimizer state of another layout"
    rng = state["rng"]
    if not (isinstance(rng, list) and rng and all(isinstance(r, dict) and RNG_KEYS <= r.keys()
                                                     for r in rng)):
        return "random states of another layout"
    if not (isinstance(state["step"], int) and state["step"] >= 0):
        return "a step that is not a count"
    return None


def load_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no checkpoint there (expected a run folder or ckpt.pt)")
    try:  # weights_only: a file from elsewhere may hold objects whose unpickling runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise UsageError(f"--resume {path}: refused, it holds "
                         f"{found.group(1) if found else 'an object'}, which is not a tensor, "
                         f"number or string (nothing was run)") from None
    except Exception as e:  # truncated or foreign file
        raise UsageError(f"--resume {path}: unreadable checkpoint ({type(e).__name__})") from None
    why = checkpoint_mismatch(state)
    if why:
        raise UsageError(f"--resume {path}: not a checkpoint of this trainer (or of another "
                         f"version of it: {why})")
    return {**state, "path": path}


# ----------------------------------------------------------------------------------------------
# The run: schedule, loop, logging, checkpoints

def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One status line with images/s and ETA; a fresh line per log when not on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty = enabled, sys.stderr.isatty()

    def show(self, text: str):
        if self.enabled:
            sys.stderr.write(("\r" + text.ljust(110)) if self.tty else text + "\n")
            sys.stderr.flush()

    def done(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class Stopped(Exception):
    """A signal during the final evaluation (StopRequest(at_once=True))."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly. at_once: raise Stopped
    at once (the final evaluation, whose checkpoint is already written)."""

    def __init__(self, at_once: bool = False):
        self.signum, self.at_once = None, at_once

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.at_once:
            raise Stopped(signum)
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "summary.json")


def finished_run(state: dict) -> Optional[dict]:
    """The summary of the run whose checkpoint `state` is, when that run has finished."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(os.path.dirname(state["path"]), "summary.json")) as f:
            summary = json.load(f)
        if isinstance(summary, dict) and summary.get("steps") == state["step"]:
            return summary
    return None


class RunFolder:
    """A run's files: config.json, metrics.jsonl (a JSON line per record), ckpt.pt, summary.json.
    Every process holds one (all take part in checkpoints); only the first writes.

    Made in two stages: the constructor only checks, before the data is loaded; open() writes.
    Until the run's first checkpoint is in place, a failure takes back what open() did
    (abandon): the files it wrote go, and a run that --overwrite was replacing, kept aside in
    .replaced/ meanwhile, comes back."""

    def __init__(self, cfg: Config, resume_state: Optional[dict], overwrite: bool, dist: Dist):
        self.cfg, self.dist, self.main = cfg, dist, dist.main
        self.out = cfg.out or os.path.join("runs", f"{cfg.variant.replace(',', '+')}-"
                                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
        self.ckpt_path = os.path.join(self.out, "ckpt.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.aside = os.path.join(self.out, ".replaced")
        self.resume_step = resume_state["step"] if resume_state else None
        source = os.path.dirname(resume_state["path"]) if resume_state else None
        in_place = source is not None and os.path.realpath(source) == os.path.realpath(self.out)
        self.source_metrics = os.path.join(source, "metrics.jsonl") if source else None
        holds_run = os.path.exists(os.path.join(self.out, "config.json"))
        if holds_run and not (in_place or overwrite):
            if source is not None:
                raise UsageError(f"--out {self.out} holds another run; --resume {source} writes into "
                                 f"its own folder, an empty one, or with --overwrite this one")
            raise UsageError(f"{self.out} already holds a run; pass --resume {self.out} to continue "
                             f"it or --overwrite to replace it")
        self.replacing = holds_run and overwrite and not in_place
        nearest = os.path.abspath(self.out)
        while not os.path.lexists(nearest):
            nearest = os.path.dirname(nearest)
        if not os.path.isdir(nearest):
            raise UsageError(f"--out {self.out}: {nearest} is not a folder")
        if not data_gpu.writable(nearest):
            raise UsageError(f"--out {self.out}: {nearest} is read-only")
        self.created = not os.path.exists(self.out)
        self.committed = in_place  # a resumed run's own folder is never taken back
        self.metrics = None

    def open(self) -> None:
        if self.dist.world_size > 1:  # every rank has looked at the folder before rank 0 writes
            torch.distributed.barrier()
        if not self.main:
            return
        try:
            os.makedirs(self.out, exist_ok=True)
            if self.replacing:
                shutil.rmtree(self.aside, ignore_errors=True)  # left by an attempt killed outright
                os.makedirs(self.aside)
                for name in RUN_FILES:
                    if os.path.exists(os.path.join(self.out, name)):
                        os.replace(os.path.join(self.out, name), os.path.join(self.aside, name))
            if self.resume_step is not None:
                self.copy_records_until(self.resume_step)
            self.write_json("config.json", dataclasses.asdict(self.cfg))
            self.metrics = open(self.metrics_path, "a")
        except OSError as e:  # a file in the way, no permission, a full disk
            self.abandon()
            raise UsageError(f"--out {self.out}: cannot write the run's files ({e.strerror})") from None

    def copy_records_until(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: forget what was logged for them
        (a line torn by a crash, and the summary of a final evaluation cut short too), so that
        metrics.jsonl reads as one uninterrupted run, in the folder the run continues in."""
        if not os.path.exists(self.source_metrics):
            return
        kept = []
        with open(self.source_metrics) as f:
            for line in f:
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("step", 0) <= step and record.get("kind") != "summary":
                        kept.append(line)
        with data_gpu.atomic_write(self.metrics_path, "w") as f:
            f.writelines(kept)

    def write_json(self, name: str, values: dict) -> None:
        if self.main:
            with data_gpu.atomic_write(os.path.join(self.out, name), "w") as f:
                json.dump(values, f, indent=2)

    def record(self, kind: str, **values) -> None:
        if self.metrics:
            self.metrics.write(json.dumps({"kind": kind, **values}) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()

    @contextlib.contextmanager
    def writing(self):
        """open(); a failure before the run's first checkpoint takes back what it wrote."""
        self.open()
        try:
            yield self
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """A failure before the run's first checkpoint: take back what open() wrote."""
        if self.committed or not self.main:
            return
        self.close()
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out, name))
        if self.replacing and os.path.isdir(self.aside):
            for name in os.listdir(self.aside):
                os.replace(os.path.join(self.aside, name), os.path.join(self.out, name))
            os.rmdir(self.aside)
        if self.created:
            with contextlib.suppress(OSError):  # only if empty
                os.rmdir(self.out)

    def checkpoint(self, trainer: "Trainer", step: int, elapsed: float, extra: dict) -> None:
        """Every rank takes part (weights checked, random streams gathered); rank 0 writes.
        extra: the loop's own counts, saved beside the trainer's state."""
        if not trainer.all_finite(trainer.model.parameters()):
            raise self.fault(f"non-finite weights after step {step}")
        state = trainer.state_dict(step, elapsed, extra)
        failed = save_checkpoint(state, self.ckpt_path) if self.main else None
        # also a sync: no rank moves on (or exits) before the file is in place
        if not trainer.everywhere(failed is None):
            raise self.fault(f"could not write the checkpoint after step {step} "
                             f"({failed or 'on the first process'})", "free some disk space")
        if not self.committed:  # the new run stands on its own: the one it replaced can go
            self.committed = True
            if self.main and self.replacing:
                shutil.rmtree(self.aside, ignore_errors=True)

    def fault(self, what: str, advice: str = "try a lower --lr") -> UsageError:
        kept = (f"the last good checkpoint {self.ckpt_path} is intact"
                if os.path.exists(self.ckpt_path) else "no checkpoint was written")
        return UsageError(f"{what}; {kept} ({advice})")


class Budget:
    """The schedule's clock. Progress through warm-up and decay is the larger of the steps' share
    and, under --time-budget, the time's share: the whole run, start-up and final evaluation
    included, then ends with the budget. As in speedruns, the one-off compile and warm-up
    (Trainer.prepare: warmup_s, before this clock starts) are not part of the budget: it holds
    data, augmentation, training and evaluation. The final evaluation's reserve is one eval batch
    (the faster of two timings) timed 5 steps in, rescaled by each log window's pace against the
    first window that starts at or after the timing, as the machine's speed drifts. While a
    rising token share makes steps dearer the reserve holds (the pace then says nothing of the
    machine); 5 steps into the last share the batch is timed again."""

    EVAL_SLACK_S = 2.0  # kept beyond the predicted final evaluation, as a batch's timing is noisy

    def __init__(self, cfg: Config, total: int, step: int, start_time: float, clock, time_eval,
                 world_size: int, warmup_s: float = 0.0):
        self.cfg, self.total, self.clock, self.time_eval = cfg, total, clock, time_eval
        self.start_time, self.warmup_s = start_time, warmup_s
        self.end = start_time + warmup_s + cfg.time_budget if cfg.time_budget else None
        self.reserve, self.eval_predicted_s, self.eval_ips = 0.0, 0.0, None
        self.start = self.window_start = clock()
        self.window_step, self.timing_step = step, step + 5
        self.keep = cfg.token_keep  # the token share of the steps being timed
        self.last_keep = keep_levels(cfg)[-1]  # the share the run ends on: timed again there
        self.timed_keep = None  # the share whose pace the reserve follows
        self.shared = 0.0 if world_size > 1 else None  # rank 0's time share as of the last sync
        self.last_share = 0.0  # the share the last progress() used: the step's lr follows it
        # the run's work by step share, for the ETA: a step costs about as many tokens as it
        # keeps, so under a rising token share the last steps are dearer than the first
        tokens = [kept_patches(cfg.num_patches, keep_at(i / 1000, cfg)) + cfg.num_cls
                  for i in range(1000)]
        self.work = [0.0, *itertools.accumulate(tokens)]
        self.start_work = self.work_share(step / max(total, 1))

    def share(self) -> float:
        """Share of the time budget spent (0 without a budget)."""
        if self.end is None:
            return 0.0
        return (self.clock() - self.start) / max(self.end - self.reserve - self.start, 1e-9)

    def progress(self, step: int) -> float:
        # under torchrun: rank 0's time share as of the last sync, so that every rank computes
        # the same learning rate and ends at the same step; never backwards, so that a re-timed
        # reserve cannot return the run to a cheaper token share
        share = self.share() if self.shared is None else self.shared
        self.last_share = max(self.last_share, share)
        return min(max((step + 1) / self.total, self.last_share), 1.0)

    def before_step(self, step: int, keep: float) -> None:
        if keep != self.keep and keep == self.last_keep and self.end is not None:
            self.timing_step = step + 5
        self.keep = keep

    def after_step(self, step: int) -> None:
        if self.end is not None and step == self.timing_step:
            start = self.clock()
            self.eval_predicted_s = self.time_eval(self.clock)  # the summary's eval_s is measured
            self.set_reserve(slowdown=1.0)
            self.eval_ips, self.timed_keep = None, self.keep
            self.window_start += self.clock() - start  # timing is no training

    def set_reserve(self, slowdown: float):
        """Time kept for the final evaluation: its timing, scaled by how much slower the
        training steps have run since it was taken, plus the slack."""
        self.reserve = self.EVAL_SLACK_S + self.eval_predicted_s * slowdown

    def window(self, step: int, shared: float) -> float:
        """At a log step: the images/s since the last one; the reserve follows that pace."""
        if self.shared is not None:
            self.shared = shared
        now = self.clock()
        ips = (step - self.window_step) * self.cfg.batch_size / max(now - self.window_start, 1e-9)
        # the pace when the eval batch was timed: that of the first log window that starts at
        # or after it, not of the window holding it (its steps after the timing are few, noisy
        # and a few % fast after an evaluation; those before may be of another token share)
        if (self.end is not None and self.window_step >= self.timing_step
                and self.keep == self.timed_keep):
            self.eval_ips = self.eval_ips or ips
            self.set_reserve(slowdown=self.eval_ips / max(ips, 1e-9))
        self.window_start, self.window_step = now, step
        return ips

    def work_share(self, step_share: float) -> float:
        """Share of the run's work done once step_share of its steps are."""
        x = min(max(step_share, 0.0), 1.0) * 1000
        i = min(int(x), 999)
        return (self.work[i] + (x - i) * (self.work[i + 1] - self.work[i])) / self.work[-1]

    def eta(self, step: int) -> float:
        """Seconds left: the time this process has run, scaled by the work left over the work
        it has done (by the time budget's share where that is ahead)."""
        done_here = self.work_share(step / max(self.total, 1)) - self.start_work
        done = max(done_here / max(1 - self.start_work, 1e-9), self.last_share)
        return (self.clock() - self.start) * (1 - done) / max(done, 1e-9)

    def timed_s(self) -> float:
        """Seconds since the run started, less the warm-up: what the budget counts."""
        return self.clock() - self.start_time - self.warmup_s


class Evaluations:
    """When the test set is scored during a run, and the best score of those evaluations.

    Every --eval-every epochs, the first after min(--eval-every, 1) epochs: at 5, after epochs
    1, 6, ..., 96, where the paper's code evaluates (the end of its epochs 0, 5, ..., 95 counted
    from 0, never the end of the run). The best of them (best_test_acc, best_epoch) is the
    statistic the paper reports; the final evaluation (the run's test_acc) counts among them
    only when it falls on one of their steps."""

    def __init__(self, cfg: Config, steps_per_epoch: float, resume_state: Optional[dict]):
        self.steps_per_epoch = steps_per_epoch
        self.every = max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every else 0
        self.first = max(1, round(min(cfg.eval_every, 1.0) * steps_per_epoch))
        saved = resume_state or {}
        self.best = {key: saved.get(key) for key in ("best_test_acc", "best_epoch")}

    def due(self, step: int) -> bool:
        return self.every > 0 and step >= self.first and (step - self.first) % self.every == 0

    def add(self, step: int, test_acc: float) -> None:
        if self.best["best_test_acc"] is None or test_acc > self.best["best_test_acc"]:
            self.best = {"best_test_acc": test_acc,  # the first of equal ones, as the paper's code
                         "best_epoch": round(step / self.steps_per_epoch, 4)}


class Meter:
    """The steps between log steps (the trainer sums their losses on the device: no sync), the
    skipped-step count, the evaluations, and what each log step prints and records."""

    def __init__(self, trainer: "Trainer", run: RunFolder, budget: Budget, skipped: int,
                 prior_elapsed: float, evals: Evaluations):
        self.trainer, self.run, self.budget, self.cfg = trainer, run, budget, trainer.cfg
        self.skipped, self.prior_elapsed, self.loss_count = skipped, prior_elapsed, 0
        self.evals = evals
        self.bar = Progress(run.main)

    def add(self, taken: bool) -> None:
        if taken:
            self.loss_count += 1
        else:
            self.skipped += 1

    def elapsed(self) -> float:
        return self.prior_elapsed + self.budget.clock() - self.budget.start

    def log(self, step: int, progress: float, stop_asked: bool) -> bool:
        """The host sync of a log step; returns whether any rank was asked to stop."""
        cfg, total = self.cfg, self.budget.total
        mean_loss, stopping, shared = self.trainer.sync(self.trainer.loss_sum, self.loss_count,
                                                        stop_asked, self.budget.share())
        if not math.isfinite(mean_loss) and cfg.nan_policy == "stop":
            raise self.run.fault(f"non-finite loss {mean_loss} near step {step}")
        ips, lr = self.budget.window(step, shared), lr_at(progress, cfg)
        epoch = step / self.trainer.steps_per_epoch
        self.bar.show(f"step {step:,}/{total:,} | ep {epoch:.2f} | loss {mean_loss:.4f} | "
                      f"lr {lr:.2e} | {ips:,.0f} img/s | ETA {fmt_time(self.budget.eta(step))}")
        self.run.record("train", step=step, epoch=round(epoch, 4),
                        loss=mean_loss if math.isfinite(mean_loss) else None,  # all skipped
                        lr=lr, img_per_s=round(ips, 1), elapsed=round(self.elapsed(), 2),
                        skipped=self.skipped)
        self.trainer.loss_sum.zero_()
        self.loss_count = 0
        return stopping

    def evaluation(self, step: int) -> dict:
        result = self.trainer.evaluate()
        if self.evals.due(step):
            self.evals.add(step, result["test_acc"])
        self.run.record("eval", step=step, epoch=round(step / self.trainer.steps_per_epoch, 4),
                        **result)
        return result

    def saved_counts(self) -> dict:
        """What a checkpoint keeps of the loop's bookkeeping."""
        return {"skipped": self.skipped, **self.evals.best}


def setup_device(cfg: Config, dist: Dist) -> torch.device:
    device = pick_device(cfg.device)
    check_kernels(cfg.kernels, device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    if cfg.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
        # warn_only: the one flagged op, equalize's scatter_add, sums integers, exact in any order
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return device


def load_data(cfg: Config, dist: Dist, log) -> dict:
    # the first process of each machine alone downloads and caches the data; the others then
    # read its copy (the barriers are global: all first processes load before any other does)
    if dist.local_rank != 0:
        torch.distributed.barrier()
    data = data_gpu.load_cifar10(cfg.data or None, log=log)
    if dist.local_rank == 0 and dist.world_size > 1:
        torch.distributed.barrier()
    return data


# ----------------------------------------------------------------------------------------------
# The training loop

@kernels.tf32_matmuls(True)  # fp32 leftovers on tensor cores; the caller's setting back after
def train(cfg: Config, resume_state: dict = None, overwrite: bool = False, eval_only: bool = False,
          clock=time.monotonic, start_time: float = None) -> dict:
    """Train (or evaluate) one configuration; returns the summary dict."""
    start_time = clock() if start_time is None else start_time
    # before the rendezvous: each process refuses on its own instead of waiting for the others
    validate(cfg, Dist.from_env().world_size)
    dist = init_distributed(cfg.device)
    log = print if dist.main else (lambda *a, **k: None)
    done = resume_state is not None and not eval_only and finished_run(resume_state)
    if done:
        log(f"{os.path.dirname(resume_state['path'])} holds a finished run ({done['steps']:,} steps, "
            f"test accuracy {done.get('test_acc')}%): nothing to resume; --eval-only evaluates it")
        return done
    # every check of the run folder before the data is loaded, and nothing written yet
    run = None if eval_only else RunFolder(cfg, resume_state, overwrite, dist)
    device = setup_device(cfg, dist)
    trainer = Trainer(cfg, load_data(cfg, dist, log), device, dist)
    step, prior_elapsed, skipped = trainer.resume(resume_state, log)
    if eval_only:
        result = trainer.evaluate()
        log(f"test accuracy {result['test_acc']:.2f}% (loss {result['test_loss']:.4f}) at step {step}")
        return result
    warm_start = clock()
    trainer.prepare(keep_levels(cfg), cfg.nan_policy == "skip")
    warmup_s = clock() - warm_start if trainer.compiled else 0.0
    total, ckpt_steps = trainer.total_steps, max(1, round(trainer.steps_per_epoch))
    log(f"{cfg.variant}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
        f"{total:,} steps of {cfg.batch_size} on {device} ({'bf16' if trainer.amp_dtype else 'fp32'}"
        f", compile {trainer.compiled}, kernels {cfg.kernels}) -> {run.out}")
    if device.type == "cpu" and (note := cpu_recipe_note(cfg, total)):
        log(note)
    budget = Budget(cfg, total, step, start_time, clock, trainer.time_eval, dist.world_size, warmup_s)
    meter = Meter(trainer, run, budget, skipped, prior_elapsed,
                  Evaluations(cfg, trainer.steps_per_epoch, resume_state))
    stopped_by = None
    with run.writing(), StopRequest() as stop:
        while step < total:
            progress = budget.progress(step)
            keep = keep_at(progress, cfg)
            budget.before_step(step, keep)
            try:
                taken = trainer.step(step, budget.last_share, token_keep=keep,
                                     skip_nonfinite=cfg.nan_policy == "skip")
            except torch.cuda.OutOfMemoryError as oom:
                traceback.clear_frames(oom.__traceback__)  # free the failed step's tensors first
                raise UsageError(trainer.out_of_memory_advice()) from None
            step += 1
            meter.add(taken)
            budget.after_step(step)
            done = progress >= 1.0 or step >= total
            # a lone process acts on a signal at once; under torchrun at the next log step, as
            # all ranks must stop at the same step and a signal may reach them a step apart
            stopping = stop.signum is not None and dist.world_size == 1
            # checkpoint steps are log steps too: a poisoned model is never saved
            if step % cfg.log_every == 0 or step % ckpt_steps == 0 or done or stopping:
                stopping = meter.log(step, progress, stop.signum is not None)
            if done:
                break
            if stopping:
                stopped_by = signal.Signals(stop.signum).name if stop.signum else "signal to another rank"
                break
            if meter.evals.due(step):
                result = meter.evaluation(step)
                meter.bar.show(f"step {step:,}: test accuracy {result['test_acc']:.2f}%")
            if step % ckpt_steps == 0:
                run.checkpoint(trainer, step, meter.elapsed(), meter.saved_counts())
        meter.bar.done()
        run.checkpoint(trainer, step, meter.elapsed(), meter.saved_counts())
    if not stopped_by:
        try:
            return finish(trainer, run, meter, step, start_time, log)
        except Stopped as signalled:
            stopped_by = f"{signalled} during the final evaluation"
    run.close()
    log(f"{stopped_by}: stopped at step {step:,}; checkpoint {run.ckpt_path}; "
        f"continue with --resume {run.out}")
    return {"stopped": stopped_by, "step": step, "out": run.out}


def finish(trainer: "Trainer", run: RunFolder, meter: Meter, step: int, start_time: float,
           log) -> dict:
    """The final evaluation, the summary record and file, and the last line printed."""
    cfg, wall, eval_start = trainer.cfg, meter.elapsed(), meter.budget.clock()
    with StopRequest(at_once=True):  # the checkpoint is in place: a signal stops at once
        result = meter.evaluation(step)
    eval_s = meter.budget.clock() - eval_start
    best, best_epoch = meter.evals.best["best_test_acc"], meter.evals.best["best_epoch"]
    summary = {"variant": cfg.variant, "test_acc": round(result["test_acc"], 2),
               "test_loss": round(result["test_loss"], 4),
               "best_test_acc": None if best is None else round(best, 2), "best_epoch": best_epoch,
               "steps": step, "skipped": meter.skipped, "compiled": trainer.compiled,
               "train_s": round(wall, 1), "warmup_s": round(meter.budget.warmup_s, 1),
               "timed_s": round(meter.budget.timed_s(), 1),
               # what the budget kept back for the final evaluation, and what it took
               "eval_reserve_s": round(meter.budget.reserve, 1), "eval_s": round(eval_s, 1),
               "total_s": round(meter.budget.clock() - start_time, 1),
               "img_per_s": round(step * cfg.batch_size / max(wall, 1e-9), 1), "out": run.out}
    run.record("summary", **summary)
    run.write_json("summary.json", summary)
    run.close()
    best_text = "—" if best is None else f"{summary['best_test_acc']:.2f}% at epoch {best_epoch:g}"
    log(f"summary: {cfg.variant} | test acc {summary['test_acc']:.2f}% | best {best_text} | "
        f"{step:,} steps | train {summary['train_s']:.1f}s | warm-up {summary['warmup_s']:.1f}s + "
        f"timed {summary['timed_s']:.1f}s | "
        f"{summary['img_per_s']:,.0f} img/s | {run.out}")
    return summary


# ----------------------------------------------------------------------------------------------
# Fitting the CPU speedrun to the CPU at hand

def probe_img_per_s(cfg: Config, precisions=("bf16", "fp32"), steps: int = 6,
                    seconds: float = 4.0, clock=time.monotonic) -> dict:
    """Training images/s of cfg's model in each precision on this CPU, on synthetic images. The
    precisions take turns step by step after two untimed steps each, so a slow phase of the
    machine (it drifts up to 2x within minutes) falls on all of them rather than on whichever
    ran first; each keeps its fastest step, the least disturbed. At most `seconds` of steps."""
    g = torch.Generator().manual_seed(0)
    n = 2 * cfg.batch_size
    data = {"train_x": torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "test_x": torch.zeros(1, 3, SIDE, SIDE, dtype=torch.uint8), "test_y": torch.zeros(1).long()}
    trainers = {p: Trainer(dataclasses.replace(cfg, precision=p, compile="off", whiten=False,
                                               time_budget=0.0, max_steps=steps + 2, device="cpu"),
                           data, torch.device("cpu")) for p in precisions}
    for trainer in trainers.values():
        trainer.step(0), trainer.step(1)
    fastest, start = dict.fromkeys(precisions, math.inf), clock()
    for s in range(2, steps + 2):
        for p, trainer in trainers.items():
            t = clock()
            trainer.step(s)
            fastest[p] = min(fastest[p], clock() - t)
        if clock() - start > seconds and s >= 3:
            break
    return {p: cfg.batch_size / t for p, t in fastest.items()}


def fit_cpu_speedrun(cfg: Config, typed: set, log=print) -> Config:
    """cpu-speedrun on a CPU: bf16 with the preset's tuning where bf16 trains faster than fp32
    (matrix units), else fp32 with cheaper images; measured in a probe of a few seconds,
    which the time budget counts. Flags the user typed win over both."""
    dist = Dist.from_env()  # before the rendezvous: torchrun's environment only
    if "precision" in typed and cfg.precision != "auto":
        choice, why = cfg.precision, "as --precision asks"
    elif dist.world_size > 1:  # every process must choose alike
        choice = "bf16" if cpu_has_bf16_units() else "fp32"
        why = "from the CPU's flags (under torchrun processes do not probe)"
    else:
        speed = probe_img_per_s(cfg)
        bf16, fp32 = speed["bf16"], speed["fp32"]
        choice = "bf16" if bf16 >= CPU_BF16_LEAD * fp32 else "fp32"
        why = (f"the preset's model trains at {bf16:,.0f} img/s in bf16, {fp32:,.0f} in fp32 "
               f"(x{bf16 / fp32:.2f})")
    tuned = {k: v for k, v in CPU_TUNING[choice].items() if k not in typed}
    cfg = dataclasses.replace(cfg, **tuned, fitted_because=why)  # config.json keeps the reason
    validate(cfg)
    if dist.main:  # under torchrun every process chooses, one says so
        log(f"{cfg.variant}: {tuning_text(dataclasses.asdict(cfg))}, batch {cfg.batch_size}: {why}")
    return cfg


def tuning_text(cfg: dict) -> str:
    """What cpu-speedrun fits to a CPU, in the words of its start-up line and of record rows."""
    return (f"{cfg['precision']}, width {cfg['width']}, depth {cfg['depth']}, "
            f"token share {cfg['token_keep']:g}")


def cpu_recipe_note(cfg: Config, total_steps: int) -> Optional[str]:
    """For a paper recipe started on a CPU: how long it would take there, and what to run."""
    if cfg.time_budget or cfg.max_steps:
        return None
    baseline = count_flops_per_image(resolve_config("baseline"))
    hours = total_steps * cfg.batch_size / (CPU_IMG_PER_S * baseline / count_flops_per_image(cfg)) / 3600
    if hours < 1:
        return None
    return (f"note: on a CPU this recipe takes about {hours:,.0f} h; for a ten-minute result run "
            f"python speedrun.py --variant cpu-speedrun (or add --time-budget/--max-steps)")


# ----------------------------------------------------------------------------------------------
# Variant table and CLI

def count_flops_per_image(cfg: Config) -> float:
    """Training FLOPs (forward + backward) per image, counted by PyTorch on a tiny batch."""
    from torch.utils.flop_counter import FlopCounterMode
    # counted inside a run too (cpu_recipe_note): its random draws must not move the run's stream
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
        x = torch.randn(2, 3, SIDE, SIDE)
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
    return counter.get_total_flops() / 2


def variant_table() -> str:
    rows = ["| variant | changes | params | train GFLOP/img | paper acc % | paper s (3090) |",
            "|---|---|---:|---:|---:|---:|"]
    for name, v in VARIANTS.items():
        cfg = resolve_config(name)
        params = sum(p.numel() for p in build_model(cfg).parameters())
        acc = f"{v.paper_acc:.2f}" if v.paper_acc else "—"
        secs = f"{v.paper_runtime_s:,}" if v.paper_runtime_s else "—"
        rows.append(f"| {name} | {v.about} | {params:,} | {count_flops_per_image(cfg) / 1e9:.3f} | "
                    f"{acc} | {secs} |")
    return "\n".join(rows)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line and exit code 2 from main, no usage dump."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        description="Train the paper's Tiny ViT (or a variant) on CIFAR-10, data and augmentation "
                    "on the device. Presets set defaults; any flag below overrides them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variant", default=argparse.SUPPRESS,  # typed or not: --resume asks
                        help="preset(s), comma-separated, later ones win (see --list-variants) "
                             "['baseline']")
    parser.add_argument("--list-variants", action="store_true",
                        help="print every preset with its parameters, GFLOPs and paper figures")
    parser.add_argument("--resume", default="", help="run folder or ckpt.pt to continue")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --resume: report the checkpoint's test accuracy and exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out instead of refusing")
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS: only flags the user typed override the preset
        kwargs = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} [{f.default!r}]"}
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else f.name.upper(),
                                **kwargs)
    return parser


def main(argv=None) -> int:
    start = time.monotonic()
    try:
        args = vars(build_parser().parse_args(argv))
        variant, resume, eval_only = args.pop("variant", None), args.pop("resume"), args.pop("eval_only")
        overwrite = args.pop("overwrite")
        if args.pop("list_variants"):
            print(variant_table())
            return 0
        state = None
        if resume:
            state = load_checkpoint(resume)
            saved = Config(**state["config"])
            if variant is not None and resolve_config(variant).variant != saved.variant:
                raise UsageError(f"checkpoint {resume} is from variant {saved.variant!r}, "
                                 f"not {variant!r}")
            changed = [k for k, v in args.items() if k not in RUN_FIELDS and getattr(saved, k) != v]
            if changed:
                raise UsageError(f"--resume continues the saved run; it cannot change "
                                 f"{', '.join('--' + c.replace('_', '-') for c in changed)}")
            out = args.get("out") or (resume if os.path.isdir(resume) else os.path.dirname(resume))
            cfg = dataclasses.replace(saved, **{**args, "out": out})
        elif eval_only:
            raise UsageError("--eval-only needs --resume PATH (a run folder or checkpoint)")
        else:
            cfg = resolve_config(variant or "baseline", **args)
            if "cpu-speedrun" in cfg.variant.split(",") and pick_device(cfg.device).type == "cpu":
                cfg = fit_cpu_speedrun(cfg, set(args))
        train(cfg, state, overwrite=overwrite, eval_only=eval_only, start_time=start)
    except (UsageError, data_gpu.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:  # outside the training step (loading, evaluation)
        print(f"error: {str(e).partition('. ')[0]}; try a smaller --batch-size", file=sys.stderr)
        return 2
    return 0


def exit_process(code: int):
    """End the process with `code`. Under torchrun: leave the process group, then exit without
    the interpreter's teardown, where Gloo's threads can abort a finished run ('terminate called
    without an active exception', SIGABRT: one exit in about six in the DDP tests)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
