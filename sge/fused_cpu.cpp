// CPU kernels of the fused SGE (sge/fused_cpu.py builds this file and calls it).
//
// The CPU counterpart of sge/fused_triton.py: one task per (sample, group) pair works on the
// group's C/G x H*W tile (contiguous in NCHW, at most a few hundred KB, so it stays in the
// core's L2 while the passes over it run). Statistics are computed in the input's type
// (float or double), like the Triton kernels and the reference. Formulas: the module
// docstring of sge/fused.py. Outputs are allocated by the caller; these only fill them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Per-channel affine (BN folded in) or the identity when scale is empty.
template <typename T>
struct Affine {
  const T* scale;
  const T* shift;
  T a(int64_t c) const { return scale ? scale[c] : T(1); }
  T b(int64_t c) const { return shift ? shift[c] : T(0); }
};

template <typename T>
Affine<T> affine_of(const at::Tensor& scale, const at::Tensor& shift) {
  if (scale.numel() == 0) return {nullptr, nullptr};
  return {scale.const_data_ptr<T>(), shift.const_data_ptr<T>()};
}

template <typename T>
void forward_impl(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                  const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                  const at::Tensor& chat, const at::Tensor& sigma, const at::Tensor& m,
                  int64_t groups, bool keep, double eps_) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3), K = C / groups;
  const T* zp = z.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  T* chatp = keep ? chat.mutable_data_ptr<T>() : nullptr;
  T* sigmap = keep ? sigma.mutable_data_ptr<T>() : nullptr;
  T* mp = keep ? m.mutable_data_ptr<T>() : nullptr;
  const Affine<T> bn = affine_of<T>(scale, shift);
  const T eps = T(eps_), dof = T(std::max<int64_t>(P - 1, 1));
  at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> cbuf(P), mbuf(K), wbuf(K), zbuf(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row % groups, c0 = (row / groups) * C + g * K;
      const T* zt = zp + c0 * P;
      T* yt = yp + c0 * P;
      T* ct = keep ? chatp + row * P : cbuf.data();
      T* mk = keep ? mp + row * K : mbuf.data();
      T* wk = wbuf.data();
      T* zm = zbuf.data();
      // Three reads of the tile (from cache after the first) and one write: x = BN(z) is
      // recomputed where needed, never stored. Channel means of x: g_k = a_k mean(z_k) + b_k.
      for (int64_t k = 0; k < K; ++k) {
        const T a = bn.a(g * K + k), b = bn.b(g * K + k);
        zm[k] = mean_of(zt + k * P, P);
        mk[k] = a * zm[k] + b;
        wk[k] = mk[k] * a;
      }
      // c_p = <g, x_p> up to a constant, which c - mean(c) removes: sum_k g_k (x_kp - g_k)
      // = sum_k g_k a_k (z_kp - mean(z_k)), each channel centred before it is summed (so a
      // large offset in z costs no precision).
      std::fill(ct, ct + P, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T wv = wk[k], zmean = zm[k];
        const T* zr = zt + k * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) ct[p] += wv * (zr[p] - zmean);
      }
      const T mean = mean_of(ct, P);
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t p = 0; p < P; ++p) {
        ct[p] -= mean;
        sq += ct[p] * ct[p];
      }
      const T sd = std::sqrt(sq / dof);  // unbiased std; 0 at H*W == 1, so chat == 0
      const T inv = T(1) / (sd + eps), gamma = wp[g], beta = bp[g];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) ct[p] *= inv;
      if (keep) sigmap[row] = sd;
      // The gate goes into cbuf (chat must stay when kept; otherwise cbuf is chat).
      T* gate = cbuf.data();
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) gate[p] = sigmoid(gamma * ct[p] + beta);
      for (int64_t k = 0; k < K; ++k) {
        const T a = bn.a(g * K + k), b = bn.b(g * K + k);
        const T* zr = zt + k * P;
        T* yr = yt + k * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) yr[p] = (zr[p] * a + b) * gate[p];
      }
    }
  });
}

