"""The pure-PyTorch backend of `local_upsample`: fast on CPU, plain torch elsewhere and under export.

On CPU the op runs native kernels (lda_aqu/kernels/local_upsample_cpu.cpp, built on first use: kernels.cpu).
Where they cannot build, it is a sparse product. Each output pixel p of offset group g reads 4 bilinear corners of
K samples, J = 4K (input row, weight) pairs, so with channels-last tables of the inputs:

    out[p]    = sum_j w_n(p) b_j(p) v[idx_j(p)]         embedding_bag, bags of J rows
    logit_n(p) = sum_{j in n} b_j(p) (q[p] . k[idx_j(p)])  sampled_addmm (a dot per pair)

and the backward is the same pairs read the other way: gradients of v and k are the transposed
product (pairs stably sorted by input row, then embedding_bag over the sorted runs: deterministic,
no atomics), and the offset gradient is the bilinear weights' derivatives times per-pair dots. No
[K, C, Ho, Wo] sample ever exists; autograd keeps the inputs and the [B, nh, Ho*Wo, K] weights.
The pairs are recomputed in backward from the offsets. Against the grid_sample graph below, which
keeps K samples of the features for backward, this form keeps about 1% of its bytes, peaks at up to
12x less memory in training and is as fast or faster where K > 1 (results/sparse-vs-grid-sample).

Elsewhere (MPS, CUDA with backend="torch") and while exporting, the op is a plain graph of
grid_sample calls, one neighbour at a time, that every exporter and device can take.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import cpu as _cpu, layout as _layout
from ..kernels.layout import (Spec, acc_dtype as _acc, segments as _segments, window_extents, window_offsets,
                            window_origins, window_valid)

from . import cpu_cache
from .dispatch import FLOAT_DTYPES, can_run_native, choose, is_exporting, traced as _traced

Tensor = torch.Tensor


# torch before 2.13 strides a view that merges symbolic sizes a and b*a Min(a, b*a); ops that order
# dimensions by stride (elementwise ops, grid_sample) on it then guard that a free size is not 1, and
# the exported program refuses a height or width of 1
_MIN_STRIDES = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13)


def _reshaped(t: Tensor, *shape) -> Tensor:
    """t.reshape(*shape); while exporting under torch before 2.13, a copy with plain strides (a compiler
    fuses it)."""
    t = t.reshape(*shape)
    return t.clone(memory_format=torch.contiguous_format) if _MIN_STRIDES and is_exporting() else t


PAD = 2  # zero border of the tables: a corner of any clipped cell [-2, H] x [-2, W] reads a real row


def _table(x: Tensor, b: int, c0: int, c1: int, acc) -> Tensor:
    """x[b, c0:c1] as channels-last rows of the map zero-padded by PAD: [(H+2PAD)*(W+2PAD), c1-c0]."""
    _, _, H, W = x.shape
    out = x.new_zeros(H + 2 * PAD, W + 2 * PAD, c1 - c0, dtype=acc)
    out[PAD:PAD + H, PAD:PAD + W] = x[b, c0:c1].permute(1, 2, 0)
    return out.view(-1, c1 - c0)


def _rows(x: Tensor, b: int, c0: int, c1: int, r0: int, r1: int, acc) -> Tensor:
    """x[b, c0:c1, r0:r1] as channels-last rows [(r1-r0)*W, c1-c0] in acc."""
    out = x.new_empty(r1 - r0, x.shape[3], c1 - c0, dtype=acc)
    out.copy_(x[b, c0:c1, r0:r1].permute(1, 2, 0))
    return out.view(-1, c1 - c0)


def _put(dst: Tensor, b: int, c0: int, c1: int, r0: int, rows: Tensor, pad: int = 0):
    """dst[b, c0:c1, r0:] = rows [R*(W+2pad), c1-c0] (R rows from r0, padding dropped) as [c, R, W]."""
    W = dst.shape[3]
    rows = rows.view(-1, W + 2 * pad, c1 - c0)
    rows = rows[pad:rows.shape[0] - pad, pad:pad + W]
    dst[b, c0:c1, r0:r0 + rows.shape[0]] = rows.permute(2, 0, 1)


class _Pairs:
    """The (table row, bilinear weight) pairs of the output pixels of rows r0:r1 of image b, per offset group.

    idx [G, n, K, 4] (int32) rows of the image's padded tables (`_table`), n = (r1-r0)*Wo: a position's
    cell is clipped to [-PAD, H] x [-PAD, W] (NaN to -PAD), so corners outside the map, far or NaN
    positions read zero rows; bw [G, n, K, 4] the bilinear weights (NaN stays NaN, so it propagates);
    dby/dbx their derivatives along the position.
    """

    def __init__(self, v_shape, size, b, r0, r1, offset, spec: Spec, acc, device, grad=False):
        G, _, K, kernel_size, coords, padding, _, window, ratio = _unpack(spec)
        _, _, H, W = v_shape
        Ho, Wo = size
        Wp = W + 2 * PAD
        self.n, self.K, self.rows = (r1 - r0) * Wo, K, (H + 2 * PAD) * Wp
        # positions [G, R, Wo, K, (y, x)] in input pixels
        (y0, uy), (x0, ux) = (window_origins(n, m, coords, window, kernel_size, ratio, acc, device)
                              for n, m in ((H, Ho), (W, Wo)))
        grid = torch.stack(torch.broadcast_tensors(y0[r0:r1].view(-1, 1), x0.view(1, Wo)), -1).unsqueeze(-2)
        grid = grid + window_offsets(kernel_size, acc, device)
        if offset is None:
            pos = grid.expand(G, *grid.shape).clone()
        else:
            pos = torch.empty(G, r1 - r0, Wo, K, 2, dtype=acc, device=device)
            torch.add(offset[b].view(G, K, 2, Ho, Wo)[:, :, :, r0:r1].permute(0, 3, 4, 1, 2), grid, out=pos)
        self.unit = torch.tensor([uy, ux], dtype=acc, device=device)
        if coords == "align_corners":  # offsets in output pixels, then mapped
            pos.mul_(self.unit)
        pos = pos.view(G, self.n, K, 2)
        lim = torch.tensor([H - 1, W - 1], dtype=acc, device=device)
        self.passes = None
        if padding == "border":  # clip, with zero gradient at and past the edge (grid_sample's border)
            self.passes = (pos > 0) & (pos < lim)
            pos = pos.clamp(min=torch.zeros_like(lim), max=lim)
        cell = pos.floor()
        frac = pos.sub_(cell)
        w = torch.stack([1 - frac, frac], -2)  # [..., corner 0/1, (y, x)]
        self.bw = (w[..., :, None, 0] * w[..., None, :, 1]).flatten(-2)  # corners (0,0) (0,1) (1,0) (1,1)
        if grad:
            sign = torch.tensor([-1.0, 1.0], dtype=acc, device=device)
            self.dby = (sign[:, None] * w[..., None, :, 1]).flatten(-2)
            self.dbx = (w[..., :, None, 0] * sign).flatten(-2)
        cell = cell.nan_to_num_(nan=-PAD).clamp_(min=torch.full_like(lim, -PAD), max=lim + 1).add_(PAD)
        lin = (cell[..., 0] * Wp + cell[..., 1]).to(torch.int32)
        if coords == "nearest" and offset is None:
            # integer positions: the pixel only, as the kernels read it; the other corners read the
            # zero pad at the start of the pixel's table row
            self.idx = torch.stack([lin, *[lin - lin % Wp] * 3], -1)
        else:
            self.idx = lin[..., None] + torch.tensor([0, 1, Wp, Wp + 1], dtype=torch.int32, device=device)
        self._pattern = [None] * G
        self._sorted = [None] * G

    def gather(self, g: int, table: Tensor, coef: Tensor) -> Tensor:
        """[n, c]: sum_j coef[p, j] table[idx_j(p)], coef [n, K, 4]."""
        return F.embedding_bag(self.idx[g].view(self.n, -1), table, per_sample_weights=coef.reshape(self.n, -1),
                               mode="sum")

    def dots(self, g: int, rows: Tensor, table: Tensor) -> Tensor:
        """[n, K, 4]: rows[p] . table[idx_j(p)] for every pair."""
        n, J = self.n, 4 * self.K
        # sampled_addmm keeps at most n * columns pairs: tiny maps get zero rows up to J
        cols = max(self.rows, J)
        if table.shape[0] < cols:
            table = torch.cat([table, table.new_zeros(cols - table.shape[0], table.shape[1])])
        if self._pattern[g] is None:
            crow = torch.arange(0, n * J + 1, J, dtype=torch.int32, device=rows.device)
            with warnings.catch_warnings():  # "sparse CSR is in beta"
                warnings.simplefilter("ignore")
                self._pattern[g] = torch.sparse_csr_tensor(crow, self.idx[g].reshape(-1), rows.new_zeros(n * J),
                                                           (n, cols), check_invariants=False)
        return torch.sparse.sampled_addmm(self._pattern[g], rows, table.t(), beta=0.0).values().view(n, self.K, 4)

    def scatter(self, g: int, rows: Tensor, coef: Tensor, out: Tensor):
        """out[r] += sum over pairs (p, j) reading row r of coef * rows[p]: the transposed gather, over the
        band of rows the chunk reads (its pairs sorted by row: a fixed summation order, no atomics)."""
        if self._sorted[g] is None:
            key = self.idx[g].reshape(-1)
            lo = int(key.min())
            key = key - lo
            order = torch.sort(key, stable=True).indices
            counts = torch.bincount(key)
            self._sorted[g] = lo, order, order // (4 * self.K), counts.cumsum(0) - counts
        lo, order, pixel, starts = self._sorted[g]
        out[lo:lo + starts.shape[0]] += F.embedding_bag(pixel, rows, starts, per_sample_weights=coef.reshape(-1)[order],
                                                        mode="sum")


def _chunks(B, size, G, K):
    """(b, r0, r1): runs of output rows of one image with about CHUNK_PAIRS pairs."""
    Ho, Wo = size
    R = max(1, _layout.CHUNK_PAIRS // (G * Wo * K * 4))
    return [(b, r0, min(r0 + R, Ho)) for b in range(B) for r0 in range(0, Ho, R)]


def _given(logits, weights, acc):
    """w [B, nh, P, K] from given logits or weights (None: every sample weighs 1)."""
    given = logits if logits is not None else weights
    if given is None:
        return None
    B, nh, K = given.shape[:3]
    w = given.new_empty(B, nh, *given.shape[3:], K, dtype=acc)  # a copy: a custom op's output never aliases
    w.copy_(given.permute(0, 1, 3, 4, 2))
    w = w.view(B, nh, -1, K)
    return w.softmax(-1) if logits is not None else w


def _coef(pairs, w, g, h):
    """[n, K, 4] the pairs' weights: bilinear times the sample's weight w [nh, n, K] (None: 1)."""
    return pairs.bw[g] if w is None else pairs.bw[g] * w[h].unsqueeze(-1)


def _native_args(v, q, size, spec: Spec, acc, mean_heads=False):
    """The native kernels' description of the problem: mode, groups, heads, K, channel runs, grid."""
    return _native_geometry(*v.shape[1:], *size, 0 if q is None else q.shape[1], spec, acc, mean_heads)


