// Channels_last layout for the fused SGE's CPU kernels: sge/fused_cpu.py builds this file
// and sge/fused_cpu.cpp as one unit, this one first.
//
// A channels_last map (what Inductor gives CPU convolutions, and eager models in that
// format) is worked on as it is stored, by rows: one position's C channels. Along a row the
// kernels need each group's sum of its K channels (group_sums) and a per-group value for
// each of its channels (expand); down the rows, per-channel sums. The per-(position, group)
// statistics are kept by row while a sample is worked on, and transposed (8 x 8 blocks, in
// AVX2 registers for float) to and from the (group, position) layout that the op keeps for
// the backward, as NCHW maps and the other paths do.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// transpose: dst[c * ldd + r] = src[r * lds + c] (r < rows, c < cols), by 8 x 8 blocks:
// element by element for any T, in AVX2 registers for float (below).
template <typename T>
inline void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
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

inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8(r);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * ldd, r[j]);
}
#endif

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  const int64_t R8 = rows / 8 * 8, C8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < R8; r0 += 8) {
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      transpose_block(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // what the whole blocks left
    for (int64_t c = r < R8 ? C8 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// The per-row helpers of the channels_last kernels: a row is one position's channels.
// group_sums: out[g] = sum of src[g K .. g K + K) (g < G), the sums over each group's channels.
// expand: dst[c] = src[c / K] (c < G K), a per-group value for each of its channels.
template <typename T>
inline void group_sums(const T* src, T* out, int64_t G, int64_t K) {
  for (int64_t g = 0; g < G; ++g) {
    T s = 0;
    for (int64_t k = 0; k < K; ++k) s += src[g * K + k];
    out[g] = s;
  }
}

template <typename T>
inline void expand(const T* src, T* dst, int64_t G, int64_t K) {
  for (int64_t g = 0; g < G; ++g) std::fill(dst + g * K, dst + (g + 1) * K, src[g]);
}

#if defined(__AVX2__)
// Groups of 4 channels (ResNet-50's first stage at 64 groups): two groups per vector, summed
// by three horizontal adds per 8 groups; multiples of 8: vectors added, then 4 groups' sums
// by two horizontal adds. Other sizes, and what is left over, element by element.
inline void group_sums(const float* src, float* out, int64_t G, int64_t K) {
  int64_t g = 0;
  if (K == 4) {
    // hadd(hadd(v0, v1), hadd(v2, v3)) holds groups 0 2 4 6 | 1 3 5 7.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; g + 8 <= G; g += 8) {
      const float* s = src + g * 4;
      const __m256 h01 = _mm256_hadd_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8));
      const __m256 h23 = _mm256_hadd_ps(_mm256_loadu_ps(s + 16), _mm256_loadu_ps(s + 24));
      _mm256_storeu_ps(out + g, _mm256_permutevar8x32_ps(_mm256_hadd_ps(h01, h23), order));
    }
  } else if (K % 8 == 0) {
    for (; g + 4 <= G; g += 4) {
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) {
        const float* s = src + (g + j) * K;
        acc[j] = _mm256_loadu_ps(s);
        for (int64_t k = 8; k < K; k += 8) acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(s + k));
      }
      // Lanes: the low and high halves of groups 0..3.
      const __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]),
                                      _mm256_hadd_ps(acc[2], acc[3]));
      _mm_storeu_ps(out + g, _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
    }
  }
  group_sums<float>(src + g * K, out + g, G - g, K);
}

inline void expand(const float* src, float* dst, int64_t G, int64_t K) {
  int64_t g = 0;
  if (K == 4) {
    const __m256i pairs = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (; g + 2 <= G; g += 2) {
      const __m128 two = _mm_castsi128_ps(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + g)));
      _mm256_storeu_ps(dst + g * 4, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), pairs));
    }
  } else if (K % 8 == 0) {
    for (; g < G; ++g) {
      const __m256 v = _mm256_set1_ps(src[g]);
      for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(dst + g * K + k, v);
    }
  }
  expand<float>(src + g, dst + g * K, G - g, K);
}
#endif

