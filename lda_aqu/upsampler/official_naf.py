"""The official NAF forward (valeoai/NAF: src/model/naf.py, src/layers/attentions.py, convolutions.py,
rope.py) re-derived from a bare state dict, its attention as the official computes it: k and v copied to
the query size (nearest-exact), then NATTEN's dilated neighbourhood attention on the copies, written here
in plain torch. It shares no code with the module or the op, so the tests use it as an independent
oracle and bench.py as the official-style baseline."""
import math

import torch
import torch.nn.functional as F


def natten_windows(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """[length, kernel_size] indices of NATTEN's dilated neighbourhood along one axis: the axis splits into
    `dilation` interleaved subsequences (index mod dilation), and index i attends, within its own
    subsequence, to the kernel_size members centred on it, the window shifted to lie inside that
    subsequence."""
    if kernel_size * dilation > length:
        raise ValueError(f"kernel_size * dilation = {kernel_size * dilation} exceeds the length {length}: "
                         f"NATTEN needs kernel_size members in every dilation group")
    i = torch.arange(length, device=device)
    group, pos = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((pos - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return group[:, None] + (start[:, None] + torch.arange(kernel_size, device=device)) * dilation


def dilated_neighborhood_attention(q, k, v, num_heads: int, kernel_size: int, dilation, scale: float):
    """NATTEN's na2d on [B, D, H, W] q and k and [B, C, H, W] v (heads: channel blocks of D/nh and C/nh):
    per head, softmax over the kernel_size^2 window of scale * q . k, applied to v. One pass per window
    offset, so the memory is that of the logits, not of kernel_size^2 copies of k and v."""
    B, D, H, W = q.shape
    C, nh, K = v.shape[1], num_heads, kernel_size
    rows = natten_windows(H, K, dilation[0], q.device)
    cols = natten_windows(W, K, dilation[1], q.device)
    qh = q.reshape(B, nh, D // nh, H, W) * scale
    kh = k.reshape(B, nh, D // nh, H, W)
    vh = v.reshape(B, nh, C // nh, H, W)

    def window(t, a, b):
        return t[:, :, :, rows[:, a]][:, :, :, :, cols[:, b]]
    logits = torch.stack([(qh * window(kh, a, b)).sum(2) for a in range(K) for b in range(K)], 2)
    attn = logits.softmax(2)
    out = sum(attn[:, :, a * K + b, None] * window(vh, a, b) for a in range(K) for b in range(K))
    return out.reshape(B, C, H, W)


def official_attention(q, k, v, num_heads: int, kernel_size: int):
    """The official CrossAttention: k [B, D, h, w] and v [B, C, h, w] copied to q's size with nearest-exact,
    then dilated neighbourhood attention with dilation (Ho // h, Wo // w) and scale (D // nh) ** -0.5."""
    Ho, Wo = q.shape[-2:]
    dilation = (Ho // k.shape[-2], Wo // k.shape[-1])
    k = F.interpolate(k, size=(Ho, Wo), mode="nearest-exact").to(q.dtype)
    v = F.interpolate(v, size=(Ho, Wo), mode="nearest-exact").to(q.dtype)
    return dilated_neighborhood_attention(q, k, v, num_heads, kernel_size, dilation, (q.shape[1] // num_heads) ** -0.5)


def _encoder(sd, prefix, x, num_layers):
    def conv(x, name):
        w = sd[f"{prefix}.{name}.weight"]
        p = w.shape[-1] // 2
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect") if p else x, w, sd[f"{prefix}.{name}.bias"])

    def norm(x, name):
        return F.group_norm(x, 8, sd[f"{prefix}.{name}.weight"], sd[f"{prefix}.{name}.bias"])
    x = conv(x, "0")
    for i in range(1, num_layers + 1):
        x = conv(F.silu(norm(x, f"{i}.norm1")), f"{i}.conv1")
        x = conv(F.silu(norm(x, f"{i}.norm2")), f"{i}.conv2")
    return x


def _rope(x, periods, num_heads):
    B, C, H, W = x.shape
    d = C // num_heads
    # pixel centres in [-1, 1], in the default dtype as the official makes them
    ch = 2.0 * (torch.arange(0.5, H, device=x.device) / H) - 1.0
    cw = 2.0 * (torch.arange(0.5, W, device=x.device) / W) - 1.0
    angle_h = 2 * math.pi * ch[:, None] / periods  # [H, d/4]
    angle_w = 2 * math.pi * cw[:, None] / periods  # [W, d/4]
    angles = torch.cat((angle_h[:, None].expand(H, W, -1), angle_w[None].expand(H, W, -1)), -1)  # [H, W, d/2]
    angles = torch.cat((angles, angles), -1).permute(2, 0, 1)  # [d, H, W]
    x = x.reshape(B, num_heads, d, H, W)
    rotated = torch.cat((-x[:, :, d // 2:], x[:, :, :d // 2]), 2)
    return (x * angles.cos() + rotated * angles.sin()).reshape(B, C, H, W)


def official_forward(sd, image, features, output_size, *, heads_attn=4, heads_rope=4, kernel_size=9, img_layers=2,
                     dtype=torch.float64):
    """The official NAF's eval forward from a state dict under its keys: encoders, RoPE, pooled keys,
    CrossAttention, all in `dtype` (RoPE's coordinates in the default dtype, as the official's)."""
    sd = {n: p.to(image.device, dtype) for n, p in sd.items()}
    image, features = image.to(dtype), features.to(dtype)
    Ho, Wo = output_size
    H, W = image.shape[-2:]
    if H > 4 * Ho or W > 4 * Wo:
        image = F.interpolate(image, size=(min(H, 4 * Ho, 4 * Wo), min(W, 4 * Ho, 4 * Wo)), mode="bilinear",
                              align_corners=False)
    x = torch.cat([_encoder(sd, "image_encoder.encoder", image, img_layers),
                   _encoder(sd, "image_encoder.sem_encoder", image, img_layers)], 1)
    x = _rope(F.adaptive_avg_pool2d(x, (Ho, Wo)), sd["image_encoder.rope.periods"], heads_rope)
    keys = F.adaptive_avg_pool2d(x, features.shape[-2:])
    return official_attention(x, keys, features, heads_attn, kernel_size)


def official_state_dict(dim=256, heads_rope=4, img_layers=2, seed=0):
    """Random weights under the official keys and shapes (valeoai/NAF's NAF), RoPE's periods included
    (positive, spread around the official's base-100 values so that a module ignoring them shows)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cpu") * s
    hid = dim // 2
    sd = {}
    for name, ks in (("encoder", 1), ("sem_encoder", 3)):
        p = f"image_encoder.{name}"
        sd[f"{p}.0.weight"], sd[f"{p}.0.bias"] = rnd(hid, 3, ks, ks, s=(3 * ks * ks) ** -0.5), rnd(hid, s=0.1)
        for i in range(1, img_layers + 1):
            for j in (1, 2):
                sd[f"{p}.{i}.norm{j}.weight"], sd[f"{p}.{i}.norm{j}.bias"] = 1 + rnd(hid, s=0.1), rnd(hid, s=0.1)
                sd[f"{p}.{i}.conv{j}.weight"] = rnd(hid, hid, ks, ks, s=(hid * ks * ks) ** -0.5)
                sd[f"{p}.{i}.conv{j}.bias"] = rnd(hid, s=0.1)
    d = dim // heads_rope
    periods = 100.0 ** (2 * torch.arange(d // 4, device="cpu") / (d // 2))
    sd["image_encoder.rope.periods"] = periods * torch.rand(d // 4, generator=g, device="cpu").add(0.5)
    return sd
