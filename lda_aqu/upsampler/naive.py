"""Eager reference of the core op, written to be read: the tests' oracle.

    out[b, c, Y, X] = sum_n w[b, head(c), n, Y, X] * bilinear(v[b, c], position(group(c), n, Y, X))

It materialises the K sampled copies of the values (and keys), which the kernels and the torch
path avoid. Autograd flows through it, offsets included. LDA-AQU is the case of attention weights
(softmax of q . (k + rpb) over the K samples) with align-corners positions; CARAFE, DySample and
plain interpolation are other choices of positions and weights (see `local_upsample`).
"""
import numpy as np
import torch
from einops import rearrange

COORDS = ("align_corners", "half_pixel", "nearest")
WINDOWS = ("centered", "clamped", "ratio")
PADDINGS = ("zeros", "border")


def align_corners_ratio(n_in: int, n_out: int) -> float:
    """Input pixels per output pixel under align_corners=True; 0 when the output is one pixel wide."""
    if isinstance(n_out, int):
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    # a symbolic size (export): min/max instead of a branch, whose guard n_out > 1 would bind the size
    return (n_in - 1) * torch.sym_min(n_out - 1, 1) / torch.sym_max(n_out - 1, 1)


def base_grid(kernel_size, dtype=torch.float64, device=None) -> torch.Tensor:
    """[K, 2] (dy, dx) of neighbour n = i*k + j: (i - k//2, j - k//2); [[0, 0]] when kernel_size is None."""
    k = kernel_size or 1
    r = torch.arange(k, dtype=dtype, device=device) - k // 2
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(k * k, 2) * (kernel_size is not None)


def output_grid(n_in: int, n_out: int, coords: str, dtype, device) -> tuple[torch.Tensor, float]:
    """(origin, unit): the input coordinate of each output row (or column) before any offset, and what
    one offset unit is worth in input pixels. position = (Y + offset) * unit for align_corners (offsets
    in output pixels), origin(Y) + offset otherwise (offsets in input pixels)."""
    ys = torch.arange(n_out, device=device)
    if coords == "align_corners":
        return ys.to(dtype), align_corners_ratio(n_in, n_out)
    if coords == "half_pixel":  # F.interpolate(align_corners=False), grid_sample(align_corners=False)
        return (ys.to(dtype) + 0.5) * (n_in / n_out) - 0.5, 1.0
    # nearest source pixel as F.interpolate(mode="nearest") picks it: float32 ratio, floor, clamp
    ratio = torch.tensor(n_in, dtype=torch.float32) / n_out
    return (ys.float() * ratio).floor().clamp(max=n_in - 1).to(dtype), 1.0


def positions(offset, size, in_size, *, kernel_size, num_groups, coords, dtype, device):
    """Sample positions in input pixels, (iy, ix) each [B or 1, G, K, Ho, Wo]. offset [B, G*2K, Ho, Wo]
    (channel g*2K + 2n the y, +1 the x of neighbour n of group g) or None."""
    (Ho, Wo), (H, W) = size, in_size
    grid = base_grid(kernel_size, dtype, device)  # [K, 2]
    disp = rearrange(grid, "k two -> two () () k () ()")
    if offset is not None:
        disp = disp + rearrange(offset, "b (g k two) h w -> two b g k h w", g=num_groups, two=2)
    (y0, uy), (x0, ux) = output_grid(H, Ho, coords, dtype, device), output_grid(W, Wo, coords, dtype, device)
    y0, x0 = y0.view(Ho, 1), x0.view(1, Wo)
    if coords == "align_corners":  # displaced in the output frame, then mapped (LDA-AQU)
        return (y0 + disp[0]) * uy, (x0 + disp[1]) * ux
    return y0 + disp[0], x0 + disp[1]


def _clamp(i, hi):
    # grid_sample's padding_mode="border": the coordinate is clipped, with zero gradient at and past the edge
    return torch.where(i <= 0, torch.zeros_like(i), torch.where(i >= hi, torch.full_like(i, hi), i))


