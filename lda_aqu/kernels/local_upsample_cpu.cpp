// The CPU kernels of local_upsample (the torch path's native form): one pass over the output pixels,
// positions, bilinear corners and weights computed once per pixel and reused across its channels, the
// K samples never materialised. Plain C ABI (no torch headers: it builds in a second with g++), called
// through ctypes by kernels/cpu.py, which also says what every array holds.
//
// Determinism without atomics: every per-pixel result is written by the thread owning the pixel; the
// transposed gathers (dv, dk) are scattered in a second pass split by channel, so each element sums
// its contributions in one fixed order (pixel, neighbour, corner) whatever the thread count.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

struct Problem {
  int64_t B, C, H, W, Ho, Wo, G, NH, K, Dq;
  int64_t mode;        // 0: unit weights, 1: given weights, 2: given logits, 3: attention
  int64_t align;       // positions (origin + offset) * unit: offsets in output pixels
  int64_t exact;       // integer positions (nearest, no offsets): the pixel alone
  int64_t border;      // grid_sample's border padding, else zeros
  int64_t has_offset, has_rpb, n_threads, chunk_pixels;
  int64_t n_seg, n_qseg;
  double unit_y, unit_x, scale;
  const int64_t *seg, *qseg;   // [n, 4] (group, head, first channel, end channel)
  const void *y0, *x0, *base;  // [Ho], [Wo] origins; [K, 2] window
  const void *v, *offset, *q, *k, *rpb, *given;
  void *out, *w;
  const void *dout;
  void *dv, *dk, *dq, *dlogit, *dw, *doffset;
  int64_t need_v, need_offset, need_q, need_k, need_weights;
  int64_t grid;                // the window's side: neighbour n is (n / grid, n % grid) of it
  const int32_t *ey, *ex;      // [Ho], [Wo] rows and columns of a "ratio" window, or null: all K
};

// Problem's fields in order: lu_problem_layout reports each one's offset, size and kind, and
// kernels/cpu.py refuses a library whose Problem differs from its ctypes copy (a drifted field would
// otherwise read and write through the wrong pointers). The assert keeps this list complete.
#define LU_PROBLEM_FIELDS(X)                                                                            \
  X(B) X(C) X(H) X(W) X(Ho) X(Wo) X(G) X(NH) X(K) X(Dq) X(mode) X(align) X(exact) X(border) X(has_offset) \
  X(has_rpb) X(n_threads) X(chunk_pixels) X(n_seg) X(n_qseg) X(unit_y) X(unit_x) X(scale) X(seg) X(qseg) \
  X(y0) X(x0) X(base) X(v) X(offset) X(q) X(k) X(rpb) X(given) X(out) X(w) X(dout) X(dv) X(dk) X(dq)     \
  X(dlogit) X(dw) X(doffset) X(need_v) X(need_offset) X(need_q) X(need_k) X(need_weights) X(grid) X(ey) X(ex)
#define LU_FIELD_SIZE(f) +sizeof(Problem::f)
static_assert(0 LU_PROBLEM_FIELDS(LU_FIELD_SIZE) == sizeof(Problem), "a field of Problem is missing above");
#undef LU_FIELD_SIZE

template <class F>
std::string field_layout(const char* name, size_t offset) {
  const char kind = std::is_pointer_v<F> ? 'p' : std::is_floating_point_v<F> ? 'f' : 'i';
  return std::string(name) + ":" + std::to_string(offset) + ":" + std::to_string(sizeof(F)) + ":" + kind + ",";
}

// Channel loops on 32-byte vectors (GCC/Clang vector extensions: the compiler's ISA, no intrinsics),
// four of them in registers at a time; each lane sums in the pairs' order, so results do not depend on
// how the channels are split.
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(T);
};

template <class T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

template <class T>
inline void store(T* p, typename Vec<T>::type x) {
  std::memcpy(p, &x, sizeof x);
}

// dst[0:n] = sum_r coef[r] * rows[r][c0:c0+n]
template <class T>
inline void combine(T* dst, const T* const* rows, const T* coef, int64_t nr, int64_t c0, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  int64_t c = 0;
  for (; c + 4 * L <= n; c += 4 * L) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t r = 0; r < nr; r++) {
      const T* s = rows[r] + c0 + c;
      const T w = coef[r];
      a0 += w * load(s), a1 += w * load(s + L), a2 += w * load(s + 2 * L), a3 += w * load(s + 3 * L);
    }
    store(dst + c, a0), store(dst + c + L, a1), store(dst + c + 2 * L, a2), store(dst + c + 3 * L, a3);
  }
  for (; c + L <= n; c += L) {
    V a = {};
    for (int64_t r = 0; r < nr; r++) a += coef[r] * load(rows[r] + c0 + c);
    store(dst + c, a);
  }
  for (; c < n; c++) {
    T a = 0;
    for (int64_t r = 0; r < nr; r++) a += coef[r] * rows[r][c0 + c];
    dst[c] = a;
  }
}

// the lanes' sum as a pairwise tree (depth log2 L, not L: dots are latency-bound)
template <class T>
inline T hsum(typename Vec<T>::type v) {
  if constexpr (Vec<T>::L == 8) {  // lane l += lane l + w, for w = 4, 2, 1: in registers
    typedef int32_t M __attribute__((vector_size(32)));
    v += __builtin_shuffle(v, M{4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, M{2, 3, 0, 1, 6, 7, 4, 5});
    v += __builtin_shuffle(v, M{1, 0, 3, 2, 5, 4, 7, 6});
  } else {
    typedef int64_t M __attribute__((vector_size(32)));
    v += __builtin_shuffle(v, M{2, 3, 0, 1});
    v += __builtin_shuffle(v, M{1, 0, 3, 2});
  }
  return v[0];
}

template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V part = {};
  int64_t c = 0;
  for (; c + L <= n; c += L) part += load(a + c) * load(b + c);
  T s = 0;
  for (; c < n; c++) s += a[c] * b[c];
  return s + hsum<T>(part);
}

