"""Roofline estimate per kernel call: fused Triton kernels vs the unfused PyTorch path.

    python bench/roofline.py [--batch 256]

For each call (forward and backward) it counts the DRAM bytes moved and the FLOPs at the
variants' shapes, and prints the estimated time = max(bytes / bandwidth, FLOPs / peak) on an
H100 SXM and an RTX 3090: what a GPU owner should see, give or take launch latency (~2-4 µs a
kernel, listed as `launches`), to check with the profiler (bench/trace_step.py).

Counting rules (bf16 activations, as under bf16 autocast on CUDA):
* every tensor an op reads or writes goes to DRAM once (operands re-read from L2 are free);
* fused kernels: tensor-core FLOPs on their padded tiles (65 keys fill a 128-wide tile, 65
  queries 80 or 96 rows, D 8 a 16-wide tile), as the hardware executes them; exponentials are
  shown as a third bound (`exp µs`) since at head dim 8-16 the SFUs, not the tensor cores,
  can be the limit — the roofline time does not include it;
* the unfused path is what the `torch` backend runs under CUDA autocast: bf16 matmuls,
  softmax in fp32 (autocast's policy) and a bf16 copy of P for the P·V matmul, the scale as
  its own elementwise kernel, the (B,H,N,D)->(B,N,C) copy before the projection; two F.linear
  calls for the low-rank projection.

Peaks (dense, no sparsity):
* H100 SXM5: 3.35 TB/s HBM3, 989.4 TFLOP/s BF16 tensor (NVIDIA H100 Tensor Core GPU
  datasheet: 1,979 TFLOP/s is the sparse figure).
* RTX 3090: 936 GB/s GDDR6X, 71 TFLOP/s BF16 tensor with FP32 accumulate (NVIDIA Ampere
  GA102 GPU Architecture whitepaper, appendix A, GeForce RTX 3090: 71/142 dense/sparse; the
  142 TFLOP/s FP16-accumulate rate does not apply to bf16).
* exp2: 16 results/clock/SM (CUDA C++ Programming Guide, arithmetic instruction throughput,
  compute capability 8.x and 9.0): H100 SXM 132 SMs × 1.98 GHz, RTX 3090 82 SMs × 1.695 GHz.
"""
import math
import sys
from dataclasses import dataclass

import torch

import common  # first: puts the repository root on sys.path
from kernels.flash_attn import attn_config

GPUS = {  # name: (bytes/s, bf16 FLOP/s, exp2/s)
    "H100": (3.35e12, 989.4e12, 132 * 16 * 1.98e9),
    "3090": (936e9, 71e12, 82 * 16 * 1.695e9),
}
BF16, FP32 = 2, 4


def pad(n: int, block: int) -> int:
    return math.ceil(n / block) * block


def pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@dataclass
class Cost:
    bytes: float = 0.0
    flops: float = 0.0
    exps: float = 0.0
    launches: int = 0

    def __add__(self, o):
        return Cost(self.bytes + o.bytes, self.flops + o.flops, self.exps + o.exps, self.launches + o.launches)

    def op(self, read=0.0, write=0.0, flops=0.0, exps=0.0):
        """One kernel launch."""
        return self + Cost(read + write, flops, exps, 1)

    def times(self, gpu: str):
        bw, peak, sfu = GPUS[gpu]
        return max(self.bytes / bw, self.flops / peak) * 1e6, self.exps / sfu * 1e6


# ----------------------------------------------------------------------------- attention