#if defined(__AVX512F__)
// The same for float rows in 512-bit registers, 64 channels (four vectors) at a time, for
// K = 4, 8, 16 or 32 channels per group (64 / K groups): gsum adds each group's lanes (its
// 64 / K sums in the low lanes, in order), gexpand spreads a vector of per-group values over
// the channels of vector j, and gload/gstore move the 64 / K group values. The row kernels
// use them in place of group_sums and expand inside their loops, so no row goes through
// memory in between.
struct Lanes {
  __m512i even, odd, spread[4][4];  // spread[log2(K) - 2][j]
  Lanes() {
    alignas(64) int32_t idx[18][16];
    for (int l = 0; l < 16; ++l) {
      idx[0][l] = 2 * l, idx[1][l] = 2 * l + 1;
      for (int k = 0; k < 4; ++k) {
        for (int j = 0; j < 4; ++j) idx[2 + 4 * k + j][l] = (16 * j + l) >> (k + 2);
      }
    }
    even = _mm512_load_si512(idx[0]), odd = _mm512_load_si512(idx[1]);
    for (int k = 0; k < 4; ++k) {
      for (int j = 0; j < 4; ++j) spread[k][j] = _mm512_load_si512(idx[2 + 4 * k + j]);
    }
  }
};

inline const Lanes& lanes() {
  static const Lanes table;
  return table;
}

// Adjacent pairs of the 32 lanes of (a, b) summed: lanes 0-7 from a's, 8-15 from b's.
inline __m512 pair_sums(__m512 a, __m512 b, const Lanes& L) {
  return _mm512_add_ps(_mm512_permutex2var_ps(a, L.even, b), _mm512_permutex2var_ps(a, L.odd, b));
}

template <int K>
inline __m512 gsum(const __m512 v[4], const Lanes& L) {
  __m512 q = pair_sums(pair_sums(v[0], v[1], L), pair_sums(v[2], v[3], L), L);  // sums of 4
  for (int k = 4; k < K; k *= 2) q = pair_sums(q, q, L);
  return q;
}

template <int K>
inline __m512 gexpand(__m512 d, int j, const Lanes& L) {
  constexpr int level = K == 4 ? 0 : K == 8 ? 1 : K == 16 ? 2 : 3;
  return _mm512_permutexvar_ps(L.spread[level][j], d);
}

template <int K>
inline __m512 gload(const float* src) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (64 / K)) - 1), src);
}

template <int K>
inline void gstore(float* dst, __m512 v) {
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << (64 / K)) - 1), v);
}
#endif

// How a channels_last map is cut into tasks: a sample's groups [g0, g1), whole samples
// unless every thread would get fewer than two tasks (small batches); then in multiples of
// `unit` groups, so that a task's share of a row is whole 64-byte lines where the group size
// allows.
struct Strip {
  int64_t n, g0, g1, at;  // sample, groups [g0, g1), first element in the map
};

struct Strips {
  int64_t per, count, groups, K, P;
  // Task t of N * count (sample-major) in a channels_last map of groups * K channels.
  Strip operator[](int64_t t) const {
    const int64_t n = t / count, g0 = (t % count) * per, g1 = std::min(groups, g0 + per);
    return {n, g0, g1, n * P * groups * K + g0 * K};
  }
};

Strips strips_of(int64_t N, int64_t P, int64_t K, int64_t groups) {
  const int64_t unit = std::min<int64_t>(groups, 16 / std::gcd<int64_t>(K, 16));
  const int64_t want = (2 * at::get_num_threads() + N - 1) / N;  // strips per sample
  const int64_t per = std::min(groups, ((groups + want - 1) / want + unit - 1) / unit * unit);
  return {per, (groups + per - 1) / per, groups, K, P};
}

}  // namespace