@functools.lru_cache(maxsize=256)
def _native_geometry(C, H, W, Ho, Wo, Dq, spec: Spec, acc, mean_heads):
    # per call this would be a dozen small tensor ops: as much as the kernel itself on a 16x16 map
    G, nh, K, kernel_size, coords, _, _, window, ratio = _unpack(spec)
    (y0, uy), (x0, ux) = (window_origins(n, m, coords, window, kernel_size, ratio, acc, "cpu")
                          for n, m in ((H, Ho), (W, Wo)))
    segs, qsegs = _segments(C, G, 1 if mean_heads else nh), _segments(Dq, G, nh) if Dq else []
    extents = (window_extents(H, Ho, ratio), window_extents(W, Wo, ratio)) if window == "ratio" else None
    return dict(mode=spec.weights, G=G, nh=nh, K=K, segs=segs, qsegs=qsegs, origins=(y0, x0),
                base=window_offsets(kernel_size, acc).expand(K, 2).contiguous(), units=(float(uy), float(ux)),
                grid=kernel_size or 1, extents=extents, mean_heads=mean_heads)


def _forward(v, offset, q, k, rpb, logits, weights, size, spec: Spec, keep=True, mean_heads=False):
    """(out, the sample weights for backward); keep=False: no backward follows, the native kernel writes none;
    mean_heads (native, keep=False): the heads' weights averaged and applied to every channel."""
    G, nh, K, kernel_size, coords, padding, scale, window, ratio = _unpack(spec)
    acc = _acc(v.dtype)
    if can_run_native(v, dtypes=FLOAT_DTYPES, node="compile") is None:
        a = _native_args(v, q, size, spec, acc, mean_heads)
        out, w = _cpu.forward(v, size, offset, q, k, rpb, logits if logits is not None else weights, **a,
                              scale=scale, coords=coords, padding=padding, acc=acc, keep_weights=keep,
                              empty=cpu_cache.empty)
        return out.to(v.dtype), w
    B, C, H, W = v.shape
    Ho, Wo = size
    w = _given(logits, weights, acc) if q is None else v.new_empty(B, nh, Ho * Wo, K, dtype=acc)
    out = v.new_empty(B, C, Ho, Wo)
    segs, qsegs = _segments(C, G, nh), _segments(q.shape[1], G, nh) if q is not None else []
    valid = window_valid(size, (H, W), kernel_size, ratio, v.device).view(-1, K) if window == "ratio" else None
    for b, r0, r1 in _chunks(B, size, G, K):
        if r0 == 0:
            vtab = [_table(v, b, c0, c1, acc) for _, _, c0, c1 in segs]
            ktab = [_table(k, b, c0, c1, acc) for _, _, c0, c1 in qsegs]
        pairs = _Pairs(v.shape, size, b, r0, r1, offset, spec, acc, v.device)
        wc = None if w is None else w[b, :, r0 * Wo:r1 * Wo]
        if q is not None:
            logit = v.new_zeros(nh, pairs.n, K, dtype=acc)
            for (g, h, c0, c1), table in zip(qsegs, ktab):
                e = pairs.dots(g, _rows(q, b, c0, c1, r0, r1, acc), table)
                logit[h] += (e * pairs.bw[g]).sum(-1)
            if rpb is not None:
                qc = q[b, :, r0:r1].to(acc).reshape(nh, -1, pairs.n)
                logit += torch.einsum("hcp,hnc->hpn", qc, rpb.to(acc))
            if valid is not None:  # box positions outside a "ratio" window take no part
                logit.masked_fill_(~valid[r0 * Wo:r1 * Wo], float("-inf"))
            wc.copy_(logit.mul_(scale).softmax(-1))
        for (g, h, c0, c1), table in zip(segs, vtab):
            _put(out, b, c0, c1, r0, pairs.gather(g, table, _coef(pairs, wc, g, h)))
    return out, w