def attention_costs(B, H, N, D, lsa=False, latent=0):
    """(fused fwd, fused bwd, unfused fwd, unfused bwd) for one attention call; the kernels'
    query blocks as kernels.flash_attn launches them."""
    block_m_fwd, block_m_bwd = (attn_config(N, D, torch.bfloat16, which, latent)["BLOCK_M"]
                                for which in ("fwd", "bwd"))
    X = B * H * N * D * BF16           # one of q, k, v, o, dO, dq, ...
    L = B * H * N * FP32               # log-sum-exp
    P2, P4 = B * H * N * N * BF16, B * H * N * N * FP32
    bn, bd = pow2(N), pow2(D)
    mm = 2 * B * H * N * N * D         # one N×N×D matmul
    mm_pad = lambda bm: 2 * B * H * pad(N, bm) * bn * bd  # noqa: E731
    exps = lambda bm: B * H * pad(N, bm) * bn  # noqa: E731

    fused_fwd = Cost().op(read=3 * X, write=X + L, flops=2 * mm_pad(block_m_fwd), exps=exps(block_m_fwd))
    fused_bwd = Cost().op(read=4 * X + L, write=3 * X, flops=5 * mm_pad(block_m_bwd), exps=exps(block_m_bwd))  # q k v dO

    f = Cost().op(read=2 * X, write=P2, flops=mm)           # S = q kᵀ
    f = f.op(read=P2, write=P2)                              # S · scale
    if lsa:
        f = f.op(read=P2, write=P2)                          # diagonal mask
    f = f.op(read=P2, write=P4, exps=B * H * N * N)          # softmax (fp32 under autocast)
    f = f.op(read=P4, write=P2)                              # P to bf16 for the matmul
    f = f.op(read=P2 + X, write=X, flops=mm)                 # O = P v
    unfused_fwd = f.op(read=X, write=X)                      # (B,H,N,D) -> (B,N,C) copy

    b = Cost().op(read=P2 + X, write=P2 + X, flops=2 * mm)   # dP = dO vᵀ, dv = Pᵀ dO
    b = b.op(read=P2, write=P4)                              # dP to fp32
    b = b.op(read=2 * P4, write=P4)                          # softmax backward
    b = b.op(read=P4, write=P2)                              # dS to bf16
    b = b.op(read=P2, write=P2)                              # · scale
    if lsa:
        b = b.op(read=P2, write=P2)                          # mask backward
    unfused_bwd = b.op(read=2 * P2 + 2 * X, write=2 * X, flops=2 * mm)  # dq, dk
    return fused_fwd, fused_bwd, unfused_fwd, unfused_bwd


# ----------------------------------------------------------------------------- low-rank projection

def lowrank_costs(M, C_in, R, C_out):
    x, y, h = M * C_in * BF16, M * C_out * BF16, M * R * BF16
    w = (R * C_in + C_out * R + C_out) * BF16
    g = 2 * M * C_in * R  # one of the five M×C×R matmuls (C_in = C_out here)
    fused_fwd = Cost().op(read=x + w, write=y, flops=2 * g)
    fused_bwd = (Cost().op(read=x + y + w, write=x + 2 * h, flops=3 * g)  # h again, dh, dx
                 .op(read=y + h, write=w, flops=g)                         # dW_up = dyᵀ h
                 .op(read=h + x, write=w, flops=g)                         # dW_down = dhᵀ x
                 .op(read=y, write=C_out * BF16))                          # db
    unfused_fwd = Cost().op(read=x + w, write=h, flops=g).op(read=h + w, write=y, flops=g)
    unfused_bwd = (Cost().op(read=y + w, write=h, flops=g)   # dh = dy W_up
                   .op(read=y + h, write=w, flops=g)          # dW_up
                   .op(read=y, write=C_out * BF16)            # db
                   .op(read=h + w, write=x, flops=g)          # dx = dh W_down
                   .op(read=h + x, write=w, flops=g))         # dW_down
    return fused_fwd, fused_bwd, unfused_fwd, unfused_bwd


# ----------------------------------------------------------------------------- mla-q: two ways

