"""Fused Triton kernels for local sampling upsamplers (LDA-AQU, CARAFE, DySample, interpolation):

    out[b, c, p] = sum_n w[b, h(c), n, p] * bilinear(v[b, c], pos[b, g(c), n, p])

Naive reference beside them: `lda_aqu/upsampler/naive.py::local_upsample_ref`.

Every program owns one batch element and a tile of BLOCK_P output pixels. Channels are walked in
*segments*: the intersection of one offset group g with one head h, so that each segment has one
set of sample positions (its group's) and one set of weights (its head's). A segment is walked in
chunks of BLOCK_D (keys) or BLOCK_C (values) channels; when the chunk covers the segment, which
the default tiles aim for, a neighbour's position is computed once per pixel and used for all of
the segment's channels. The K sampled copies of k and v are never written: each neighbour is
gathered from its four bilinear corners (from channels-last copies of k and v, so that a corner's
channels are one contiguous run), used and dropped.

Constexpr switches pick the upsampler:
- COORD: where an output pixel sits in the input before its displacement d (base grid + offset):
  ALIGN_CORNERS (Y + d) * (H-1)/(Ho-1) (LDA-AQU: d in output pixels), HALF_PIXEL
  (Y + 0.5) * H/Ho - 0.5 + d (DySample), NEAREST floor(Y * H/Ho) + d (CARAFE).
- BORDER: positions clipped to the map (grid_sample's "border") instead of zeros outside.
- WEIGHTS: ATTENTION softmax(scale * q . (k + rpb)), LOGITS softmax of given logits, GIVEN weights,
  UNIT weights of 1.
- GRID: the k x k window added to neighbour n = i*k + j (0: none); EXACT: integer positions
  (nearest, no offsets), one corner read instead of four.

Per-pixel, per-head state over the K neighbours (logits, weights, their gradients) lives in
registers as [BLOCK_P, NH_PAD, K_PAD] tiles; a neighbour's column is read or updated with a
masked reduction, which is cheap next to the channel gathers it goes with.
"""
import triton
import triton.language as tl

# kernels.layout.WEIGHT_MODES' numbers
UNIT: tl.constexpr = tl.constexpr(0)
GIVEN: tl.constexpr = tl.constexpr(1)
LOGITS: tl.constexpr = tl.constexpr(2)
ATTENTION: tl.constexpr = tl.constexpr(3)
ALIGN_CORNERS: tl.constexpr = tl.constexpr(0)
HALF_PIXEL: tl.constexpr = tl.constexpr(1)
NEAREST: tl.constexpr = tl.constexpr(2)
# kernels.layout.WINDOWS' numbers
CLAMPED: tl.constexpr = tl.constexpr(1)
RATIO: tl.constexpr = tl.constexpr(2)


@triton.jit
def _cmax(a, b):
    # max/min of compile-time ints, written so that the interpreter takes them too
    return a * (a >= b) + b * (a < b)


@triton.jit
def _cmin(a, b):
    return a * (a <= b) + b * (a > b)


@triton.jit
def _segment(g, h, PER_G, PER_H):
    # the channels of group g that head h owns
    return _cmax(g * PER_G, h * PER_H), _cmin((g + 1) * PER_G, (h + 1) * PER_H)