def _backward(dout, v, offset, q, k, rpb, logits, weights, w, size, spec: Spec, needs):
    """Gradients of (v, offset, q, k, rpb, logits, weights), None where not needed; the forward's weights w
    carry the window (zero outside a "ratio" window), so only the positions depend on it here."""
    if can_run_native(v, dtypes=FLOAT_DTYPES, node="compile") is None:
        return _native_backward(dout, v, offset, q, k, rpb, logits, weights, w, size, spec, needs)
    G, nh, K, kernel_size, coords, padding, scale, window, ratio = _unpack(spec)
    acc = _acc(v.dtype)
    B, C, H, W = v.shape
    Ho, Wo = size
    n_v, n_off, n_q, n_k, n_rpb, n_logits, n_weights = needs
    n_off = n_off and offset is not None
    attention = q is not None and (n_q or n_k or n_rpb or n_off)
    n_dw = attention or n_logits or n_weights
    segs, qsegs = _segments(C, G, nh), _segments(q.shape[1], G, nh) if q is not None else []
    dv = v.new_empty(v.shape, dtype=acc) if n_v else None
    dq = q.new_empty(q.shape, dtype=acc) if attention and n_q else None
    dk = k.new_empty(k.shape, dtype=acc) if attention and n_k else None
    drpb = rpb.new_zeros(rpb.shape, dtype=acc) if attention and n_rpb and rpb is not None else None
    dlogit = dout.new_empty(B, nh, Ho * Wo, K, dtype=acc) if n_dw else None
    dw = dout.new_empty(B, nh, Ho * Wo, K, dtype=acc) if n_weights else None
    doffset = offset.new_empty(B, G, K, 2, Ho, Wo, dtype=acc) if n_off else None
    for b, r0, r1 in _chunks(B, size, G, K):
        if r0 == 0:
            vtab = [_table(v, b, c0, c1, acc) for _, _, c0, c1 in segs] if (n_off or n_dw) else None
            ktab = [_table(k, b, c0, c1, acc) for _, _, c0, c1 in qsegs] if attention and (n_q or n_off) else None
            dvtab = [v.new_zeros(H + 2 * PAD, W + 2 * PAD, c1 - c0, dtype=acc).view(-1, c1 - c0)
                     for _, _, c0, c1 in segs] if n_v else None
            dktab = [v.new_zeros(H + 2 * PAD, W + 2 * PAD, c1 - c0, dtype=acc).view(-1, c1 - c0)
                     for _, _, c0, c1 in qsegs] if dk is not None else None
        pairs = _Pairs(v.shape, size, b, r0, r1, offset, spec, acc, v.device, grad=n_off)
        p0, p1 = r0 * Wo, r1 * Wo
        wc = None if w is None else w[b, :, p0:p1]
        dwc = dout.new_zeros(nh, pairs.n, K, dtype=acc) if n_dw else None
        per_pair = dout.new_zeros(G, pairs.n, K, 4, dtype=acc) if n_off else None  # d loss / d bilinear weight
        for i, (g, h, c0, c1) in enumerate(segs):
            rows = _rows(dout, b, c0, c1, r0, r1, acc)
            if n_off or n_dw:
                e = pairs.dots(g, rows, vtab[i])
                if n_dw:
                    dwc[h] += (e * pairs.bw[g]).sum(-1)
                if n_off:
                    per_pair[g] += e if wc is None else e * wc[h].unsqueeze(-1)
            if n_v:
                pairs.scatter(g, rows, _coef(pairs, wc, g, h), dvtab[i])
        if dw is not None:
            dw[b, :, p0:p1] = dwc
        if n_dw:
            dlogit[b, :, p0:p1] = wc * (dwc - (wc * dwc).sum(-1, keepdim=True))
        if attention:
            a = dlogit[b, :, p0:p1] * scale  # d loss / d (q . (k + rpb))
            for i, (g, h, c0, c1) in enumerate(qsegs):
                coef = pairs.bw[g] * a[h].unsqueeze(-1)
                qrows = _rows(q, b, c0, c1, r0, r1, acc) if (dk is not None or n_off) else None
                if dq is not None:
                    _put(dq, b, c0, c1, r0, pairs.gather(g, ktab[i], coef))
                if dk is not None:
                    pairs.scatter(g, qrows, coef, dktab[i])
                if n_off:
                    per_pair[g] += pairs.dots(g, qrows, ktab[i]) * a[h].unsqueeze(-1)
            if rpb is not None:
                if dq is not None:
                    dq[b, :, r0:r1] += torch.einsum("hpn,hnc->hcp", a, rpb.to(acc)).reshape(-1, r1 - r0, Wo)
                if drpb is not None:
                    drpb += torch.einsum("hpn,hcp->hnc", a, q[b, :, r0:r1].to(acc).reshape(nh, -1, pairs.n))
        if n_off:
            dpos = torch.stack([(per_pair * pairs.dby).sum(-1), (per_pair * pairs.dbx).sum(-1)], -1)  # [G, n, K, 2]
            if pairs.passes is not None:
                dpos = torch.where(pairs.passes, dpos, 0)
            if coords == "align_corners":  # offsets in output pixels: d position / d offset is the ratio
                dpos = dpos * pairs.unit
            doffset[b, :, :, :, r0:r1] = dpos.view(G, r1 - r0, Wo, K, 2).permute(0, 3, 4, 1, 2)
        if r1 == Ho:
            for i, (_, _, c0, c1) in enumerate(segs if n_v else []):
                _put(dv, b, c0, c1, 0, dvtab[i], PAD)
            for i, (_, _, c0, c1) in enumerate(qsegs if dk is not None else []):
                _put(dk, b, c0, c1, 0, dktab[i], PAD)
    dlogits = dweights = None
    if logits is not None and n_dw:
        dlogits = dlogit.view(B, nh, Ho, Wo, K).permute(0, 1, 4, 2, 3)
    if dw is not None:
        dweights = dw.view(B, nh, Ho, Wo, K).permute(0, 1, 4, 2, 3)
    if doffset is not None:
        doffset = doffset.view(offset.shape)
    grads = (dv, doffset, dq, dk, drpb, dlogits, dweights)
    ins = (v, offset, q, k, rpb, logits, weights)
    return tuple(None if d is None else d.to(x.dtype).contiguous() for d, x in zip(grads, ins))