// out[q] = sum_r coefs[q][r] * (d . rows[r][c0:c0+n]) for NQ coefficient sets over the same rows (the
// bilinear weights and their derivatives): each row is read once, one horizontal sum per set
template <class T, int NQ>
inline void sampled_dots(const T* d, const T* const* rows, const T* const (&coefs)[NQ], int64_t nr, int64_t c0,
                         int64_t n, T* out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V acc[NQ] = {};
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    const V dv = load(d + c);
    for (int64_t r = 0; r < nr; r++) {
      const V t = dv * load(rows[r] + c0 + c);
      for (int i = 0; i < NQ; i++) acc[i] += coefs[i][r] * t;
    }
  }
  T tail[NQ] = {};
  for (; c < n; c++)
    for (int64_t r = 0; r < nr; r++) {
      const T t = d[c] * rows[r][c0 + c];
      for (int i = 0; i < NQ; i++) tail[i] += coefs[i][r] * t;
    }
  for (int i = 0; i < NQ; i++) out[i] = tail[i] + hsum<T>(acc[i]);
}

template <class T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
  constexpr int L = Vec<T>::L;
  int64_t c = 0;
  for (; c + L <= n; c += L) store(y + c, load(y + c) + a * load(x + c));
  for (; c < n; c++) y[c] += a * x[c];
}

// a square block of vectors transposed in registers: in[i][j] -> out[j][i] (the unpack / shuffle / lane-swap
// ladder of an AVX transpose, written as GCC shuffles)
template <class T>
inline void transpose_block(typename Vec<T>::type (&r)[Vec<T>::L]) {
  using V = typename Vec<T>::type;
  if constexpr (Vec<T>::L == 8) {
    typedef int32_t M __attribute__((vector_size(32)));
    const M lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const M lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const M lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    V t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = __builtin_shuffle(r[i], r[i + 1], lo), t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
    for (int i = 0; i < 8; i += 4)
      for (int j = 0; j < 2; j++)
        u[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], lo2), u[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], hi2);
    // u[j]: channels j and j + 4 of pixels 0-3 (lanes 0-3 and 4-7); u[j + 4] the same of pixels 4-7
    for (int j = 0; j < 4; j++)
      r[j] = __builtin_shuffle(u[j], u[j + 4], lo4), r[j + 4] = __builtin_shuffle(u[j], u[j + 4], hi4);
  } else {
    static_assert(Vec<T>::L == 4, "32-byte vectors of 4 or 8 lanes");
    typedef int64_t M __attribute__((vector_size(32)));
    const M lo = {0, 4, 2, 6}, hi = {1, 5, 3, 7}, lo2 = {0, 1, 4, 5}, hi2 = {2, 3, 6, 7};
    const V t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
    const V t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
    r[0] = __builtin_shuffle(t0, t2, lo2), r[2] = __builtin_shuffle(t0, t2, hi2);
    r[1] = __builtin_shuffle(t1, t3, lo2), r[3] = __builtin_shuffle(t1, t3, hi2);
  }
}

// out[j * out_stride + i] = in[i * in_stride + j] for i < n, j < m: L x L blocks through registers, not a
// strided scalar loop (the output row's transpose alone was a tenth of the forward); words copied as
// they are (memcpy: they may be integers, the corners' indices)
template <class T>
void transpose(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t n, int64_t m) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  int64_t j0 = 0;
  for (; j0 + L <= m; j0 += L) {
    int64_t i0 = 0;
    for (; i0 + L <= n; i0 += L) {
      V r[L];
      for (int i = 0; i < L; i++) r[i] = load(in + (i0 + i) * in_stride + j0);
      transpose_block<T>(r);
      for (int j = 0; j < L; j++) store(out + (j0 + j) * out_stride + i0, r[j]);
    }
    for (int64_t j = j0; j < j0 + L; j++)
      for (int64_t i = i0; i < n; i++) std::memcpy(out + j * out_stride + i, in + i * in_stride + j, sizeof(T));
  }
  for (int64_t j = j0; j < m; j++)
    for (int64_t i = 0; i < n; i++) std::memcpy(out + j * out_stride + i, in + i * in_stride + j, sizeof(T));
}

// The samples of one output row, computed for the whole row at once (loops over x that vectorise), then
// read out per pixel: for group g, neighbour n, corner c (00, 01, 10, 11) at r = 4 (g K + n) + c, the
// map index of the corner (-1 outside: it reads a zero row, so a NaN weight still makes NaN), its
// bilinear weight, and with `grad` the weight's derivatives along y and x and whether the position
// passes the border clip (per g K + n).
template <class T>
struct Corners {
  // a tile of a row at a time: the per-pixel read-out strides by TW, not by the row (at Wo = 1024 a
  // 4 KiB stride put all 4S reads of a pixel in one cache set); 60 keeps the stride off powers of two
  static constexpr int64_t TILE = 60;
  int64_t TW, S;
  std::vector<int32_t> row_idx;  // [4S, TW]
  std::vector<T> row_bw, row_dby, row_dbx, py, px, zero;
  std::vector<unsigned char> row_pass;  // [2S, TW]
  std::vector<int32_t> pix_idx;  // [TW, 4S]: the tile pixel-major, for the read-out
  std::vector<T> pix_bw;
  const int32_t* idx = nullptr;  // one pixel's [4S], ...
  const T* bw = nullptr;
  std::vector<T> dby, dbx;
  std::vector<unsigned char> pass_y, pass_x;
  explicit Corners(const Problem& p) : TW(std::min(p.Wo, TILE)), S(p.G * p.K) {
    row_idx.resize(4 * S * TW), row_bw.resize(4 * S * TW), row_dby.resize(4 * S * TW), row_dbx.resize(4 * S * TW);
    py.resize(TW), px.resize(TW), zero.assign(TW, T(0)), row_pass.assign(2 * S * TW, 1);
    pix_idx.resize(4 * S * TW), pix_bw.resize(4 * S * TW);
    dby.resize(4 * S), dbx.resize(4 * S), pass_y.resize(S), pass_x.resize(S);
  }

