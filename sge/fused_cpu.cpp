// CPU kernels of the fused SGE (sge/fused_cpu.py builds this file, after
// sge/fused_cpu_layout.h, and calls it).
//
// The CPU counterpart of sge/fused_triton.py: one task per (sample, group) pair works on the
// group's C/G x H*W tile (contiguous in NCHW, at most a few hundred KB, so it stays in the
// core's L2 while the passes over it run). channels_last maps are taken as they are and
// worked on by rows of channels, one task per sample (forward_rows, backward_rows; RowOps or
// LaneOps do the work along a row, with the helpers of sge/fused_cpu_layout.h). Statistics
// are computed in the input's type (float or double), like the Triton kernels and the
// reference.
// Formulas: the module docstring of sge/fused.py. The ops allocate their outputs in their
// input's layout.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// sigmoid(v) = 1 / (1 + exp(-v)), one per position per group, forward and backward: with
// std::exp (scalar; glibc's vector variants are only declared under -ffast-math) the exps
// cost more than the rest of the kernels. For float it is computed here by range reduction
// and a degree-6 polynomial (relative error ~2e-7, that of float rounding), which the
// compiler vectorizes (given -fno-trapping-math, for the clamp's selects); double uses
// std::exp (the float64 tests compare to 1e-7).
inline float exp_float(float x) {
  x = x < -87.0f ? -87.0f : x;  // 2^k below stays a normal float
  x = x > 88.0f ? 88.0f : x;
  // k = round(x / ln 2) by the 1.5 * 2^23 trick (no rounding instruction needed), r in
  // [-ln2/2, ln2/2], ln 2 split in two so that k * ln2 is exact enough.
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-06f;
  const float poly = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-01f + r * (
      4.16666679e-02f + r * (8.33333377e-03f + r * 1.38888892e-03f)))));
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return poly * scale;
}

template <typename T>
inline T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }
template <>
inline float sigmoid<float>(float v) { return 1.0f / (1.0f + exp_float(-v)); }

// The mean of a row of P values (vectorized sum).
template <typename T>
inline T mean_of(const T* r, int64_t P) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < P; ++p) s += r[p];
  return s / T(P);
}

using OptTensor = std::optional<at::Tensor>;

// A tensor as a contiguous one of type T (in the given layout).
template <typename T>
at::Tensor as_type(const at::Tensor& t,
                   at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return t.to(c10::CppTypeToScalarType<T>::value).contiguous(format);
}

// Whether the kernels work on t as channels_last (stored so; NCHW otherwise, copied if need
// be). Outputs are allocated like the input, in the same layout.
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The BN before SGE, x = BN(z) = z * scale_c + shift_c, from its statistics (the batch's or
// the running ones, chosen by the caller) and optional affine parameters; the identity
// without statistics.
template <typename T>
struct Affine {
  std::vector<T> scale, shift, invstd, mean;
  bool on() const { return !scale.empty(); }
  T a(int64_t c) const { return on() ? scale[c] : T(1); }
  T b(int64_t c) const { return on() ? shift[c] : T(0); }
};

template <typename T>
Affine<T> affine_of(const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
                    const OptTensor& var, double eps, int64_t C) {
  Affine<T> f;
  if (!mean) return f;
  const at::Tensor mv = as_type<T>(*mean), vv = as_type<T>(*var);
  const at::Tensor wv = bn_weight ? as_type<T>(*bn_weight) : at::Tensor();
  const at::Tensor bv = bn_bias ? as_type<T>(*bn_bias) : at::Tensor();
  // Pointers taken once: const_data_ptr checks the tensor on every call, which per channel
  // took most of a late-stage op's fixed cost (2048 channels: ~25 us per call).
  const T* mp = mv.const_data_ptr<T>();
  const T* vp = vv.const_data_ptr<T>();
  const T* wp = bn_weight ? wv.const_data_ptr<T>() : nullptr;
  const T* bp = bn_bias ? bv.const_data_ptr<T>() : nullptr;
  f.scale.resize(C), f.shift.resize(C), f.invstd.resize(C), f.mean.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const T inv = T(1) / std::sqrt(vp[c] + T(eps));
    const T a = wp ? inv * wp[c] : inv;
    f.invstd[c] = inv;
    f.mean[c] = mp[c];
    f.scale[c] = a;
    f.shift[c] = -f.mean[c] * a + (bp ? bp[c] : T(0));
  }
  return f;
}

// Per-(position, group) scratch of the channels_last kernels, kept per thread across calls
// and grown on demand (slot: which buffer). Allocated per task, these few hundred KB went
// back to the OS at every free (glibc trims its heap's top) and were faulted in again by
// the next task: ~1,600 page faults per first-stage backward at batch 8, 112 px, 1.9 of its
// 4.3 ms.
template <typename T>
T* reused(int slot, int64_t n) {
  thread_local std::vector<T> pool[3];
  std::vector<T>& v = pool[slot];
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// Per-position scratch of one task.
template <typename T>
struct Scratch {
  std::vector<T> a, b, m, w, zm;
  Scratch(int64_t P, int64_t K) : a(P), b(P), m(K), w(K), zm(K) {}
};

// One (sample, group) tile of an NCHW map: K channel rows of P positions each, contiguous.
// chat, sigma, m: where to keep the statistics, or null. zmean: the K channels' means over
// the positions when known (batch_stats computes them), or null. rbn: the residual's own BN
// (the shortcut's, applied as the residual is read; off: the residual as it is).
template <typename T>
void forward_tile(const T* zt, T* yt, const T* rt, int64_t P, int64_t K, int64_t ch0,
                  const Affine<T>& bn, const Affine<T>& rbn, T gamma, T beta, T eps, T* chat,
                  T* sigma, T* m, const T* zmean, Scratch<T>& s) {
  const T dof = T(std::max<int64_t>(P - 1, 1));
  T* ct = chat ? chat : s.a.data();
  T* mk = m ? m : s.m.data();
  T* wk = s.w.data();
  T* zm = s.zm.data();
  // Three reads of the tile (from cache after the first; two given zmean) and one write:
  // x = BN(z) is recomputed where needed, never stored. Channel means of x:
  // g_k = a_k mean(z_k) + b_k.
  for (int64_t k = 0; k < K; ++k) {
    const T a = bn.a(ch0 + k), b = bn.b(ch0 + k);
    zm[k] = zmean ? zmean[k] : mean_of(zt + k * P, P);
    mk[k] = a * zm[k] + b;
    wk[k] = mk[k] * a;
  }
  // c_p = <g, x_p> up to a constant, which c - mean(c) removes: sum_k g_k (x_kp - g_k)
  // = sum_k g_k a_k (z_kp - mean(z_k)), each channel centred before it is summed (so a
  // large offset in z costs no precision).
  std::fill(ct, ct + P, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T wv = wk[k], mu = zm[k];
    const T* zr = zt + k * P;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) ct[p] += wv * (zr[p] - mu);
  }
  const T mean = mean_of(ct, P);
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t p = 0; p < P; ++p) {
    ct[p] -= mean;
    sq += ct[p] * ct[p];
  }
  const T sd = std::sqrt(sq / dof);  // unbiased std; 0 at H*W == 1, so chat == 0
  const T inv = T(1) / (sd + eps);
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) ct[p] *= inv;
  if (sigma) *sigma = sd;
  // The gate goes into s.a (chat must stay when kept; otherwise s.a is chat).
  T* gate = s.a.data();
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) gate[p] = sigmoid(gamma * ct[p] + beta);
  for (int64_t k = 0; k < K; ++k) {
    const T a = bn.a(ch0 + k), b = bn.b(ch0 + k);
    const T* zr = zt + k * P;
    T* yr = yt + k * P;
    if (rt && rbn.on()) {
      const T* rr = rt + k * P;
      const T ra = rbn.scale[ch0 + k], rb = rbn.shift[ch0 + k];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        yr[p] = std::max((zr[p] * a + b) * gate[p] + (rr[p] * ra + rb), T(0));
      }
    } else if (rt) {
      const T* rr = rt + k * P;
      // std::max(v, 0) keeps a NaN, as torch.relu does.
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) yr[p] = std::max((zr[p] * a + b) * gate[p] + rr[p], T(0));
    } else {
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) yr[p] = (zr[p] * a + b) * gate[p];
    }
  }
}

