"""The official AnyUp forward (wimmerth/anyup: model.py, layers/*) re-derived from a bare state dict:
the attention dense over every feature pixel with AnyUp's boolean window mask, as nn.MultiheadAttention
weighs it (per head, averaged over the heads), applied to the features. It shares no code with the module
or the op (pooling as matrices, the unification by unfold, the norms written out), so the tests use it as
an independent oracle and bench.py as the official-style baseline."""
import torch
import torch.nn.functional as F


def window_mask(Ho: int, Wo: int, H: int, W: int, ratio: float, device=None) -> torch.Tensor:
    """[Ho*Wo, H*W] bool, True where output pixel (Y, X) sees feature pixel (y, x): the official window2d
    bounds, computed in float32 as there, rows [floor(clamp(p - r, 0, 1) * H), ceil(clamp(p + r, 0, 1) * H))
    with p = (Y + .5) / Ho, columns alike."""
    def bounds(n_out, n_in):
        p = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) / n_out
        lo = ((p - ratio).clamp(0.0, 1.0) * n_in).floor().long()
        hi = ((p + ratio).clamp(0.0, 1.0) * n_in).ceil().long()
        i = torch.arange(n_in, device=device)
        return (i >= lo[:, None]) & (i < hi[:, None])  # [n_out, n_in]
    rows, cols = bounds(Ho, H), bounds(Wo, W)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(Ho * Wo, H * W)


def dense_window_attention(q, k, v, num_heads: int, window_ratio: float, scale=None):
    """q [B, D, Ho, Wo], k [B, D, H, W] (projected), v [B, C, H, W] -> [B, C, Ho, Wo]: per head the softmax
    of scale * q_h . k_h over all H*W keys, those outside the window at -inf (none for a ratio <= 0),
    averaged over the heads and applied to v."""
    B, D, Ho, Wo = q.shape
    H, W = k.shape[-2:]
    d = D // num_heads
    scale = d ** -0.5 if scale is None else scale
    qh = q.reshape(B, num_heads, d, Ho * Wo).transpose(-1, -2)
    kh = k.reshape(B, num_heads, d, H * W)
    logits = (qh * scale) @ kh  # [B, nh, Ho*Wo, H*W]
    if window_ratio > 0:
        logits = logits.masked_fill(~window_mask(Ho, Wo, H, W, window_ratio, q.device), float("-inf"))
    attn = logits.softmax(-1).mean(1)
    return (attn @ v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, Ho, Wo)


def _conv(x, w, reflect=True):
    p = w.shape[-1] // 2
    if p and reflect:
        x = F.pad(x, (p, p, p, p), mode="reflect")
    return F.conv2d(x, w)


def _group_norm(x, w, b, groups=8, eps=1e-5):
    B, C = x.shape[:2]
    g = x.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return g.reshape(x.shape) * w.view(1, C, 1, 1) + b.view(1, C, 1, 1)


def _silu(x):
    return x * torch.sigmoid(x)


def _resblock(sd, pre, x):
    h = _conv(_silu(_group_norm(x, sd[pre + "block.0.weight"], sd[pre + "block.0.bias"])), sd[pre + "block.2.weight"])
    h = _conv(_silu(_group_norm(h, sd[pre + "block.3.weight"], sd[pre + "block.3.bias"])), sd[pre + "block.5.weight"])
    short = sd.get(pre + "shortcut.weight")
    return h + (x if short is None else F.conv2d(x, short))


def _encoder(sd, name, x, first):
    x = first(x)
    return _resblock(sd, f"{name}.2.", _resblock(sd, f"{name}.1.", x))