  // pixels xb .. xb + nx - 1 (nx <= TW) of output row y
  void row(const Problem& p, int64_t b, int64_t y, int64_t xb, int64_t nx, bool grad) {
    const int64_t Wo = TW;
    const T* x0 = static_cast<const T*>(p.x0) + xb;
    const T* base = static_cast<const T*>(p.base);
    const T* off = static_cast<const T*>(p.offset);
    const int64_t HW = p.Ho * p.Wo, H = p.H, W = p.W;
    const T limy = T(H - 1), limx = T(W - 1), uy = p.align ? T(p.unit_y) : T(1), ux = p.align ? T(p.unit_x) : T(1);
    const T y0 = static_cast<const T*>(p.y0)[y];
    for (int64_t s = 0; s < S; s++) {
      const int64_t n = s % p.K;
      // without offsets, zeros: 0 + (origin + window) is exactly the grid; unit 1 multiplies exactly
      const T* oy = p.has_offset ? off + ((b * S + s) * 2) * HW + y * p.Wo + xb : zero.data();
      const T* ox = p.has_offset ? oy + HW : zero.data();
      const T by = y0 + base[2 * n], bx = base[2 * n + 1];
      for (int64_t x = 0; x < nx; x++) py[x] = (oy[x] + by) * uy, px[x] = (ox[x] + (x0[x] + bx)) * ux;
      unsigned char *pay = &row_pass[2 * s * Wo], *pax = pay + Wo;
      if (p.border) {  // clipped, zero gradient at and past the edge; NaN stays NaN
        for (int64_t x = 0; x < nx; x++) {
          const T yy = py[x], xx = px[x];
          pay[x] = yy > 0 && yy < limy, pax[x] = xx > 0 && xx < limx;
          py[x] = yy < 0 ? T(0) : yy > limy ? limy : yy;
          px[x] = xx < 0 ? T(0) : xx > limx ? limx : xx;
        }
      }
      int32_t* __restrict ix = &row_idx[4 * s * Wo];
      T* __restrict w = &row_bw[4 * s * Wo];
      const int32_t Wi = int32_t(W), Hi = int32_t(H), one = p.exact ? 0 : 1;
      const T *__restrict qy = py.data(), *__restrict qx = px.data();
      for (int64_t x = 0; x < nx; x++) {  // branch-free (& on bools, selects): it vectorises
        const T cy = std::floor(qy[x]), cx = std::floor(qx[x]);
        const T fy = qy[x] - cy, fx = qx[x] - cx;
        // cells far outside (or NaN) read zero rows only; compared as floats before any int conversion
        const bool near = (cy >= -1) & (cy <= limy) & (cx >= -1) & (cx <= limx);
        const int32_t iy = near ? int32_t(cy) : -2, jx = near ? int32_t(cx) : -2;
        const bool y0in = iy >= 0, y1in = near & (iy + 1 < Hi) & (one == 1), x0in = jx >= 0;
        const bool x1in = near & (jx + 1 < Wi) & (one == 1);
        const int32_t i00 = iy * Wi + jx;
        ix[x] = y0in & x0in ? i00 : -1;
        ix[Wo + x] = y0in & x1in ? i00 + 1 : -1;
        ix[2 * Wo + x] = y1in & x0in ? i00 + Wi : -1;
        ix[3 * Wo + x] = y1in & x1in ? i00 + Wi + 1 : -1;
        w[x] = (1 - fy) * (1 - fx), w[Wo + x] = (1 - fy) * fx, w[2 * Wo + x] = fy * (1 - fx), w[3 * Wo + x] = fy * fx;
      }
      if (grad) {
        T *__restrict gy = &row_dby[4 * s * Wo], *__restrict gx = &row_dbx[4 * s * Wo];
        for (int64_t x = 0; x < nx; x++) {
          const T fy = qy[x] - std::floor(qy[x]), fx = qx[x] - std::floor(qx[x]);
          gy[x] = -(1 - fx), gy[Wo + x] = -fx, gy[2 * Wo + x] = 1 - fx, gy[3 * Wo + x] = fx;
          gx[x] = -(1 - fy), gx[Wo + x] = 1 - fy, gx[2 * Wo + x] = -fy, gx[3 * Wo + x] = fy;
        }
      }
    }
    // the read-out takes one pixel's 4S corners at a time: the tile turned pixel-major, in register
    // blocks (a strided copy per pixel was a tenth of the forward); the indices moved as 4-byte words
    transpose(row_bw.data(), TW, pix_bw.data(), 4 * S, 4 * S, TW);
    transpose(reinterpret_cast<const float*>(row_idx.data()), TW, reinterpret_cast<float*>(pix_idx.data()), 4 * S,
              4 * S, TW);
  }

  void pixel(int64_t x, bool grad) {  // x within the tile
    const int64_t Wo = TW;
    idx = &pix_idx[x * 4 * S], bw = &pix_bw[x * 4 * S];
    if (grad) {
      for (int64_t r = 0; r < 4 * S; r++) dby[r] = row_dby[r * Wo + x], dbx[r] = row_dbx[r * Wo + x];
      for (int64_t s = 0; s < S; s++) pass_y[s] = row_pass[2 * s * Wo + x], pass_x[s] = row_pass[(2 * s + 1) * Wo + x];
    }
  }

  // the corners' rows of a channels-last table [H*W, width] (outside: the zero row)
  void rows(const T* table, int64_t width, const T* zeros, const T** out) const {
    for (int64_t r = 0; r < 4 * S; r++) out[r] = idx[r] >= 0 ? table + int64_t(idx[r]) * width : zeros;
  }
};

template <class T>
void softmax(T* l, int64_t K) {
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t n = 0; n < K; n++) nan |= std::isnan(l[n]), m = l[n] > m ? l[n] : m;
  T s = 0;
  for (int64_t n = 0; n < K; n++) s += (l[n] = nan ? l[n] : std::exp(l[n] - m));
  for (int64_t n = 0; n < K; n++) l[n] = nan ? std::numeric_limits<T>::quiet_NaN() : l[n] / s;
}