def _native_backward(dout, v, offset, q, k, rpb, logits, weights, w, size, spec: Spec, needs):
    acc = _acc(v.dtype)
    nh, scale = spec.NH, spec.scale
    n_v, n_off, n_q, n_k, n_rpb, n_logits, n_weights = needs
    a = _native_args(v, q, size, spec, acc)
    d = _cpu.backward(dout, v, size, offset, q, k, rpb, w, **a, scale=scale, coords=spec.coords, padding=spec.padding,
                      acc=acc,
                      needs=(n_v, n_off, n_q, n_k, n_weights), empty=cpu_cache.empty)
    B, P, K = v.shape[0], size[0] * size[1], a["K"]
    drpb = dlogits = dweights = None
    if q is not None and rpb is not None and n_rpb:  # d loss / d rpb: scale * dlogit . q, over every pixel
        qh = q.to(acc).reshape(B, nh, -1, P)
        drpb = torch.einsum("bhpn,bhcp->hnc", d["dlogit"], qh) * scale
    if logits is not None and n_logits:
        dlogits = d["dlogit"].view(B, nh, *size, K).permute(0, 1, 4, 2, 3)
    if d["dw"] is not None:
        dweights = d["dw"].view(B, nh, *size, K).permute(0, 1, 4, 2, 3)
    grads = (d["dv"], d["doffset"], d["dq"], d["dk"], drpb, dlogits, dweights)
    ins = (v, offset, q, k, rpb, logits, weights)
    return tuple(None if g is None or not n else g.to(x.dtype).contiguous() for g, x, n in zip(grads, ins, needs))