// The backward of one tile (layout as forward_tile's): dx (which may be dy: in place), the
// partials of dweight/dbias, and when BN is folded in the per-channel sums of dx and
// dx * z that BN's backward needs (sum_dx, sum_dxz: K values each, or null). With the
// tail's output yo (residual folded in), dy is first ReLU's: dres = dy where yo > 0, else
// 0, written to dr (the residual's gradient) as the tile is read, and used in dy's place.
template <typename T>
void backward_tile(const T* dyt, const T* yo, T* dr, const T* zt, T* dxt, int64_t P,
                   int64_t K, int64_t ch0, const Affine<T>& bn, T gamma, T beta, T sd,
                   const T* ct, const T* mk, T eps, T* dw, T* db, T* sum_dx, T* sum_dxz,
                   Scratch<T>& scratch) {
  const T dof = T(std::max<int64_t>(P - 1, 1));
  T* s = scratch.a.data();
  T* d = scratch.b.data();  // ds, then da, then dc
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) s[p] = sigmoid(gamma * ct[p] + beta);
  std::fill(d, d + P, T(0));
  for (int64_t k = 0; k < K; ++k) {  // ds_p = sum_k dy_kp x_kp
    const T a = bn.a(ch0 + k), b = bn.b(ch0 + k);
    const T* zr = zt + k * P;
    const T* dyr = dyt + k * P;
    if (yo) {  // ReLU's backward, as threshold_backward: 0 where yo <= 0
      const T* yr = yo + k * P;
      T* gr = dr + k * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T v = yr[p] <= T(0) ? T(0) : dyr[p];
        gr[p] = v;
        d[p] += v * (zr[p] * a + b);
      }
    } else {
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) d[p] += dyr[p] * (zr[p] * a + b);
    }
  }
  T da_sum = 0, da_chat = 0;
#pragma omp simd reduction(+ : da_sum, da_chat)
  for (int64_t p = 0; p < P; ++p) {
    const T v = d[p] * s[p] * (T(1) - s[p]);
    d[p] = v;
    da_sum += v;
    da_chat += v * ct[p];
  }
  *dw = da_chat;
  *db = da_sum;
  // sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
  const T coef = -(sd + eps) * da_chat / ((sd > 0 ? sd : T(1)) * dof);
  const T f = gamma / (sd + eps), mean_da = da_sum / T(P);
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) d[p] = f * (d[p] - mean_da + ct[p] * coef);
  for (int64_t k = 0; k < K; ++k) {
    const T a = bn.a(ch0 + k), b = bn.b(ch0 + k), mv = mk[k];
    const T* zr = zt + k * P;
    const T* gr = (yo ? dr : dyt) + k * P;
    T* xr = dxt + k * P;
    T dm = 0;
#pragma omp simd reduction(+ : dm)
    for (int64_t p = 0; p < P; ++p) dm += (zr[p] * a + b) * d[p];
    dm /= T(P);
    T sdx = 0, sdxz = 0;
#pragma omp simd reduction(+ : sdx, sdxz)
    for (int64_t p = 0; p < P; ++p) {
      const T v = gr[p] * s[p] + dm + mv * d[p];
      xr[p] = v;
      sdx += v;
      sdxz += v * zr[p];
    }
    if (sum_dx) {
      sum_dx[k] = sdx;
      sum_dxz[k] = sdxz;
    }
  }
}

// Per-channel (or per-group) sums down the rows of a channels_last map: float sums of
// thousands of rows, so each block of 64 rows is summed apart and then added to the total
// (kept in Total: T, or double for BN's statistics).
// The totals go straight to `out` when given, which the first block's sums are written to
// (not added: no zero-filling first; at the last stage, 16 positions, that was a sixth of
// the statistics kernel's time). No copy out afterwards.
template <typename T, typename Total = T>
struct ColumnSums {
  std::vector<Total> own;  // the totals, without out
  Total* total;
  std::vector<T> part;
  bool first;  // out not written yet
  explicit ColumnSums(int64_t n, Total* out = nullptr)
      : own(out ? 0 : n, Total(0)), total(out ? out : own.data()), part(n, T(0)),
        first(out != nullptr) {}
  T* row() { return part.data(); }
  // After row p of P: every 64 rows, and after the last, the block joins the total.
  void done(int64_t p, int64_t P) {
    if ((p + 1) % 64 != 0 && p + 1 != P) return;
    if (first) {
      for (size_t i = 0; i < part.size(); ++i) total[i] = part[i], part[i] = T(0);
      first = false;
      return;
    }
    for (size_t i = 0; i < part.size(); ++i) total[i] += part[i], part[i] = T(0);
  }
};

// BN's scale and shift for channels [ch0, ch0 + cw), as arrays that the row loops index:
// the call's own (ones and zeros, kept per thread, without BN; a second call for no more
// channels keeps the first one's valid). Copied per task, they took a tenth of a last-stage
// forward (2048 channels, 16 positions per task).
template <typename T>
std::pair<const T*, const T*> affine_rows(const Affine<T>& bn, int64_t ch0, int64_t cw) {
  if (bn.on()) return {bn.scale.data() + ch0, bn.shift.data() + ch0};
  thread_local std::vector<T> ones, zeros;
  if (int64_t(ones.size()) < cw) ones.assign(cw, T(1)), zeros.assign(cw, T(0));
  return {ones.data(), zeros.data()};
}

// What the channels_last kernels do along one row (one position's cw = gw K channels from
// ch0; a, b: BN's scale and shift of those channels, w, zm, mk, dmk per channel; per-group
// values by row, gw of them), any T and K: through row buffers, group_sums and expand.
template <typename T>
struct RowOps {
  int64_t K, gw, cw;
  std::vector<T> row, ex;
  RowOps(int64_t K_, int64_t gw_) : K(K_), gw(gw_), cw(gw_ * K_), row(cw), ex(cw) {}

  // t_g = sum over group g of w_k (z_k - zm_k)
  void centred_sums(const T* zr, const T* w, const T* zm, T* t) {
#pragma omp simd
    for (int64_t k = 0; k < cw; ++k) row[k] = w[k] * (zr[k] - zm[k]);
    group_sums(row.data(), t, gw, K);
  }
  // y = x gate_g, or relu(x gate_g + r) with a residual r (std::max keeps a NaN, as
  // torch.relu does), r = rr ra + rb when the residual has its own BN (ra, rb non-null)
  void gated(const T* zr, const T* a, const T* b, const T* gate, const T* rr, const T* ra,
             const T* rb, T* yr) {
    expand(gate, row.data(), gw, K);
    if (rr && ra) {
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) {
        yr[k] = std::max((zr[k] * a[k] + b[k]) * row[k] + (rr[k] * ra[k] + rb[k]), T(0));
      }
    } else if (rr) {
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) {
        yr[k] = std::max((zr[k] * a[k] + b[k]) * row[k] + rr[k], T(0));
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) yr[k] = (zr[k] * a[k] + b[k]) * row[k];
    }
  }
  // ds_g = sum over group g of dy_k x_k; with the tail's output yo, dy is ReLU's backward
  // first (as threshold_backward: 0 where yo <= 0), written to gr
  void ds(const T* dyr, const T* yr, T* gr, const T* zr, const T* a, const T* b, T* d) {
    if (yr) {
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) {
        const T v = yr[k] <= T(0) ? T(0) : dyr[k];
        gr[k] = v;
        row[k] = v * (zr[k] * a[k] + b[k]);
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) row[k] = dyr[k] * (zr[k] * a[k] + b[k]);
    }
    group_sums(row.data(), d, gw, K);
  }
  // acc_k += x_k dc_g
  void dm(const T* dc, const T* zr, const T* a, const T* b, T* acc) {
    expand(dc, ex.data(), gw, K);
#pragma omp simd
    for (int64_t k = 0; k < cw; ++k) acc[k] += (zr[k] * a[k] + b[k]) * ex[k];
  }
  // dx_k = g_k s_g + dm_k + m_k dc_g, and the sums of dx and dx z
  void dx(const T* s, const T* dc, const T* gr, const T* zr, const T* dmk, const T* mk, T* xr,
          T* acc, T* acc2) {
    expand(s, row.data(), gw, K);
    expand(dc, ex.data(), gw, K);
#pragma omp simd
    for (int64_t k = 0; k < cw; ++k) {
      const T v = gr[k] * row[k] + dmk[k] + mk[k] * ex[k];
      xr[k] = v;
      acc[k] += v;
      acc2[k] += v * zr[k];
    }
  }
};

#if defined(__AVX512F__)
// RowOps for float rows of whole 64-channel chunks, K = 4, 8, 16 or 32, in 512-bit
// registers (fused_cpu_layout.h's gsum and gexpand): ResNet-50's gated maps, whose rows in
// the first two stages hold 64 groups of 4 and of 8 channels. Through RowOps' row buffers
// the second stage's backward took 0.91-0.96 ms per call at batch 8, 112 px, one thread,
// this way 0.72-0.76 ms (the first stage's, closer to memory's pace, 2.18-2.29 and
// 1.94-2.19 ms).
template <int K>
struct LaneOps {
  int64_t cw;
  const Lanes& L = lanes();
  LaneOps(int64_t, int64_t gw) : cw(gw * K) {}

