// Decode attention over pdlb's token-slot KV pool on a CPU, reading K and V in place through each
// row's slot list (paged attention with pages of one token). Built and called by
// paged_attention_cpu.py; see there for the shapes. One query token per sequence; float32
// arithmetic throughout, K/V and Q converted on load from their own dtype (float32, bfloat16,
// float16). Work is split over (sequence, KV head) pairs on the calling thread's OpenMP team
// (torch's own runtime, already loaded: the same threads, the same thread count and binding), in
// contiguous ranges: a thread reads the heads of a sequence it holds in one pass over its slots.
#include <immintrin.h>

#include "avx2_math.h"
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using pdlb_avx2::exp8;
using pdlb_avx2::hsum;

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum Status : int { OK = 0, SLOT_OUT_OF_RANGE = 1, BAD_LENGTH = 2, BAD_SHAPE = 3 };

constexpr int BLOCK = 32;     // tokens per softmax block: their K and V rows stay in L1/L2
// tokens ahead whose rows are requested early (prefetch): a sequence's rows are scattered over the
// pool, where the hardware's own prefetchers cannot guess them (a few percent faster than none).
constexpr int PREFETCH = 16;
constexpr int MAX_HEAD_DIM = 256;
constexpr int MAX_GROUP = 16;  // query heads per KV head