def _unpack(spec: Spec):
    """The names the torch path reads: G, nh, K, kernel_size (None for no window), coords, padding, scale,
    window, ratio."""
    return spec.G, spec.NH, spec.K, spec.grid or None, spec.coords, spec.padding, spec.scale, spec.window, spec.ratio


def _fwd_impl(v, offset, q, k, rpb, logits, weights, Ho, Wo, *spec):
    out, w = _forward(v, offset, q, k, rpb, logits, weights, (Ho, Wo), Spec(*spec))
    return out, (w if w is not None else v.new_empty(0, dtype=_acc(v.dtype)))


# custom ops, so torch.compile traces through the CPU path as one node (no graph break on the sparse ops);
# after the sizes come the fields of the call's Spec
@torch.library.custom_op("lda_aqu::local_upsample_cpu", mutates_args=())
def _fwd_op(v: Tensor, offset: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor], rpb: Optional[Tensor],
            logits: Optional[Tensor], weights: Optional[Tensor], Ho: int, Wo: int, G: int, NH: int, K: int, mode: str,
            coords: str, padding: str, grid: int, scale: float, window: str, ratio: float) -> tuple[Tensor, Tensor]:
    return _fwd_impl(v, offset, q, k, rpb, logits, weights, Ho, Wo, G, NH, K, mode, coords, padding, grid, scale,
                     window, ratio)


