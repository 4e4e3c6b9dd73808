// Channels_last layout for the fused SGE's CPU kernels: sge/fused_cpu.py builds this file
// and sge/fused_cpu.cpp as one unit, this one first.
//
// The kernels of sge/fused_cpu.cpp work on one (sample, group) tile at a time, its K channel
// rows of P positions contiguous, as in NCHW. A channels_last map (what Inductor gives CPU
// convolutions, and eager models in that format) is worked on in strips: one sample's P x cw
// block of whole groups, transposed into a planar scratch (in cache: L2 or L3) that the tiles
// read, then transposed back on the way out, with the block's residual add and ReLU. The
// transposes are 8 x 8 blocks, in AVX2 registers for float (element by element for double
// or without AVX2). They replace the layout copies around the op: Inductor's under
// torch.compile, ATen's (about 7 GB/s here) in eager mode.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// to_planar: dst[k * P + p] = src[p * ld + k] (p < P, k < cw). With a mask (src's layout):
// src where mask > 0 or NaN, else 0 (ReLU's backward), also written to masked.
// from_planar: dst[p * ld + k] = src[k * P + p]; with res (dst's layout) relu(src + res).
template <typename T>
inline T masked_value(const T* src, const T* mask, T* masked, int64_t i) {
  if (!mask) return src[i];
  const T v = mask[i] <= T(0) ? T(0) : src[i];
  masked[i] = v;
  return v;
}

template <typename T>
inline T tail_value(T v, const T* res, int64_t i) {
  return res ? std::max(v + res[i], T(0)) : v;
}

// The 8 x 8 blocks (8 positions x 8 channels) of to_planar / from_planar: element by
// element for any T, in AVX2 registers for float (below).
template <typename T>
inline void to_planar_block(const T* src, int64_t ld, T* dst, int64_t P, const T* mask,
                            T* masked) {
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[j * P + i] = masked_value(src, mask, masked, i * ld + j);
  }
}

template <typename T>
inline void from_planar_block(const T* src, int64_t P, T* dst, int64_t ld, const T* res) {
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[i * ld + j] = tail_value(src[j * P + i], res, i * ld + j);
  }
}

#if defined(__AVX2__)
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

inline void to_planar_block(const float* src, int64_t ld, float* dst, int64_t P,
                            const float* mask, float* masked) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_ps(src + i * ld);
    if (mask) {  // not (mask <= 0), unordered: a NaN mask keeps the value
      const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(mask + i * ld), _mm256_setzero_ps(),
                                        _CMP_NLE_UQ);
      r[i] = _mm256_and_ps(r[i], keep);
      _mm256_storeu_ps(masked + i * ld, r[i]);
    }
  }
  transpose8(r);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * P, r[j]);
}

inline void from_planar_block(const float* src, int64_t P, float* dst, int64_t ld,
                              const float* res) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * P);
  transpose8(r);
  for (int j = 0; j < 8; ++j) {
    if (res) {  // max(0, v) returns v when v is NaN, as std::max(v, 0) and torch.relu
      r[j] = _mm256_max_ps(_mm256_setzero_ps(),
                           _mm256_add_ps(r[j], _mm256_loadu_ps(res + j * ld)));
    }
    _mm256_storeu_ps(dst + j * ld, r[j]);
  }
}
#endif

// Calls block(p0, k0) for every whole 8 x 8 block of a P x cw map, one(p, k) for the rest.
// Always inlined: as a call, the transposes measured up to 1.4x slower.
template <typename Block, typename One>
__attribute__((always_inline)) inline void by_blocks(int64_t P, int64_t cw, Block block, One one) {
  const int64_t P8 = P / 8 * 8, C8 = cw / 8 * 8;
  for (int64_t p0 = 0; p0 < P8; p0 += 8) {
    for (int64_t k0 = 0; k0 < C8; k0 += 8) block(p0, k0);
  }
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t k = p < P8 ? C8 : 0; k < cw; ++k) one(p, k);
  }
}

template <typename T>
void to_planar(const T* src, int64_t ld, T* dst, int64_t P, int64_t cw,
               const T* mask = nullptr, T* masked = nullptr) {
  by_blocks(
      P, cw,
      [&](int64_t p0, int64_t k0) {
        const int64_t at = p0 * ld + k0;
        to_planar_block(src + at, ld, dst + k0 * P + p0, P, mask ? mask + at : nullptr,
                        masked ? masked + at : nullptr);
      },
      [&](int64_t p, int64_t k) { dst[k * P + p] = masked_value(src, mask, masked, p * ld + k); });
}

template <typename T>
void from_planar(const T* src, int64_t P, T* dst, int64_t ld, int64_t cw,
                 const T* res = nullptr) {
  by_blocks(
      P, cw,
      [&](int64_t p0, int64_t k0) {
        const int64_t at = p0 * ld + k0;
        from_planar_block(src + k0 * P + p0, P, dst + at, ld, res ? res + at : nullptr);
      },
      [&](int64_t p, int64_t k) { dst[p * ld + k] = tail_value(src[k * P + p], res, p * ld + k); });
}

// How a channels_last map is cut into strips: groups per strip and strips per sample. Wide:
// up to 4 MB, a whole sample of every ResNet-50 stage at 224 px. Narrow strips (256 KB, to
// stay in L2) read a line or two of every row of C channels from memory and measured 1.5x
// slower forward at the first stage (batch 16, 224 px: 10.3 ms against 6.9 ms); whole rows
// are read in order. Narrower only so that every thread gets two tasks (small batches), then
// in multiples of `unit` groups, so that a strip is whole 64-byte lines where the group
// size allows.
struct Strip {
  int64_t n, g0, g1, at, cw;  // sample, groups [g0, g1), first element in the map, channels
};

struct Strips {
  int64_t per, count, groups, K, P;
  // Task t of N * count (sample-major) in a channels_last map of groups * K channels.
  Strip operator[](int64_t t) const {
    const int64_t n = t / count, g0 = (t % count) * per, g1 = std::min(groups, g0 + per);
    return {n, g0, g1, n * P * groups * K + g0 * K, (g1 - g0) * K};
  }
};

Strips strips_of(int64_t N, int64_t P, int64_t K, int64_t groups, int64_t elem) {
  const int64_t unit = std::min<int64_t>(groups, 16 / std::gcd<int64_t>(K, 16));
  auto round_up = [&](int64_t v) { return (v + unit - 1) / unit * unit; };
  int64_t per = std::max(unit, (4 << 20) / std::max<int64_t>(1, K * P * elem) / unit * unit);
  const int64_t want = (2 * at::get_num_threads() + N - 1) / N;  // strips per sample
  per = std::min(per, round_up((groups + want - 1) / want));
  per = std::min(per, groups);
  return {per, (groups + per - 1) / per, groups, K, P};
}

}  // namespace
