// The Llama layer's element-wise ops of a CPU decode step, each group in one pass over its rows:
// residual add + RMSNorm, rotary on Q and K plus the K/V write into the pool, SiLU(gate) * up. Built
// and called by decode_ops_cpu.py (see there for the shapes), in the same way as
// paged_attention_cpu.cpp: float32 tensors, AVX2/FMA, on the calling thread's OpenMP team (torch's
// own runtime). Eager torch runs each of these as several ops, each a pass over the tensor and a
// dispatch; at a decode batch of 16 the dispatch is most of their cost.
#include <immintrin.h>

#include "avx2_math.h"
#include <omp.h>

#include <cmath>
#include <cstdint>

namespace {

using pdlb_avx2::exp8;
using pdlb_avx2::hsum;

enum Status : int { OK = 0, SLOT_OUT_OF_RANGE = 1, BAD_SHAPE = 3 };

// Below this many elements a call runs on the calling thread alone: waking the team costs more than
// the pass (a decode batch's RMSNorm is ~9,000 floats, a few microseconds on one core).
constexpr int64_t MIN_PARALLEL = 1 << 16;

inline int team(int threads, int64_t rows, int64_t elements) {
  if (elements < MIN_PARALLEL || threads < 1) return 1;
  return static_cast<int>(threads < rows ? threads : rows);
}


// Row r: x += delta (when given), then out = x / sqrt(mean(x^2) + eps) * weight.
void add_rms_norm_row(float* x, const float* delta, const float* weight, float* out, int64_t dim, float eps) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    if (delta) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(delta + i));
      b = _mm256_add_ps(b, _mm256_loadu_ps(delta + i + 8));
      _mm256_storeu_ps(x + i, a);
      _mm256_storeu_ps(x + i + 8, b);
    }
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  float sum = hsum(_mm256_add_ps(s0, s1));
  for (; i < dim; ++i) {
    if (delta) x[i] += delta[i];
    sum += x[i] * x[i];
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 8 <= dim; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(weight + i)));
  for (; i < dim; ++i) out[i] = x[i] * inv * weight[i];
}

// One head of hd values rotated in place (rotate-half layout): with c, s the cos and sin of the
// row's half-table, x1' = x1 c - x2 s and x2' = x2 c + x1 s.
inline void rotate_head(float* x, const float* c, const float* s, int half) {
  int i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(x + i, _mm256_fnmadd_ps(b, sv, _mm256_mul_ps(a, cv)));
    _mm256_storeu_ps(x + half + i, _mm256_fmadd_ps(a, sv, _mm256_mul_ps(b, cv)));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    x[i] = a * c[i] - b * s[i];
    x[half + i] = b * c[i] + a * s[i];
  }
}

inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace

extern "C" {

// x [rows, dim] (row stride x_stride) += delta [rows, dim] (delta_stride; null: no add), in place;
// out [rows, dim] (out_stride) = RMSNorm(x) * weight [dim].
int pdlb_add_rms_norm(float* x, int64_t x_stride, const float* delta, int64_t delta_stride, const float* weight,
                      float* out, int64_t out_stride, int64_t rows, int64_t dim, float eps, int threads) {
  if (rows < 0 || dim < 1) return BAD_SHAPE;
#pragma omp parallel for num_threads(team(threads, rows, rows * dim)) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    add_rms_norm_row(x + r * x_stride, delta ? delta + r * delta_stride : nullptr, weight, out + r * out_stride, dim,
                     eps);
  return OK;
}

// qkv [rows, (heads + 2 kv_heads) * hd] (row stride qkv_stride; Q heads, K heads, V heads): Q and K
// rotated in place by cos, sin [rows, hd / 2] (row stride trig_stride), then row r's K and V heads
// copied to slot slots[r] of k_pool and v_pool [num_slots, kv_heads, hd] (dense). Every slot is
// checked before anything is written.
int pdlb_rotary_kv_write(float* qkv, int64_t qkv_stride, const float* cos, const float* sin, int64_t trig_stride,
                         const int64_t* slots, float* k_pool, float* v_pool, int64_t num_slots, int64_t rows,
                         int heads, int kv_heads, int head_dim, int threads) {
  if (rows < 0 || heads < 1 || kv_heads < 1 || head_dim < 2 || head_dim % 2) return BAD_SHAPE;
  for (int64_t r = 0; r < rows; ++r)
    if (slots[r] < 0 || slots[r] >= num_slots) return SLOT_OUT_OF_RANGE;
  const int half = head_dim / 2;
  const int64_t kv_width = static_cast<int64_t>(kv_heads) * head_dim;
#pragma omp parallel for num_threads(team(threads, rows, rows * (heads + 2 * kv_heads) * head_dim)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = qkv + r * qkv_stride;
    const float* c = cos + r * trig_stride;
    const float* s = sin + r * trig_stride;
    for (int h = 0; h < heads + kv_heads; ++h) rotate_head(row + h * head_dim, c, s, half);
    const float* k = row + static_cast<int64_t>(heads) * head_dim;
    copy_row(k_pool + slots[r] * kv_width, k, kv_width);
    copy_row(v_pool + slots[r] * kv_width, k + kv_width, kv_width);
  }
  return OK;
}

// out [rows, inter] (out_stride) = SiLU(gate_up[:, :inter]) * gate_up[:, inter:] (gate_up's row
// stride gu_stride).
int pdlb_silu_mul(const float* gate_up, int64_t gu_stride, float* out, int64_t out_stride, int64_t rows, int64_t inter,
                  int threads) {
  if (rows < 0 || inter < 1) return BAD_SHAPE;
#pragma omp parallel for num_threads(team(threads, rows, rows * inter * 4)) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    silu_mul_row(gate_up + r * gu_stride, gate_up + r * gu_stride + inter, out + r * out_stride, inter);
  return OK;
}

}  // extern "C"
