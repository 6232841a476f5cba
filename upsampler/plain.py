"""CARAFE and DySample in plain PyTorch, as their original projects define them, from bare state dicts:
CARAFE's reassembly through unfold (mmcv's CARAFEPack semantics; mmcv computes it with a CUDA op) and
DySample's grid_sample on normalised grids (tiny-smart/dysample). They share no code with the modules
or the op: the tests use them as oracles and bench.py as the plain-PyTorch baselines. Like
F.interpolate, both materialise what the fused op never does (k*k neighbourhoods; sampling grids)."""
import torch
import torch.nn.functional as F


def carafe_reassemble(x, masks, kernel_size: int, groups: int, size):
    """x [B, C, H, W], masks [B, groups*k*k, Ho, Wo] (normalised kernels) -> [B, C, Ho, Wo].

    Output pixel (Y, X) sums the k x k neighbourhood (zeros outside) of the source pixel that
    F.interpolate(mode="nearest") picks for it, (Y//s, X//s) at an integer scale s; channel c uses the
    kernel of group c // (C/groups)."""
    B, C, H, W = x.shape
    kk = kernel_size * kernel_size
    cols = F.unfold(x, kernel_size, padding=kernel_size // 2).view(B, C * kk, H, W)
    cols = F.interpolate(cols, size=tuple(size), mode="nearest").view(B, groups, C // groups, kk, *size)
    return torch.einsum("bgcnyx,bgnyx->bgcyx", cols, masks.view(B, groups, kk, *size)).reshape(B, C, *size)


def carafe_forward(sd, x, *, scale_factor: int, up_kernel: int = 5, up_group: int = 1, encoder_dilation: int = 1,
                   size=None):
    """CARAFEPack's forward: compressor, content encoder, kernels by pixel_shuffle then a softmax over
    k*k per group, reassembly. `size` other than (sH, sW) picks each output pixel's kernel by the
    nearest rule too (a crop when it is one pixel smaller)."""
    enc = sd["content_encoder.weight"]
    pad = (enc.shape[-1] - 1) * encoder_dilation // 2
    masks = F.conv2d(F.conv2d(x, sd["channel_compressor.weight"], sd["channel_compressor.bias"]), enc,
                     sd["content_encoder.bias"], padding=pad, dilation=encoder_dilation)
    masks = F.pixel_shuffle(masks, scale_factor)
    B, _, Hs, Ws = masks.shape
    masks = masks.view(B, up_group, up_kernel ** 2, Hs, Ws).softmax(2).view(B, -1, Hs, Ws)
    size = tuple(size) if size is not None else (Hs, Ws)
    if size != (Hs, Ws):
        masks = F.interpolate(masks, size=size, mode="nearest")
    return carafe_reassemble(x, masks, up_kernel, up_group, size)


def dysample_init_pos(scale: int, groups: int, dtype=torch.float32) -> torch.Tensor:
    """The official init_pos buffer [1, 2*groups*s*s, 1, 1] (float32 there): channels (x then y, group,
    i, j) hold the sub-pixel centre (j or i - (s-1)/2) / s."""
    r = (torch.arange(scale, dtype=dtype) - (scale - 1) / 2) / scale
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x, y])[:, None].expand(2, groups, scale, scale).reshape(1, -1, 1, 1)


def dysample_offset(sd, x, *, scale: int = 2, style: str = "lp"):
    """DySample's learned offsets [B, 2*groups*s*s, H, W], channels (x then y, group, i, j) as init_pos:
    0.25 * conv, or 0.5 * conv * sigmoid(scope conv) when sd has scope.weight; style "pl" predicts them
    from pixel_shuffle(x) and unshuffles them."""
    feat = x if style == "lp" else F.pixel_shuffle(x, scale)
    off = F.conv2d(feat, sd["offset.weight"], sd["offset.bias"])
    if "scope.weight" in sd:
        off = off * F.conv2d(feat, sd["scope.weight"], sd.get("scope.bias")).sigmoid() * 0.5
    else:
        off = off * 0.25
    return off if style == "lp" else F.pixel_unshuffle(off, scale)


def dysample_forward(sd, x, *, scale: int = 2, style: str = "lp", groups: int = 4):
    """DySample's forward: offsets plus init_pos, in input pixels around each input pixel's centre,
    normalised and pixel-shuffled into a grid for grid_sample (bilinear, border padding,
    align_corners=False), each channel group at its own grid."""
    s, G = scale, groups
    B, C, H, W = x.shape
    off = (dysample_offset(sd, x, scale=s, style=style) + sd["init_pos"]).view(B, 2, G * s * s, H, W)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device) + 0.5,
                            torch.arange(W, dtype=x.dtype, device=x.device) + 0.5, indexing="ij")
    centre = torch.stack([xs, ys]).view(1, 2, 1, H, W)
    extent = torch.tensor([W, H], dtype=x.dtype, device=x.device).view(1, 2, 1, 1, 1)
    grid = (2 * (centre + off) / extent - 1).view(B, -1, H, W)
    grid = F.pixel_shuffle(grid, s).view(B, 2, G, s * H, s * W).permute(0, 2, 3, 4, 1).reshape(B * G, s * H, s * W, 2)
    out = F.grid_sample(x.reshape(B * G, C // G, H, W), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(B, C, s * H, s * W)
