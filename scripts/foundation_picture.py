"""A photograph's 1/16-resolution features upsampled 16x by `local_upsample` guided by the photograph,
beside bilinear interpolation: results/foundation/picture.png.

    python scripts/foundation_picture.py [--image china|flower] [--out results/foundation] [--kernel-size 7]

The photograph is one of the two JPEGs scikit-learn's wheel ships (sklearn/datasets/images/), read from
the wheel itself; the wheel comes from the configured package index (`pip download --no-deps
scikit-learn`) into .cache/foundation/ (git-ignored) when it is not there yet.

No pretrained backbone ships here, so the features are ones the image itself gives, one vector per
16x16 patch as a ViT/16 gives one token: the patch's mean colour (RGB and Lab), its colour spread, and a
fixed random projection of its 768 pixel values, 64 channels in all.

The guided upsampling is a joint bilateral upsampling written as attention: with the query of an
output pixel q = [lab / s_r, yx / s_s, 1] and the key of a patch k = [lab_k / s_r, yx_k / s_s,
-|.|^2 / 2] (lab_k the patch's mean Lab colour, yx_k its centre, yx in patches), q . k =
-|q' - k'|^2 / 2 + a term of the query alone, so the softmax over the window is the Gaussian weight of
colour and position distance, normalised. Two windows: NATTEN's (window="clamped", as NAF) and AnyUp's
(window_ratio, a fraction of the map around the pixel's relative position).
"""
import argparse
import glob
import os
import subprocess
import sys
import zipfile
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's package, also when run from elsewhere
from lda_aqu.upsampler import local_upsample  # noqa: E402

PATCH = 16
CHANNELS = 64


def photograph(name: str, cache: str):
    """(uint8 [H, W, 3] array, wheel file name) of sklearn/datasets/images/<name>.jpg."""
    wheels = sorted(glob.glob(os.path.join(cache, "scikit_learn-*.whl")))
    if not wheels:
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "scikit-learn", "-d", cache], check=True)
        wheels = sorted(glob.glob(os.path.join(cache, "scikit_learn-*.whl")))
        if not wheels:
            raise SystemExit(f"pip download left no scikit-learn wheel in {cache}")
    with zipfile.ZipFile(wheels[-1]) as z:
        data = z.read(f"sklearn/datasets/images/{name}.jpg")
    return np.asarray(Image.open(BytesIO(data)).convert("RGB")), os.path.basename(wheels[-1])


def lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of sRGB in [0, 1], [3, H, W] -> [3, H, W], L in [0, 100]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = torch.einsum("ij,jhw->ihw", m, lin) / torch.tensor([0.9505, 1.0, 1.089])[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def patch_features(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[3, H, W] -> [1, CHANNELS, H/16, W/16]: per patch mean RGB, mean Lab, RGB spread and a random
    projection of the patch's pixels, each channel standardised over the map."""
    mean_rgb = F.avg_pool2d(rgb[None], PATCH)
    mean_lab = F.avg_pool2d(lab(rgb)[None], PATCH)
    spread = (F.avg_pool2d(rgb[None] ** 2, PATCH) - mean_rgb ** 2).clamp_min(0).sqrt()
    pixels = F.unfold(rgb[None] - 0.5, PATCH, stride=PATCH)  # [1, 3*16*16, h*w]
    n_proj = CHANNELS - 9
    proj = torch.randn(n_proj, pixels.shape[1], generator=gen) / pixels.shape[1] ** 0.5
    h, w = rgb.shape[1] // PATCH, rgb.shape[2] // PATCH
    projected = (proj @ pixels[0]).view(1, n_proj, h, w)
    f = torch.cat([mean_rgb, mean_lab, spread, projected], 1)
    return (f - f.mean((2, 3), keepdim=True)) / f.std((2, 3), keepdim=True).clamp_min(1e-6)


def guidance(rgb: torch.Tensor, s_r: float, s_s: float):
    """(q [1, 6, H, W], k [1, 6, h, w]) whose dot product is a Gaussian log-weight of Lab colour distance
    (s_r Lab units) and position distance (s_s patches), up to a term of the query alone."""
    H, W = rgb.shape[1:]
    h, w = H // PATCH, W // PATCH
    colour = lab(rgb)[None] / s_r
    ys = (torch.arange(H) + 0.5) / PATCH
    xs = (torch.arange(W) + 0.5) / PATCH
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None] / s_s
    q = torch.cat([colour, pos, torch.ones(1, 1, H, W)], 1)
    key = F.adaptive_avg_pool2d(torch.cat([colour, pos], 1), (h, w))  # patch mean colour, patch centre
    k = torch.cat([key, -0.5 * key.square().sum(1, keepdim=True)], 1)
    return q, k


def pca_rgb(maps, basis_from: torch.Tensor):
    """Each [1, C, H, W] map projected on the first three principal components of `basis_from`'s pixels,
    scaled to [0, 1] by `basis_from`'s 1st and 99th percentiles: one colouring for every panel."""
    x = basis_from[0].flatten(1).T
    mu = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mu, full_matrices=False)
    ref = (x - mu) @ vt[:3].T
    lo, hi = torch.quantile(ref, 0.01, 0), torch.quantile(ref, 0.99, 0)
    out = []
    for m in maps:
        p = (m[0].flatten(1).T - mu) @ vt[:3].T
        out.append(((p - lo) / (hi - lo)).clamp(0, 1).T.reshape(3, *m.shape[-2:]).permute(1, 2, 0).numpy())
    return out