// The sample weights of one pixel, w [NH, K]: attention softmax(scale * (q . (k + rpb))), given
// logits' softmax, given weights, or 1. qp: the pixel's Dq query channels; krows: the corners' rows of k;
// ks: scratch of Dq.
template <class T>
void pixel_weights(const Problem& p, const Corners<T>& cs, int64_t b, int64_t pix, const T* qp, const T* const* krows,
                   T* ks, T* wt) {
  const int64_t K = p.K, P = p.Ho * p.Wo;
  if (p.mode == 0) {
    for (int64_t i = 0; i < p.NH * K; i++) wt[i] = 1;
    return;
  }
  if (p.mode < 3) {
    const T* gv = static_cast<const T*>(p.given);
    for (int64_t h = 0; h < p.NH; h++)
      for (int64_t n = 0; n < K; n++) wt[h * K + n] = gv[((b * p.NH + h) * K + n) * P + pix];
    if (p.mode == 2)
      for (int64_t h = 0; h < p.NH; h++) softmax(wt + h * K, K);
    return;
  }
  for (int64_t i = 0; i < p.NH * K; i++) wt[i] = 0;
  for (int64_t i = 0; i < p.n_qseg; i++) {
    const int64_t g = p.qseg[4 * i], h = p.qseg[4 * i + 1], c0 = p.qseg[4 * i + 2], c1 = p.qseg[4 * i + 3];
    for (int64_t n = 0; n < K; n++) {  // q . (the sampled key): the corners combined first
      const int64_t r = 4 * (g * K + n);
      combine(ks, krows + r, cs.bw + r, 4, c0, c1 - c0);
      wt[h * K + n] += dot(qp + c0, ks, c1 - c0);
    }
  }
  const int64_t dh = p.Dq / p.NH;
  // a "ratio" window's box positions past the pixel's rows or columns take no part in the softmax
  const int32_t ry = p.ey ? p.ey[pix / p.Wo] : int32_t(p.grid), rx = p.ex ? p.ex[pix % p.Wo] : int32_t(p.grid);
  for (int64_t h = 0; h < p.NH; h++) {
    for (int64_t n = 0; n < K; n++) {
      if (p.has_rpb) wt[h * K + n] += dot(qp + h * dh, static_cast<const T*>(p.rpb) + (h * K + n) * dh, dh);
      wt[h * K + n] *= T(p.scale);
      if (p.ey && (n / p.grid >= ry || n % p.grid >= rx)) wt[h * K + n] = -std::numeric_limits<T>::infinity();
    }
    softmax(wt + h * K, K);
  }
}

// coef[r] = bw[r] * wt[h, n(r)] over the 4K pairs of group g
template <class T>
inline void pair_coef(const Corners<T>& cs, const T* wt, int64_t K, int64_t g, int64_t h, T* coef) {
  for (int64_t n = 0; n < K; n++) {
    const T a = wt[h * K + n], *b = cs.bw + 4 * (g * K + n);
    coef[4 * n] = b[0] * a, coef[4 * n + 1] = b[1] * a, coef[4 * n + 2] = b[2] * a, coef[4 * n + 3] = b[3] * a;
  }
}

template <class T>
void forward(const Problem& p) {
  const int64_t K = p.K, C = p.C, P = p.Ho * p.Wo, HW = p.H * p.W;
  const T* v = static_cast<const T*>(p.v);
  const T* k = static_cast<const T*>(p.k);
  const T* q = static_cast<const T*>(p.q);  // NCHW: each output row's queries transposed as the row starts
  T* out = static_cast<T*>(p.out);
  T* wout = static_cast<T*>(p.w);
  const std::vector<T> zeros(C > p.Dq ? C : p.Dq, T(0));
#pragma omp parallel num_threads(p.n_threads)
  {
    Corners<T> cs(p);
    std::vector<T> wt(p.NH * K), row(p.Wo * C), qrow(p.Wo * p.Dq), ks(p.Dq), coef(4 * K);
    std::vector<const T*> vrows(p.G * K * 4), krows(p.G * K * 4);
#pragma omp for schedule(static)
    for (int64_t by = 0; by < p.B * p.Ho; by++) {
      const int64_t b = by / p.Ho, y = by % p.Ho;
      if (p.mode == 3) transpose(q + b * p.Dq * P + y * p.Wo, P, qrow.data(), p.Dq, p.Dq, p.Wo);
      for (int64_t x = 0; x < p.Wo; x++) {
        const int64_t pix = y * p.Wo + x;
        if (x % cs.TW == 0) cs.row(p, b, y, x, std::min(cs.TW, p.Wo - x), false);
        cs.pixel(x % cs.TW, false);
        if (p.mode == 3) cs.rows(k + b * HW * p.Dq, p.Dq, zeros.data(), krows.data());
        pixel_weights(p, cs, b, pix, qrow.data() + x * p.Dq, krows.data(), ks.data(), wt.data());
        if (wout)  // null: no backward follows
          for (int64_t h = 0; h < p.NH; h++)
            for (int64_t n = 0; n < K; n++) wout[((b * p.NH + h) * P + pix) * K + n] = wt[h * K + n];
        cs.rows(v + b * HW * C, C, zeros.data(), vrows.data());
        for (int64_t i = 0; i < p.n_seg; i++) {
          const int64_t g = p.seg[4 * i], h = p.seg[4 * i + 1], c0 = p.seg[4 * i + 2], c1 = p.seg[4 * i + 3];
          pair_coef(cs, wt.data(), K, g, h, coef.data());
          combine(row.data() + x * C + c0, vrows.data() + 4 * g * K, coef.data(), 4 * K, c0, c1 - c0);
        }
      }
      transpose(row.data(), C, out + b * C * P + y * p.Wo, P, p.Wo, C);  // [Wo, C] -> the NCHW output row
    }
  }
}