// ---- loading 8 values of any dtype as float32 ----
template <int D>
inline __m256 load8(const void* p);
template <>
inline __m256 load8<F32>(const void* p) {
  return _mm256_loadu_ps(static_cast<const float*>(p));
}
template <>
inline __m256 load8<BF16>(const void* p) {
  __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
inline __m256 load8<F16>(const void* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
template <int D>
constexpr int elem_size() {
  return D == F32 ? 4 : 2;
}

inline void store8(void* p, __m256 v, int dtype) {
  if (dtype == F32) {
    _mm256_storeu_ps(static_cast<float*>(p), v);
  } else if (dtype == F16) {
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {  // bfloat16, rounded to nearest even
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    bits = _mm256_srli_epi32(bits, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(static_cast<__m128i*>(p), packed);
  }
}

inline __m256 load8_any(const void* p, int dtype) {
  return dtype == F32 ? load8<F32>(p) : dtype == BF16 ? load8<BF16>(p) : load8<F16>(p);
}


struct Args {
  const void* q;
  int64_t q_row_stride, q_head_stride;  // elements
  int q_dtype;
  const void* k_pool;
  const void* v_pool;
  int64_t slot_stride, kv_head_stride;  // elements, the same for K and V
  int64_t num_slots;
  int kv_dtype;
  const int64_t* table;
  int64_t table_stride, table_cols;
  const int64_t* lens;
  void* out;  // [batch, heads * head_dim], q's dtype
  int64_t out_row_stride;
  int batch, heads, kv_heads, head_dim;
  float scale;
};

// Heads h0..h1-1 of sequence b: each KV head's G query heads over the context, in blocks of BLOCK
// tokens with a running maximum and sum per query head (online softmax). Each K and V row is read
// from the pool once, for all G query heads; the KV heads of one token row are read one after the
// other (a slot's heads are adjacent in the pool), and rows PREFETCH tokens ahead are requested early.
template <int KV, int G>
int attend_span(const Args& a, int b, int h0, int h1, int group) {
  const int g = G > 0 ? G : group;
  const int hd = a.head_dim, chunks = hd / 8, span = h1 - h0;
  const int64_t len = a.lens[b];
  if (len < 1 || len > a.table_cols) return BAD_LENGTH;
  const int64_t* slots = a.table + b * a.table_stride;
  constexpr int es = elem_size<KV>();
  const char* k_pool = static_cast<const char*>(a.k_pool);
  const char* v_pool = static_cast<const char*>(a.v_pool);
  const int64_t row_bytes = a.slot_stride * es, head_bytes = a.kv_head_stride * es;
  const int q_size = a.q_dtype == F32 ? 4 : 2;

  thread_local std::vector<float> scratch;
  const size_t per_head = static_cast<size_t>(g) * hd;
  scratch.resize(2 * span * per_head + 2 * span * g);
  float* q = scratch.data();                // [span][g][hd], scaled
  float* acc = q + span * per_head;         // [span][g][hd]
  float* m = acc + span * per_head;         // [span][g]
  float* l = m + span * g;                  // [span][g]
  alignas(32) float p[MAX_GROUP][BLOCK];
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int hh = 0; hh < span; ++hh) {
    for (int j = 0; j < g; ++j) {
      const int head = (h0 + hh) * g + j;
      const char* qj = static_cast<const char*>(a.q) + (b * a.q_row_stride + head * a.q_head_stride) * q_size;
      float* qd = q + (hh * g + j) * hd;
      float* ad = acc + (hh * g + j) * hd;
      for (int c = 0; c < chunks; ++c) {
        _mm256_storeu_ps(qd + 8 * c, _mm256_mul_ps(load8_any(qj + 8 * c * q_size, a.q_dtype), scale));
        _mm256_storeu_ps(ad + 8 * c, _mm256_setzero_ps());
      }
      m[hh * g + j] = -INFINITY;
      l[hh * g + j] = 0.0f;
    }
  }
  int64_t offsets[BLOCK];  // of the block's slots in the pools
  for (int64_t t0 = 0; t0 < len; t0 += BLOCK) {
    const int n = static_cast<int>(len - t0 < BLOCK ? len - t0 : BLOCK);
    for (int i = 0; i < n; ++i) {
      const int64_t slot = slots[t0 + i];
      if (slot < 0 || slot >= a.num_slots) return SLOT_OUT_OF_RANGE;
      offsets[i] = slot * row_bytes;
    }
    for (int hh = 0; hh < span; ++hh) {
      const int64_t head_off = (h0 + hh) * head_bytes;
      // scores of the block (query heads of this KV head x tokens)
      for (int i = 0; i < n; ++i) {
        if (hh == 0 && t0 + i + PREFETCH < len) {
          const int64_t ahead = slots[t0 + i + PREFETCH];
          if (ahead >= 0 && ahead < a.num_slots) {
            const int64_t first = ahead * row_bytes + h0 * head_bytes, bytes = span * head_bytes;
            for (int64_t off = 0; off < bytes; off += 64) {
              _mm_prefetch(k_pool + first + off, _MM_HINT_T0);
              _mm_prefetch(v_pool + first + off, _MM_HINT_T0);
            }
          }
        }
        const char* k = k_pool + offsets[i] + head_off;
        for (int j = 0; j < g; ++j) {
          const float* qd = q + (hh * g + j) * hd;
          __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
          int c = 0;
          for (; c + 1 < chunks; c += 2) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qd + 8 * c), load8<KV>(k + 8 * c * es), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qd + 8 * c + 8), load8<KV>(k + (8 * c + 8) * es), s1);
          }
          if (c < chunks) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qd + 8 * c), load8<KV>(k + 8 * c * es), s0);
          p[j][i] = hsum(_mm256_add_ps(s0, s1));
        }
      }
      // softmax weights of the block, the running sums rescaled to its maximum
      for (int j = 0; j < g; ++j) {
        float& mj = m[hh * g + j];
        float* ad = acc + (hh * g + j) * hd;
        float block_max = p[j][0];
        for (int i = 1; i < n; ++i) block_max = p[j][i] > block_max ? p[j][i] : block_max;
        const float new_max = block_max > mj ? block_max : mj;
        if (new_max > mj && mj != -INFINITY) {
          const float correction = std::exp(mj - new_max);
          l[hh * g + j] *= correction;
          const __m256 cv = _mm256_set1_ps(correction);
          for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(ad + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(ad + 8 * c), cv));
        }
        mj = new_max;
        const __m256 mv = _mm256_set1_ps(new_max);
        __m256 sum = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p[j] + i), mv));
          _mm256_storeu_ps(p[j] + i, e);
          sum = _mm256_add_ps(sum, e);
        }
        float rest = 0.0f;
        for (; i < n; ++i) {
          p[j][i] = std::exp(p[j][i] - new_max);
          rest += p[j][i];
        }
        l[hh * g + j] += hsum(sum) + rest;
      }
      // acc += p V: one 8-wide slice of the head at a time, every query head's slice in registers
      float* ah = acc + hh * per_head;
      const char* v_head = v_pool + head_off;
      for (int c = 0; c < chunks; ++c) {
        if (G > 0) {
          __m256 r[G > 0 ? G : 1];
          for (int j = 0; j < G; ++j) r[j] = _mm256_loadu_ps(ah + j * hd + 8 * c);
          for (int i = 0; i < n; ++i) {
            const __m256 v = load8<KV>(v_head + offsets[i] + 8 * c * es);
            for (int j = 0; j < G; ++j) r[j] = _mm256_fmadd_ps(_mm256_set1_ps(p[j][i]), v, r[j]);
          }
          for (int j = 0; j < G; ++j) _mm256_storeu_ps(ah + j * hd + 8 * c, r[j]);
        } else {
          for (int i = 0; i < n; ++i) {
            const __m256 v = load8<KV>(v_head + offsets[i] + 8 * c * es);
            for (int j = 0; j < g; ++j)
              _mm256_storeu_ps(ah + j * hd + 8 * c,
                               _mm256_fmadd_ps(_mm256_set1_ps(p[j][i]), v, _mm256_loadu_ps(ah + j * hd + 8 * c)));
          }
        }
      }
    }
  }
  for (int hh = 0; hh < span; ++hh) {
    for (int j = 0; j < g; ++j) {
      const int head = (h0 + hh) * g + j;
      const __m256 inv = _mm256_set1_ps(1.0f / l[hh * g + j]);
      const float* ad = acc + (hh * g + j) * hd;
      char* out = static_cast<char*>(a.out) + (b * a.out_row_stride + head * hd) * q_size;
      for (int c = 0; c < chunks; ++c) store8(out + 8 * c * q_size, _mm256_mul_ps(_mm256_loadu_ps(ad + 8 * c), inv), a.q_dtype);
    }
  }
  return OK;
}