def _pool_matrix(n_out, n_in, dtype, device):
    """adaptive_avg_pool's bins as a matrix: out i averages [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    i = torch.arange(n_out, device=device)
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    j = torch.arange(n_in, device=device)
    m = ((j >= lo[:, None]) & (j < hi[:, None])).to(dtype)
    return m / m.sum(1, keepdim=True)


def _pool(x, size):
    Ph = _pool_matrix(size[0], x.shape[-2], x.dtype, x.device)
    Pw = _pool_matrix(size[1], x.shape[-1], x.dtype, x.device)
    return Ph @ x @ Pw.T


def _unification(basis, x):
    """Every channel filtered by every basis kernel (zero padding, over the taps inside), the [C, O]
    responses read as [O, C] (the official view), softmax over O, mean over C."""
    B, C, H, W = x.shape
    O, k = basis.shape[0], basis.shape[-1]
    cols = F.unfold(x, k, padding=k // 2).view(B, C, k * k, H * W)
    taps = F.unfold(x.new_ones(1, 1, H, W), k, padding=k // 2).sum(1)  # [1, H*W]
    y = torch.einsum("bcth,ot->bcoh", cols, basis.reshape(O, k * k)) / taps
    return y.reshape(B, O, C, H, W).softmax(1).mean(2)


def _rope(freqs, x):
    B, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H, dtype=x.dtype, device=x.device),
                            torch.linspace(0, 1, W, dtype=x.dtype, device=x.device), indexing="ij")
    angle = torch.stack((ys, xs), -1).reshape(H * W, 2) @ freqs  # [H*W, C]
    t = x.flatten(2).transpose(1, 2)
    half = torch.cat((-t[..., C // 2:], t[..., :C // 2]), -1)
    return (t * angle.cos() + half * angle.sin()).transpose(1, 2).reshape(B, C, H, W)


def _rms(x, w):
    """nn.RMSNorm over the channels with its default eps (the dtype's machine epsilon)."""
    eps = torch.finfo(x.dtype).eps
    return x * (x.pow(2).mean(1, keepdim=True) + eps).rsqrt() * w.view(1, -1, 1, 1)


def official_attention_inputs(sd, image, features, output_size=None, *, dtype=torch.float64):
    """The official block's q and k as the attention sees them (3x3 conv, RMSNorm, in-projection):
    q [B, D, Ho, Wo], k [B, D, h, w], and v = the features, in `dtype`."""
    sd = {n: t.to(image.device, dtype) for n, t in sd.items()}
    image, features = image.to(dtype), features.to(dtype)
    size = tuple(image.shape[-2:]) if output_size is None else tuple(output_size)
    enc = _rope(sd["rope.freqs"], _encoder(sd, "image_encoder", image,
                                           lambda x: _conv(x, sd["image_encoder.0.weight"])))
    q = _pool(_encoder(sd, "query_encoder", enc, lambda x: _conv(x, sd["query_encoder.0.weight"])), size)
    k = _pool(_encoder(sd, "key_encoder", enc, lambda x: _conv(x, sd["key_encoder.0.weight"])), features.shape[-2:])
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kf = _encoder(sd, "key_features_encoder", unit, lambda x: _unification(sd["key_features_encoder.0.basis"], x))
    k = _encoder(sd, "aggregation", torch.cat([k, kf], 1), lambda x: _conv(x, sd["aggregation.0.weight"]))
    q = F.conv2d(q, sd["cross_decode.conv2d.weight"], padding=1)
    D = q.shape[1]
    w, b = sd["cross_decode.cross_attn.attention.in_proj_weight"], sd["cross_decode.cross_attn.attention.in_proj_bias"]
    q = torch.einsum("bchw,dc->bdhw", _rms(q, sd["cross_decode.cross_attn.norm_q.weight"]), w[:D]) \
        + b[:D].view(1, D, 1, 1)
    k = torch.einsum("bchw,dc->bdhw", _rms(k, sd["cross_decode.cross_attn.norm_k.weight"]), w[D:2 * D]) \
        + b[D:2 * D].view(1, D, 1, 1)
    return q, k, features


def official_forward(sd, image, features, output_size=None, *, num_heads=4, window_ratio=0.1, dtype=torch.float64):
    """The official AnyUp forward (use_natten=False) on a state dict under the official keys."""
    q, k, v = official_attention_inputs(sd, image, features, output_size, dtype=dtype)
    return dense_window_attention(q, k, v, num_heads, window_ratio)


def official_state_dict(input_dim=3, qk_dim=128, kernel_size=1, kernel_size_lfu=5, lfu_dim=None, seed=0):
    """Random weights under the official keys and shapes (wimmerth/anyup's AnyUp, use_natten=False)."""
    g = torch.Generator().manual_seed(seed)
    D, L = qk_dim, qk_dim if lfu_dim is None else lfu_dim

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cpu") * s

    def conv(co, ci, k):
        return rnd(co, ci, k, k, s=(ci * k * k) ** -0.5)

    sd = {}

    def encoder(name, first, c0=D):
        sd.update(first)
        for i, c in ((1, c0), (2, D)):
            p = f"{name}.{i}."
            sd.update({p + "block.0.weight": 1 + rnd(c, s=0.1), p + "block.0.bias": rnd(c, s=0.1),
                       p + "block.2.weight": conv(D, c, 1),
                       p + "block.3.weight": 1 + rnd(D, s=0.1), p + "block.3.bias": rnd(D, s=0.1),
                       p + "block.5.weight": conv(D, D, 1)})
            if c != D:
                sd[p + "shortcut.weight"] = conv(D, c, 1)

    encoder("image_encoder", {"image_encoder.0.weight": conv(D, input_dim, kernel_size)})
    encoder("key_encoder", {"key_encoder.0.weight": conv(D, D, 1)})
    encoder("query_encoder", {"query_encoder.0.weight": conv(D, D, 1)})
    encoder("key_features_encoder", {"key_features_encoder.0.basis": rnd(L, 1, kernel_size_lfu, kernel_size_lfu)}, L)
    p = "cross_decode.cross_attn."
    sd.update({p + "norm_q.weight": 1 + rnd(D, s=0.1), p + "norm_k.weight": 1 + rnd(D, s=0.1),
               p + "attention.in_proj_weight": rnd(3 * D, D, s=D ** -0.5),
               p + "attention.in_proj_bias": rnd(3 * D, s=0.1),
               p + "attention.out_proj.weight": rnd(D, D, s=D ** -0.5), p + "attention.out_proj.bias": rnd(D, s=0.1),
               "cross_decode.conv2d.weight": conv(D, D, 3)})
    encoder("aggregation", {"aggregation.0.weight": conv(D, 2 * D, 3)})
    sd["rope.freqs"] = rnd(2, D, s=3.0)
    return sd
