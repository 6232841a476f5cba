"""The pure-PyTorch backend of `local_upsample`: fast on CPU, plain torch elsewhere and under export.

On CPU the op is a sparse product. Each output pixel p of offset group g reads 4 bilinear corners of
K samples, J = 4K (input row, weight) pairs, so with channels-last tables of the inputs:

    out[p]    = sum_j w_n(p) b_j(p) v[idx_j(p)]         embedding_bag, bags of J rows
    logit_n(p) = sum_{j in n} b_j(p) (q[p] . k[idx_j(p)])  sampled_addmm (a dot per pair)

and the backward is the same pairs read the other way: gradients of v and k are the transposed
product (pairs stably sorted by input row, then embedding_bag over the sorted runs: deterministic,
no atomics), and the offset gradient is the bilinear weights' derivatives times per-pair dots. No
[K, C, Ho, Wo] sample ever exists; autograd keeps the inputs and the [B, nh, Ho*Wo, K] weights.
The pairs are recomputed in backward from the offsets.

Elsewhere (MPS, CUDA with backend="torch") and while exporting, the op is a plain graph of
grid_sample calls, one neighbour at a time, that every exporter and device can take.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.layout import acc_dtype as _acc, neighbours as _neighbours, segments as _segments

from .naive import base_grid, output_grid

Tensor = torch.Tensor


def is_exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


PAD = 2  # zero border of the tables: a corner of any clipped cell [-2, H] x [-2, W] reads a real row


def _rows(x: Tensor, c0: int, c1: int, acc) -> Tensor:
    """x[:, c0:c1] as channels-last rows [B*H*W, c1-c0] in acc."""
    B, _, H, W = x.shape
    out = x.new_empty(B, H, W, c1 - c0, dtype=acc)
    out.copy_(x[:, c0:c1].permute(0, 2, 3, 1))
    return out.view(B * H * W, c1 - c0)


def _table(x: Tensor, c0: int, c1: int, acc) -> Tensor:
    """x[:, c0:c1] as channels-last rows of the map zero-padded by PAD: [B*(H+2PAD)*(W+2PAD), c1-c0]."""
    B, _, H, W = x.shape
    out = x.new_zeros(B, H + 2 * PAD, W + 2 * PAD, c1 - c0, dtype=acc)
    out[:, PAD:PAD + H, PAD:PAD + W] = x[:, c0:c1].permute(0, 2, 3, 1)
    return out.view(-1, c1 - c0)


def _put(dst: Tensor, c0: int, c1: int, rows: Tensor, pad: int = 0):
    """dst[:, c0:c1] = rows [B*(H+2pad)*(W+2pad), c1-c0] laid back out as [B, c, H, W], padding dropped."""
    B, _, H, W = dst.shape
    rows = rows.view(B, H + 2 * pad, W + 2 * pad, c1 - c0)[:, pad:pad + H, pad:pad + W]
    dst[:, c0:c1] = rows.permute(0, 3, 1, 2)


class _Pairs:
    """The (table row, bilinear weight) pairs of every output pixel, per offset group.

    idx [G, B*P, K, 4] rows of the padded tables (`_table`): a position's cell is clipped to
    [-PAD, H] x [-PAD, W] (NaN to -PAD), so corners outside the map, far or NaN positions read zero
    rows; bw [G, B*P, K, 4] the bilinear weights (NaN stays NaN, so it propagates); dby/dbx their
    derivatives along the position.
    """

    def __init__(self, v_shape, size, offset, kernel_size, G, K, coords, padding, acc, device, grad=False):
        B, _, H, W = v_shape
        Ho, Wo = size
        Hp, Wp = H + 2 * PAD, W + 2 * PAD
        self.B, self.P, self.K, self.rows = B, Ho * Wo, K, B * Hp * Wp
        # positions [G, B, Ho, Wo, K, (y, x)] in input pixels, as naive.positions computes them
        (y0, uy), (x0, ux) = output_grid(H, Ho, coords, acc, device), output_grid(W, Wo, coords, acc, device)
        grid = torch.stack(torch.broadcast_tensors(y0.view(Ho, 1), x0.view(1, Wo)), -1).view(Ho, Wo, 1, 2)
        grid = grid + base_grid(kernel_size, acc, device)
        if offset is None:
            pos = grid.expand(G, B, Ho, Wo, K, 2).clone()
        else:
            pos = torch.empty(G, B, Ho, Wo, K, 2, dtype=acc, device=device)
            torch.add(offset.view(B, G, K, 2, Ho, Wo).permute(1, 0, 4, 5, 2, 3), grid, out=pos)
        self.unit = torch.tensor([uy, ux], dtype=acc, device=device)
        if coords == "align_corners":  # offsets in output pixels, then mapped
            pos.mul_(self.unit)
        pos = pos.view(G, B * Ho * Wo, K, 2)
        lim = torch.tensor([H - 1, W - 1], dtype=acc, device=device)
        self.passes = None
        if padding == "border":  # clip, with zero gradient at and past the edge (grid_sample's border)
            self.passes = (pos > 0) & (pos < lim)
            pos = pos.clamp(min=torch.zeros_like(lim), max=lim)
        cell = pos.floor()
        frac = pos - cell
        w = torch.stack([1 - frac, frac], -2)  # [..., corner 0/1, (y, x)]
        self.bw = (w[..., :, None, 0] * w[..., None, :, 1]).flatten(-2)  # corners (0,0) (0,1) (1,0) (1,1)
        if grad:
            sign = torch.tensor([-1.0, 1.0], dtype=acc, device=device)
            self.dby = (sign[:, None] * w[..., None, :, 1]).flatten(-2)
            self.dbx = (w[..., :, None, 0] * sign).flatten(-2)
        cell = cell.nan_to_num(nan=-PAD).clamp(min=torch.full_like(lim, -PAD), max=lim + 1).long() + PAD
        batch = torch.arange(B, device=device).repeat_interleave(Ho * Wo).view(1, -1, 1) * (Hp * Wp)
        lin = cell[..., 0] * Wp + cell[..., 1] + batch
        if coords == "nearest" and offset is None:  # integer positions: read the pixel only, as the kernels do
            self.idx = torch.stack([lin, *[torch.zeros_like(lin)] * 3], -1)  # row 0: a zero pad of batch 0
        else:
            self.idx = lin[..., None] + torch.tensor([0, 1, Wp, Wp + 1], device=device)
        self._pattern = [None] * G
        self._sorted = [None] * G

    def gather(self, g: int, table: Tensor, coef: Tensor) -> Tensor:
        """[B*P, c]: sum_j coef[p, j] table[idx_j(p)], coef [B*P, K, 4]."""
        return F.embedding_bag(self.idx[g].view(self.B * self.P, -1), table,
                               per_sample_weights=coef.reshape(self.B * self.P, -1), mode="sum")

    def dots(self, g: int, rows: Tensor, table: Tensor) -> Tensor:
        """[B*P, K, 4]: rows[p] . table[idx_j(p)] for every pair."""
        n, J = self.B * self.P, 4 * self.K
        # sampled_addmm keeps at most n * columns pairs: tiny maps get zero rows up to J
        cols = max(self.rows, J)
        if table.shape[0] < cols:
            table = torch.cat([table, table.new_zeros(cols - table.shape[0], table.shape[1])])
        if self._pattern[g] is None:
            crow = torch.arange(0, n * J + 1, J, device=rows.device)
            with warnings.catch_warnings():  # "sparse CSR is in beta"
                warnings.simplefilter("ignore")
                self._pattern[g] = torch.sparse_csr_tensor(crow, self.idx[g].reshape(-1), rows.new_zeros(n * J),
                                                           (n, cols), check_invariants=False)
        return torch.sparse.sampled_addmm(self._pattern[g], rows, table.t(), beta=0.0).values().view(n, self.K, 4)

    def scatter(self, g: int, rows: Tensor, coef: Tensor) -> Tensor:
        """[table rows, c]: the transposed gather, out[r] = sum over pairs (p, j) reading row r of coef * rows[p]."""
        if self._sorted[g] is None:
            key = self.idx[g].reshape(-1)
            # a stable sort fixes the summation order (deterministic); int32 keys take the radix sort
            order = torch.sort(key.int() if self.rows < 2**31 else key, stable=True).indices
            counts = torch.bincount(key, minlength=self.rows)
            self._sorted[g] = order, order // (4 * self.K), counts.cumsum(0) - counts
        order, pixel, starts = self._sorted[g]
        return F.embedding_bag(pixel, rows, starts, per_sample_weights=coef.reshape(-1)[order], mode="sum")


def _weights(pairs, q, k, rpb, logits, weights, G, nh, scale, acc):
    """w [B, nh, P, K] (None: every sample weighs 1)."""
    B, P, K = pairs.B, pairs.P, pairs.K
    if q is not None:
        D = q.shape[1]
        logit = q.new_zeros(B, nh, P, K, dtype=acc)
        for g, h, c0, c1 in _segments(D, G, nh):
            e = pairs.dots(g, _rows(q, c0, c1, acc), _table(k, c0, c1, acc))
            logit[:, h] += (e * pairs.bw[g]).sum(-1).view(B, P, K)
        if rpb is not None:
            logit += torch.einsum("bhcp,hnc->bhpn", q.to(acc).reshape(B, nh, D // nh, P), rpb.to(acc))
        return (logit * scale).softmax(-1)
    given = logits if logits is not None else weights
    if given is None:
        return None
    w = given.new_empty(B, nh, *given.shape[3:], K, dtype=acc)  # a copy: a custom op's output never aliases
    w.copy_(given.permute(0, 1, 3, 4, 2))
    w = w.view(B, nh, P, K)
    return w.softmax(-1) if logits is not None else w


def _coef(pairs, w, g, h):
    return pairs.bw[g] if w is None else pairs.bw[g] * w[:, h].reshape(-1, pairs.K, 1)


def _forward(v, offset, q, k, rpb, logits, weights, size, kernel_size, G, nh, scale, coords, padding):
    acc = _acc(v.dtype)
    B, C, H, W = v.shape
    K = _neighbours(offset, rpb, logits, weights, kernel_size, G)
    pairs = _Pairs(v.shape, size, offset, kernel_size, G, K, coords, padding, acc, v.device)
    w = _weights(pairs, q, k, rpb, logits, weights, G, nh, scale, acc)
    out = v.new_empty(B, C, *size)
    for g, h, c0, c1 in _segments(C, G, nh):
        _put(out, c0, c1, pairs.gather(g, _table(v, c0, c1, acc), _coef(pairs, w, g, h)))
    return out, w


def _backward(dout, v, offset, q, k, rpb, logits, weights, w, size, kernel_size, G, nh, scale, coords, padding,
              needs):
    """Gradients of (v, offset, q, k, rpb, logits, weights), None where not needed."""
    acc = _acc(v.dtype)
    B, C, H, W = v.shape
    K = _neighbours(offset, rpb, logits, weights, kernel_size, G)
    n_v, n_off, n_q, n_k, n_rpb, n_logits, n_weights = needs
    n_off = n_off and offset is not None
    attention = q is not None and (n_q or n_k or n_rpb or n_off)
    n_dw = attention or n_logits or n_weights
    pairs = _Pairs(v.shape, size, offset, kernel_size, G, K, coords, padding, acc, v.device, grad=n_off)
    P = pairs.P
    dv = v.new_empty(v.shape, dtype=acc) if n_v else None
    dw = dout.new_zeros(B, nh, P, K, dtype=acc) if n_dw else None
    per_pair = dout.new_zeros(G, B * P, K, 4, dtype=acc) if n_off else None  # d loss / d bilinear weight
    for g, h, c0, c1 in _segments(C, G, nh):
        rows = _rows(dout, c0, c1, acc)
        if n_off or n_dw:
            e = pairs.dots(g, rows, _table(v, c0, c1, acc))
            if n_dw:
                dw[:, h] += (e * pairs.bw[g]).sum(-1).view(B, P, K)
            if n_off:
                per_pair[g] += e if w is None else e * w[:, h].reshape(B * P, K, 1)
        if n_v:
            _put(dv, c0, c1, pairs.scatter(g, rows, _coef(pairs, w, g, h)), PAD)
    dq = dk = drpb = dlogits = dweights = None
    if n_dw:
        dlogit = w * (dw - (w * dw).sum(-1, keepdim=True))
        if logits is not None:
            dlogits = dlogit.view(B, nh, *size, K).permute(0, 1, 4, 2, 3)
        if weights is not None:
            dweights = dw.view(B, nh, *size, K).permute(0, 1, 4, 2, 3)
    if attention:
        D = q.shape[1]
        a = dlogit * scale  # d loss / d (q . (k + rpb))
        dq = q.new_empty(q.shape, dtype=acc) if n_q else None
        dk = k.new_empty(k.shape, dtype=acc) if n_k else None
        for g, h, c0, c1 in _segments(D, G, nh):
            coef = pairs.bw[g] * a[:, h].reshape(B * P, K, 1)
            table = _table(k, c0, c1, acc) if (n_q or n_off) else None
            qrows = _rows(q, c0, c1, acc) if (n_k or n_off) else None
            if n_q:
                _put(dq, c0, c1, pairs.gather(g, table, coef))
            if n_k:
                _put(dk, c0, c1, pairs.scatter(g, qrows, coef), PAD)
            if n_off:
                per_pair[g] += pairs.dots(g, qrows, table) * a[:, h].reshape(B * P, K, 1)
        if rpb is not None:
            qh = q.to(acc).reshape(B, nh, D // nh, P)
            if n_q:
                dq += torch.einsum("bhpn,hnc->bhcp", a, rpb.to(acc)).reshape(q.shape)
            drpb = torch.einsum("bhpn,bhcp->hnc", a, qh) if n_rpb else None
    doffset = None
    if n_off:
        dpos = torch.stack([(per_pair * pairs.dby).sum(-1), (per_pair * pairs.dbx).sum(-1)], -1)  # [G, B*P, K, 2]
        if pairs.passes is not None:
            dpos = torch.where(pairs.passes, dpos, 0)
        if coords == "align_corners":  # offsets in output pixels: d position / d offset is the ratio
            dpos = dpos * pairs.unit
        doffset = dpos.view(G, B, *size, K, 2).permute(1, 0, 4, 5, 2, 3).reshape(offset.shape)
    grads = (dv, doffset, dq, dk, drpb, dlogits, dweights)
    ins = (v, offset, q, k, rpb, logits, weights)
    return tuple(None if d is None else d.to(x.dtype).contiguous() for d, x in zip(grads, ins))


# custom ops, so torch.compile traces through the CPU path as one node (no graph break on the sparse ops)
@torch.library.custom_op("lda_aqu::local_upsample_cpu", mutates_args=())
def _fwd_op(v: Tensor, offset: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor], rpb: Optional[Tensor],
            logits: Optional[Tensor], weights: Optional[Tensor], Ho: int, Wo: int, kernel_size: int, num_groups: int,
            num_heads: int, scale: float, coords: str, padding: str) -> tuple[Tensor, Tensor]:
    out, w = _forward(v, offset, q, k, rpb, logits, weights, (Ho, Wo), kernel_size or None, num_groups, num_heads,
                      scale, coords, padding)
    return out, (w if w is not None else v.new_empty(0, dtype=_acc(v.dtype)))


@_fwd_op.register_fake
def _(v, offset, q, k, rpb, logits, weights, Ho, Wo, kernel_size, num_groups, num_heads, scale, coords, padding):
    K = _neighbours(offset, rpb, logits, weights, kernel_size, num_groups)
    weighted = q is not None or logits is not None or weights is not None
    w = v.new_empty(v.shape[0], num_heads, Ho * Wo, K, dtype=_acc(v.dtype)) if weighted \
        else v.new_empty(0, dtype=_acc(v.dtype))
    return v.new_empty(v.shape[0], v.shape[1], Ho, Wo), w


@torch.library.custom_op("lda_aqu::local_upsample_cpu_bwd", mutates_args=())
def _bwd_op(dout: Tensor, v: Tensor, offset: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
            rpb: Optional[Tensor], logits: Optional[Tensor], weights: Optional[Tensor], w: Tensor, Ho: int, Wo: int,
            kernel_size: int, num_groups: int, num_heads: int, scale: float, coords: str, padding: str,
            needs: list[bool]) -> list[Tensor]:
    grads = _backward(dout, v, offset, q, k, rpb, logits, weights, w if w.numel() else None, (Ho, Wo),
                      kernel_size or None, num_groups, num_heads, scale, coords, padding, needs)
    return [d if d is not None else v.new_empty(0) for d in grads]


@_bwd_op.register_fake
def _(dout, v, offset, q, k, rpb, logits, weights, w, Ho, Wo, kernel_size, num_groups, num_heads, scale, coords,
      padding, needs):
    ins = (v, offset, q, k, rpb, logits, weights)
    return [x.new_empty(x.shape) if n and x is not None else v.new_empty(0) for x, n in zip(ins, needs)]


def _setup(ctx, inputs, output):
    v, offset, q, k, rpb, logits, weights = inputs[:7]
    ctx.save_for_backward(v, offset, q, k, rpb, logits, weights, output[1])
    ctx.args = inputs[7:]


def _grad(ctx, dout, _dw):
    needs = list(ctx.needs_input_grad[:7])
    grads = torch.ops.lda_aqu.local_upsample_cpu_bwd(dout, *ctx.saved_tensors, *ctx.args, needs)
    return tuple(d if n else None for d, n in zip(grads, needs)) + (None,) * len(ctx.args)


torch.library.register_autograd("lda_aqu::local_upsample_cpu", _grad, setup_context=_setup)


def refuse_double_backward(op: str):
    """Registers, as the autograd formula of a backward op, an error that says where double backward is."""
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward (a gradient of a gradient, create_graph=True) is not implemented by "
                           f"{op}; backend='reference' supports it (plain autograd through the eager op)")
    torch.library.register_autograd(op, backward)


refuse_double_backward("lda_aqu::local_upsample_cpu_bwd")


def _plain(v, size, offset, q, k, rpb, logits, weights, kernel_size, G, nh, scale, coords, padding):
    """The same op as standard differentiable ops (grid_sample per neighbour): for export, devices
    other than the CPU, and one-sample upsamplers. Samples are taken one neighbour at a time, but
    autograd keeps each one."""
    C, H, W = v.shape[1:]
    Ho, Wo = size
    K = _neighbours(offset, rpb, logits, weights, kernel_size, G)
    (y0, uy), (x0, ux) = output_grid(H, Ho, coords, v.dtype, v.device), output_grid(W, Wo, coords, v.dtype, v.device)
    d = base_grid(kernel_size, v.dtype, v.device).view(1, 1, -1, 2, 1, 1)
    if offset is not None:
        d = offset.reshape(-1, G, K, 2, Ho, Wo) + d
    iy, ix = torch.broadcast_tensors(y0.view(Ho, 1) + d[:, :, :, 0], x0.view(1, Wo) + d[:, :, :, 1])
    if coords == "align_corners":
        iy, ix = iy * uy, ix * ux
    # align_corners=False normalisation: no division by a size minus one
    grid = torch.stack([(2 * ix + 1) / W - 1, (2 * iy + 1) / H - 1], -1)  # [B or 1, G, K, Ho, Wo, 2]
    if offset is None:
        grid = grid.expand(v.shape[0], G, K, Ho, Wo, 2)

    def sample(x, n):  # [B, ch, H, W] -> [B, nh, ch // nh, Ho, Wo], each group at its own positions
        g = grid[:, :, n].reshape(-1, Ho, Wo, 2)
        # integer positions (the nearest rule, no offsets): the pixel alone, as the kernels read it
        mode = "nearest" if coords == "nearest" and offset is None else "bilinear"
        s = F.grid_sample(x.reshape(-1, x.shape[1] // G, H, W), g, mode=mode, padding_mode=padding,
                          align_corners=False)
        if padding == "border":  # grid_sample clips a NaN position into the map; the contract is NaN out
            s = s.masked_fill(g.isnan().any(-1)[:, None], float("nan"))
        return s.reshape(-1, nh, x.shape[1] // nh, Ho, Wo)

    if q is not None:
        qh = q.reshape(-1, nh, q.shape[1] // nh, Ho, Wo) * scale
        logit = [(qh * sample(k, n)).sum(2) for n in range(K)]
        if rpb is not None:
            logit = [lg + torch.einsum("bhcyx,hc->bhyx", qh, rpb[:, n]) for n, lg in enumerate(logit)]
        weights = torch.stack(logit, 2).softmax(2)
    elif logits is not None:
        weights = logits.softmax(2)
    out = 0
    for n in range(K):
        out = out + (sample(v, n) if weights is None else weights[:, :, n, None] * sample(v, n))
    return out.reshape(-1, C, Ho, Wo)


def local_upsample_torch(v, size, *, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale,
                         coords, padding):
    """`upsampler.local_upsample` in PyTorch; arguments already checked."""
    # One unit-weight sample per pixel (DySample, interpolation) is exactly grid_sample, whose native
    # CPU kernel is ~2x faster than the gathers and keeps the same tensors for backward.
    one_sample = q is None and logits is None and weights is None and \
        _neighbours(offset, rpb, logits, weights, kernel_size, num_groups) == 1
    if v.device.type != "cpu" or is_exporting() or one_sample:
        return _plain(v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale, coords,
                      padding)
    out, _ = torch.ops.lda_aqu.local_upsample_cpu(v, offset, q, k, rpb, logits, weights, size[0], size[1],
                                                  kernel_size or 0, num_groups, num_heads, scale, coords, padding)
    return out