def bilinear_sample(feat: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, padding: str = "zeros",
                    exact: bool = False) -> torch.Tensor:
    """grid_sample(mode='bilinear') at input-pixel coordinates, zeros or border padding; `exact`: the
    positions are integers (the nearest rule without offsets), and only the pixel itself is read.

    feat [B, G, c, H, W]; iy, ix [B or 1, G, K, Ho, Wo] -> [B, G, K, c, Ho, Wo]. NaN positions give NaN.
    """
    B, G, c, H, W = feat.shape
    iy, ix = torch.broadcast_tensors(iy, ix)
    iy, ix = iy.expand(B, G, *iy.shape[2:]), ix.expand(B, G, *ix.shape[2:])
    if padding == "border":
        iy, ix = _clamp(iy, H - 1), _clamp(ix, W - 1)
    K, Ho, Wo = iy.shape[2:]
    flat = rearrange(feat, "b g c h w -> b g () c (h w)").expand(B, G, K, c, H * W)
    y0, x0 = iy.floor(), ix.floor()
    out = 0
    corners = (0,) if exact else (0, 1)  # exact: the other three corners weigh 0 and are not read (NaN stays out)
    for dy in corners:
        for dx in corners:
            y, x = y0 + dy, x0 + dx
            # weight of this corner: 1 - distance along each axis
            w = (iy - y0 if dy else y0 + 1 - iy) * (ix - x0 if dx else x0 + 1 - ix)
            inside = (y >= 0) & (y <= H - 1) & (x >= 0) & (x <= W - 1)
            # the index in integers: y * W + x in a half dtype rounds (8191 is 8192 in bfloat16)
            idx = torch.where(inside, y.clamp(0, H - 1).long() * W + x.clamp(0, W - 1).long(), 0)
            idx = rearrange(idx, "b g k h w -> b g k () (h w)").expand(B, G, K, c, Ho * Wo)
            val = rearrange(torch.gather(flat, -1, idx), "b g k c (h w) -> b g k c h w", h=Ho)
            # a corner outside reads an exact zero, not 0 * v[0, 0] (NaN there would spread everywhere)
            out = out + w[:, :, :, None] * torch.where(inside[:, :, :, None], val, 0)
    return out