// dx (SGE's input gradient), dweight/dbias partials per (n, g), and when BN is folded in the
// per-(n, c) sums of dx and dx * z that BN's backward needs.
template <typename T>
void backward_impl(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& chat, const at::Tensor& sigma,
                   const at::Tensor& m, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db,
                   const at::Tensor& sums, double eps_) {
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
  const Affine<T> bn = affine_of<T>(scale, shift);
  T* sump = bn.scale ? sums.mutable_data_ptr<T>() : nullptr;  // (2, N, C)
  const T eps = T(eps_), dof = T(std::max<int64_t>(P - 1, 1));
  at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(P), dbuf(P);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / groups, g = row % groups, c0 = n * C + g * K;
      const T* zt = zp + c0 * P;
      const T* dyt = dyp + c0 * P;
      T* dxt = dxp + c0 * P;
      const T* ct = chatp + row * P;
      const T* mk = mp + row * K;
      const T gamma = wp[g], beta = bp[g], sd = sigmap[row];
      T* s = sbuf.data();
      T* d = dbuf.data();  // ds, then da, then dc
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) s[p] = sigmoid(gamma * ct[p] + beta);
      std::fill(d, d + P, T(0));
      for (int64_t k = 0; k < K; ++k) {  // ds_p = sum_k dy_kp x_kp
        const T a = bn.a(g * K + k), b = bn.b(g * K + k);
        const T* zr = zt + k * P;
        const T* dr = dyt + k * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) d[p] += dr[p] * (zr[p] * a + b);
      }
      T da_sum = 0, da_chat = 0;
#pragma omp simd reduction(+ : da_sum, da_chat)
      for (int64_t p = 0; p < P; ++p) {
        const T v = d[p] * s[p] * (T(1) - s[p]);
        d[p] = v;
        da_sum += v;
        da_chat += v * ct[p];
      }
      dwp[row] = da_chat;
      dbp[row] = da_sum;
      // sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
      const T coef = -(sd + eps) * da_chat / ((sd > 0 ? sd : T(1)) * dof);
      const T f = gamma / (sd + eps), mean_da = da_sum / T(P);
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) d[p] = f * (d[p] - mean_da + ct[p] * coef);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t ch = g * K + k;
        const T a = bn.a(ch), b = bn.b(ch), mv = mk[k];
        const T* zr = zt + k * P;
        const T* dr = dyt + k * P;
        T* xr = dxt + k * P;
        T dm = 0;
#pragma omp simd reduction(+ : dm)
        for (int64_t p = 0; p < P; ++p) dm += (zr[p] * a + b) * d[p];
        dm /= T(P);
        T sdx = 0, sdxz = 0;
#pragma omp simd reduction(+ : sdx, sdxz)
        for (int64_t p = 0; p < P; ++p) {
          const T v = dr[p] * s[p] + dm + mv * d[p];
          xr[p] = v;
          sdx += v;
          sdxz += v * zr[p];
        }
        if (sump) {
          sump[n * C + ch] = sdx;
          sump[N * C + n * C + ch] = sdxz;
        }
      }
    }
  });
}

// BN's input gradient in place: dx <- a_c dx + b_c z + d_c (b, d empty: dx <- a_c dx).
template <typename T>
void bn_input_grad_impl(const at::Tensor& dx, const at::Tensor& z, const at::Tensor& a,
                        const at::Tensor& b, const at::Tensor& d) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  T* dxp = dx.mutable_data_ptr<T>();
  const T* zp = z.const_data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const bool affine = b.numel() > 0;
  const T* bp = affine ? b.const_data_ptr<T>() : nullptr;
  const T* dp = affine ? d.const_data_ptr<T>() : nullptr;
  at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C;
      T* xr = dxp + row * P;
      const T* zr = zp + row * P;
      const T av = ap[c];
      if (affine) {
        const T bv = bp[c], dv = dp[c];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) xr[p] = av * xr[p] + bv * zr[p] + dv;
      } else {
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) xr[p] *= av;
      }
    }
  });
}