@_fwd_op.register_fake
def _(v, offset, q, k, rpb, logits, weights, Ho, Wo, G, NH, K, mode, *spec):
    w = v.new_empty(v.shape[0], NH, Ho * Wo, K, dtype=_acc(v.dtype)) if mode != "unit" \
        else v.new_empty(0, dtype=_acc(v.dtype))
    return v.new_empty(v.shape[0], v.shape[1], Ho, Wo), w


def _bwd_impl(dout, v, offset, q, k, rpb, logits, weights, w, Ho, Wo, *spec_needs):
    *spec, needs = spec_needs
    grads = _backward(dout, v, offset, q, k, rpb, logits, weights, w if w.numel() else None, (Ho, Wo), Spec(*spec),
                      needs)
    return [d if d is not None else v.new_empty(0) for d in grads]


@torch.library.custom_op("lda_aqu::local_upsample_cpu_bwd", mutates_args=())
def _bwd_op(dout: Tensor, v: Tensor, offset: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
            rpb: Optional[Tensor], logits: Optional[Tensor], weights: Optional[Tensor], w: Tensor, Ho: int, Wo: int,
            G: int, NH: int, K: int, mode: str, coords: str, padding: str, grid: int, scale: float, window: str,
            ratio: float, needs: list[bool]) -> list[Tensor]:
    return _bwd_impl(dout, v, offset, q, k, rpb, logits, weights, w, Ho, Wo, G, NH, K, mode, coords, padding, grid,
                     scale, window, ratio, needs)


@_bwd_op.register_fake
def _(dout, v, offset, q, k, rpb, logits, weights, w, Ho, Wo, *spec_needs):
    ins = (v, offset, q, k, rpb, logits, weights)
    return [x.new_empty(x.shape) if n and x is not None else v.new_empty(0) for x, n in zip(ins, spec_needs[-1])]


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