template <int KV>
int attend_span_kv(const Args& a, int b, int h0, int h1, int group) {
  switch (group) {
    case 1: return attend_span<KV, 1>(a, b, h0, h1, group);
    case 2: return attend_span<KV, 2>(a, b, h0, h1, group);
    case 3: return attend_span<KV, 3>(a, b, h0, h1, group);
    case 4: return attend_span<KV, 4>(a, b, h0, h1, group);
    case 5: return attend_span<KV, 5>(a, b, h0, h1, group);
    case 6: return attend_span<KV, 6>(a, b, h0, h1, group);
    case 7: return attend_span<KV, 7>(a, b, h0, h1, group);
    case 8: return attend_span<KV, 8>(a, b, h0, h1, group);
    default: return attend_span<KV, 0>(a, b, h0, h1, group);
  }
}

// Units first..last-1 of the (sequence, KV head) pairs, sequence-major: each sequence's part of the
// range in one pass over its context
int attend_range(const Args& a, int first, int last) {
  const int group = a.heads / a.kv_heads;
  for (int u = first; u < last;) {
    const int b = u / a.kv_heads, h0 = u % a.kv_heads;
    const int end = (b + 1) * a.kv_heads < last ? (b + 1) * a.kv_heads : last;
    const int h1 = h0 + (end - u);
    const int status = a.kv_dtype == F32    ? attend_span_kv<F32>(a, b, h0, h1, group)
                       : a.kv_dtype == BF16 ? attend_span_kv<BF16>(a, b, h0, h1, group)
                                            : attend_span_kv<F16>(a, b, h0, h1, group);
    if (status != OK) return status;
    u += h1 - h0;
  }
  return OK;
}

}  // namespace

extern "C" {

// The checks paged_attention_cpu.py relies on, so that a caller's mistake is a status, not a crash.
int pdlb_paged_attention_limits(int* max_head_dim, int* max_group) {
  *max_head_dim = MAX_HEAD_DIM;
  *max_group = MAX_GROUP;
  return OK;
}

int pdlb_paged_decode_attention(const void* q, int64_t q_row_stride, int64_t q_head_stride, int q_dtype,
                                const void* k_pool, const void* v_pool, int64_t slot_stride, int64_t kv_head_stride,
                                int64_t num_slots, int kv_dtype, const int64_t* table, int64_t table_stride,
                                int64_t table_cols, const int64_t* lens, void* out, int64_t out_row_stride, int batch,
                                int heads, int kv_heads, int head_dim, float scale, int threads) {
  if (batch < 0 || kv_heads < 1 || heads % kv_heads || heads / kv_heads > MAX_GROUP || head_dim % 8 ||
      head_dim < 8 || head_dim > MAX_HEAD_DIM || q_dtype < F32 || q_dtype > F16 || kv_dtype < F32 || kv_dtype > F16)
    return BAD_SHAPE;
  const Args a{q,         q_row_stride, q_head_stride, q_dtype, k_pool, v_pool,   slot_stride, kv_head_stride,
               num_slots, kv_dtype,     table,         table_stride, table_cols, lens, out, out_row_stride,
               batch,     heads,        kv_heads,      head_dim,     scale};
  const int units = batch * kv_heads;
  if (threads > units) threads = units;
  if (threads <= 1) return attend_range(a, 0, units);
  // contiguous ranges of (sequence, KV head) pairs of about equal context, one per thread
  int64_t total = 0;
  for (int b = 0; b < batch; ++b) total += (lens[b] > 0 ? lens[b] : 0) + BLOCK;
  total *= kv_heads;
  int status = OK;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), count = omp_get_num_threads();
    const int64_t lo = total * tid / count, hi = total * (tid + 1) / count;
    int first = units, last = units;
    int64_t seen = 0;
    for (int u = 0; u < units; ++u) {
      const int64_t mid = seen + ((lens[u / kv_heads] > 0 ? lens[u / kv_heads] : 0) + BLOCK) / 2;
      if (mid >= lo && first == units) first = u;
      if (mid >= hi) {
        last = u;
        break;
      }
      seen += (lens[u / kv_heads] > 0 ? lens[u / kv_heads] : 0) + BLOCK;
    }
    if (first > last) first = last;
    const int mine = attend_range(a, first, last);
    if (mine != OK) {
#pragma omp critical
      status = mine;
    }
  }
  return status;
}

}  // extern "C"