// BatchNorm's batch statistics of an NCHW map: per channel mean and biased variance. ATen's
// torch.batch_norm_update_stats took 60 ms over ResNet-50's 16 gated BN inputs at batch 16,
// 224 px (a pass over them from memory takes ~8). Here one pass: each (sample, channel) row's
// mean, then its centred sum of squares from L1; rows are combined per channel in double
// (M2 = sum M2_row + P sum (mean_row - mean)^2), so a large offset costs no precision.
template <typename T>
void batch_stats_impl(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  const T* zp = z.const_data_ptr<T>();
  std::vector<double> row_mean(N * C), row_m2(N * C);
  at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* zr = zp + row * P;
      const T m = mean_of(zr, P);
      T q = 0;
#pragma omp simd reduction(+ : q)
      for (int64_t p = 0; p < P; ++p) q += (zr[p] - m) * (zr[p] - m);
      row_mean[row] = m;
      row_m2[row] = q;
    }
  });
  T* mp = mean.mutable_data_ptr<T>();
  T* vp = var.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0, m2 = 0, spread = 0;
    for (int64_t n = 0; n < N; ++n) mu += row_mean[n * C + c];
    mu /= double(N);
    for (int64_t n = 0; n < N; ++n) {
      const double d = row_mean[n * C + c] - mu;
      m2 += row_m2[n * C + c];
      spread += d * d;
    }
    mp[c] = T(mu);
    vp[c] = T((m2 + double(P) * spread) / double(N * P));
  }
}

void forward(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
             const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
             const at::Tensor& chat, const at::Tensor& sigma, const at::Tensor& m,
             int64_t groups, bool keep, double eps) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_forward", [&] {
    forward_impl<scalar_t>(z, scale, shift, weight, bias, y, chat, sigma, m, groups, keep,
                           eps);
  });
}

void backward(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& scale,
              const at::Tensor& shift, const at::Tensor& chat, const at::Tensor& sigma,
              const at::Tensor& m, const at::Tensor& weight, const at::Tensor& bias,
              const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db,
              const at::Tensor& sums, double eps) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_backward", [&] {
    backward_impl<scalar_t>(dy, z, scale, shift, chat, sigma, m, weight, bias, dx, dw, db,
                            sums, eps);
  });
}

void batch_stats(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var) {
  TORCH_CHECK(z.is_contiguous(), "sge_cpu: batch_stats takes contiguous NCHW maps");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_batch_stats", [&] {
    batch_stats_impl<scalar_t>(z, mean, var);
  });
}

void bn_input_grad(const at::Tensor& dx, const at::Tensor& z, const at::Tensor& a,
                   const at::Tensor& b, const at::Tensor& d) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sge_cpu_bn_input_grad", [&] {
    bn_input_grad_impl<scalar_t>(dx, z, a, b, d);
  });
}

}  // namespace

TORCH_LIBRARY(sge_cpu, lib) {
  lib.def("forward(Tensor z, Tensor scale, Tensor shift, Tensor weight, Tensor bias, "
          "Tensor(a!) y, Tensor(b!) chat, Tensor(c!) sigma, Tensor(d!) m, int groups, "
          "bool keep, float eps) -> ()", &forward);
  lib.def("backward(Tensor dy, Tensor z, Tensor scale, Tensor shift, Tensor chat, "
          "Tensor sigma, Tensor m, Tensor weight, Tensor bias, Tensor(a!) dx, Tensor(b!) dw, "
          "Tensor(c!) db, Tensor(d!) sums, float eps) -> ()", &backward);
  lib.def("bn_input_grad(Tensor(a!) dx, Tensor z, Tensor a, Tensor b, Tensor d) -> ()",
          &bn_input_grad);
  lib.def("batch_stats(Tensor z, Tensor(a!) mean, Tensor(b!) var) -> ()", &batch_stats);
}