@functools.lru_cache(maxsize=64)
def _half_pixel_grid(H, W, Ho, Wo, dtype, gain):
    """grid_sample's normalised half-pixel origins [Ho, Wo, (x, y)] and gain times the normalised size of
    one input pixel (2/W, 2/H): the origin of output column X is (2X + 1) / Wo - 1. Normal tensors even
    when first made under inference_mode, so a later training step may save them."""
    with torch.inference_mode(False), torch.no_grad():
        gx, gy = (torch.linspace(1 / n - 1, 1 - 1 / n, n, dtype=dtype) for n in (Wo, Ho))
        origin = torch.stack(torch.broadcast_tensors(gx, gy.view(Ho, 1)), -1).contiguous()
        return origin, torch.tensor([2 * gain / W, 2 * gain / H], dtype=dtype)


def one_sample(v, size, o, padding, gain=1.0):
    """One bilinear sample per output pixel and channel group at its half-pixel position plus gain * o in
    input pixels, o [B, G, Ho, Wo, (x, y)]: a view of DySample's own offsets (x|y, group), in whose
    layout grid_sample's grid needs no reordering. `_plain` in as few ops as DySample's own
    grid_sample form (on small maps each op's call costs more than its pass)."""
    (B, C, H, W), (Ho, Wo), G = v.shape, size, o.shape[1]
    dtype = v.dtype
    v, o = v.to(_acc(dtype)), o.to(_acc(dtype))  # half inputs: fp32 positions and sums, as the kernels
    if v.device.type == "cpu" and not _traced():
        origin, unit = _half_pixel_grid(H, W, Ho, Wo, v.dtype, gain)
        grid = torch.addcmul(origin, o, unit)
        nan_possible = padding == "border" and bool(o.sum().isnan())
    else:  # the same, without constants a graph would capture
        # tensor arithmetic on the sizes, which may be symbolic (export with free sizes)
        ys, xs = (torch.arange(n, dtype=v.dtype, device=v.device) * 2 + 1 for n in (Ho, Wo))
        grid = torch.stack([xs / Wo - 1 + o[..., 0] * (2 * gain) / W,
                            ys.view(Ho, 1) / Ho - 1 + o[..., 1] * (2 * gain) / H], -1)
        nan_possible = padding == "border"
    grid = _reshaped(grid, B * G, Ho, Wo, 2)
    out = F.grid_sample(v.reshape(B * G, C // G, H, W), grid, padding_mode=padding, align_corners=False)
    if nan_possible:
        out = out.masked_fill(grid.isnan().any(-1)[:, None], float("nan"))  # see _plain
    return out.reshape(B, C, Ho, Wo).to(dtype)


def _plain(v, size, offset, q, k, rpb, logits, weights, spec: Spec):
    """The same op as standard differentiable ops (grid_sample per neighbour): for export, devices
    other than the CPU, and one-sample upsamplers. Samples are taken one neighbour at a time, but
    autograd keeps each one."""
    G, nh, K, kernel_size, coords, padding, scale, window, ratio = _unpack(spec)
    C, H, W = v.shape[1:]
    Ho, Wo = size
    if K == 1 and coords == "half_pixel" and offset is not None and q is None and logits is None and weights is None:
        return one_sample(v, size, offset.view(-1, G, 2, Ho, Wo).flip(2).permute(0, 1, 3, 4, 2), padding)
    (y0, uy), (x0, ux) = (window_origins(n, m, coords, window, kernel_size, ratio, v.dtype, v.device)
                          for n, m in ((H, Ho), (W, Wo)))
    d = window_offsets(kernel_size, v.dtype, v.device).view(1, 1, -1, 2, 1, 1)
    if offset is not None:
        d = offset.reshape(-1, G, K, 2, Ho, Wo) + d
    iy, ix = torch.broadcast_tensors(y0.view(Ho, 1) + d[:, :, :, 0], x0.view(1, Wo) + d[:, :, :, 1])
    if coords == "align_corners":
        iy, ix = iy * uy, ix * ux
    # align_corners=False normalisation: no division by a size minus one
    grid = torch.stack([(2 * ix + 1) / W - 1, (2 * iy + 1) / H - 1], -1)  # [B or 1, G, K, Ho, Wo, 2]
    if offset is None:
        grid = grid.expand(v.shape[0], G, K, Ho, Wo, 2)

    nan_possible = padding == "border" and offset is not None and \
        (v.device.type != "cpu" or _traced() or bool(offset.sum().isnan()))

    # Inductor before 2.13 cannot lower a graph that keeps for backward a [B*G, ch // G, H, W] view of a
    # conv's output (it orders the view's symbolic channels-last strides with bare sympy comparisons:
    # "cannot determine truth value of Relational"); under torch.compile the groups are stacked group-major
    # (copies, no views: the grid's too), each sample's batch index g*B + b
    group_major = G > 1 and _MIN_STRIDES and torch.compiler.is_compiling()

    def sample(x, n):  # [B, ch, H, W] -> [B, nh, ch // nh, Ho, Wo], each group at its own positions
        g = grid[:, :, n]
        if group_major:
            xs, g = torch.cat(x.chunk(G, 1)), torch.cat(g.unbind(1))
        else:
            xs, g = x.reshape(-1, x.shape[1] // G, H, W), g.reshape(-1, Ho, Wo, 2)
        # integer positions (the nearest rule, no offsets): the pixel alone, as the kernels read it
        mode = "nearest" if coords == "nearest" and offset is None else "bilinear"
        s = F.grid_sample(xs, g, mode=mode, padding_mode=padding, align_corners=False)
        # grid_sample clips a NaN position into the map; the contract is NaN out. In eager on the CPU the
        # output pass runs only when an offset is NaN (its sum is: one reduction; inf - inf a false alarm)
        if nan_possible:
            s = s.masked_fill(g.isnan().any(-1)[:, None], float("nan"))
        if group_major:
            s = s.unflatten(0, (G, -1)).transpose(0, 1)
        return _reshaped(s, -1, nh, x.shape[1] // nh, Ho, Wo)

    if q is not None:
        qh = q.reshape(-1, nh, q.shape[1] // nh, Ho, Wo) * scale
        logit = [(qh * sample(k, n)).sum(2) for n in range(K)]
        if rpb is not None:
            logit = [lg + torch.einsum("bhcyx,hc->bhyx", qh, rpb[:, n]) for n, lg in enumerate(logit)]
        logit = torch.stack(logit, 2)
        if window == "ratio":  # box positions outside the window take no part
            valid = window_valid(size, (H, W), kernel_size, ratio, v.device).permute(2, 0, 1)
            logit = logit.masked_fill(~valid, float("-inf"))
        weights = logit.softmax(2)
    elif logits is not None:
        weights = logits.softmax(2)
    out = None
    for n in range(K):
        term = sample(v, n) if weights is None else weights[:, :, n, None] * sample(v, n)
        out = term if out is None else out + term
    return out.reshape(-1, C, Ho, Wo)


class _Eager(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch: in eager mode the custom-op machinery
    (schema defaults, autograd wrapper) costs ~0.1 ms a call, as much as the whole op on a small map.
    A second backward goes through the custom backward op, which says where double backward is."""

    @staticmethod
    def forward(ctx, v, offset, q, k, rpb, logits, weights, *args):
        out, w = _fwd_impl(v, offset, q, k, rpb, logits, weights, *args)
        ctx.save_for_backward(v, offset, q, k, rpb, logits, weights, w)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, dout):
        needs = list(ctx.needs_input_grad[:7])
        if torch.is_grad_enabled():  # create_graph=True
            grads = torch.ops.lda_aqu.local_upsample_cpu_bwd(dout, *ctx.saved_tensors, *ctx.args, needs)
        else:
            grads = _bwd_impl(dout, *ctx.saved_tensors, *ctx.args, needs)
        return tuple(d if n else None for d, n in zip(grads, needs)) + (None,) * len(ctx.args)


def averages_heads(*tensors) -> bool:
    """Whether the native forward averages the heads itself here: eager CPU inference (it keeps no weights
    for a backward). Elsewhere average_heads is the mean of one call per head."""
    return can_run_native(*tensors, dtypes=FLOAT_DTYPES) is None and \
        not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def local_upsample_torch(v, size, spec: Spec, *, offset, q, k, rpb, logits, weights, average_heads=False):
    """`upsampler.local_upsample` in PyTorch; arguments already checked and resolved into `spec` (average_heads
    where averages_heads() says so)."""
    if average_heads:
        return _forward(v, offset, q, k, rpb, logits, weights, size, spec, keep=False, mean_heads=True)[0]
    single = spec.weights == "unit" and spec.K == 1
    if choose("torch", v, single=single).backend == "plain":
        return _plain(v, size, offset, q, k, rpb, logits, weights, spec)
    args = (v, offset, q, k, rpb, logits, weights, size[0], size[1], *spec)
    if _traced():
        return torch.ops.lda_aqu.local_upsample_cpu(*args)[0]
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in args[:7]):
        return _forward(v, offset, q, k, rpb, logits, weights, size, spec, keep=False)[0]
    return _Eager.apply(*args)