// out[idx] += coef * rows[pixel] for every recorded pair of a chunk, channels c0:c1 of a segment,
// split into one channel slice per thread (an orphaned omp for: called inside the backward's team): no
// two threads write one element, and each element sums in the pairs' order.
template <class T>
void scatter(const Problem& p, int64_t n_px, int64_t nsegs, const int64_t* segs, const int32_t* idx,
             const T* coef, const T* rows, T* out, int64_t width) {
  const int64_t K = p.K, nt = p.n_threads;
#pragma omp for schedule(static) collapse(2)
  for (int64_t i = 0; i < nsegs; i++) {
    for (int64_t t = 0; t < nt; t++) {
      const int64_t g = segs[4 * i], c0 = segs[4 * i + 2], c1 = segs[4 * i + 3];
      const int64_t n = c1 - c0, a = c0 + (n * t / nt) / 8 * 8, e = t == nt - 1 ? c1 : c0 + (n * (t + 1) / nt) / 8 * 8;
      if (a >= e) continue;
      for (int64_t px = 0; px < n_px; px++) {
        const int32_t* ix = idx + (px * p.G + g) * K * 4;
        const T* cf = coef + (px * nsegs + i) * K * 4;
        const T* src = rows + px * width + a;
        for (int64_t r = 0; r < K * 4; r++)
          if (ix[r] >= 0) axpy(out + int64_t(ix[r]) * width + a, cf[r], src, e - a);
      }
    }
  }
}

template <class T>
void backward(const Problem& p) {
  const int64_t K = p.K, C = p.C, Dq = p.Dq, P = p.Ho * p.Wo, HW = p.H * p.W, dh = Dq ? Dq / p.NH : 0;
  const bool attention = p.mode == 3, need_off = p.need_offset && p.has_offset;
  const bool need_dw = attention || p.mode == 2 || p.need_weights;
  const bool need_dk = attention && p.need_k, need_dq = attention && p.need_q;
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);  // NCHW, as q and dq: a chunk's rows transposed as they start
  const T* q = static_cast<const T*>(p.q);
  const T* kk = static_cast<const T*>(p.k);
  const T* rpb = static_cast<const T*>(p.rpb);
  const T* wsaved = static_cast<const T*>(p.w);
  T *dv = static_cast<T*>(p.dv), *dk = static_cast<T*>(p.dk), *dq = static_cast<T*>(p.dq);
  T *dlogit = static_cast<T*>(p.dlogit), *dwout = static_cast<T*>(p.dw), *doff = static_cast<T*>(p.doffset);
  const std::vector<T> zeros(C > Dq ? C : Dq, T(0));
  // rows of one image per chunk: about chunk_pixels pixels' pairs, at least a row per thread
  const int64_t J = K * 4, R = std::min(p.Ho, std::max(p.n_threads, p.chunk_pixels / p.Wo)),
                chunk = R * p.Wo;
  std::vector<int32_t> idx(p.need_v || need_dk ? chunk * p.G * J : 0);
  std::vector<T> coef_v(p.need_v ? chunk * p.n_seg * J : 0), coef_k(need_dk ? chunk * p.n_qseg * J : 0);
  // the chunk's dout and q channels-last: read per pixel, and by the scatters
  std::vector<T> dchunk(chunk * C), qchunk(attention ? chunk * Dq : 0);
  // one team for the whole call (scratch allocated once per thread, not per chunk): every thread walks the
  // chunks, the omp for loops split each chunk's rows, then its scatters (their barriers order them)