def grad_norm(x: torch.Tensor) -> torch.Tensor:
    """[1, C, H, W] -> [H-1, W-1]: the norm over channels of the forward differences."""
    dy, dx = x[0, :, 1:, :-1] - x[0, :, :-1, :-1], x[0, :, :-1, 1:] - x[0, :, :-1, :-1]
    return (dy.square() + dx.square()).sum(0).sqrt()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", choices=("china", "flower"), default="china")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "foundation"))
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache", "foundation"))
    ap.add_argument("--kernel-size", type=int, default=7, help="NATTEN's window, in patches (odd)")
    ap.add_argument("--window-ratio", type=float, default=0.1, help="AnyUp's window, a fraction of the map")
    ap.add_argument("--sigma-colour", type=float, default=8.0, help="Lab units")
    ap.add_argument("--sigma-space", type=float, default=1.5, help="patches")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pixels, wheel = photograph(args.image, args.cache)
    H, W = (pixels.shape[0] // PATCH) * PATCH, (pixels.shape[1] // PATCH) * PATCH
    rgb = torch.from_numpy(pixels[:H, :W].copy()).permute(2, 0, 1).float() / 255
    gen = torch.Generator().manual_seed(args.seed)
    feats = patch_features(rgb, gen)
    q, k = guidance(rgb, args.sigma_colour, args.sigma_space)

    with torch.no_grad():
        bilinear = F.interpolate(feats, (H, W), mode="bilinear", align_corners=False)
        clamped = local_upsample(feats, (H, W), q=q, k=k, scale=1.0, kernel_size=args.kernel_size,
                                 coords="nearest", window="clamped")
        ratio = local_upsample(feats, (H, W), q=q, k=k, scale=1.0, window_ratio=args.window_ratio)

    panels = pca_rgb([feats, bilinear, clamped, ratio], feats)
    titles = [f"photograph ({args.image}.jpg, {W}x{H})",
              f"features, 1/{PATCH}: {feats.shape[-1]}x{feats.shape[-2]}x{CHANNELS} (PCA 1-3)",
              f"bilinear x{PATCH} (F.interpolate)",
              f"local_upsample x{PATCH}, window=\"clamped\", {args.kernel_size}x{args.kernel_size}",
              f"local_upsample x{PATCH}, window_ratio={args.window_ratio}"]
    images = [rgb.permute(1, 2, 0).numpy(), *panels]
    # a detail (the box on the photograph): the same crop of bilinear (left) and the clamped window (right)
    y0, x0, ch, cw = int(H * 0.27), int(W * 0.27), int(H * 0.38), int(W * 0.19)
    gap = np.ones((ch, 3, 3))
    images.append(np.concatenate([panels[1][y0:y0 + ch, x0:x0 + cw], gap, panels[2][y0:y0 + ch, x0:x0 + cw]], 1))
    titles.append("detail (box on the photograph): bilinear | clamped")
    version = wheel.split("-")[1]

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.4))
    for ax, im, title in zip(axes.flat, images, titles):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].add_patch(plt.Rectangle((x0, y0), cw, ch, fill=False, edgecolor="white", linewidth=1))
    fig.suptitle(f"Patch features (one 64-vector per 16x16 patch, as a ViT/16's tokens) upsampled 16x, guided by "
                 f"the photograph; photograph from scikit-learn {version}'s wheel", fontsize=11)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    # a 256-colour palette keeps the PNG small; the panels are smooth colourings, the photo a reference
    path = os.path.join(args.out, "picture.png")
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)

    edges = grad_norm(lab(rgb)[None])
    print(f"photograph: sklearn/datasets/images/{args.image}.jpg from {wheel}, cropped to {W}x{H}")
    print(f"features {tuple(feats.shape)} -> {(H, W)}; correlation of the features' gradient with the "
          f"photograph's: bilinear {corr(grad_norm(bilinear), edges):.3f}, clamped "
          f"{corr(grad_norm(clamped), edges):.3f}, window_ratio {corr(grad_norm(ratio), edges):.3f}")
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


if __name__ == "__main__":
    main()