  static __m512 x_of(const float* zr, const float* a, const float* b, int64_t c) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(zr + c), _mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c));
  }
  void centred_sums(const float* zr, const float* w, const float* zm, float* t) {
    for (int64_t c0 = 0; c0 < cw; c0 += 64) {
      __m512 v[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + 16 * j;
        v[j] = _mm512_mul_ps(_mm512_loadu_ps(w + c),
                             _mm512_sub_ps(_mm512_loadu_ps(zr + c), _mm512_loadu_ps(zm + c)));
      }
      gstore<K>(t + c0 / K, gsum<K>(v, L));
    }
  }
  void gated(const float* zr, const float* a, const float* b, const float* gate,
             const float* rr, const float* ra, const float* rb, float* yr) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < cw; c0 += 64) {
      const __m512 gv = gload<K>(gate + c0 / K);
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + 16 * j;
        const __m512 v = _mm512_mul_ps(x_of(zr, a, b, c), gexpand<K>(gv, j, L));
        // max(0, v) gives v when v is NaN (the second operand), as torch.relu does
        const __m512 out =
            rr ? _mm512_max_ps(zero, _mm512_add_ps(v, ra ? x_of(rr, ra, rb, c)
                                                         : _mm512_loadu_ps(rr + c)))
               : v;
        _mm512_storeu_ps(yr + c, out);
      }
    }
  }
  void ds(const float* dyr, const float* yr, float* gr, const float* zr, const float* a,
          const float* b, float* d) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < cw; c0 += 64) {
      __m512 v[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + 16 * j;
        __m512 g = _mm512_loadu_ps(dyr + c);
        if (yr) {  // 0 where yo <= 0 (not where yo is NaN, as threshold_backward)
          const __mmask16 pass = _mm512_cmp_ps_mask(_mm512_loadu_ps(yr + c), zero, _CMP_NLE_UQ);
          g = _mm512_maskz_mov_ps(pass, g);
          _mm512_storeu_ps(gr + c, g);
        }
        v[j] = _mm512_mul_ps(g, x_of(zr, a, b, c));
      }
      gstore<K>(d + c0 / K, gsum<K>(v, L));
    }
  }
  void dm(const float* dc, const float* zr, const float* a, const float* b, float* acc) {
    for (int64_t c0 = 0; c0 < cw; c0 += 64) {
      const __m512 dv = gload<K>(dc + c0 / K);
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + 16 * j;
        _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(x_of(zr, a, b, c), gexpand<K>(dv, j, L),
                                                  _mm512_loadu_ps(acc + c)));
      }
    }
  }
  void dx(const float* s, const float* dc, const float* gr, const float* zr, const float* dmk,
          const float* mk, float* xr, float* acc, float* acc2) {
    for (int64_t c0 = 0; c0 < cw; c0 += 64) {
      const __m512 sv = gload<K>(s + c0 / K), dv = gload<K>(dc + c0 / K);
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + 16 * j;
        const __m512 v = _mm512_fmadd_ps(
            _mm512_loadu_ps(gr + c), gexpand<K>(sv, j, L),
            _mm512_fmadd_ps(_mm512_loadu_ps(mk + c), gexpand<K>(dv, j, L),
                            _mm512_loadu_ps(dmk + c)));
        _mm512_storeu_ps(xr + c, v);
        _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), v));
        _mm512_storeu_ps(acc2 + c, _mm512_fmadd_ps(v, _mm512_loadu_ps(zr + c),
                                                   _mm512_loadu_ps(acc2 + c)));
      }
    }
  }
};
#endif

// Calls f with the row ops for K channels per group and gw groups: LaneOps where they
// apply, else RowOps.
template <typename T, typename F>
void with_row_ops(int64_t K, int64_t gw, F&& f) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (gw * K % 64 == 0) {
      switch (K) {
        case 4: { LaneOps<4> ops(K, gw); return f(ops); }
        case 8: { LaneOps<8> ops(K, gw); return f(ops); }
        case 16: { LaneOps<16> ops(K, gw); return f(ops); }
        case 32: { LaneOps<32> ops(K, gw); return f(ops); }
        default: break;
      }
    }
  }
#endif
  RowOps<T> ops(K, gw);
  f(ops);
}

// forward_tile on a channels_last map, without transposing it: one sample's groups
// [g0, g0 + gw), its rows (positions) of C channels, of which this task's are cw = gw K
// from ch0 (z, y, r point at the first). Along the rows: the channel means (column sums),
// then per position the group sums of g_k a_k (z_k - mean(z_k)) (group_sums), then the
// statistics per group down the positions, and the gate expanded back to the channels. The
// per-(position, group) values are kept by row (P x gw, K times smaller than the task's map).
// chat: kept as (group, position) rows of P (chat_ld 0: the ops' layout), or by position,
// rows of chat_ld (the tail node's, whose backward reads it so: no transposes; at the first
// stage, K = 4, they took a tenth of the forward).
template <typename T, typename Ops>
void forward_rows(const T* z, T* y, const T* r, int64_t P, int64_t C, int64_t K, int64_t gw,
                  int64_t ch0, const Affine<T>& bn, const Affine<T>& rbn, const T* gamma,
                  const T* beta, T eps, T* chat, int64_t chat_ld, T* sigma, T* m,
                  const T* zmean, Ops& ops) {
  const int64_t cw = gw * K;
  const T dof = T(std::max<int64_t>(P - 1, 1));
  const auto [a, b] = affine_rows(bn, ch0, cw);
  const auto [ra, rb] = affine_rows(rbn, ch0, rbn.on() ? cw : 0);  // the residual's BN
  std::vector<T> w(cw), mean(gw), inv(gw);
  T* t = reused<T>(0, P * gw);
  // The channel means: given (one pass over the map less), or summed here.
  ColumnSums<T> zs(zmean ? 0 : cw);
  if (!zmean) {
    for (int64_t p = 0; p < P; ++p) {
      const T* zr = z + p * C;
      T* acc = zs.row();
#pragma omp simd
      for (int64_t k = 0; k < cw; ++k) acc[k] += zr[k];
      zs.done(p, P);
    }
    for (int64_t k = 0; k < cw; ++k) zs.total[k] /= T(P);
  }
  const T* zm = zmean ? zmean : zs.total;
  for (int64_t k = 0; k < cw; ++k) {
    const T mk = a[k] * zm[k] + b[k];
    w[k] = mk * a[k];
    if (m) m[k] = mk;
  }
  ColumnSums<T> ts(gw);
  for (int64_t p = 0; p < P; ++p) {
    T* tr = t + p * gw;
    ops.centred_sums(z + p * C, w.data(), zm, tr);
    T* acc = ts.row();
#pragma omp simd
    for (int64_t g = 0; g < gw; ++g) acc[g] += tr[g];
    ts.done(p, P);
  }
  for (int64_t g = 0; g < gw; ++g) mean[g] = ts.total[g] / T(P);
  ColumnSums<T> sq(gw);
  for (int64_t p = 0; p < P; ++p) {
    T* tr = t + p * gw;
    T* acc = sq.row();
#pragma omp simd
    for (int64_t g = 0; g < gw; ++g) {
      tr[g] -= mean[g];
      acc[g] += tr[g] * tr[g];
    }
    sq.done(p, P);
  }
  for (int64_t g = 0; g < gw; ++g) {
    const T sd = std::sqrt(sq.total[g] / dof);  // unbiased; 0 at H*W == 1, so chat == 0
    inv[g] = T(1) / (sd + eps);
    if (sigma) sigma[g] = sd;
  }
  const bool by_group = chat && chat_ld == 0;
  if (by_group) {
    for (int64_t p = 0; p < P; ++p) {
      T* tr = t + p * gw;
#pragma omp simd
      for (int64_t g = 0; g < gw; ++g) tr[g] *= inv[g];
    }
    transpose(t, P, gw, gw, chat, P);  // kept as (group, position)
  }
  for (int64_t p = 0; p < P; ++p) {
    T* tr = t + p * gw;
    if (by_group) {
#pragma omp simd
      for (int64_t g = 0; g < gw; ++g) tr[g] = sigmoid(gamma[g] * tr[g] + beta[g]);
    } else if (chat) {  // kept by position
      T* cr = chat + p * chat_ld;
#pragma omp simd
      for (int64_t g = 0; g < gw; ++g) {
        cr[g] = tr[g] * inv[g];
        tr[g] = sigmoid(gamma[g] * cr[g] + beta[g]);
      }
    } else {
#pragma omp simd
      for (int64_t g = 0; g < gw; ++g) tr[g] = sigmoid(gamma[g] * (tr[g] * inv[g]) + beta[g]);
    }
    ops.gated(z + p * C, a, b, tr, r ? r + p * C : nullptr, rbn.on() ? ra : nullptr,
              rbn.on() ? rb : nullptr, y + p * C);
  }
}

