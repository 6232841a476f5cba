"""Fused Triton kernels for offset-sampled local attention (LDA-AQU steps 4-5).

Every program owns one batch element and a tile of BLOCK_P output pixels. Channels are walked
in *segments*: the intersection of one offset group g with one head h, so that each segment
has one set of sample positions (its group's) and one softmax (its head's). A segment is
walked in chunks of BLOCK_D (keys) or BLOCK_C (values) channels. The K sampled copies of k
and v are never written: each neighbour is gathered from the four bilinear corners, used and
dropped.

Per-pixel, per-head state over the K neighbours (logits, attention, their gradients) lives in
registers as [BLOCK_P, NH_PAD, K_PAD] tiles; a neighbour's column is read or updated with a
masked reduction, which is cheap next to the 4 * BLOCK channel gathers it goes with.
"""
import triton
import triton.language as tl


@triton.jit
def _cmax(a, b):
    # max/min of compile-time ints, written so that the interpreter takes them too
    return a * (a >= b) + b * (a < b)


@triton.jit
def _cmin(a, b):
    return a * (a <= b) + b * (a > b)


@triton.jit
def _bilinear_setup(p_off, o_p, m_p, yf, xf, rh, rw, H, W, P, c_oy, INT64: tl.constexpr, ACC: tl.constexpr):
    """Sample position of one (group, neighbour) for a tile of pixels, as grid_sample(align_corners=True,
    padding='zeros') sees it: corner weights, corner validity, and the top-left corner. The offsets
    are [G*2K, P] with channel c_oy the y and c_oy + 1 the x offset."""
    # [BLOCK_P]
    oy = tl.load(p_off + c_oy * P + o_p, mask=m_p, other=0.).to(ACC)
    ox = tl.load(p_off + (c_oy + 1) * P + o_p, mask=m_p, other=0.).to(ACC)
    iy = (yf + oy) * rh
    ix = (xf + ox) * rw
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
def _gather4(p_x, y0, x0, o_c, m_c, s_y, s_x, m_y0, m_y1, m_x0, m_x1, ACC: tl.constexpr):
    # [BLOCK_P, BLOCK] each; masked corners read 0 (zero padding)
    p = p_x + (y0 * s_y + x0 * s_x)[:, None] + o_c[None, :]
    x00 = tl.load(p, mask=(m_y0 & m_x0)[:, None] & m_c[None, :], other=0.).to(ACC)
    x01 = tl.load(p + s_x, mask=(m_y0 & m_x1)[:, None] & m_c[None, :], other=0.).to(ACC)
    x10 = tl.load(p + s_y, mask=(m_y1 & m_x0)[:, None] & m_c[None, :], other=0.).to(ACC)
    x11 = tl.load(p + s_y + s_x, mask=(m_y1 & m_x1)[:, None] & m_c[None, :], other=0.).to(ACC)
    return x00, x01, x10, x11


@triton.jit
def _scatter4(p_x, y0, x0, o_c, m_c, s_y, s_x, m_y0, m_y1, m_x0, m_x1, hy, ly, hx, lx, b_g):
    # adjoint of _gather4 + _blend: corner += weight * b_g
    p = p_x + (y0 * s_y + x0 * s_x)[:, None] + o_c[None, :]
    tl.atomic_add(p, (hy * hx)[:, None] * b_g, mask=(m_y0 & m_x0)[:, None] & m_c[None, :])
    tl.atomic_add(p + s_x, (hy * lx)[:, None] * b_g, mask=(m_y0 & m_x1)[:, None] & m_c[None, :])
    tl.atomic_add(p + s_y, (ly * hx)[:, None] * b_g, mask=(m_y1 & m_x0)[:, None] & m_c[None, :])
    tl.atomic_add(p + s_y + s_x, (ly * lx)[:, None] * b_g, mask=(m_y1 & m_x1)[:, None] & m_c[None, :])


@triton.jit
def _blend(hy, ly, hx, lx, x00, x01, x10, x11):
    return hy[:, None] * (hx[:, None] * x00 + lx[:, None] * x01) + ly[:, None] * (hx[:, None] * x10 + lx[:, None] * x11)


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


