"""Eager reference of the core op: the math of SPEC.md steps 4-5, written to be read.

It materialises the K sampled copies of k and v (what the kernels avoid) and is the oracle of
the tests and the CPU backend. Autograd flows through it, offsets included.
"""
import torch
from einops import rearrange


def align_corners_ratio(n_in: int, n_out: int) -> float:
    """Input pixels per output pixel under align_corners=True; 0 when the output is one pixel wide."""
    return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0


def bilinear_sample(feat: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """grid_sample(align_corners=True, padding_mode='zeros') at input-pixel coordinates.

    feat [B, G, c, H, W]; iy, ix [B, G, K, Ho, Wo] -> [B, G, K, c, Ho, Wo]. NaN positions give NaN.
    """
    B, G, c, H, W = feat.shape
    K, Ho, Wo = iy.shape[2:]
    flat = rearrange(feat, "b g c h w -> b g () c (h w)").expand(B, G, K, c, H * W)
    y0, x0 = iy.floor(), ix.floor()
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            y, x = y0 + dy, x0 + dx
            # weight of this corner: 1 - distance along each axis
            w = (iy - y0 if dy else y0 + 1 - iy) * (ix - x0 if dx else x0 + 1 - ix)
            inside = (y >= 0) & (y <= H - 1) & (x >= 0) & (x <= W - 1)
            idx = torch.where(inside, y * W + x, 0).long()
            idx = rearrange(idx, "b g k h w -> b g k () (h w)").expand(B, G, K, c, Ho * Wo)
            val = rearrange(torch.gather(flat, -1, idx), "b g k c (h w) -> b g k c h w", h=Ho)
            out = out + (w * inside)[:, :, :, None] * val
    return out


def deformable_local_attention_ref(q, k, v, offset, rpb=None, *, num_heads: int = 1, num_groups: int,
                                   scale: float):
    """q [B, D, Ho, Wo], k [B, D, H, W], v [B, C, H, W], offset [B, G*2K, Ho, Wo] (output pixels,
    base grid included; channel 2n is y and 2n+1 is x of neighbour n), rpb [nh, K, D//nh] or None
    -> [B, C, Ho, Wo]."""
    B, D, Ho, Wo = q.shape
    H, W = v.shape[-2:]
    G = num_groups
    off = rearrange(offset, "b (g k two) h w -> two b g k h w", g=G, two=2)
    ys = torch.arange(Ho, device=q.device, dtype=off.dtype).view(Ho, 1)
    xs = torch.arange(Wo, device=q.device, dtype=off.dtype).view(1, Wo)
    iy = (ys + off[0]) * align_corners_ratio(H, Ho)
    ix = (xs + off[1]) * align_corners_ratio(W, Wo)

    def sample(x):  # [B, ch, H, W] -> [B, nh, K, ch // nh, Ho, Wo], each group at its own offsets
        s = bilinear_sample(rearrange(x, "b (g c) h w -> b g c h w", g=G), iy, ix)
        return rearrange(s, "b g k c h w -> b k (g c) h w").unflatten(2, (num_heads, -1)).transpose(1, 2)

    ks, vs = sample(k), sample(v)
    if rpb is not None:
        ks = ks + rearrange(rpb, "nh k c -> () nh k c () ()")
    qh = rearrange(q, "b (nh c) h w -> b nh c h w", nh=num_heads)
    attn = torch.einsum("bhcyx,bhkcyx->bhkyx", qh * scale, ks).softmax(dim=2)
    out = torch.einsum("bhkyx,bhkcyx->bhcyx", attn, vs)
    return rearrange(out, "b nh c h w -> b (nh c) h w")