// backward_tile on a channels_last map (layout as forward_rows'): chat comes as (group,
// position) rows (chat_ld 0) and is read by position, or by position in rows of chat_ld;
// sd, gamma, beta, dw, db per group from g0; mk, sum_dx, sum_dxz per channel from ch0.
// Three passes along the rows: ds = sum_k dy_k x_k per position and group (ReLU's backward
// first with yo, writing dres); dm = mean_p(x_p dc_p) per channel; dx. (Folding the second
// into the first, by sums that dc's per-group coefficients multiply afterwards, measured
// slower: the first pass is the one that waits on memory, and it grew.)
template <typename T, typename Ops>
void backward_rows(const T* dy, const T* yo, T* dr, const T* z, T* dx, int64_t P, int64_t C,
                   int64_t K, int64_t gw, int64_t ch0, const Affine<T>& bn, const T* gamma,
                   const T* beta, const T* sd, const T* chat, int64_t chat_ld, const T* mk,
                   T eps, T* dw, T* db, T* sum_dx, T* sum_dxz, Ops& ops) {
  const int64_t cw = gw * K;
  const T dof = T(std::max<int64_t>(P - 1, 1));
  const auto [a, b] = affine_rows(bn, ch0, cw);
  // Per (position, group): chat, the gate s, ds then da then dc.
  const T* ct = chat;
  const int64_t ld = chat_ld ? chat_ld : gw;
  if (chat_ld == 0) {
    T* rows = reused<T>(0, P * gw);
    transpose(chat, gw, P, P, rows, gw);
    ct = rows;
  }
  T* s = reused<T>(1, P * gw);
  T* d = reused<T>(2, P * gw);
  std::vector<T> coef(gw), f(gw), mean_da(gw);
  for (int64_t p = 0; p < P; ++p) {  // ReLU's backward first with yo, written to dr
    ops.ds(dy + p * C, yo ? yo + p * C : nullptr, yo ? dr + p * C : nullptr, z + p * C,
           a, b, d + p * gw);
  }
  ColumnSums<T> da_sum(gw), da_chat(gw);
  for (int64_t p = 0; p < P; ++p) {
    T* dp = d + p * gw;
    T* sr = s + p * gw;
    const T* cr = ct + p * ld;
    T* acc = da_sum.row();
    T* acc2 = da_chat.row();
#pragma omp simd
    for (int64_t g = 0; g < gw; ++g) {
      sr[g] = sigmoid(gamma[g] * cr[g] + beta[g]);
      const T v = dp[g] * sr[g] * (T(1) - sr[g]);
      dp[g] = v;
      acc[g] += v;
      acc2[g] += v * cr[g];
    }
    da_sum.done(p, P);
    da_chat.done(p, P);
  }
  for (int64_t g = 0; g < gw; ++g) {
    dw[g] = da_chat.total[g];
    db[g] = da_sum.total[g];
    // sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
    coef[g] = -(sd[g] + eps) * da_chat.total[g] / ((sd[g] > 0 ? sd[g] : T(1)) * dof);
    f[g] = gamma[g] / (sd[g] + eps);
    mean_da[g] = da_sum.total[g] / T(P);
  }
  ColumnSums<T> dm(cw);
  for (int64_t p = 0; p < P; ++p) {
    T* dp = d + p * gw;
    const T* cr = ct + p * ld;
#pragma omp simd
    for (int64_t g = 0; g < gw; ++g) dp[g] = f[g] * (dp[g] - mean_da[g] + cr[g] * coef[g]);
    ops.dm(dp, z + p * C, a, b, dm.row());
    dm.done(p, P);
  }
  for (int64_t k = 0; k < cw; ++k) dm.total[k] /= T(P);
  const T* dmk = dm.total;
  ColumnSums<T> sdx(cw, sum_dx), sdxz(cw, sum_dxz);  // straight to the caller's sums
  for (int64_t p = 0; p < P; ++p) {
    ops.dx(s + p * gw, d + p * gw, (yo ? dr : dy) + p * C, z + p * C, dmk, mk, dx + p * C,
           sdx.row(), sdxz.row());
    sdx.done(p, P);
    sdxz.done(p, P);
  }
}

template <typename T>
void forward_impl(const at::Tensor& z, const Affine<T>& bn, const Affine<T>& rbn,
                  const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& residual, const at::Tensor& y,
                  const at::Tensor& chat, const at::Tensor& sigma, const at::Tensor& m,
                  const at::Tensor& zmean, int64_t groups, bool keep, bool channels_last,
                  double eps_, bool chat_by_position) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3), K = C / groups;
  const T* zp = z.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  // With a residual, y = relu(SGE(x) + residual): the block's add and ReLU in the same write.
  const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
  T* chatp = keep ? chat.mutable_data_ptr<T>() : nullptr;
  T* sigmap = keep ? sigma.mutable_data_ptr<T>() : nullptr;
  T* mp = keep ? m.mutable_data_ptr<T>() : nullptr;
  // The channel means of each sample ((N, C)) when batch_stats gave them, else null.
  const T* zmp = zmean.defined() ? zmean.const_data_ptr<T>() : nullptr;
  const T eps = T(eps_);
  // The statistics of (sample n, group g), the tile's rows: row = n * groups + g.
  auto tile = [&](const T* zt, T* yt, const T* rt, int64_t row, Scratch<T>& s) {
    const int64_t g = row % groups;
    forward_tile(zt, yt, rt, P, K, g * K, bn, rbn, wp[g], bp[g], eps,
                 keep ? chatp + row * P : nullptr,
                 keep ? sigmap + row : nullptr, keep ? mp + row * K : nullptr,
                 zmp ? zmp + row * K : nullptr, s);
  };
  if (!channels_last) {  // one task per (sample, group): its tile is contiguous
    at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> s(P, K);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t at = (row / groups) * C * P + (row % groups) * K * P;
        tile(zp + at, yp + at, rp ? rp + at : nullptr, row, s);
      }
    });
    return;
  }
  const Strips st = strips_of(N, P, K, groups);
  at::parallel_for(0, N * st.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Strip sp = st[task];
      const int64_t row = sp.n * groups + sp.g0;
      with_row_ops<T>(K, sp.g1 - sp.g0, [&](auto& ops) {
        forward_rows(zp + sp.at, yp + sp.at, rp ? rp + sp.at : nullptr, P, C, K, sp.g1 - sp.g0,
                     sp.g0 * K, bn, rbn, wp + sp.g0, bp + sp.g0, eps,
                     !keep ? nullptr
                           : chat_by_position ? chatp + sp.n * groups * P + sp.g0
                                              : chatp + row * P,
                     chat_by_position ? groups : 0, keep ? sigmap + row : nullptr,
                     keep ? mp + row * K : nullptr, zmp ? zmp + row * K : nullptr, ops);
      });
    }
  });
}

