"""CARAFE, DySample, SAPA, SAPADeform and FADE in plain PyTorch, as their original projects define them, from
bare state dicts: CARAFE's reassembly through unfold (mmcv's CARAFEPack semantics; mmcv computes it with a
CUDA op), DySample's grid_sample on normalised grids (tiny-smart/dysample), SAPA's unfold and SAPADeform's
grid_sample forms (the pure-PyTorch forward checks of tiny-smart/sapa, whose own ops are CUDA-only) and
FADE's kernels with CARAFE's reassembly (detection-with-upsamplers). They share no code with the modules
or the op: the tests use them as oracles and bench.py as the plain-PyTorch baselines. Like
F.interpolate, all materialise what the fused op never does (k*k neighbourhoods; sampling grids)."""
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


def conv(sd, name, x, padding=0):
    """The conv `name` of a bare state dict (its bias if it has one)."""
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=padding)


def _norms(sd, y, x, groups):
    if "norm_y.weight" not in sd:
        return y, x
    return (F.group_norm(y, groups, sd["norm_y.weight"], sd["norm_y.bias"]),
            F.group_norm(x, groups, sd["norm_x.weight"], sd["norm_x.bias"]))


def _window(t, k):
    """[B, C, k*k, H, W]: the k x k neighbourhood of every pixel, zeros outside (F.unfold)."""
    B, C, H, W = t.shape
    return F.unfold(t, k, padding=k // 2).view(B, C, k * k, H, W)


def sapa_forward(sd, y, x, *, scale_factor=2, up_kernel_size=5, norm_groups=32):
    """SAPA: qk and av of sapa's forward_check (unfold, einsum over the sub-pixel layout)."""
    s, k = scale_factor, up_kernel_size
    yn, xn = _norms(sd, y, x, norm_groups)
    q, key = conv(sd, "q", yn), conv(sd, "k", xn)
    B, E, H, W = key.shape
    attn = torch.einsum("behiwj,benhw->bnhiwj", q.view(B, E, H, s, W, s), _window(key, k)).softmax(1)
    out = torch.einsum("bnhiwj,bcnhw->bchiwj", attn, _window(x, k))
    return out.reshape(B, x.shape[1], s * H, s * W)


def _deform_sample(t, offset, P, s, G):
    """deformsapa's forward_check sample(): t [B, Ct, H, W] read per group at (h + 0.5, w + 0.5) + offset
    (x, y per point) normalised for grid_sample (bilinear, zeros, align_corners=False) ->
    [B, G, P, Ct/G, sH, sW]."""
    B, Ct, H, W = t.shape
    off = offset.view(B, G * P, 2, s * H, s * W).permute(0, 1, 3, 4, 2)
    cy = (torch.arange(H, dtype=t.dtype, device=t.device) + 0.5).repeat_interleave(s)
    cx = (torch.arange(W, dtype=t.dtype, device=t.device) + 0.5).repeat_interleave(s)
    centre = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), -1)  # [sH, sW, (x, y)]
    grid = 2 * (centre + off) / torch.tensor([W, H], dtype=t.dtype, device=t.device) - 1
    tg = t.reshape(B * G, 1, Ct // G, H, W).expand(B * G, P, Ct // G, H, W).reshape(B * G * P, Ct // G, H, W)
    out = F.grid_sample(tg, grid.reshape(B * G * P, s * H, s * W, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.view(B, G, P, Ct // G, s * H, s * W)


def sapadeform_forward(sd, y, x, *, scale_factor=2, num_point=9, groups=4, high_offset=True, norm_groups=32):
    """SAPADeform: deform_qk and deform_av of deformsapa's forward_check, offsets pixel-shuffled (or
    nearest-upsampled) from a 1x1 conv of x, a softmax over each group's points."""
    s, P, G = scale_factor, num_point, groups
    yn, xn = _norms(sd, y, x, norm_groups)
    q, key = conv(sd, "q", yn), conv(sd, "k", xn)
    off = conv(sd, "offset", xn)
    off = F.pixel_shuffle(off, s) if high_offset else F.interpolate(off, scale_factor=s)
    B, _, Ho, Wo = q.shape
    attn = (q.view(B, G, 1, -1, Ho, Wo) * _deform_sample(key, off, P, s, G)).sum(3).softmax(2)
    return (attn.unsqueeze(3) * _deform_sample(x, off, P, s, G)).sum(2).reshape(B, -1, Ho, Wo)


def fade_forward(sd, en, de, *, up_kernel_size=5, scale_factor=2):
    """FADE: SemiShift's kernels, softmax, mmcv's carafe (the k x k window of the source pixel (Y//s,
    X//s), zeros outside), and the gate when sd has one. The original's decoder terms are upsampled 2x
    whatever the scale (so it runs at 2 only); here by scale_factor."""
    k, s = up_kernel_size, scale_factor
    pad = sd["ker_generator.content_encoder.weight"].shape[-1] // 2
    enc, dec = conv(sd, "ker_generator.compressor_en", en), conv(sd, "ker_generator.compressor_de", de)
    logits = conv(sd, "ker_generator.content_encoder", enc, pad) + F.interpolate(
        conv(sd, "ker_generator.content_encoder", dec, pad), scale_factor=s)
    up = carafe_reassemble(de, logits.softmax(1), k, 1, logits.shape[-2:])
    if "gate_generator.conv.weight" not in sd:
        return up
    gate = torch.sigmoid(F.interpolate(conv(sd, "gate_generator.conv", de), scale_factor=s))
    return gate * en + (1 - gate) * up