#pragma omp parallel num_threads(p.n_threads)
  {
    Corners<T> cs(p);
    std::vector<T> wt(p.NH * K), dwc(p.NH * K), a(p.NH * K), gy(p.G * K), gx(p.G * K), cf(J);
    std::vector<const T*> vrows(p.G * J), krows(p.G * J);
    std::vector<T> dqrow(need_dq ? p.Wo * Dq : 0);
    for (int64_t b = 0; b < p.B; b++) {
      for (int64_t r0 = 0; r0 < p.Ho; r0 += R) {
        const int64_t r1 = std::min(r0 + R, p.Ho), p0 = r0 * p.Wo, p1 = r1 * p.Wo;
#pragma omp for schedule(static)
        for (int64_t y = r0; y < r1; y++) {
          transpose(dout + b * C * P + y * p.Wo, P, &dchunk[(y - r0) * p.Wo * C], C, C, p.Wo);
          if (attention) transpose(q + b * Dq * P + y * p.Wo, P, &qchunk[(y - r0) * p.Wo * Dq], Dq, Dq, p.Wo);
          for (int64_t x = 0; x < p.Wo; x++) {
            const int64_t pix = y * p.Wo + x, lp = pix - p0;
            if (x % cs.TW == 0) cs.row(p, b, y, x, std::min(cs.TW, p.Wo - x), need_off);
            cs.pixel(x % cs.TW, need_off);
            for (int64_t i = 0; i < p.NH * K; i++)
              wt[i] = p.mode ? wsaved[((b * p.NH + i / K) * P + pix) * K + i % K] : T(1);
            std::fill(dwc.begin(), dwc.end(), T(0));
            std::fill(gy.begin(), gy.end(), T(0));
            std::fill(gx.begin(), gx.end(), T(0));
            if (!idx.empty()) std::memcpy(&idx[lp * p.G * J], cs.idx, sizeof(int32_t) * p.G * J);
            cs.rows(v + b * HW * C, C, zeros.data(), vrows.data());
            const T* drow = &dchunk[lp * C];
            for (int64_t i = 0; i < p.n_seg; i++) {
              const int64_t g = p.seg[4 * i], h = p.seg[4 * i + 1], c0 = p.seg[4 * i + 2], c1 = p.seg[4 * i + 3];
              for (int64_t n = 0; n < K; n++) {
                const int64_t r = 4 * (g * K + n), s = g * K + n;
                if (need_off) {  // d loss / d (weight, position y, position x) of the sample
                  T o[3];
                  sampled_dots<T, 3>(drow + c0, vrows.data() + r, {&cs.bw[r], &cs.dby[r], &cs.dbx[r]}, 4, c0, c1 - c0,
                                     o);
                  dwc[h * K + n] += o[0], gy[s] += o[1] * wt[h * K + n], gx[s] += o[2] * wt[h * K + n];
                } else if (need_dw) {
                  T o[1];
                  sampled_dots<T, 1>(drow + c0, vrows.data() + r, {&cs.bw[r]}, 4, c0, c1 - c0, o);
                  dwc[h * K + n] += o[0];
                }
              }
              if (p.need_v) pair_coef(cs, wt.data(), K, g, h, &coef_v[(lp * p.n_seg + i) * J]);
            }
            if (p.need_weights && p.mode == 1)
              for (int64_t i = 0; i < p.NH * K; i++) dwout[((b * p.NH + i / K) * P + pix) * K + i % K] = dwc[i];
            if (need_dw && p.mode >= 2) {
              for (int64_t h = 0; h < p.NH; h++) {
                T s = 0;
                for (int64_t n = 0; n < K; n++) s += wt[h * K + n] * dwc[h * K + n];
                for (int64_t n = 0; n < K; n++) {
                  const int64_t i = h * K + n;
                  const T d = wt[i] * (dwc[i] - s);
                  dlogit[((b * p.NH + h) * P + pix) * K + n] = d;
                  a[i] = d * T(p.scale);
                }
              }
            }
            if (attention && (need_dq || need_dk || need_off)) {
              const T* qp = &qchunk[lp * Dq];
              T* dqp = need_dq ? &dqrow[x * Dq] : nullptr;
              cs.rows(kk + b * HW * Dq, Dq, zeros.data(), krows.data());
              for (int64_t i = 0; i < p.n_qseg; i++) {
                const int64_t g = p.qseg[4 * i], h = p.qseg[4 * i + 1], c0 = p.qseg[4 * i + 2], c1 = p.qseg[4 * i + 3];
                pair_coef(cs, a.data(), K, g, h, cf.data());
                if (dqp) combine(dqp + c0, krows.data() + 4 * g * K, cf.data(), J, c0, c1 - c0);
                if (need_dk) std::memcpy(&coef_k[(lp * p.n_qseg + i) * J], cf.data(), sizeof(T) * J);
                if (need_off)
                  for (int64_t n = 0; n < K; n++) {
                    const int64_t r = 4 * (g * K + n), s = g * K + n;
                    T o[2];
                    sampled_dots<T, 2>(qp + c0, krows.data() + r, {&cs.dby[r], &cs.dbx[r]}, 4, c0, c1 - c0, o);
                    gy[s] += o[0] * a[h * K + n], gx[s] += o[1] * a[h * K + n];
                  }
              }
              if (dqp && p.has_rpb)
                for (int64_t h = 0; h < p.NH; h++)
                  for (int64_t n = 0; n < K; n++) axpy(dqp + h * dh, a[h * K + n], rpb + (h * K + n) * dh, dh);
            }
            if (need_off) {
              for (int64_t s = 0; s < p.G * K; s++) {
                T ty = gy[s], tx = gx[s];
                if (p.border) ty = cs.pass_y[s] ? ty : T(0), tx = cs.pass_x[s] ? tx : T(0);
                if (p.align) ty *= T(p.unit_y), tx *= T(p.unit_x);
                T* o = doff + ((b * p.G * K + s) * 2) * P + pix;
                o[0] = ty, o[P] = tx;
              }
            }
          }
          if (need_dq) transpose(dqrow.data(), Dq, dq + b * Dq * P + y * p.Wo, P, p.Wo, Dq);
        }
        if (p.need_v) scatter(p, p1 - p0, p.n_seg, p.seg, idx.data(), coef_v.data(), dchunk.data(), dv + b * HW * C, C);
        if (need_dk)
          scatter(p, p1 - p0, p.n_qseg, p.qseg, idx.data(), coef_k.data(), qchunk.data(), dk + b * HW * Dq, Dq);
      }
    }
  }
}

// LayerNorm over the channels of x [N, C, HW] (NCHW, contiguous), then the affine: per pixel, the mean and
// the biased variance of its C channels, as F.layer_norm over the channels of x.permute(0, 2, 3, 1)
// computes them, but in place in NCHW: the pixels of a row are the vector lanes, no permuted copies.
constexpr int64_t LN_BP = 64;  // pixels per block: the lanes of a few vectors, C of them in cache

// mean and 1/std over the C channels of np <= LN_BP pixels xs[c * HW + i], as the forward computes them
template <class T>
void channel_stats(const T* xs, int64_t C, int64_t HW, int64_t np, double eps, T* mean, T* rstd) {
  for (int64_t i = 0; i < np; i++) mean[i] = 0, rstd[i] = 0;
  for (int64_t c = 0; c < C; c++)
    for (int64_t i = 0; i < np; i++) mean[i] += xs[c * HW + i];
  for (int64_t i = 0; i < np; i++) mean[i] /= T(C);
  for (int64_t c = 0; c < C; c++)
    for (int64_t i = 0; i < np; i++) {
      const T d = xs[c * HW + i] - mean[i];
      rstd[i] += d * d;
    }
  for (int64_t i = 0; i < np; i++) rstd[i] = T(1) / std::sqrt(rstd[i] / T(C) + T(eps));
}

template <class T>
void layer_norm_channels(const T* x, const T* w, const T* b, T* out, int64_t N, int64_t C, int64_t HW, double eps,
                         int64_t n_threads) {
  const int64_t blocks = (HW + LN_BP - 1) / LN_BP;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t nb = 0; nb < N * blocks; nb++) {
    const int64_t n = nb / blocks, p0 = nb % blocks * LN_BP, np = std::min(LN_BP, HW - p0);
    const T* xs = x + n * C * HW + p0;
    T* os = out + n * C * HW + p0;
    T mean[LN_BP], rstd[LN_BP];
    channel_stats(xs, C, HW, np, eps, mean, rstd);
    for (int64_t c = 0; c < C; c++)
      for (int64_t i = 0; i < np; i++) os[c * HW + i] = (xs[c * HW + i] - mean[i]) * rstd[i] * w[c] + b[c];
  }
}