def window_rows(n_in: int, n_out: int, window: str, kernel_size, ratio) -> list[tuple[int, int]]:
    """(first, end) input rows of each output row's window, "clamped" or "ratio" (see local_upsample)."""
    if window == "clamped":  # NATTEN: k rows around the nearest source row, kept on the map
        src = output_grid(n_in, n_out, "nearest", torch.float64, None)[0].tolist()
        firsts = [min(max(int(s) - kernel_size // 2, 0), n_in - kernel_size) for s in src]
        return [(f, f + kernel_size) for f in firsts]
    # AnyUp: cells within ratio of the row centre, in float32 arithmetic as its masks are made
    f32, rows = np.float32, []
    for o in range(n_out):
        centre = f32(f32(o) + f32(0.5)) / f32(n_out)
        lo = min(max(centre - f32(ratio), f32(0)), f32(1)) * f32(n_in)
        hi = min(max(centre + f32(ratio), f32(0)), f32(1)) * f32(n_in)
        rows.append((int(np.floor(lo)), int(np.ceil(hi))))
    return rows


def window_positions(size, in_size, window, kernel_size, ratio, dtype, device):
    """Positions (iy, ix) [1, 1, K, Ho, Wo] of a "clamped" or "ratio" window's box, K = box**2 with the
    box the widest window, and which of them take part, [Ho, Wo, K]."""
    (Ho, Wo), (H, W) = size, in_size
    rows, cols = window_rows(H, Ho, window, kernel_size, ratio), window_rows(W, Wo, window, kernel_size, ratio)
    box = max(e - f for f, e in rows + cols)
    i = torch.arange(box, device=device)
    fy, ey = (torch.tensor(t, device=device) for t in zip(*rows))
    fx, ex = (torch.tensor(t, device=device) for t in zip(*cols))
    iy = fy[:, None, None, None] + i[None, None, :, None]  # [Ho, 1, i, 1]
    ix = fx[None, :, None, None] + i[None, None, None, :]  # [1, Wo, 1, j]
    valid = (iy < ey[:, None, None, None]) & (ix < ex[None, :, None, None])
    iy, ix = torch.broadcast_tensors(iy, ix)
    pos = [rearrange(t.flatten(2).to(dtype), "h w k -> () () k h w") for t in (iy, ix)]
    return pos[0], pos[1], valid.flatten(2)


def local_upsample_ref(v, size, *, offset=None, q=None, k=None, rpb=None, logits=None, weights=None,
                       kernel_size=None, num_groups: int = 1, num_heads: int = 1, scale: float = 1.0,
                       coords: str = "align_corners", padding: str = "zeros", window: str = "centered",
                       window_ratio=None, average_heads: bool = False):
    """v [B, C, H, W] -> [B, C, Ho, Wo]; the arguments are those of `upsampler.local_upsample`, checked.

    Weights, per head h and neighbour n: softmax_n(scale * q . (k_n + rpb_n)) when q and k are given,
    softmax_n(logits) when logits [B, nh, K, Ho, Wo] are, the given weights [B, nh, K, Ho, Wo], or 1.
    A "ratio" window's positions outside the window take no part in the softmax; average_heads: the
    heads' softmax weights averaged, applied to every channel of v."""
    B, C, H, W = v.shape
    G, nh = num_groups, num_heads
    valid = None
    if window == "centered":
        iy, ix = positions(offset, size, (H, W), kernel_size=kernel_size, num_groups=G, coords=coords,
                           dtype=v.dtype, device=v.device)
    else:
        iy, ix, valid = window_positions(size, (H, W), window, kernel_size, window_ratio, v.dtype, v.device)
    exact = window != "centered" or coords == "nearest" and offset is None

    def sample(x, heads):  # [B, ch, H, W] -> [B, heads, K, ch // heads, Ho, Wo], each group at its own positions
        s = bilinear_sample(rearrange(x, "b (g c) h w -> b g c h w", g=G), iy, ix, padding, exact=exact)
        return rearrange(s, "b g k c h w -> b k (g c) h w").unflatten(2, (heads, -1)).transpose(1, 2)

    if q is not None:
        ks = sample(k, nh)
        if rpb is not None:
            ks = ks + rearrange(rpb, "nh k c -> () nh k c () ()")
        qh = rearrange(q, "b (nh c) h w -> b nh c h w", nh=nh)
        logits = torch.einsum("bhcyx,bhkcyx->bhkyx", qh * scale, ks)
    if logits is not None:
        if valid is not None:
            logits = logits.masked_fill(~rearrange(valid, "h w k -> () () k h w"), float("-inf"))
        weights = logits.softmax(dim=2)
    if average_heads:
        weights, nh = weights.mean(1, keepdim=True), 1
    vs = sample(v, nh)
    if weights is None:
        out = vs.sum(2)
    else:
        out = torch.einsum("bhkyx,bhkcyx->bhcyx", weights, vs)
    return rearrange(out, "b nh c h w -> b (nh c) h w")


def deformable_local_attention_ref(q, k, v, offset, rpb=None, *, num_heads: int = 1, num_groups: int,
                                   scale: float):
    """q [B, D, Ho, Wo], k [B, D, H, W], v [B, C, H, W], offset [B, G*2K, Ho, Wo] (output pixels,
    base grid included; channel 2n is y and 2n+1 is x of neighbour n), rpb [nh, K, D//nh] or None
    -> [B, C, Ho, Wo]."""
    return local_upsample_ref(v, tuple(q.shape[-2:]), offset=offset, q=q, k=k, rpb=rpb, num_groups=num_groups,
                              num_heads=num_heads, scale=scale)
