"""LDA-AQU demo: upsample a feature map with every backend (the Triton kernels, the torch path, the
eager reference), report agreement and time, and draw where a few output pixels sample the input.

    python demo.py [--out results/demo] [--channels 64] [--size 40 56]
"""
import argparse
import os
import time

import torch

if not torch.cuda.is_available():  # the kernels then run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lda_aqu.upsampler import LDAAQU  # noqa: E402


def scene(H: int, W: int) -> torch.Tensor:
    """A synthetic image with edges and blobs: something whose features have structure."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    disc = ((x + 0.35) ** 2 + (y + 0.2) ** 2 < 0.18).float()
    box = ((x - 0.45).abs() < 0.25) & ((y - 0.3).abs() < 0.4)
    stripes = 0.5 * torch.sin(9 * (x + 0.6 * y))
    return torch.stack([disc, box.float(), stripes])


def features(img: torch.Tensor, C: int, gen: torch.Generator) -> torch.Tensor:
    """A fixed random two-layer conv encoder: a feature map with the scene's structure."""
    w1 = torch.randn(C, 3, 3, 3, generator=gen) / 3
    w2 = torch.randn(C, C, 3, 3, generator=gen) / (3 * C ** 0.5)
    return F.conv2d(F.gelu(F.conv2d(img[None], w1, padding=1)), w2, padding=1)


def timed(fn, repeat: int):
    if repeat > 1:
        fn()  # warm-up: compilation, the allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) / repeat


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, nargs=2, default=(40, 56), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    img = scene(*args.size)
    x = features(img, args.channels, gen).to(dev)

    torch.manual_seed(args.seed)  # the initialisation too: the same figure and numbers every run
    m = LDAAQU(args.channels, k_u=3, n_groups=2).to(dev)
    with torch.no_grad():  # stand-in for trained weights: a last offset conv that deforms the grid
        m.conv_offset[-1].weight.normal_(0, 0.15, generator=gen.manual_seed(args.seed + 1))
    outs, times = {}, {}
    with torch.no_grad():
        for backend in ("triton", "torch", "reference"):
            m.backend = backend
            # one run through the interpreter: it proves the kernels, its time means nothing
            outs[backend], times[backend] = timed(lambda: m(x), repeat=1 if backend == "triton" and dev == "cpu" else 3)
    errs = {b: ((outs[b] - outs["reference"]).norm() / outs["reference"].norm()).item() for b in ("triton", "torch")}
    err = max(errs.values())
    where = "GPU " + torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"LDAAQU(C={args.channels}, k_u=3, G=2): {tuple(x.shape)} -> {tuple(outs['triton'].shape)} on {where}")
    for b, t in times.items():
        note = "  (Triton's interpreter: proves the kernels, not a timing)" if b == "triton" and dev == "cpu" else ""
        vs = f"  rel err vs reference {errs[b]:.2e}" if b in errs else ""
        print(f"  {b:9s} {t * 1e3:9.1f} ms{vs}{note}")

    # where do a few output pixels look? capture the op's offsets and attention
    _, Ho, Wo = outs["triton"].shape[1:]
    H, W = args.size
    with torch.no_grad():
        off = m.sampling_offsets(x)
    off = off.reshape(2, 9, 2, Ho, Wo).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    axes[0].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy() * 0.8 + 0.1, extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    picks = [(int(Ho * fy), int(Wo * fx)) for fy, fx in ((0.25, 0.2), (0.5, 0.55), (0.7, 0.8), (0.35, 0.75))]
    colors = ["tab:red", "tab:cyan", "tab:orange", "tab:green"]
    ry, rx = (H - 1) / (Ho - 1), (W - 1) / (Wo - 1)
    for (py, px), c in zip(picks, colors):
        for g, marker in ((0, "o"), (1, "^")):
            sy = (py + off[g, :, 0, py, px]) * ry
            sx = (px + off[g, :, 1, py, px]) * rx
            axes[0].scatter(sx, sy, s=28, c=c, marker=marker, edgecolors="k", linewidths=0.5)
        axes[0].scatter([px * rx], [py * ry], s=160, c=c, marker="*", edgecolors="k")
    axes[0].set_title("input scene: output pixels (stars) and their 9 samples\nper offset group (circles: g=0, triangles: g=1)")
    axes[1].imshow(outs["triton"][0, :3].permute(1, 2, 0).cpu().sub(-2).div(4).clamp(0, 1).numpy())
    axes[1].set_title(f"upsampled features, channels 0-2 ({Ho}x{Wo})\nrel err vs reference {errs['triton']:.1e} "
                      f"(Triton), {errs['torch']:.1e} (torch)")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sampling.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    if err > 1e-5:
        raise SystemExit(f"backends disagree: rel err {err:.2e}")


if __name__ == "__main__":
    main()