// The layer norm's backward from x (statistics recomputed: nothing but x is kept), g = d loss / d out:
// dx = rstd (g w - mean_c(g w) - xhat mean_c(g w xhat)); dw = sum_p g xhat, db = sum_p g from per-block
// partials in double [N * blocks, 2, C] (part) summed in block order, whatever the thread count.
template <class T>
void layer_norm_channels_backward(const T* x, const T* w, const T* g, T* dx, T* dw, T* db, double* part, int64_t N,
                                  int64_t C, int64_t HW, double eps, int64_t n_threads) {
  const int64_t blocks = (HW + LN_BP - 1) / LN_BP, nblk = N * blocks;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t nb = 0; nb < nblk; nb++) {
    const int64_t n = nb / blocks, p0 = nb % blocks * LN_BP, np = std::min(LN_BP, HW - p0);
    const T *xs = x + n * C * HW + p0, *gs = g + n * C * HW + p0;
    T* ds = dx + n * C * HW + p0;
    T mean[LN_BP], rstd[LN_BP], sg[LN_BP], sgx[LN_BP];
    channel_stats(xs, C, HW, np, eps, mean, rstd);
    for (int64_t i = 0; i < np; i++) sg[i] = 0, sgx[i] = 0;
    double* pw = part + nb * C * 2;
    for (int64_t c = 0; c < C; c++) {
      double pwc = 0, pbc = 0;  // sums over the whole map: in double (torch's are as good as float's cascade)
      for (int64_t i = 0; i < np; i++) {
        const T xh = (xs[c * HW + i] - mean[i]) * rstd[i], gi = gs[c * HW + i], gw = gi * w[c];
        sg[i] += gw;
        sgx[i] += gw * xh;
        pwc += double(gi) * double(xh);
        pbc += gi;
      }
      pw[c] = pwc, pw[C + c] = pbc;
    }
    for (int64_t i = 0; i < np; i++) sg[i] /= T(C), sgx[i] /= T(C);
    for (int64_t c = 0; c < C; c++)
      for (int64_t i = 0; i < np; i++) {
        const T xh = (xs[c * HW + i] - mean[i]) * rstd[i];
        ds[c * HW + i] = rstd[i] * (gs[c * HW + i] * w[c] - sg[i] - xh * sgx[i]);
      }
  }
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t c = 0; c < 2 * C; c++) {
    double s = 0;
    for (int64_t nb = 0; nb < nblk; nb++) s += part[nb * C * 2 + c];
    (c < C ? dw[c] : db[c - C]) = T(s);
  }
}

// tanh in double, lane-parallel: torch's CPU tanh took 2.5 ns an element on "CPU (AMD EPYC), 2 cores"
// (its sigmoid 0.4). exp(-2|x|) by 2^n times a degree-9 Taylor series on |r| <= ln2/2 (relative error
// < 1e-11), then (1 - e) / (1 + e); below 2^-12, x - x^3/3 + 2x^5/15, where 1 - e would cancel. Its
// error is far under a float's half ulp: rounded to float it is the correctly rounded tanhf but for
// double rounding (5 in 2.1M normal samples; torch's tanhf is off by an ulp in 2.3k of them).
inline double tanh_lanes(double x) {
  const double t = std::min(std::fabs(x), 20.0);  // tanh(20) is 1 in double; NaN stays NaN
  const double z = -2.0 * t;
  const double kd = z * 1.4426950408889634 + 0x1.8p52;  // round(z / ln2) in the low bits
  int64_t bits;
  std::memcpy(&bits, &kd, sizeof bits);
  const double n = kd - 0x1.8p52;
  const double r = (z - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 362880;
  for (double c : {1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0})
    p = p * r + c;
  const int64_t scale_bits = (static_cast<int64_t>(static_cast<int32_t>(bits)) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const double e = p * scale, t2 = t * t;
  const double y = t < 0x1p-12 ? t * (1.0 - t2 * (1.0 / 3 - t2 * (2.0 / 15))) : (1.0 - e) / (1.0 + e);
  return std::copysign(y, x);
}

// y * range + b as torch's mul_ and add_ round it: two roundings, no fused multiply-add
template <class T>
__attribute__((optimize("fp-contract=off"))) void scale_shift(T* y, int64_t n, T range, T b) {
  for (int64_t i = 0; i < n; i++) y[i] = y[i] * range + b;
}

// The offset branch's last conv and its head in one pass: out[n, co, y, x] = tanh(bias[co] + sum over
// ci, i, j of w[co, ci, i, j] * h[n, ci, y + i - pt, x + j - k/2]) * range + base[co], h [N, Ci, Hi, W],
// out [N, Co, Hi + pt + pb - k + 1, W]: stride 1, pt and pb zero rows above and below h (a band's halo
// is in h), k/2 zero columns each side. A thread owns a block of BX columns of an output row: its tap
// rows' segments are copied once, halo and map edges zero-filled, so the vector loop has no bounds, and
// CB output channels of two vectors each sum in registers over the taps. At 2x8x52x80 -> 18 channels
// (LDAAQU(64), k_u=3, a 26x40 map at s=2) oneDNN's conv took 0.48 ms and torch's tanh, mul_ and add_
// 0.41 ms more; this pass 0.49 ms (1 thread, "CPU (AMD EPYC), 2 cores").
template <class T>
void offset_conv_head(const T* h, const T* w, const T* bias, const T* base, T* out, int64_t N, int64_t Ci,
                      int64_t Hi, int64_t W, int64_t Co, int64_t k, int64_t pt, int64_t pb, double range,
                      int64_t n_threads) {
  using V = typename Vec<T>::type;
  constexpr int64_t VL = 2 * Vec<T>::L, BX = 4 * VL, CB = 6;  // CB channels of two vectors in registers
  const int64_t Ho = Hi + pt + pb - k + 1, half = k / 2, bx = (W + BX - 1) / BX, RL = BX + k - 1;
  const int64_t Cp = (Co + CB - 1) / CB * CB, taps = Ci * k * k;
  std::vector<T> wt(taps * Cp, T(0));  // [ci, i, j, co]: a tap's CB weights side by side, zero past Co
  for (int64_t co = 0; co < Co; co++)
    for (int64_t t = 0; t < taps; t++) wt[t * Cp + co] = w[co * taps + t];
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> rows(Ci * k * RL), res(Cp * BX);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N * Ho * bx; t++) {
      const int64_t n = t / (Ho * bx), y = t / bx % Ho, x0 = t % bx * BX, nx = std::min(BX, W - x0);
      for (int64_t ci = 0; ci < Ci; ci++)  // the tap rows' segments, halo and map edges zero-filled
        for (int64_t i = 0; i < k; i++) {
          const int64_t yi = y + i - pt;
          T* r = rows.data() + (ci * k + i) * RL;
          const T* src = h + ((n * Ci + ci) * Hi + yi) * W;
          for (int64_t j = 0; j < RL; j++) {
            const int64_t xi = x0 + j - half;
            r[j] = yi >= 0 && yi < Hi && xi >= 0 && xi < W ? src[xi] : T(0);
          }
        }
      for (int64_t c0 = 0; c0 < Cp; c0 += CB)
        for (int64_t xv = 0; xv < nx; xv += VL) {  // past nx: no vector of the block is computed
          V a[CB][2] = {};
          for (int64_t ci = 0; ci < Ci; ci++)
            for (int64_t i = 0; i < k; i++)
              for (int64_t j = 0; j < k; j++) {
                const T* rp = rows.data() + (ci * k + i) * RL + xv + j;
                const V r0 = load(rp), r1 = load(rp + Vec<T>::L);
                const T* wv = wt.data() + ((ci * k + i) * k + j) * Cp + c0;
                for (int64_t c = 0; c < CB; c++) a[c][0] += wv[c] * r0, a[c][1] += wv[c] * r1;
              }
          for (int64_t c = 0; c < CB; c++)
            store(res.data() + (c0 + c) * BX + xv, a[c][0]), store(res.data() + (c0 + c) * BX + xv + Vec<T>::L, a[c][1]);
        }
      for (int64_t co = 0; co < Co; co++) {
        T* dst = out + ((n * Co + co) * Ho + y) * W + x0;
        const T* a = res.data() + co * BX;
        const T bc = bias[co];
        if constexpr (sizeof(T) == 4) {
#pragma omp simd
          for (int64_t x = 0; x < nx; x++) dst[x] = T(tanh_lanes(a[x] + bc));
        } else {
          for (int64_t x = 0; x < nx; x++) dst[x] = std::tanh(a[x] + bc);
        }
        scale_shift(dst, nx, T(range), base[co]);
      }
    }
  }
}