// dx (SGE's input gradient), dweight/dbias partials per (n, g), and when BN is folded in the
// per-(n, c) sums of dx and dx * z that BN's backward needs. With the tail's output y_out
// (residual folded in), ReLU's backward first: its gradient is written to dres.
template <typename T>
void backward_impl(const at::Tensor& dy, const at::Tensor& y_out, const at::Tensor& z,
                   const Affine<T>& bn, const at::Tensor& chat, const at::Tensor& sigma,
                   const at::Tensor& m, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& dres, const at::Tensor& dx, const at::Tensor& dw,
                   const at::Tensor& db, const at::Tensor& sums, bool channels_last,
                   double eps_, bool chat_by_position) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  const int64_t groups = chat.size(1), K = C / groups;
  const T* dyp = dy.const_data_ptr<T>();
  const T* zp = z.const_data_ptr<T>();
  const T* chatp = chat.const_data_ptr<T>();
  const T* sigmap = sigma.const_data_ptr<T>();
  const T* mp = m.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  T* dxp = dx.mutable_data_ptr<T>();
  T* dwp = dw.mutable_data_ptr<T>();
  T* dbp = db.mutable_data_ptr<T>();
  const T* yop = y_out.defined() ? y_out.const_data_ptr<T>() : nullptr;
  T* drp = yop ? dres.mutable_data_ptr<T>() : nullptr;
  T* sump = bn.on() ? sums.mutable_data_ptr<T>() : nullptr;  // (2, N, C)
  const T eps = T(eps_);
  auto tile = [&](const T* dyt, const T* yo, T* dr, const T* zt, T* dxt, int64_t row,
                  Scratch<T>& s) {
    const int64_t n = row / groups, g = row % groups, at = n * C + g * K;
    backward_tile(dyt, yo, dr, zt, dxt, P, K, g * K, bn, wp[g], bp[g], sigmap[row],
                  chatp + row * P, mp + row * K, eps, dwp + row, dbp + row,
                  sump ? sump + at : nullptr, sump ? sump + N * C + at : nullptr, s);
  };
  if (!channels_last) {
    at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> s(P, K);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t at = (row / groups) * C * P + (row % groups) * K * P;
        tile(dyp + at, yop ? yop + at : nullptr, yop ? drp + at : nullptr, zp + at, dxp + at,
             row, s);
      }
    });
    return;
  }
  const Strips st = strips_of(N, P, K, groups);
  at::parallel_for(0, N * st.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Strip sp = st[task];
      const int64_t row = sp.n * groups + sp.g0, at = sp.n * C + sp.g0 * K;
      with_row_ops<T>(K, sp.g1 - sp.g0, [&](auto& ops) {
        backward_rows(dyp + sp.at, yop ? yop + sp.at : nullptr, yop ? drp + sp.at : nullptr,
                      zp + sp.at, dxp + sp.at, P, C, K, sp.g1 - sp.g0, sp.g0 * K, bn,
                      wp + sp.g0, bp + sp.g0, sigmap + row,
                      chat_by_position ? chatp + sp.n * groups * P + sp.g0 : chatp + row * P,
                      chat_by_position ? groups : 0, mp + row * K, eps,
                      dwp + row, dbp + row, sump ? sump + at : nullptr,
                      sump ? sump + N * C + at : nullptr, ops);
      });
    }
  });
}

// BN's input gradient in place: dx <- a_c dx + b_c z + d_c (b, d empty: dx <- a_c dx), on
// NCHW maps (rows of P positions, one channel each) or channels_last ones (rows of C).
template <typename T>
void bn_input_grad_impl(const at::Tensor& dx, const at::Tensor& z, const std::vector<T>& a,
                        const std::vector<T>& b, const std::vector<T>& d, bool channels_last) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  T* dxp = dx.mutable_data_ptr<T>();
  const T* zp = z.const_data_ptr<T>();
  const bool full = !b.empty();
  const int64_t len = channels_last ? C : P;
  at::parallel_for(0, N * (channels_last ? P : C), 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* xr = dxp + row * len;
      const T* zr = zp + row * len;
      if (channels_last) {  // per-channel coefficients along the row
        if (full) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) xr[c] = a[c] * xr[c] + b[c] * zr[c] + d[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) xr[c] *= a[c];
        }
        continue;
      }
      const int64_t c = row % C;
      const T av = a[c];
      if (full) {
        const T bv = b[c], dv = d[c];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) xr[p] = av * xr[p] + bv * zr[p] + dv;
      } else {
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) xr[p] *= av;
      }
    }
  });
}

// The per-(n, c) sums of g and g * z ((2, N, C), as the SGE kernels give them for dx) that
// BN's backward needs, for the residual's BN: its gradient g is written by the SGE backward.
template <typename T>
void channel_sums_impl(const at::Tensor& g, const at::Tensor& z, const at::Tensor& sums,
                       bool channels_last) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  const T* gp = g.const_data_ptr<T>();
  const T* zp = z.const_data_ptr<T>();
  T* sp = sums.mutable_data_ptr<T>();
  if (channels_last) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* gn = gp + n * P * C;
        const T* zn = zp + n * P * C;
        ColumnSums<T> sg(C, sp + n * C), sgz(C, sp + N * C + n * C);
        for (int64_t p = 0; p < P; ++p) {
          T* acc = sg.row();
          T* acc2 = sgz.row();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc[c] += gn[p * C + c];
            acc2[c] += gn[p * C + c] * zn[p * C + c];
          }
          sg.done(p, P);
          sgz.done(p, P);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gr = gp + row * P;
      const T* zr = zp + row * P;
      T sg = 0, sgz = 0;
#pragma omp simd reduction(+ : sg, sgz)
      for (int64_t p = 0; p < P; ++p) {
        sg += gr[p];
        sgz += gr[p] * zr[p];
      }
      sp[row] = sg;
      sp[N * C + row] = sgz;
    }
  });
}

// BN's backward from the per-(n, c) sums of dx and dx * z (the SGE kernel's): dz into dx in
// place, and BN's parameter gradients (per channel, in double). dbeta = sum dx, dgamma =
// sum dx * xhat; dz = scale * dx in eval mode, and with batch statistics
// dz = scale * (dx - mean(dx) - xhat * mean(dx * xhat)) = a dx + b z + d.
template <typename T>
std::pair<std::vector<double>, std::vector<double>> bn_backward(
    const at::Tensor& dx, const at::Tensor& z, const Affine<T>& bn, const at::Tensor& sums,
    bool training, bool channels_last) {
  const int64_t N = z.size(0), C = z.size(1), count = N * z.size(2) * z.size(3);
  const T* sp = sums.const_data_ptr<T>();  // (2, N, C)
  std::vector<T> a(bn.scale), b, d;
  if (training) b.resize(C), d.resize(C);
  std::vector<double> dgamma(C), dbeta(C);
  // The samples' sums, sample by sample (rows of C: a channel at a time, they were read at a
  // stride of C, which took most of a late stage's call), the channels split between the
  // threads.
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    std::vector<double> sums_dx(c1 - c0, 0.0), sums_dxz(c1 - c0, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const T* s_dx = sp + n * C + c0;
      const T* s_dxz = sp + N * C + n * C + c0;
      for (int64_t c = 0; c < c1 - c0; ++c) {
        sums_dx[c] += s_dx[c];
        sums_dxz[c] += s_dxz[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      const double sum_dx = sums_dx[c - c0], sum_dxz = sums_dxz[c - c0];
      const double inv = bn.invstd[c], mean = bn.mean[c], scale = bn.scale[c];
      const double sum_dxc = sum_dxz - mean * sum_dx;  // sum dx * (z - mean)
      if (training) {
        const double k = sum_dxc * inv * inv / double(count);
        b[c] = T(-scale * k);
        d[c] = T(scale * (k * mean - sum_dx / double(count)));
      }
      dgamma[c] = sum_dxc * inv;
      dbeta[c] = sum_dx;
    }
  });
  bn_input_grad_impl<T>(dx, z, a, b, d, channels_last);
  return {dgamma, dbeta};
}