def mla_q_costs(B, H, N, D, R):
    """The q path of an mla-q layer, x -> q -> attention, forward + backward:
    A: fused low-rank kernel writes q, the attention kernel reads it;
    B: cuBLAS down-projection writes the latent c, the attention kernel builds q_h = c W_hᵀ + b_h
       in registers (c re-read by each head from L2), the backward writes dq for the
       up-projection's weight/latent gradients (cuBLAS)."""
    C, M = H * D, B * N
    x, q, c = M * C * BF16, M * C * BF16, M * R * BF16
    lr_f, lr_b, _, _ = lowrank_costs(M, C, R, C)
    at_f, at_b, _, _ = attention_costs(B, H, N, D)
    a_fwd, a_bwd = lr_f + at_f, at_b + lr_b
    at_f, at_b, _, _ = attention_costs(B, H, N, D, latent=R)  # its own block sizes

    w = (R * C + C * R + C) * BF16
    up = 2 * M * R * C
    up_pad = 2 * B * H * pad(N, 16) * R * pow2(D)     # per-head q_h recompute on padded tiles
    b_fwd = Cost().op(read=x + w, write=c, flops=up) + Cost(at_f.bytes - q + c, at_f.flops + up_pad, at_f.exps, 1)
    b_bwd = (Cost(at_b.bytes - q + c, at_b.flops + up_pad, at_b.exps, 1)
             .op(read=q + w, write=c, flops=up)      # dc = dq W_up
             .op(read=q + c, write=w, flops=up)      # dW_up = dqᵀ c
             .op(read=q, write=C * BF16)             # db
             .op(read=c + w, write=x, flops=up)      # dx = dc W_down
             .op(read=c + x, write=w, flops=up))     # dW_down = dcᵀ x
    return a_fwd, a_bwd, b_fwd, b_bwd


def row(name, shape, direction, path, cost: Cost):
    h100, h100_exp = cost.times("H100")
    r3090, r3090_exp = cost.times("3090")
    return (f"{name:<10} {shape:<18} {direction:<4} {path:<15} {cost.bytes / 1e6:>8.1f} {cost.flops / 1e9:>7.2f} "
            f"{cost.launches:>3} {h100:>8.1f} {h100_exp:>6.1f} {r3090:>8.1f} {r3090_exp:>6.1f}")


def run(argv=None) -> int:
    ap = common.Parser(prog="bench/roofline.py", description=__doc__)
    ap.add_argument("--batch", type=int, default=256, help="images per call [256]")
    args = ap.parse_args(argv)
    common.check_ranges(args, {"--batch": "[1, inf)"})
    B = args.batch
    print(f"{'kernel':<10} {'shape':<18} {'dir':<4} {'path':<15} {'MB':>8} {'GFLOP':>7} {'#k':>3} "
          f"{'H100 µs':>8} {'exp µs':>6} {'3090 µs':>8} {'exp µs':>6}")
    for name, (H, N, D), lsa in (("baseline", (12, 65, 16), False), ("lsa", (12, 65, 16), True),
                                 ("mcls", (12, 66, 8), False)):
        ff, fb, uf, ub = attention_costs(B, H, N, D, lsa=lsa)
        shape = f"B{B} H{H} N{N} D{D}"
        for direction, fused, unfused in (("fwd", ff, uf), ("bwd", fb, ub)):
            print(row(f"attn/{name}", shape, direction, "fused kernel", fused))
            print(row(f"attn/{name}", shape, direction, "unfused torch", unfused))
    for width, tokens in ((192, 65), (96, 66)):
        ff, fb, uf, ub = lowrank_costs(B * tokens, width, 64, width)
        shape = f"M{B * tokens} {width}-64-{width}"
        for direction, fused, unfused in (("fwd", ff, uf), ("bwd", fb, ub)):
            print(row("lowrank", shape, direction, "fused kernel", fused))
            print(row("lowrank", shape, direction, "unfused torch", unfused))
    a_f, a_b, b_f, b_b = mla_q_costs(B, 12, 65, 16, 64)
    shape = f"B{B} 192-64-192"
    for direction, a, b in (("fwd", a_f, b_f), ("bwd", a_b, b_b), ("both", a_f + a_b, b_f + b_b)):
        print(row("mla-q q", shape, direction, "A lowrank+attn", a))
        print(row("mla-q q", shape, direction, "B fused q-attn", b))
    print("\n#k: kernel launches. µs: max(bytes/BW, FLOPs/peak) per call; exp µs: exponentials at "
          "16/clk/SM, a separate bound.")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