// out[b] = in[b]^T for B matrices [n, m] (NCHW <-> channels-last: n channels, m pixels, or back), in
// tiles through the register blocks; torch's strided copy of a permuted map ran at ~1.5 GB/s
template <class T>
void transpose_batched(const T* in, T* out, int64_t B, int64_t n, int64_t m, int64_t n_threads) {
  constexpr int64_t TB = 64;  // a tile's rows in L1 on both sides
  const int64_t tn = (n + TB - 1) / TB, tm = (m + TB - 1) / TB;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t t = 0; t < B * tn * tm; t++) {
    const int64_t b = t / (tn * tm), i0 = t / tm % tn * TB, j0 = t % tm * TB;
    transpose(in + b * n * m + i0 * m + j0, m, out + b * n * m + j0 * n + i0, n, std::min(TB, n - i0),
              std::min(TB, m - j0));
  }
}

}  // namespace

extern "C" {
// "sizeof;name:offset:size:kind,..." for Problem, kind i(nteger), f(loat) or p(ointer)
const char* lu_problem_layout() {
  static const std::string layout = [] {
    std::string s = std::to_string(sizeof(Problem)) + ";";
#define LU_FIELD(f) s += field_layout<decltype(Problem::f)>(#f, offsetof(Problem, f));
    LU_PROBLEM_FIELDS(LU_FIELD)
#undef LU_FIELD
    s.pop_back();
    return s;
  }();
  return layout.c_str();
}
void lu_layer_norm_f32(const float* x, const float* w, const float* b, float* out, int64_t N, int64_t C, int64_t HW,
                       double eps, int64_t n_threads) {
  layer_norm_channels(x, w, b, out, N, C, HW, eps, n_threads);
}
void lu_layer_norm_f64(const double* x, const double* w, const double* b, double* out, int64_t N, int64_t C,
                       int64_t HW, double eps, int64_t n_threads) {
  layer_norm_channels(x, w, b, out, N, C, HW, eps, n_threads);
}
void lu_layer_norm_backward_f32(const float* x, const float* w, const float* g, float* dx, float* dw, float* db,
                                double* part, int64_t N, int64_t C, int64_t HW, double eps, int64_t n_threads) {
  layer_norm_channels_backward(x, w, g, dx, dw, db, part, N, C, HW, eps, n_threads);
}
void lu_layer_norm_backward_f64(const double* x, const double* w, const double* g, double* dx, double* dw,
                                double* db, double* part, int64_t N, int64_t C, int64_t HW, double eps,
                                int64_t n_threads) {
  layer_norm_channels_backward(x, w, g, dx, dw, db, part, N, C, HW, eps, n_threads);
}
void lu_offset_conv_head_f32(const float* h, const float* w, const float* bias, const float* base, float* out,
                             int64_t N, int64_t Ci, int64_t Hi, int64_t W, int64_t Co, int64_t k, int64_t pt,
                             int64_t pb, double range, int64_t n_threads) {
  offset_conv_head(h, w, bias, base, out, N, Ci, Hi, W, Co, k, pt, pb, range, n_threads);
}
void lu_offset_conv_head_f64(const double* h, const double* w, const double* bias, const double* base,
                             double* out, int64_t N, int64_t Ci, int64_t Hi, int64_t W, int64_t Co, int64_t k,
                             int64_t pt, int64_t pb, double range, int64_t n_threads) {
  offset_conv_head(h, w, bias, base, out, N, Ci, Hi, W, Co, k, pt, pb, range, n_threads);
}
void lu_transpose_f32(const float* in, float* out, int64_t B, int64_t n, int64_t m, int64_t n_threads) {
  transpose_batched(in, out, B, n, m, n_threads);
}
void lu_transpose_f64(const double* in, double* out, int64_t B, int64_t n, int64_t m, int64_t n_threads) {
  transpose_batched(in, out, B, n, m, n_threads);
}
void lu_forward_f32(const Problem* p) { forward<float>(*p); }
void lu_forward_f64(const Problem* p) { forward<double>(*p); }
void lu_backward_f32(const Problem* p) { backward<float>(*p); }
void lu_backward_f64(const Problem* p) { backward<double>(*p); }
}