@triton.jit
def _chunk_mask(o_c, c_hi, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    # an all-true mask when chunks tile the segments exactly: masks that are constant along the
    # channels let loads and atomics of contiguous channels vectorise
    if EVEN:
        return tl.full([BLOCK], 1, tl.int1)
    return o_c < c_hi


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    # fp32 `/` compiles to an approximate division (div.full.f32, up to 2 ulp): a ratio that decides
    # on which side of a pixel edge a position falls is rounded correctly, as the reference's is
    if ACC == tl.float32:
        q = tl.math.div_rn(a, b)
    else:  # one return: the compiler types every return statement, taken or not
        q = a / b
    return q


@triton.jit
def _host_float(hi, lo, ACC: tl.constexpr):
    # a float argument reaches a compiled kernel as fp32: an fp64 value is passed as the sum of two
    # fp32 halves (hi = fp32(x), lo = fp32(x - hi); 48 bits of x)
    if ACC == tl.float64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = tl.cast(hi, tl.float32)
    return x


@triton.jit
def _pixel_tile(H, W, Ho, Wo, P, win, BLOCK_P: tl.constexpr, COORD: tl.constexpr, WINDOW: tl.constexpr,
                GRID: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr):
    """This program's output pixels: flat index, mask, row and column, and per pixel the origin
    (yb, xb) and unit (uy, ux) of its positions, (yb + dy) * uy; P is int64 when offsets can pass 2**31.
    A CLAMPED window's centre is kept GRID // 2 inside the map; a RATIO window's first row and column
    come from win [first rows (Ho), first columns (Wo), ...], its centre GRID // 2 past them."""
    o_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_y = o_p // Wo
    o_x = o_p % Wo
    if INT64:
        # tl.cast, not P.to: a launch with P == 1 passes P as the constant 1
        P = tl.cast(P, tl.int64)
        o_y = o_y.to(tl.int64)
        o_x = o_x.to(tl.int64)
    if COORD == ALIGN_CORNERS:
        # align-corners ratio from output to input pixels; 0 for a single output row/column
        uy = _div((H - 1).to(ACC), tl.maximum(Ho - 1, 1).to(ACC), ACC) * (Ho > 1).to(ACC)
        ux = _div((W - 1).to(ACC), tl.maximum(Wo - 1, 1).to(ACC), ACC) * (Wo > 1).to(ACC)
        yb = o_y.to(ACC)
        xb = o_x.to(ACC)
    elif COORD == HALF_PIXEL:
        uy = 1.
        ux = 1.
        yb = (o_y.to(ACC) + 0.5) * _div(H.to(ACC), Ho.to(ACC), ACC) - 0.5
        xb = (o_x.to(ACC) + 0.5) * _div(W.to(ACC), Wo.to(ACC), ACC) - 0.5
    else:
        # F.interpolate's nearest source pixel: a correctly rounded float32 ratio, floor, clamp
        uy = 1.
        ux = 1.
        yb = tl.minimum(tl.floor(o_y.to(tl.float32) * tl.math.div_rn(H.to(tl.float32), Ho.to(tl.float32))),
                        (H - 1).to(tl.float32)).to(ACC)
        xb = tl.minimum(tl.floor(o_x.to(tl.float32) * tl.math.div_rn(W.to(tl.float32), Wo.to(tl.float32))),
                        (W - 1).to(tl.float32)).to(ACC)
    if WINDOW == CLAMPED:
        yb = tl.minimum(tl.maximum(yb, GRID // 2), H - 1 - GRID // 2)
        xb = tl.minimum(tl.maximum(xb, GRID // 2), W - 1 - GRID // 2)
    elif WINDOW == RATIO:
        yb = (tl.load(win + o_y, mask=m_p, other=0) + GRID // 2).to(ACC)
        xb = (tl.load(win + Ho + o_x, mask=m_p, other=0) + GRID // 2).to(ACC)
    return o_p, m_p, o_y, o_x, yb, xb, uy, ux, P


@triton.jit
def _pixel_offsets(o_p, o_y, o_x, s_y, s_x, FLAT: tl.constexpr):
    # a map whose rows follow each other (s_y == Wo * s_x) is addressed by the flat pixel index, which
    # the compiler knows to be contiguous: its loads and stores along the pixels can vectorise
    if FLAT:
        return o_p.to(o_y.dtype) * s_x
    return o_y * s_y + o_x * s_x


@triton.jit
def _positions(p_off, s_oc, c_oy, n, o_p, m_p, yb, xb, uy, ux, H, W,
               GRID: tl.constexpr, HAS_OFF: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr):
    """Input-pixel position (iy, ix) of neighbour n for the tile (offset channels c_oy, c_oy + 1),
    and d(iy)/d(oy), d(ix)/d(ox): the unit, zero where the border clips."""
    dy = 0.
    dx = 0.
    if GRID > 0:
        # n is a Python int in the interpreter, an int32 scalar when compiled: `* 1.` suits both
        dy = (n // GRID - GRID // 2) * 1.
        dx = (n % GRID - GRID // 2) * 1.
    if HAS_OFF:
        # [BLOCK_P]
        dy += tl.load(p_off + c_oy * s_oc + o_p, mask=m_p, other=0.).to(ACC)
        dx += tl.load(p_off + (c_oy + 1) * s_oc + o_p, mask=m_p, other=0.).to(ACC)
    iy = (yb + dy) * uy
    ix = (xb + dx) * ux
    gy = uy
    gx = ux
    if BORDER:
        hy = (H - 1).to(ACC)
        hx = (W - 1).to(ACC)
        gy = tl.where((iy > 0) & (iy < hy), uy, 0.)
        gx = tl.where((ix > 0) & (ix < hx), ux, 0.)
        # written with where, not min/max, so that NaN stays NaN
        iy = tl.where(iy <= 0, 0., tl.where(iy >= hy, hy, iy))
        ix = tl.where(ix <= 0, 0., tl.where(ix >= hx, hx, ix))
    return iy, ix, gy, gx


@triton.jit
def _corners(iy, ix, m_p, H, W, INT64: tl.constexpr):
    """Bilinear corners of each position as grid_sample(align_corners=True, padding='zeros') reads
    them: weights, validity, and the top-left corner."""
    y0f = tl.floor(iy)
    x0f = tl.floor(ix)
    ly = iy - y0f
    lx = ix - x0f
    # validity is decided on floats so that NaN/inf/huge positions never become indices
    m_y0 = (y0f >= 0) & (y0f <= H - 1)
    m_y1 = (y0f >= -1) & (y0f <= H - 2)
    m_x0 = (x0f >= 0) & (x0f <= W - 1)
    m_x1 = (x0f >= -1) & (x0f <= W - 2)
    y0 = tl.where(m_y0 | m_y1, y0f, 0.).to(tl.int32)
    x0 = tl.where(m_x0 | m_x1, x0f, 0.).to(tl.int32)
    if INT64:
        y0 = y0.to(tl.int64)
        x0 = x0.to(tl.int64)
    return 1. - ly, ly, 1. - lx, lx, m_y0 & m_p, m_y1 & m_p, m_x0, m_x1, y0, x0


@triton.jit
def _neighbour(p_off, s_oc, c_oy, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID: tl.constexpr, HAS_OFF: tl.constexpr,
               BORDER: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr):
    """_corners of neighbour n's _positions, and d(iy)/d(oy), d(ix)/d(ox)."""
    iy, ix, gy, gx = _positions(p_off, s_oc, c_oy, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, ACC)
    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0 = _corners(iy, ix, m_p, H, W, INT64)
    return hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, gy, gx


@triton.jit
def _gather4(p_x, y0, x0, o_c, m_c, s_y, s_x, m_y0, m_y1, m_x0, m_x1, EXACT: tl.constexpr, ACC: tl.constexpr):
    # [BLOCK_P, BLOCK] each; masked corners read 0 (zero padding); integer positions need one corner
    p = p_x + (y0 * s_y + x0 * s_x)[:, None] + o_c[None, :]
    x00 = tl.load(p, mask=(m_y0 & m_x0)[:, None] & m_c[None, :], other=0.).to(ACC)
    if EXACT:
        return x00, x00, x00, x00
    x01 = tl.load(p + s_x, mask=(m_y0 & m_x1)[:, None] & m_c[None, :], other=0.).to(ACC)
    x10 = tl.load(p + s_y, mask=(m_y1 & m_x0)[:, None] & m_c[None, :], other=0.).to(ACC)
    x11 = tl.load(p + s_y + s_x, mask=(m_y1 & m_x1)[:, None] & m_c[None, :], other=0.).to(ACC)
    return x00, x01, x10, x11


@triton.jit
def _blend(hy, ly, hx, lx, x00, x01, x10, x11, EXACT: tl.constexpr):
    if EXACT:
        return x00
    return hy[:, None] * (hx[:, None] * x00 + lx[:, None] * x01) + ly[:, None] * (hx[:, None] * x10 + lx[:, None] * x11)


@triton.jit
def _scatter4(p_x, y0, x0, o_c, m_c, s_y, s_x, m_y0, m_y1, m_x0, m_x1, hy, ly, hx, lx, b_g, EXACT: tl.constexpr):
    # adjoint of _gather4 + _blend: corner += weight * b_g. Relaxed: a reduction needs no ordering,
    # and the result is unused, so these compile to fire-and-forget reductions (RED), not ATOM + fences
    p = p_x + (y0 * s_y + x0 * s_x)[:, None] + o_c[None, :]
    if EXACT:
        tl.atomic_add(p, b_g, mask=(m_y0 & m_x0)[:, None] & m_c[None, :], sem="relaxed")
    else:
        tl.atomic_add(p, (hy * hx)[:, None] * b_g, mask=(m_y0 & m_x0)[:, None] & m_c[None, :], sem="relaxed")
        tl.atomic_add(p + s_x, (hy * lx)[:, None] * b_g, mask=(m_y0 & m_x1)[:, None] & m_c[None, :], sem="relaxed")
        tl.atomic_add(p + s_y, (ly * hx)[:, None] * b_g, mask=(m_y1 & m_x0)[:, None] & m_c[None, :], sem="relaxed")
        tl.atomic_add(p + s_y + s_x, (ly * lx)[:, None] * b_g, mask=(m_y1 & m_x1)[:, None] & m_c[None, :],
                      sem="relaxed")


@triton.jit
def _blend_grad(hy, ly, hx, lx, x00, x01, x10, x11, b_g):
    """d(sum_c b_g * blend)/d(iy, ix): [BLOCK_P] each."""
    gy = tl.sum(b_g * (hx[:, None] * (x10 - x00) + lx[:, None] * (x11 - x01)), axis=1)
    gx = tl.sum(b_g * (hy[:, None] * (x01 - x00) + ly[:, None] * (x11 - x10)), axis=1)
    return gy, gx


@triton.jit
def _col(b_x, o_n, n):
    # [BLOCK_P, K_PAD] -> [BLOCK_P]: column n
    return tl.sum(tl.where(o_n[None, :] == n, b_x, 0.), axis=1)


@triton.jit
def _add_col(b_x, o_n, n, b_s):
    return tl.where(o_n[None, :] == n, b_x + b_s[:, None], b_x)


@triton.jit
def _head(b_x, o_h, h):
    # [BLOCK_P, NH_PAD, K_PAD] -> [BLOCK_P, K_PAD]: head h
    return tl.sum(tl.where(o_h[None, :, None] == h, b_x, 0.), axis=1)


@triton.jit
def _add_head(b_x, o_h, h, b_s):
    return tl.where(o_h[None, :, None] == h, b_x + b_s[:, None, :], b_x)


@triton.jit(do_not_specialize=["H", "W", "Ho", "Wo"])
def upsample_fwd_kernel(
    q, k, v, off, rpb, wts, out, attn, win,
    s_qb, s_qc, s_qy, s_qx,
    s_kb, s_kc, s_ky, s_kx,
    s_vb, s_vc, s_vy, s_vx,
    s_ob, s_wb,
    H, W, Ho, Wo, P, scale_hi, scale_lo,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    NH_PAD: tl.constexpr, K_PAD: tl.constexpr, GRID: tl.constexpr, COORD: tl.constexpr, BORDER: tl.constexpr,
    WINDOW: tl.constexpr, WEIGHTS: tl.constexpr, HAS_OFF: tl.constexpr, EXACT: tl.constexpr, HAS_RPB: tl.constexpr,
    STORE_ATTN: tl.constexpr, FLAT_Q: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
):
    """v [B, C, H, W], q [B, D, Ho, Wo], k [B, D, H, W] (any strides), off [B, G*2K, P] and wts (logits
    or weights) [B, NH, K, P] (contiguous but for the batch), rpb [NH, K, D//NH], out [B, C, P],
    attn [B, NH, K, P] (the softmax, kept for the backward), win the window's table (see _pixel_tile; a
    RATIO window's rows (Ho) and columns (Wo) follow its first ones). P = Ho * Wo."""
    DG: tl.constexpr = D // G
    DH: tl.constexpr = D // NH
    CG: tl.constexpr = C // G
    CH: tl.constexpr = C // NH
    i_b = tl.program_id(1).to(tl.int64)
    scale = _host_float(scale_hi, scale_lo, ACC)
    o_p, m_p, o_y, o_x, yb, xb, uy, ux, P = _pixel_tile(H, W, Ho, Wo, P, win, BLOCK_P, COORD, WINDOW, GRID, INT64,
                                                        ACC)
    v += i_b * s_vb
    off += i_b * s_ob
    o_n = tl.arange(0, K_PAD)
    o_h = tl.arange(0, NH_PAD)
    m_hn = m_p[:, None, None] & (o_h < NH)[None, :, None] & (o_n < K)[None, None, :]
    # [BLOCK_P, NH_PAD, K_PAD]: (h, n, p) in the [NH, K, P] weight layouts
    o_a = (o_h[None, :, None] * K + o_n[None, None, :]) * P + o_p[:, None, None]

    if WEIGHTS == ATTENTION:
        q += i_b * s_qb
        k += i_b * s_kb
        o_qp = _pixel_offsets(o_p, o_y, o_x, s_qy, s_qx, FLAT_Q)
        b_l = tl.zeros([BLOCK_P, NH_PAD, K_PAD], dtype=ACC)
        for g in tl.static_range(G):
            for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
                b_lh = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
                d_lo, d_hi = _segment(g, h, DG, DH)
                for d0 in range(d_lo, d_hi, BLOCK_D):
                    o_d = d0 + tl.arange(0, BLOCK_D)
                    m_d = _chunk_mask(o_d, d_hi, BLOCK_D, EVEN_D)
                    # [BLOCK_P, BLOCK_D]
                    b_q = tl.load(q + o_qp[:, None] + o_d[None, :] * s_qc, mask=m_p[:, None] & m_d[None, :],
                                  other=0.).to(ACC) * scale
                    for n in range(K):
                        hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, _, _ = _neighbour(
                            off, P, (g * K + n) * 2, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, INT64, ACC)
                        k00, k01, k10, k11 = _gather4(k, y0, x0, o_d * s_kc, m_d, s_ky, s_kx, m_y0, m_y1, m_x0, m_x1,
                                                      EXACT, ACC)
                        b_k = _blend(hy, ly, hx, lx, k00, k01, k10, k11, EXACT)
                        if HAS_RPB:
                            b_k += tl.load(rpb + (h * K + n) * DH + o_d - h * DH, mask=m_d, other=0.).to(ACC)[None, :]
                        b_lh = _add_col(b_lh, o_n, n, tl.sum(b_q * b_k, axis=1))
                b_l = _add_head(b_l, o_h, h, b_lh)
    elif WEIGHTS == LOGITS:
        b_l = tl.load(wts + i_b * s_wb + o_a, mask=m_hn, other=0.).to(ACC)
    if WEIGHTS == ATTENTION or WEIGHTS == LOGITS:
        m_n = (o_n < K)[None, :]
        if WINDOW == RATIO:  # box positions past the pixel's rows or columns take no part
            e_y = tl.load(win + Ho + Wo + o_y, mask=m_p, other=GRID)
            e_x = tl.load(win + 2 * Ho + Wo + o_x, mask=m_p, other=GRID)
            m_n = m_n & ((o_n // GRID)[None, :] < e_y[:, None]) & ((o_n % GRID)[None, :] < e_x[:, None])
        b_l = tl.where(m_n[:, None, :], b_l, float('-inf'))
        b_a = tl.exp(b_l - tl.max(b_l, axis=2)[:, :, None])
        b_a = b_a / tl.sum(b_a, axis=2)[:, :, None]
        if STORE_ATTN:
            tl.store(attn + i_b * NH * K * P + o_a, b_a, mask=m_hn)
    elif WEIGHTS == GIVEN:
        b_a = tl.load(wts + i_b * s_wb + o_a, mask=m_hn, other=0.).to(ACC)

    out += i_b * C * P
    for g in tl.static_range(G):
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            if WEIGHTS != UNIT:
                b_ah = _head(b_a, o_h, h)
            c_lo, c_hi = _segment(g, h, CG, CH)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = _chunk_mask(o_c, c_hi, BLOCK_C, EVEN_C)
                b_o = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, _, _ = _neighbour(
                        off, P, (g * K + n) * 2, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, INT64, ACC)
                    v00, v01, v10, v11 = _gather4(v, y0, x0, o_c * s_vc, m_c, s_vy, s_vx, m_y0, m_y1, m_x0, m_x1,
                                                  EXACT, ACC)
                    b_v = _blend(hy, ly, hx, lx, v00, v01, v10, v11, EXACT)
                    if WEIGHTS == UNIT:
                        b_o += b_v
                    else:
                        b_o += _col(b_ah, o_n, n)[:, None] * b_v
                tl.store(out + o_c[None, :] * P + o_p[:, None], b_o.to(out.dtype.element_ty),
                         mask=m_p[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["H", "W", "Ho", "Wo", "n_slots"])
def upsample_bwd_kernel(
    q, k, v, off, rpb, attn, dout, dq, dk, dv, doff, drpb, dwts, tgt, cw, win,
    s_qb, s_qc, s_qy, s_qx,
    s_kb, s_kc, s_ky, s_kx,
    s_vb, s_vc, s_vy, s_vx,
    s_ob,
    s_dob, s_doc, s_doy, s_dox,
    s_dkb, s_dkc, s_dky, s_dkx,
    s_dvb, s_dvc, s_dvy, s_dvx,
    s_dqb, s_dqc, s_dqy, s_dqx,
    H, W, Ho, Wo, P, scale_hi, scale_lo, n_slots,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    NH_PAD: tl.constexpr, K_PAD: tl.constexpr, GRID: tl.constexpr, COORD: tl.constexpr, BORDER: tl.constexpr,
    WINDOW: tl.constexpr, WEIGHTS: tl.constexpr, HAS_OFF: tl.constexpr, EXACT: tl.constexpr, HAS_RPB: tl.constexpr,
    ATOMIC: tl.constexpr, FLAT_Q: tl.constexpr, FLAT_DO: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Gradients of upsample_fwd_kernel from its saved weights attn [B, NH, K, P] (the softmax, or
    the given weights; unused for UNIT). dq [B, D, Ho, Wo] (any strides), doff [B, G*2K, P] (accumulation dtype),
    drpb [n_slots, NH, K, D//NH] partial sums (zeroed; ATOMIC only: the deterministic backward sums it in
    upsample_drpb_kernel from dwts), dwts [B, NH, K, P] (the gradient of
    the logits or of the given weights; for ATTENTION, that of the logits, which the deterministic
    gather needs). With ATOMIC, dk and dv (accumulation dtype, zeroed) receive atomic scatters;
    without, every corner read is recorded instead in tgt (input pixel, -1 if outside) and cw (its
    bilinear weight), [B, G, K, 4, P], for the deterministic gather kernel."""
    DG: tl.constexpr = D // G
    DH: tl.constexpr = D // NH
    CG: tl.constexpr = C // G
    CH: tl.constexpr = C // NH
    i_b = tl.program_id(1).to(tl.int64)
    scale = _host_float(scale_hi, scale_lo, ACC)
    o_p, m_p, o_y, o_x, yb, xb, uy, ux, P = _pixel_tile(H, W, Ho, Wo, P, win, BLOCK_P, COORD, WINDOW, GRID, INT64,
                                                        ACC)
    o_dop = _pixel_offsets(o_p, o_y, o_x, s_doy, s_dox, FLAT_DO)
    v += i_b * s_vb
    off += i_b * s_ob
    dout += i_b * s_dob
    dv += i_b * s_dvb
    doff += i_b * G * 2 * K * P
    o_n = tl.arange(0, K_PAD)
    o_h = tl.arange(0, NH_PAD)
    m_hn = m_p[:, None, None] & (o_h < NH)[None, :, None] & (o_n < K)[None, None, :]
    o_a = (o_h[None, :, None] * K + o_n[None, None, :]) * P + o_p[:, None, None]
    if WEIGHTS != UNIT:
        b_a = tl.load(attn + i_b * NH * K * P + o_a, mask=m_hn, other=0.).to(ACC)

    if not ATOMIC:
        for g in tl.static_range(G):
            for n in range(K):
                hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, _, _ = _neighbour(
                    off, P, (g * K + n) * 2, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, INT64, ACC)
                p_r = (((i_b * G + g) * K + n) * 4) * P + o_p
                t00 = y0 * W + x0
                tl.store(tgt + p_r, tl.where(m_y0 & m_x0, t00, -1), mask=m_p)
                tl.store(tgt + p_r + P, tl.where(m_y0 & m_x1, t00 + 1, -1), mask=m_p)
                tl.store(tgt + p_r + 2 * P, tl.where(m_y1 & m_x0, t00 + W, -1), mask=m_p)
                tl.store(tgt + p_r + 3 * P, tl.where(m_y1 & m_x1, t00 + W + 1, -1), mask=m_p)
                tl.store(cw + p_r, hy * hx, mask=m_p)
                tl.store(cw + p_r + P, hy * lx, mask=m_p)
                tl.store(cw + p_r + 2 * P, ly * hx, mask=m_p)
                tl.store(cw + p_r + 3 * P, ly * lx, mask=m_p)

    # values: dv, d(weights), and the value part of d(offset) (stored raw, finished below)
    b_da = tl.zeros([BLOCK_P, NH_PAD, K_PAD], dtype=ACC)
    for g in tl.static_range(G):
        b_gy = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
        b_gx = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            if WEIGHTS != UNIT:
                b_ah = _head(b_a, o_h, h)
            b_dah = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
            c_lo, c_hi = _segment(g, h, CG, CH)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = _chunk_mask(o_c, c_hi, BLOCK_C, EVEN_C)
                b_do = tl.load(dout + o_dop[:, None] + o_c[None, :] * s_doc, mask=m_p[:, None] & m_c[None, :],
                               other=0.).to(ACC)
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, gy_u, gx_u = _neighbour(
                        off, P, (g * K + n) * 2, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, INT64, ACC)
                    # [BLOCK_P, BLOCK_C] gradient of the sampled values
                    if WEIGHTS == UNIT:
                        b_g = b_do
                    else:
                        b_g = _col(b_ah, o_n, n)[:, None] * b_do
                    if ATOMIC:
                        _scatter4(dv, y0, x0, o_c * s_dvc, m_c, s_dvy, s_dvx, m_y0, m_y1, m_x0, m_x1, hy, ly, hx, lx,
                                  b_g, EXACT)
                    if WEIGHTS != UNIT or HAS_OFF:
                        v00, v01, v10, v11 = _gather4(v, y0, x0, o_c * s_vc, m_c, s_vy, s_vx, m_y0, m_y1, m_x0,
                                                      m_x1, EXACT, ACC)
                    if WEIGHTS != UNIT:
                        b_v = _blend(hy, ly, hx, lx, v00, v01, v10, v11, EXACT)
                        b_dah = _add_col(b_dah, o_n, n, tl.sum(b_do * b_v, axis=1))
                    if HAS_OFF:
                        gy, gx = _blend_grad(hy, ly, hx, lx, v00, v01, v10, v11, b_g)
                        b_gy = _add_col(b_gy, o_n, n, gy * gy_u)
                        b_gx = _add_col(b_gx, o_n, n, gx * gx_u)
            b_da = _add_head(b_da, o_h, h, b_dah)
        if HAS_OFF:
            p_doff = doff + (g * K + o_n[None, :]) * 2 * P + o_p[:, None]
            m_doff = m_p[:, None] & (o_n < K)[None, :]
            tl.store(p_doff, b_gy, mask=m_doff)
            tl.store(p_doff + P, b_gx, mask=m_doff)

    if WEIGHTS == GIVEN:
        tl.store(dwts + i_b * NH * K * P + o_a, b_da, mask=m_hn)
    if WEIGHTS == ATTENTION or WEIGHTS == LOGITS:
        # softmax backward; for attention the logit scale is folded in
        b_ds = b_a * (b_da - tl.sum(b_a * b_da, axis=2)[:, :, None])
        if WEIGHTS == ATTENTION:
            b_ds = b_ds * scale
        if WEIGHTS == LOGITS or not ATOMIC:
            tl.store(dwts + i_b * NH * K * P + o_a, b_ds, mask=m_hn)

    if WEIGHTS == ATTENTION:
        # keys: dq, dk, drpb, and the key part of d(offset); the value part stored above is read
        # back by other threads of this program
        tl.debug_barrier()
        o_qp = _pixel_offsets(o_p, o_y, o_x, s_qy, s_qx, FLAT_Q)
        q += i_b * s_qb
        k += i_b * s_kb
        dk += i_b * s_dkb
        dq += i_b * s_dqb
        o_dqp = _pixel_offsets(o_p, o_y, o_x, s_dqy, s_dqx, FLAT_Q)
        # programs share n_slots partial sums, so that the scratch stays K * D per slot whatever the
        # output size; neighbouring tiles land on different slots
        i_s = (tl.program_id(0) + tl.program_id(1)) % n_slots
        for g in tl.static_range(G):
            p_doff = doff + (g * K + o_n[None, :]) * 2 * P + o_p[:, None]
            m_doff = m_p[:, None] & (o_n < K)[None, :]
            if HAS_OFF:
                b_gy = tl.load(p_doff, mask=m_doff, other=0.)
                b_gx = tl.load(p_doff + P, mask=m_doff, other=0.)
            for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
                b_dsh = _head(b_ds, o_h, h)
                d_lo, d_hi = _segment(g, h, DG, DH)
                for d0 in range(d_lo, d_hi, BLOCK_D):
                    o_d = d0 + tl.arange(0, BLOCK_D)
                    m_d = _chunk_mask(o_d, d_hi, BLOCK_D, EVEN_D)
                    b_q = tl.load(q + o_qp[:, None] + o_d[None, :] * s_qc, mask=m_p[:, None] & m_d[None, :],
                                  other=0.).to(ACC)
                    b_dq = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
                    for n in range(K):
                        hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0, gy_u, gx_u = _neighbour(
                            off, P, (g * K + n) * 2, n, o_p, m_p, yb, xb, uy, ux, H, W, GRID, HAS_OFF, BORDER, INT64, ACC)
                        k00, k01, k10, k11 = _gather4(k, y0, x0, o_d * s_kc, m_d, s_ky, s_kx, m_y0, m_y1, m_x0, m_x1,
                                                      EXACT, ACC)
                        b_k = _blend(hy, ly, hx, lx, k00, k01, k10, k11, EXACT)
                        b_dsn = _col(b_dsh, o_n, n)
                        # [BLOCK_P, BLOCK_D] gradient of the sampled keys (+ rpb)
                        b_g = b_dsn[:, None] * b_q
                        if HAS_RPB:
                            o_r = (h * K + n) * DH + o_d - h * DH
                            b_k += tl.load(rpb + o_r, mask=m_d, other=0.).to(ACC)[None, :]
                            if ATOMIC:
                                tl.atomic_add(drpb + i_s * NH * K * DH + o_r, tl.sum(b_g, axis=0), mask=m_d,
                                              sem="relaxed")
                        b_dq += b_dsn[:, None] * b_k
                        if ATOMIC:
                            _scatter4(dk, y0, x0, o_d * s_dkc, m_d, s_dky, s_dkx, m_y0, m_y1, m_x0, m_x1,
                                      hy, ly, hx, lx, b_g, EXACT)
                        if HAS_OFF:
                            gy, gx = _blend_grad(hy, ly, hx, lx, k00, k01, k10, k11, b_g)
                            b_gy = _add_col(b_gy, o_n, n, gy * gy_u)
                            b_gx = _add_col(b_gx, o_n, n, gx * gx_u)
                    tl.store(dq + o_dqp[:, None] + o_d[None, :] * s_dqc, b_dq.to(dq.dtype.element_ty),
                             mask=m_p[:, None] & m_d[None, :])
            if HAS_OFF:
                tl.store(p_doff, b_gy, mask=m_doff)
                tl.store(p_doff + P, b_gx, mask=m_doff)


@triton.jit
def _fixed_order_sum(grad, p_w, src_p, src_n, src_w, x, s_xc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                     CH: tl.constexpr, CG: tl.constexpr, C: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
                     HAS_W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
                     ACC: tl.constexpr):
    """grad[b, c, t] = sum over entries e of src_w[e] * w[b, head(c), src_n[e], src_p[e]] * x[b, c, src_p[e]]
    for the CG channels of group i_g, entries in order. w is the attention or the given weights (for
    dv; 1 without HAS_W) or the softmax gradient (for dk); x is dout or q."""
    p_w += i_b * NH * K * P
    for c0 in range(0, CG, BLOCK_C):
        o_c = (i_g * CG + c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        m_c = o_c < (i_g + 1) * CG
        b_acc = tl.zeros([BLOCK_C], dtype=ACC)
        for e0 in range(e_lo, e_hi, BLOCK_E):
            o_e = e0 + tl.arange(0, BLOCK_E)
            m_e = o_e < e_hi
            # [BLOCK_E]
            b_p = tl.load(src_p + o_e, mask=m_e, other=0).to(tl.int64)
            b_sw = tl.load(src_w + o_e, mask=m_e, other=0.)
            m = m_e[:, None] & m_c[None, :]
            # [BLOCK_E, BLOCK_C]
            b_x = tl.load(x + o_c[None, :] * s_xc + b_p[:, None], mask=m, other=0.).to(ACC)
            if HAS_W:
                b_n = tl.load(src_n + o_e, mask=m_e, other=0)
                if INT64:  # (n * P + p) of a [K, P] weight plane past 2**31
                    b_n = b_n.to(tl.int64)
                b_x *= tl.load(p_w + ((o_c // CH) * K)[None, :] * P + (b_n * P + b_p)[:, None], mask=m, other=0.)
            b_acc += tl.sum(b_sw[:, None] * b_x, axis=0)
        tl.store(grad + (i_b * C + o_c) * HW + i_t, b_acc, mask=m_c)


@triton.jit
def upsample_bwd_gather_kernel(
    row_ptr, src_p, src_n, src_w, q, dout, attn, ds, dk, dv,
    s_qb, s_qc, s_dob, s_doc,
    HW, P,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    HAS_W: tl.constexpr, HAS_K: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    """Deterministic dk/dv: one program per (batch, group, input pixel) sums every (output pixel,
    neighbour, corner) that sampled it, BLOCK_E at a time in a fixed order. row_ptr [B*G*HW + 1]
    indexes src_* sorted by target. dk [B, D, HW], dv [B, C, HW]; q [B, D, P] and dout [B, C, P]
    with pixel stride 1. Channel offsets are int64: this path is not the hot one; INT64 widens the
    weight planes' offsets too."""
    i_r = tl.program_id(0)
    i_t = i_r % HW
    i_g = (i_r // HW) % G
    i_b = (i_r // (HW * G)).to(tl.int64)
    e_lo = tl.load(row_ptr + i_r)
    e_hi = tl.load(row_ptr + i_r + 1)
    _fixed_order_sum(dv, attn, src_p, src_n, src_w, dout + i_b * s_dob, s_doc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                     C // NH, C // G, C, NH, K, HAS_W, BLOCK_E, BLOCK_C, INT64, ACC)
    if HAS_K:
        _fixed_order_sum(dk, ds, src_p, src_n, src_w, q + i_b * s_qb, s_qc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                         D // NH, D // G, D, NH, K, True, BLOCK_E, BLOCK_D, INT64, ACC)


@triton.jit(do_not_specialize=["B", "P", "n_pt", "per_slot"])  # B = 1 must stay a tensor: .to() below
def upsample_drpb_kernel(
    ds, q, part, s_qb, s_qc, s_qp, B, P, n_pt, per_slot,
    NH: tl.constexpr, K: tl.constexpr, DH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Deterministic drpb: part[s, h, n, d] = sum of ds[b, h, n, p] * q[b, h*DH + d, p] over the
    per_slot (batch, pixel tile) units of slot s, summed in a fixed order (the caller sums the slots).
    ds [B, NH, K, P] is the scaled softmax gradient, q [B, NH*DH, P] with pixel stride s_qp."""
    i_hn = tl.program_id(0)
    i_d = tl.program_id(1)
    i_s = tl.program_id(2)
    h = i_hn // K
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < DH
    b_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
    u_lo = i_s.to(tl.int64) * per_slot
    u_hi = tl.minimum(u_lo + per_slot, B.to(tl.int64) * n_pt)
    for u in range(u_lo, u_hi):
        i_b = u // n_pt
        o_p = (u % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        # [BLOCK_P]
        b_ds = tl.load(ds + (i_b * NH * K + i_hn) * P + o_p, mask=m_p, other=0.).to(ACC)
        # [BLOCK_P, BLOCK_D]
        b_q = tl.load(q + i_b * s_qb + (h * DH + o_d)[None, :] * s_qc + o_p[:, None] * s_qp,
                      mask=m_p[:, None] & m_d[None, :], other=0.).to(ACC)
        b_acc += b_ds[:, None] * b_q
    tl.store(part + (i_s * NH * K + i_hn) * DH + o_d, tl.sum(b_acc, axis=0), mask=m_d)