// BatchNorm's batch statistics of an NCHW or channels_last map: per channel mean and biased
// variance. ATen's torch.batch_norm_update_stats took 60 ms over ResNet-50's 16 gated BN
// inputs at batch 16, 224 px (a pass over them from memory takes ~8). Here one pass: each
// (sample, channel) row's mean, then its centred sum of squares from cache (channels_last:
// a sample's per-channel sums along its rows of C, then the same from L2/L3); rows are
// combined per channel in double (M2 = sum M2_row + P sum (mean_row - mean)^2), so a large
// offset costs no precision. The (sample, channel) means also go to zmean ((N, C)), for
// the forward, which would compute them again.
template <typename T>
void batch_stats_impl(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
                      const at::Tensor& zmean, bool channels_last) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  const T* zp = z.const_data_ptr<T>();
  T* zmp = zmean.mutable_data_ptr<T>();
  // Written in full below (ColumnSums zeroes its totals): no zero-filling here, which took a
  // tenth of a 16 x 2048 x 4 x 4 call, in the serial part.
  const std::unique_ptr<double[]> row_mean(new double[N * C]), row_m2(new double[N * C]);
  if (channels_last) {
    // Each a sum of P values: blocks of 64 rows summed in T (full-width vectors), each
    // block's sum added to the total in double (double all along took 1.5-2x the time).
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> mt(C);
      for (int64_t n = begin; n < end; ++n) {
        const T* zn = zp + n * P * C;
        ColumnSums<T, double> m(C, row_mean.get() + n * C), q(C, row_m2.get() + n * C);
        // Four rows per update of the row of sums: one row at a time, the loads and stores
        // of the sums bound the loop (2.4x ATen's time at 16 x 1024 x 7 x 7). Blocks of 64
        // rows stay whole (64 is a multiple of 4).
        int64_t p = 0;
        for (; p + 4 <= P; p += 4) {
          T* acc = m.row();
          const T* r = zn + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc[c] += (r[c] + r[C + c]) + (r[2 * C + c] + r[3 * C + c]);
          }
          m.done(p + 3, P);
        }
        for (; p < P; ++p) {
          T* acc = m.row();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc[c] += zn[p * C + c];
          m.done(p, P);
        }
        for (int64_t c = 0; c < C; ++c) {
          m.total[c] /= double(P);
          mt[c] = zmp[n * C + c] = T(m.total[c]);
        }
        const T* mc = mt.data();
        for (p = 0; p + 4 <= P; p += 4) {
          T* acc = q.row();
          const T* r = zn + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d0 = r[c] - mc[c], d1 = r[C + c] - mc[c];
            const T d2 = r[2 * C + c] - mc[c], d3 = r[3 * C + c] - mc[c];
            acc[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
          }
          q.done(p + 3, P);
        }
        for (; p < P; ++p) {
          T* acc = q.row();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = zn[p * C + c] - mc[c];
            acc[c] += d * d;
          }
          q.done(p, P);
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* zr = zp + row * P;
        const T m = mean_of(zr, P);
        T q = 0;
#pragma omp simd reduction(+ : q)
        for (int64_t p = 0; p < P; ++p) q += (zr[p] - m) * (zr[p] - m);
        row_mean[row] = m;
        row_m2[row] = q;
        zmp[row] = m;
      }
    });
  }
  T* mp = mean.mutable_data_ptr<T>();
  T* vp = var.mutable_data_ptr<T>();
  // Combined sample by sample, along rows of C (a channel at a time, the rows were read at a
  // stride of C: 43% of a 16 x 2048 x 4 x 4 call), the channels split between the threads
  // (done by one, this took a quarter of that call while the other thread waited).
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    const int64_t cw = c1 - c0;
    std::vector<double> mu(cw, 0.0), m2(cw, 0.0), spread(cw, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const double* rm = row_mean.get() + n * C + c0;
      for (int64_t c = 0; c < cw; ++c) mu[c] += rm[c];
    }
    for (int64_t c = 0; c < cw; ++c) mu[c] /= double(N);
    for (int64_t n = 0; n < N; ++n) {
      const double* rm = row_mean.get() + n * C + c0;
      const double* rq = row_m2.get() + n * C + c0;
      for (int64_t c = 0; c < cw; ++c) {
        const double d = rm[c] - mu[c];
        m2[c] += rq[c];
        spread[c] += d * d;
      }
    }
    for (int64_t c = 0; c < cw; ++c) {
      mp[c0 + c] = T(mu[c]);
      vp[c0 + c] = T((m2[c] + double(P) * spread[c]) / double(N * P));
    }
  });
}

// The residual's BN needs a residual, and C-channel statistics and parameters (affine_of
// reads C of each).
void check_residual_bn(const OptTensor& residual, const OptTensor& rbn_weight,
                       const OptTensor& rbn_bias, const OptTensor& rmean, const OptTensor& rvar,
                       int64_t C) {
  if (!rmean) return;
  TORCH_CHECK(residual && rvar && rmean->numel() == C && rvar->numel() == C &&
                  (!rbn_weight || rbn_weight->numel() == C) &&
                  (!rbn_bias || rbn_bias->numel() == C),
              "sge_cpu: the residual's BN needs the residual and its ", C, " channels' "
              "statistics and parameters");
}

// A per-channel vector of doubles as a tensor of ``like``'s type.
at::Tensor channel_tensor(const std::vector<double>& v, const at::Tensor& like) {
  at::Tensor t = at::empty({int64_t(v.size())}, like.options().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t.to(like.scalar_type());
}

// y = SGE(BN(z)) (BN: with the given statistics; none without mean), or with a residual the
// block's tail relu(SGE(BN(z)) + residual); chat, sigma, m for the backward when keep.
// out: where y goes instead of a new tensor (y is then returned empty), of z's shape, type
// and layout; it may be z itself, since every element of z is read before y is written at
// the same place (the kernels' last pass goes element by element). rmean, rvar (and the
// optional rbn_weight, rbn_bias): the residual's own BN (a downsampling shortcut's), applied
// as the residual is read, so that its output is never written. chat_by_position (the tail
// node's; channels_last maps only): chat kept by position, as (N, H*W, G), for a backward
// told the same.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sge_cpu_forward(
    const at::Tensor& z_in, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& mean, const OptTensor& var, double bn_eps, const at::Tensor& weight,
    const at::Tensor& bias, const OptTensor& residual, int64_t groups, bool keep, double eps,
    const OptTensor& zmean, const OptTensor& out, const OptTensor& rbn_weight,
    const OptTensor& rbn_bias, const OptTensor& rmean, const OptTensor& rvar, double rbn_eps,
    bool chat_by_position) {
  const bool cl = is_channels_last(z_in);
  TORCH_CHECK(z_in.dim() == 4 && z_in.numel() > 0, "sge_cpu: takes non-empty 4-d maps");
  const at::Tensor z = z_in.contiguous(format_of(cl));
  TORCH_CHECK(!residual || residual->sizes() == z.sizes(),
              "sge_cpu: the residual must have the input's shape");
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  check_residual_bn(residual, rbn_weight, rbn_bias, rmean, rvar, C);
  TORCH_CHECK(!zmean || zmean->numel() == 0 || zmean->sizes() == at::IntArrayRef({N, C}),
              "sge_cpu: zmean must be the input's (N, C) channel means");
  const bool means = zmean && zmean->numel() > 0;
  TORCH_CHECK(!out || (out->sizes() == z.sizes() && out->scalar_type() == z.scalar_type() &&
                       out->is_contiguous(format_of(cl))),
              "sge_cpu: out must have the input's shape, type and layout");
  const at::Tensor y = out ? *out : at::empty_like(z);
  auto stat = [&](std::vector<int64_t> shape) {
    return keep ? z.new_empty(shape) : z.new_empty({0});
  };
  const at::Tensor chat = stat({N, groups, P}), sigma = stat({N, groups, 1});
  const at::Tensor m = stat({N, groups, C / groups});
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_forward", [&] {
    using T = scalar_t;
    forward_impl<T>(z, affine_of<T>(bn_weight, bn_bias, mean, var, bn_eps, C),
                    affine_of<T>(rbn_weight, rbn_bias, rmean, rvar, rbn_eps, C),
                    as_type<T>(weight), as_type<T>(bias),
                    residual ? as_type<T>(*residual, format_of(cl)) : at::Tensor(), y, chat,
                    sigma, m, means ? as_type<T>(*zmean) : at::Tensor(), groups, keep, cl, eps,
                    chat_by_position && cl);
  });
  return {out ? z.new_empty({0}) : y, chat, sigma, m};
}