@triton.jit
def _pixel_tile(H, W, Ho, Wo, BLOCK_P: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr):
    """This program's output pixels: flat index, mask, row and column (as indices and as floats),
    the align-corners ratios, and the pixel count P (int64 when offsets can pass 2**31)."""
    P = Ho * Wo
    o_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_y = o_p // Wo
    o_x = o_p % Wo
    if INT64:
        P = P.to(tl.int64)
        o_y = o_y.to(tl.int64)
        o_x = o_x.to(tl.int64)
    # align-corners ratio from output to input pixels; 0 for a single output row/column
    rh = (H - 1).to(ACC) / tl.maximum(Ho - 1, 1).to(ACC) * (Ho > 1).to(ACC)
    rw = (W - 1).to(ACC) / tl.maximum(Wo - 1, 1).to(ACC) * (Wo > 1).to(ACC)
    return o_p, m_p, o_y, o_x, o_y.to(ACC), o_x.to(ACC), rh, rw, P


@triton.jit(do_not_specialize=["H", "W", "Ho", "Wo"])
def dla_fwd_kernel(
    q, k, v, off, rpb, out, attn,
    s_qb, s_qc, s_qy, s_qx,
    s_kb, s_kc, s_ky, s_kx,
    s_vb, s_vc, s_vy, s_vx,
    s_ob,
    H, W, Ho, Wo, scale,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    NH_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_RPB: tl.constexpr, STORE_ATTN: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    """q [B, D, Ho, Wo], k [B, D, H, W], v [B, C, H, W] (any strides), off [B, G*2K, Ho*Wo] (contiguous
    but for the batch), rpb [NH, K, D//NH], out [B, C, Ho*Wo], attn [B, NH, K, Ho*Wo]."""
    DG: tl.constexpr = D // G
    DH: tl.constexpr = D // NH
    CG: tl.constexpr = C // G
    CH: tl.constexpr = C // NH
    i_b = tl.program_id(1).to(tl.int64)
    o_p, m_p, o_y, o_x, yf, xf, rh, rw, P = _pixel_tile(H, W, Ho, Wo, BLOCK_P, INT64, ACC)
    o_qp = o_y * s_qy + o_x * s_qx
    q += i_b * s_qb
    k += i_b * s_kb
    v += i_b * s_vb
    off += i_b * s_ob
    o_n = tl.arange(0, K_PAD)
    o_h = tl.arange(0, NH_PAD)

    # logits [BLOCK_P, NH_PAD, K_PAD]
    b_l = tl.zeros([BLOCK_P, NH_PAD, K_PAD], dtype=ACC)
    for g in tl.static_range(G):
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            b_lh = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
            d_lo = _cmax(g * DG, h * DH)
            d_hi = _cmin((g + 1) * DG, (h + 1) * DH)
            for d0 in range(d_lo, d_hi, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < d_hi
                # [BLOCK_P, BLOCK_D]
                b_q = tl.load(q + o_qp[:, None] + o_d[None, :] * s_qc, mask=m_p[:, None] & m_d[None, :],
                              other=0.).to(ACC) * scale
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0 = _bilinear_setup(
                        off, o_p, m_p, yf, xf, rh, rw, H, W, P, (g * K + n) * 2, INT64, ACC)
                    k00, k01, k10, k11 = _gather4(k, y0, x0, o_d * s_kc, m_d, s_ky, s_kx, m_y0, m_y1, m_x0, m_x1, ACC)
                    b_k = _blend(hy, ly, hx, lx, k00, k01, k10, k11)
                    if HAS_RPB:
                        b_k += tl.load(rpb + (h * K + n) * DH + o_d - h * DH, mask=m_d, other=0.).to(ACC)[None, :]
                    b_lh = _add_col(b_lh, o_n, n, tl.sum(b_q * b_k, axis=1))
            b_l = _add_head(b_l, o_h, h, b_lh)

    b_l = tl.where((o_n < K)[None, None, :], b_l, float('-inf'))
    b_a = tl.exp(b_l - tl.max(b_l, axis=2)[:, :, None])
    b_a = b_a / tl.sum(b_a, axis=2)[:, :, None]
    if STORE_ATTN:
        p_a = attn + i_b * NH * K * P + (o_h[None, :, None] * K + o_n[None, None, :]) * P + o_p[:, None, None]
        tl.store(p_a, b_a, mask=m_p[:, None, None] & (o_h < NH)[None, :, None] & (o_n < K)[None, None, :])

    out += i_b * C * P
    for g in tl.static_range(G):
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            b_ah = _head(b_a, o_h, h)
            c_lo = _cmax(g * CG, h * CH)
            c_hi = _cmin((g + 1) * CG, (h + 1) * CH)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = o_c < c_hi
                b_o = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0 = _bilinear_setup(
                        off, o_p, m_p, yf, xf, rh, rw, H, W, P, (g * K + n) * 2, INT64, ACC)
                    v00, v01, v10, v11 = _gather4(v, y0, x0, o_c * s_vc, m_c, s_vy, s_vx, m_y0, m_y1, m_x0, m_x1, ACC)
                    b_o += _col(b_ah, o_n, n)[:, None] * _blend(hy, ly, hx, lx, v00, v01, v10, v11)
                tl.store(out + o_c[None, :] * P + o_p[:, None], b_o.to(out.dtype.element_ty),
                         mask=m_p[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["H", "W", "Ho", "Wo"])
def dla_bwd_kernel(
    q, k, v, off, rpb, attn, dout, dq, dk, dv, doff, drpb, ds,
    s_qb, s_qc, s_qy, s_qx,
    s_kb, s_kc, s_ky, s_kx,
    s_vb, s_vc, s_vy, s_vx,
    s_ob,
    s_dob, s_doc, s_doy, s_dox,
    s_dkb, s_dkc, s_dky, s_dkx,
    s_dvb, s_dvc, s_dvy, s_dvx,
    H, W, Ho, Wo, scale,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    NH_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_RPB: tl.constexpr, ATOMIC: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
):
    """Gradients of dla_fwd_kernel from the saved attention. dq [B, D, Ho*Wo], doff [B, G*2K, Ho*Wo]
    (accumulation dtype), drpb [B * n_tiles, NH, K, D//NH] per-program partial sums. With ATOMIC,
    dk and dv (accumulation dtype, zeroed) receive atomic scatters; without, the softmax
    gradient ds [B, NH, K, Ho*Wo] is stored instead for the deterministic gather kernel."""
    DG: tl.constexpr = D // G
    DH: tl.constexpr = D // NH
    CG: tl.constexpr = C // G
    CH: tl.constexpr = C // NH
    i_b = tl.program_id(1).to(tl.int64)
    o_p, m_p, o_y, o_x, yf, xf, rh, rw, P = _pixel_tile(H, W, Ho, Wo, BLOCK_P, INT64, ACC)
    o_qp = o_y * s_qy + o_x * s_qx
    o_dop = o_y * s_doy + o_x * s_dox
    q += i_b * s_qb
    k += i_b * s_kb
    v += i_b * s_vb
    off += i_b * s_ob
    dout += i_b * s_dob
    dk += i_b * s_dkb
    dv += i_b * s_dvb
    dq += i_b * D * P
    doff += i_b * G * 2 * K * P
    o_n = tl.arange(0, K_PAD)
    o_h = tl.arange(0, NH_PAD)
    m_hn = (o_h < NH)[None, :, None] & (o_n < K)[None, None, :]
    o_a = (o_h[None, :, None] * K + o_n[None, None, :]) * P + o_p[:, None, None]
    b_a = tl.load(attn + i_b * NH * K * P + o_a, mask=m_p[:, None, None] & m_hn, other=0.).to(ACC)

    # values: dv, d(attention), and the value part of d(offset) (stored raw, finished below)
    b_da = tl.zeros([BLOCK_P, NH_PAD, K_PAD], dtype=ACC)
    for g in tl.static_range(G):
        b_gy = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
        b_gx = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            b_ah = _head(b_a, o_h, h)
            b_dah = tl.zeros([BLOCK_P, K_PAD], dtype=ACC)
            c_lo = _cmax(g * CG, h * CH)
            c_hi = _cmin((g + 1) * CG, (h + 1) * CH)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = o_c < c_hi
                b_do = tl.load(dout + o_dop[:, None] + o_c[None, :] * s_doc, mask=m_p[:, None] & m_c[None, :],
                               other=0.).to(ACC)
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0 = _bilinear_setup(
                        off, o_p, m_p, yf, xf, rh, rw, H, W, P, (g * K + n) * 2, INT64, ACC)
                    v00, v01, v10, v11 = _gather4(v, y0, x0, o_c * s_vc, m_c, s_vy, s_vx, m_y0, m_y1, m_x0, m_x1, ACC)
                    b_v = _blend(hy, ly, hx, lx, v00, v01, v10, v11)
                    b_dah = _add_col(b_dah, o_n, n, tl.sum(b_do * b_v, axis=1))
                    # [BLOCK_P, BLOCK_C] gradient of the sampled values
                    b_g = _col(b_ah, o_n, n)[:, None] * b_do
                    if ATOMIC:
                        _scatter4(dv, y0, x0, o_c * s_dvc, m_c, s_dvy, s_dvx, m_y0, m_y1, m_x0, m_x1, hy, ly, hx, lx,
                                  b_g)
                    gy, gx = _blend_grad(hy, ly, hx, lx, v00, v01, v10, v11, b_g)
                    b_gy = _add_col(b_gy, o_n, n, gy)
                    b_gx = _add_col(b_gx, o_n, n, gx)
            b_da = _add_head(b_da, o_h, h, b_dah)
        p_doff = doff + (g * K + o_n[None, :]) * 2 * P + o_p[:, None]
        m_doff = m_p[:, None] & (o_n < K)[None, :]
        tl.store(p_doff, b_gy, mask=m_doff)
        tl.store(p_doff + P, b_gx, mask=m_doff)

    # softmax backward; scale folded in
    b_ds = b_a * (b_da - tl.sum(b_a * b_da, axis=2)[:, :, None]) * scale
    if not ATOMIC:
        tl.store(ds + i_b * NH * K * P + o_a, b_ds, mask=m_p[:, None, None] & m_hn)
    # the value part of doff above is read back by other threads of this program
    tl.debug_barrier()

    # keys: dq, dk, drpb, and the key part of d(offset)
    i_t = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    for g in tl.static_range(G):
        p_doff = doff + (g * K + o_n[None, :]) * 2 * P + o_p[:, None]
        m_doff = m_p[:, None] & (o_n < K)[None, :]
        b_gy = tl.load(p_doff, mask=m_doff, other=0.)
        b_gx = tl.load(p_doff + P, mask=m_doff, other=0.)
        for h in tl.static_range((g * NH) // G, ((g + 1) * NH + G - 1) // G):
            b_dsh = _head(b_ds, o_h, h)
            d_lo = _cmax(g * DG, h * DH)
            d_hi = _cmin((g + 1) * DG, (h + 1) * DH)
            for d0 in range(d_lo, d_hi, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < d_hi
                b_q = tl.load(q + o_qp[:, None] + o_d[None, :] * s_qc, mask=m_p[:, None] & m_d[None, :],
                              other=0.).to(ACC)
                b_dq = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
                for n in range(K):
                    hy, ly, hx, lx, m_y0, m_y1, m_x0, m_x1, y0, x0 = _bilinear_setup(
                        off, o_p, m_p, yf, xf, rh, rw, H, W, P, (g * K + n) * 2, INT64, ACC)
                    k00, k01, k10, k11 = _gather4(k, y0, x0, o_d * s_kc, m_d, s_ky, s_kx, m_y0, m_y1, m_x0, m_x1, ACC)
                    b_k = _blend(hy, ly, hx, lx, k00, k01, k10, k11)
                    b_dsn = _col(b_dsh, o_n, n)
                    # [BLOCK_P, BLOCK_D] gradient of the sampled keys (+ rpb)
                    b_g = b_dsn[:, None] * b_q
                    if HAS_RPB:
                        o_r = (h * K + n) * DH + o_d - h * DH
                        b_k += tl.load(rpb + o_r, mask=m_d, other=0.).to(ACC)[None, :]
                        tl.store(drpb + i_t * NH * K * DH + o_r, tl.sum(b_g, axis=0), mask=m_d)
                    b_dq += b_dsn[:, None] * b_k
                    if ATOMIC:
                        _scatter4(dk, y0, x0, o_d * s_dkc, m_d, s_dky, s_dkx, m_y0, m_y1, m_x0, m_x1, hy, ly, hx, lx,
                                  b_g)
                    gy, gx = _blend_grad(hy, ly, hx, lx, k00, k01, k10, k11, b_g)
                    b_gy = _add_col(b_gy, o_n, n, gy)
                    b_gx = _add_col(b_gx, o_n, n, gx)
                tl.store(dq + o_d[None, :] * P + o_p[:, None], b_dq.to(dq.dtype.element_ty),
                         mask=m_p[:, None] & m_d[None, :])
        tl.store(p_doff, b_gy * rh, mask=m_doff)
        tl.store(p_doff + P, b_gx * rw, mask=m_doff)


@triton.jit
def _fixed_order_sum(grad, b_w_ptr, src_p, src_n, src_w, x, s_xc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                     CH: tl.constexpr, CG: tl.constexpr, C: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """grad[b, c, t] = sum over entries e of src_w[e] * b_w[b, head(c), src_n[e], src_p[e]] * x[b, c, src_p[e]]
    for the CG channels of group i_g, entries in order. b_w is the attention (for dv) or the
    softmax gradient (for dk); x is dout or q."""
    b_w_ptr += i_b * NH * K * P
    for c0 in range(0, CG, BLOCK_C):
        o_c = (i_g * CG + c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        m_c = o_c < (i_g + 1) * CG
        b_acc = tl.zeros([BLOCK_C], dtype=ACC)
        for e0 in range(e_lo, e_hi, BLOCK_E):
            o_e = e0 + tl.arange(0, BLOCK_E)
            m_e = o_e < e_hi
            # [BLOCK_E]
            b_p = tl.load(src_p + o_e, mask=m_e, other=0).to(tl.int64)
            b_n = tl.load(src_n + o_e, mask=m_e, other=0)
            b_sw = tl.load(src_w + o_e, mask=m_e, other=0.)
            m = m_e[:, None] & m_c[None, :]
            # [BLOCK_E, BLOCK_C]
            b_a = tl.load(b_w_ptr + ((o_c // CH) * K)[None, :] * P + (b_n * P + b_p)[:, None], mask=m, other=0.)
            b_x = tl.load(x + o_c[None, :] * s_xc + b_p[:, None], mask=m, other=0.).to(ACC)
            b_acc += tl.sum(b_sw[:, None] * b_a * b_x, axis=0)
        tl.store(grad + (i_b * C + o_c) * HW + i_t, b_acc, mask=m_c)


@triton.jit
def dla_bwd_kv_gather_kernel(
    row_ptr, src_p, src_n, src_w, q, dout, attn, ds, dk, dv,
    s_qb, s_qc, s_dob, s_doc,
    HW, P,
    D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, K: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Deterministic dk/dv: one program per (batch, group, input pixel) sums every (output pixel,
    neighbour, corner) that sampled it, BLOCK_E at a time in a fixed order. row_ptr [B*G*HW + 1]
    indexes src_* sorted by target. dk [B, D, HW], dv [B, C, HW]; q [B, D, P] and dout [B, C, P]
    with pixel stride 1. Channel offsets are int64: this path is not the hot one."""
    i_r = tl.program_id(0)
    i_t = i_r % HW
    i_g = (i_r // HW) % G
    i_b = (i_r // (HW * G)).to(tl.int64)
    e_lo = tl.load(row_ptr + i_r)
    e_hi = tl.load(row_ptr + i_r + 1)
    _fixed_order_sum(dv, attn, src_p, src_n, src_w, dout + i_b * s_dob, s_doc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                     C // NH, C // G, C, NH, K, BLOCK_E, BLOCK_C, ACC)
    _fixed_order_sum(dk, ds, src_p, src_n, src_w, q + i_b * s_qb, s_qc, e_lo, e_hi, i_b, i_g, i_t, HW, P,
                     D // NH, D // G, D, NH, K, BLOCK_E, BLOCK_D, ACC)
