"""The official LDA_AQU forward (duzw9311/LDA-AQU, fpn_lau.py) re-derived from a bare state dict:
grid_sample on normalised grids, the official einops layouts, the K sampled copies materialised.
It shares no code with the module or the op, so the tests use it as an independent oracle and
bench.py as the official-style baseline."""
import torch
import torch.nn.functional as F
from einops import rearrange


def _ln_channels(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b).permute(0, 3, 1, 2).contiguous()


def _extract(x, Ho, Wo, offset, ks):
    """The official extract_feats: the K neighbours laid out as a (ks*Ho, ks*Wo) grid."""
    B = x.shape[0]
    rows, cols = torch.meshgrid(torch.arange(Ho, dtype=x.dtype, device=x.device),
                                torch.arange(Wo, dtype=x.dtype, device=x.device), indexing="ij")
    index = torch.stack((rows, cols), -1).view(1, Ho, Wo, 2)
    offset = rearrange(offset, "b (kh kw d) h w -> b kh h kw w d", kh=ks, kw=ks)
    offset = (offset + index.view(1, 1, Ho, 1, Wo, 2)).contiguous().view(B, ks * Ho, ks * Wo, 2)
    grid = torch.stack((2 * offset[..., 1] / (Wo - 1) - 1, 2 * offset[..., 0] / (Ho - 1) - 1), -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return rearrange(out, "b c (ksh h) (ksw w) -> b (ksh ksw) c h w", ksh=ks, ksw=ks)


def official_offsets(sd, x, *, scale_factor=2, n_groups=2, k_u=3, k_e=3, range_factor=11, dtype=torch.float64):
    """The official query, key and sampling offsets: q [B, D, Ho, Wo], k [B, D, H, W], offsets
    [B*G, 2K, Ho, Wo] in output pixels, the base grid included."""
    sd = {n: p.to(x.device, dtype) for n, p in sd.items()}
    x = x.to(dtype)
    B, C, H, W = x.shape
    Ho, Wo = int(H * scale_factor), int(W * scale_factor)
    D, G = sd["proj_q.weight"].shape[0], n_groups
    xn = _ln_channels(x, sd["layer_norm.norm.weight"], sd["layer_norm.norm.bias"])
    q = F.interpolate(F.conv2d(xn, sd["proj_q.weight"]), (Ho, Wo), mode="bilinear", align_corners=True)
    k = F.conv2d(xn, sd["proj_k.weight"])
    h = F.conv2d(q.reshape(B * G, -1, Ho, Wo), sd["conv_offset.0.weight"], padding=1, groups=D // G)
    h = F.gelu(_ln_channels(h, sd["conv_offset.1.norm.weight"], sd["conv_offset.1.norm.bias"]))
    h = F.conv2d(h, sd["conv_offset.3.weight"], sd["conv_offset.3.bias"], padding=k_e // 2)
    base = torch.arange(k_u, dtype=dtype, device=x.device) - k_u // 2
    base = torch.stack([base.repeat_interleave(k_u), base.repeat(k_u)], 1).flatten().view(1, -1, 1, 1)
    return q, k, h.tanh() * range_factor + base


def official_forward(sd, x, *, scale_factor=2, n_groups=2, num_heads=1, k_u=3, k_e=3, range_factor=11,
                     rpb=True, dtype=torch.float64):
    q, k, offset = official_offsets(sd, x, scale_factor=scale_factor, n_groups=n_groups, k_u=k_u, k_e=k_e,
                                    range_factor=range_factor, dtype=dtype)
    sd = {n: p.to(x.device, dtype) for n, p in sd.items()}
    x = x.to(dtype)
    B, C, H, W = x.shape
    (D, Ho, Wo), G, nh = q.shape[1:], n_groups, num_heads
    ks = _extract(k.view(B * G, D // G, H, W), Ho, Wo, offset, k_u)
    vs = _extract(x.view(B * G, C // G, H, W), Ho, Wo, offset, k_u)
    q = rearrange(q, "b (nh c) h w -> b nh (h w) () c", nh=nh)
    ks = rearrange(ks, "(b g) n c h w -> b (h w) n (g c)", g=G)
    vs = rearrange(vs, "(b g) n c h w -> b (h w) n (g c)", g=G)
    ks = rearrange(ks, "b n1 n (nh c) -> b nh n1 n c", nh=nh)
    vs = rearrange(vs, "b n1 n (nh c) -> b nh n1 n c", nh=nh)
    if rpb:
        ks = ks + sd["relative_position_bias_table"]
    attn = ((q * (D // nh) ** -0.5) @ ks.transpose(-1, -2)).softmax(-1)
    return rearrange(attn @ vs, "b nh (h w) t c -> b (nh c) (t h) w", h=Ho)


def official_state_dict(C, r=4, G=2, nh=1, k_u=3, k_e=3, rpb=True, seed=0):
    """Random weights under the official keys and shapes (duzw9311/LDA-AQU's module), offsets conv included."""
    g = torch.Generator().manual_seed(seed)
    D, K = C // r, k_u * k_u

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cpu") * s
    sd = {
        "layer_norm.norm.weight": 1 + rnd(C, s=0.1), "layer_norm.norm.bias": rnd(C, s=0.1),
        "proj_q.weight": rnd(D, C, 1, 1, s=C ** -0.5), "proj_k.weight": rnd(D, C, 1, 1, s=C ** -0.5),
        "conv_offset.0.weight": rnd(D // G, 1, 3, 3, s=0.3),
        "conv_offset.1.norm.weight": 1 + rnd(D // G, s=0.1), "conv_offset.1.norm.bias": rnd(D // G, s=0.1),
        "conv_offset.3.weight": rnd(2 * K, D // G, k_e, k_e, s=0.3), "conv_offset.3.bias": rnd(2 * K, s=0.5),
    }
    if rpb:
        sd["relative_position_bias_table"] = rnd(1, nh, 1, K, D // nh, s=0.5)
    return sd