// (dz, dresidual, dweight, dbias, dbn_weight, dbn_bias, drbn_weight, drbn_bias): forward's
// gradients, BN's backward included (batch statistics when bn_training). dresidual is empty
// without y_out (forward's output, given when it had a residual), BN's gradients without BN
// parameters. With the residual's BN (rmean, rvar; the residual is then its input), its
// backward too (batch statistics when rbn_training): dresidual is its input gradient,
// written over ReLU's gradient in place, and drbn_weight, drbn_bias its parameters' (empty
// without them, or without its BN).
// out: where the first map gradient goes instead of a new tensor (dresidual with y_out, else
// dz; it is then returned empty), of dy's shape, type and layout; it may be dy itself,
// since the kernels' last read of each element of dy comes before that gradient is written
// at the same place. A dy copied here (another type or layout) is the op's own and used so
// without out. chat_by_position: chat as the forward kept it when told so (channels_last).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
sge_cpu_backward(
    const at::Tensor& dy_in, const OptTensor& y_out, const at::Tensor& z_in,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
    const OptTensor& var, double bn_eps, bool bn_training, const at::Tensor& chat,
    const at::Tensor& sigma, const at::Tensor& m, const at::Tensor& weight,
    const at::Tensor& bias, double eps, const OptTensor& residual, const OptTensor& rbn_weight,
    const OptTensor& rbn_bias, const OptTensor& rmean, const OptTensor& rvar, double rbn_eps,
    bool rbn_training, const OptTensor& out, bool chat_by_position) {
  const bool cl = is_channels_last(dy_in);  // the layout of dy and of the gradients
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.numel() > 0, "sge_cpu: takes non-empty 4-d maps");
  TORCH_CHECK(!chat_by_position || cl, "sge_cpu: chat kept by position needs a "
              "channels_last backward");
  const at::Tensor z = z_in.contiguous(format_of(cl));
  const at::Tensor dy = dy_in.to(z.scalar_type()).contiguous(format_of(cl));
  TORCH_CHECK(dy.sizes() == z.sizes() && (!y_out || y_out->sizes() == z.sizes()),
              "sge_cpu: dy and y_out must have the input's shape");
  const int64_t N = z.size(0), C = z.size(1), groups = chat.size(1);
  check_residual_bn(residual, rbn_weight, rbn_bias, rmean, rvar, C);
  TORCH_CHECK(!rmean || (y_out && residual->sizes() == z.sizes()),
              "sge_cpu: the residual's BN needs the forward's output and the residual");
  const at::Tensor yo =
      y_out ? y_out->to(z.scalar_type()).contiguous(format_of(cl)) : at::Tensor();
  TORCH_CHECK(!out || (out->sizes() == dy.sizes() && out->scalar_type() == dy.scalar_type() &&
                       out->is_contiguous(format_of(cl))),
              "sge_cpu: out must have dy's shape, type and layout");
  // Where the first map gradient goes: out, or dy when it is a copy made above.
  const at::Tensor first = out ? *out : (dy.is_same(dy_in) ? at::empty_like(dy) : dy);
  const at::Tensor dres = y_out ? first : dy.new_empty({0});
  const at::Tensor dx = y_out ? at::empty_like(dy) : first;
  const at::Tensor dw = chat.new_empty({N, groups}), db = chat.new_empty({N, groups});
  at::Tensor dbn_weight = dy.new_empty({0}), dbn_bias = dy.new_empty({0});
  at::Tensor drbn_weight = dy.new_empty({0}), drbn_bias = dy.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_backward", [&] {
    using T = scalar_t;
    const Affine<T> bn = affine_of<T>(bn_weight, bn_bias, mean, var, bn_eps, C);
    const at::Tensor sums = bn.on() ? z.new_empty({2, N, C}) : z.new_empty({0});
    backward_impl<T>(dy, yo, z, bn, chat, sigma, m, as_type<T>(weight), as_type<T>(bias),
                     dres, dx, dw, db, sums, cl, eps, chat_by_position);
    // A BN's backward over its output gradient g in place, and its parameters' gradients
    // into dpw, dpb when it has parameters.
    auto norm_backward = [&](const at::Tensor& g, const at::Tensor& input, const Affine<T>& f,
                             const at::Tensor& s, bool training, const OptTensor& pw,
                             const OptTensor& pb, at::Tensor& dpw, at::Tensor& dpb) {
      const auto grads = bn_backward<T>(g, input, f, s, training, cl);
      if (pw) {
        dpw = channel_tensor(grads.first, *pw);
        dpb = channel_tensor(grads.second, pb ? *pb : *pw);
      }
    };
    if (bn.on()) {
      norm_backward(dx, z, bn, sums, bn_training, bn_weight, bn_bias, dbn_weight, dbn_bias);
    }
    const Affine<T> rbn = affine_of<T>(rbn_weight, rbn_bias, rmean, rvar, rbn_eps, C);
    if (rbn.on()) {  // ReLU's gradient in dres becomes the residual BN's input gradient
      const at::Tensor zr = as_type<T>(*residual, format_of(cl));
      const at::Tensor rsums = z.new_empty({2, N, C});
      channel_sums_impl<T>(dres, zr, rsums, cl);
      norm_backward(dres, zr, rbn, rsums, rbn_training, rbn_weight, rbn_bias, drbn_weight,
                    drbn_bias);
    }
  });
  const std::vector<int64_t> shape{1, groups, 1, 1};
  const at::Tensor none = dy.new_empty({0});  // out's gradient, not returned a second time
  return {out && !y_out ? none : dx, out && y_out ? none : dres,
          dw.sum(0).view(shape).to(weight.scalar_type()),
          db.sum(0).view(shape).to(bias.scalar_type()), dbn_weight, dbn_bias, drbn_weight,
          drbn_bias};
}

// BN's batch statistics (mean, biased variance) of a contiguous NCHW or channels_last map,
// updating the running ones as nn.BatchNorm2d does when given (running variance unbiased),
// and each sample's channel means ((N, C), forward's zmean).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats(const at::Tensor& z,
                                               const OptTensor& running_mean,
                                               const OptTensor& running_var, double momentum) {
  const bool cl = is_channels_last(z);
  TORCH_CHECK(z.dim() == 4 && z.numel() > 0, "sge_cpu: takes non-empty 4-d maps");
  TORCH_CHECK(cl || z.is_contiguous(), "sge_cpu: batch_stats takes contiguous NCHW or "
              "channels_last maps");
  const at::Tensor mean = z.new_empty({z.size(1)}), var = z.new_empty({z.size(1)});
  const at::Tensor zmean = z.new_empty({z.size(0), z.size(1)});
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_batch_stats", [&] {
    batch_stats_impl<scalar_t>(z, mean, var, zmean, cl);
  });
  if (running_mean) {
    const double count = double(z.numel() / z.size(1));
    running_mean->mul_(1 - momentum).add_(mean, momentum);
    running_var->mul_(1 - momentum).add_(var, momentum * count / (count - 1));
  }
  return {mean, var, zmean};
}

// ---------------------------------------------------------------------------------------
// The block's tail as one C++ autograd node (sge/fused.py's eager calls on this path).
//
// Why: through a Python autograd.Function with its Python wrappers, a tail's forward and
// backward cost 243 us of host time at 2 x 256 x 4 x 4 (one thread) against ResNet's 123,
// of which these kernels' own calls were 52: Python and autograd's Python node made most
// of the difference, paid by every block at every step.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether the backward writes its first map gradient over its incoming gradient dy: when
// autograd alone holds dy (kCheck), by reference counts against a calibration; always or
// never (tests, A/B timing).
enum ReusePolicy : int64_t { kCheck = 0, kAlways = 1, kNever = 2 };
std::atomic<int64_t> reuse_policy{kCheck};
// The counts of a gradient that autograd alone holds, seen where the tail's backward takes
// its own (-1: not calibrated yet).
std::atomic<int64_t> free_tensor_refs{-1}, free_storage_refs{-1};
// Per backward, while recorded (tests): 1 if it wrote over dy, + 2 if it did the residual
// BN's backward.
std::atomic<bool> recording{false};
std::mutex log_mutex;
std::vector<int64_t> backward_log;

// A backward's incoming gradient: its tensor's and its storage's reference counts, taken
// first thing, in the same way by the probe and by the tail.
std::pair<int64_t, int64_t> grad_refs(const variable_list& grads) {
  return {int64_t(grads[0].use_count()), int64_t(grads[0].storage().use_count())};
}

// Records the counts of a fresh gradient: a multiplication's output, which nothing else
// holds, passed to this node's backward.
struct FreeGradProbe : public torch::autograd::Function<FreeGradProbe> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x) { return x.clone(); }
  static variable_list backward(AutogradContext*, variable_list grads) {
    const auto counts = grad_refs(grads);
    free_tensor_refs = counts.first;
    free_storage_refs = counts.second;
    return {grads[0]};
  }
};

// Once per process, before the first tail whose backward is to come (a small backward of
// its own, so never in inference mode).
void calibrate_free_grads() {
  if (free_tensor_refs.load() >= 0) return;
  at::AutoGradMode grad_mode(true);
  const at::Tensor x = at::zeros({2}, at::kFloat).requires_grad_();
  torch::autograd::backward({FreeGradProbe::apply(x).mul(2.0).sum()});
}

// Whether the tail's backward may write over dy, given its grad_refs: a tensor hook that
// kept dy (its Python object), a post-hook on the node, torch.autograd.grad capturing it
// (each a reference to its tensor), a view of the same memory, as another slice's gradient
// is after torch.cat (its storage), each add a count; with create_graph (grad mode on) dy
// may be part of a graph. PyTorch's own gradient accumulation steals buffers by the same
// kind of count (AccumulateGrad, InputBuffer::add).
bool grad_is_free(std::pair<int64_t, int64_t> counts) {
  const int64_t policy = reuse_policy.load();
  if (policy != kCheck) return policy == kAlways;
  return !at::GradMode::is_enabled() && counts.first == free_tensor_refs.load() &&
         counts.second == free_storage_refs.load();
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor or_none(const OptTensor& t) { return t ? *t : at::Tensor(); }
// The kernels' empty "no gradient" as autograd's.
at::Tensor grad_or_none(const at::Tensor& t) { return t.numel() ? t : at::Tensor(); }

// Arguments: sge/fused.py's _fused_forward's 13, then the residual's own BN.
struct Tail : public torch::autograd::Function<Tail> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const OptTensor& bn_weight,
                            const OptTensor& bn_bias, const OptTensor& mean,
                            const OptTensor& var, const OptTensor& zmean,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const OptTensor& residual, int64_t groups, bool bn_training,
                            double bn_eps, bool keep, const OptTensor& rbn_weight,
                            const OptTensor& rbn_bias, const OptTensor& rmean,
                            const OptTensor& rvar, bool rbn_training, double rbn_eps,
                            double eps) {
    auto [y, chat, sigma, m] =
        sge_cpu_forward(z, bn_weight, bn_bias, mean, var, bn_eps, weight, bias, residual,
                        groups, keep, eps, zmean, std::nullopt, rbn_weight, rbn_bias, rmean,
                        rvar, rbn_eps, /*chat_by_position=*/true);
    // With a residual, ReLU's backward needs the output: the block's output, which the next
    // block's convolution keeps anyway. The residual itself only with its own BN, whose
    // backward needs it (as nn.BatchNorm2d would have kept it).
    ctx->save_for_backward({z, or_none(bn_weight), or_none(bn_bias), or_none(mean),
                            or_none(var), chat, sigma, m, weight, bias,
                            residual ? y : at::Tensor(), rmean ? *residual : at::Tensor(),
                            or_none(rbn_weight), or_none(rbn_bias), or_none(rmean),
                            or_none(rvar)});
    ctx->saved_data["flags"] = c10::List<bool>(
        {bn_training, rbn_training, bool(residual), is_channels_last(z)});
    ctx->saved_data["eps"] = c10::List<double>({bn_eps, rbn_eps, eps});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto counts = grad_refs(grads);  // first thing, as the probe's
    bool free = grad_is_free(counts);
    // (A backward called inside an autocast region: as in the forward, nothing to downcast.)
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    // As saved: z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias (0-9), y (10),
    // the residual (11), rbn_weight, rbn_bias, rmean, rvar (12-15); undefined where absent.
    const auto s = ctx->get_saved_variables();
    const auto flags = ctx->saved_data["flags"].toBoolList();
    const auto eps = ctx->saved_data["eps"].toDoubleList();
    const bool residual = flags[2], channels_last = flags[3];
    at::Tensor dy = grads[0];
    // In a channels_last model the last stage's dy comes NCHW from the head's pooling:
    // taking it as the maps are (one copy of dy) spares copying z and y to NCHW, and keeps
    // the gradients that flow on channels_last. That copy is this backward's own.
    if (channels_last && !dy.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      dy = dy.contiguous(at::MemoryFormat::ChannelsLast);
      free = reuse_policy.load() != kNever;
    }
    const bool dense = dy.is_contiguous() || dy.is_contiguous(at::MemoryFormat::ChannelsLast);
    const bool over_dy = free && dense && dy.scalar_type() == s[0].scalar_type();
    if (recording.load()) {
      std::lock_guard<std::mutex> lock(log_mutex);
      backward_log.push_back(int64_t(over_dy) + 2 * int64_t(s[14].defined()));
    }
    auto [dz, dres, dweight, dbias, dbn_weight, dbn_bias, drbn_weight, drbn_bias] =
        sge_cpu_backward(dy, opt(s[10]), s[0], opt(s[1]), opt(s[2]), opt(s[3]), opt(s[4]),
                         eps[0], flags[0], s[5], s[6], s[7], s[8], s[9], eps[2], opt(s[11]),
                         opt(s[12]), opt(s[13]), opt(s[14]), opt(s[15]), eps[1], flags[1],
                         over_dy ? OptTensor(dy) : std::nullopt, channels_last);
    if (over_dy) (residual ? dres : dz) = dy;
    const at::Tensor none;
    return {dz, grad_or_none(dbn_weight), grad_or_none(dbn_bias), none, none, none, dweight,
            dbias, residual ? dres : none, none, none, none, none, grad_or_none(drbn_weight),
            grad_or_none(drbn_bias), none, none, none, none, none};
  }
};

at::Tensor tail(const at::Tensor& z, const OptTensor& bn_weight, const OptTensor& bn_bias,
                const OptTensor& mean, const OptTensor& var, const OptTensor& zmean,
                const at::Tensor& weight, const at::Tensor& bias, const OptTensor& residual,
                int64_t groups, bool bn_training, double bn_eps, bool keep,
                const OptTensor& rbn_weight, const OptTensor& rbn_bias, const OptTensor& rmean,
                const OptTensor& rvar, bool rbn_training, double rbn_eps, double eps) {
  // Autocast has nothing to downcast here (no matmuls), and the statistics stay in z's type.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (keep && at::GradMode::is_enabled()) calibrate_free_grads();
  return Tail::apply(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups,
                     bn_training, bn_eps, keep, rbn_weight, rbn_bias, rmean, rvar,
                     rbn_training, rbn_eps, eps);
}

// Sets the reuse policy (kCheck, kAlways, kNever; -1 leaves it; 3 forgets the calibration,
// which the next tail bound for a backward takes again, and checks); gives the policy and
// the calibration's two counts (-1 when not taken) as they were.
std::vector<int64_t> grad_reuse(int64_t policy) {
  std::vector<int64_t> before{reuse_policy.load(), free_tensor_refs.load(),
                              free_storage_refs.load()};
  TORCH_CHECK(policy >= -1 && policy <= 3, "sge_cpu: no reuse policy ", policy);
  if (policy == 3) {
    free_tensor_refs = -1;
    free_storage_refs = -1;
    policy = kCheck;
  }
  if (policy >= 0) reuse_policy = policy;
  return before;
}

// The tail backwards' log entries since the last call, and whether to record them from now
// on.
std::vector<int64_t> backward_log_since(bool record) {
  std::lock_guard<std::mutex> lock(log_mutex);
  std::vector<int64_t> log;
  log.swap(backward_log);
  recording = record;
  return log;
}

// The ops (chat by group and position).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& z, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& mean, const OptTensor& var, double bn_eps, const at::Tensor& weight,
    const at::Tensor& bias, const OptTensor& residual, int64_t groups, bool keep, double eps,
    const OptTensor& zmean, const OptTensor& out, const OptTensor& rbn_weight,
    const OptTensor& rbn_bias, const OptTensor& rmean, const OptTensor& rvar, double rbn_eps) {
  return sge_cpu_forward(z, bn_weight, bn_bias, mean, var, bn_eps, weight, bias, residual,
                         groups, keep, eps, zmean, out, rbn_weight, rbn_bias, rmean, rvar,
                         rbn_eps, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
backward_op(const at::Tensor& dy, const OptTensor& y_out, const at::Tensor& z,
            const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
            const OptTensor& var, double bn_eps, bool bn_training, const at::Tensor& chat,
            const at::Tensor& sigma, const at::Tensor& m, const at::Tensor& weight,
            const at::Tensor& bias, double eps, const OptTensor& residual,
            const OptTensor& rbn_weight, const OptTensor& rbn_bias, const OptTensor& rmean,
            const OptTensor& rvar, double rbn_eps, bool rbn_training, const OptTensor& out) {
  return sge_cpu_backward(dy, y_out, z, bn_weight, bn_bias, mean, var, bn_eps, bn_training,
                          chat, sigma, m, weight, bias, eps, residual, rbn_weight, rbn_bias,
                          rmean, rvar, rbn_eps, rbn_training, out, false);
}

}  // namespace

TORCH_LIBRARY(sge_cpu, lib) {
  lib.def("forward(Tensor z, Tensor? bn_weight, Tensor? bn_bias, Tensor? mean, Tensor? var, "
          "float bn_eps, Tensor weight, Tensor bias, Tensor? residual, int groups, bool keep, "
          "float eps, Tensor? zmean, Tensor(a!)? out, Tensor? rbn_weight, Tensor? rbn_bias, "
          "Tensor? rmean, Tensor? rvar, float rbn_eps) -> (Tensor, Tensor, Tensor, Tensor)",
          &forward_op);
  lib.def("backward(Tensor dy, Tensor? y_out, Tensor z, Tensor? bn_weight, Tensor? bn_bias, "
          "Tensor? mean, Tensor? var, float bn_eps, bool bn_training, Tensor chat, "
          "Tensor sigma, Tensor m, Tensor weight, Tensor bias, float eps, Tensor? residual, "
          "Tensor? rbn_weight, Tensor? rbn_bias, Tensor? rmean, Tensor? rvar, float rbn_eps, "
          "bool rbn_training, Tensor(a!)? out=None) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
          &backward_op);
  lib.def("batch_stats(Tensor z, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "float momentum) -> (Tensor, Tensor, Tensor)", &batch_stats);
  lib.def("tail(Tensor z, Tensor? bn_weight, Tensor? bn_bias, Tensor? mean, Tensor? var, "
          "Tensor? zmean, Tensor weight, Tensor bias, Tensor? residual, int groups, "
          "bool bn_training, float bn_eps, bool keep, Tensor? rbn_weight, Tensor? rbn_bias, "
          "Tensor? rmean, Tensor? rvar, bool rbn_training, float rbn_eps, float eps) -> Tensor",
          &tail);
  lib.def("grad_reuse(int policy) -> int[]", &grad_reuse);
  lib.def("backward_log(bool record) -> int[]", &backward_log_since);
}
