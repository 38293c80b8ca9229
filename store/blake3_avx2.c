/*
 * blake3_avx2.c - BLAKE3 over 8 inputs at once with AVX2 (compiled with
 * -mavx2, called only when the CPU has it). See blake3_simd.h.
 */
#include <immintrin.h>

#include "blake3_i.h"

#define B3V __m256i
#define B3_LANES 8
#define B3_HASH_MANY b3_hash_many_avx2
#define B3_FALLBACK b3_hash_many_portable

#define v_add(a, b) _mm256_add_epi32((a), (b))
#define v_xor(a, b) _mm256_xor_si256((a), (b))
#define v_set1(x) _mm256_set1_epi32((int)(x))
#define v_rot12(x) _mm256_or_si256(_mm256_srli_epi32((x), 12), _mm256_slli_epi32((x), 20))
#define v_rot7(x) _mm256_or_si256(_mm256_srli_epi32((x), 7), _mm256_slli_epi32((x), 25))

static inline __m256i v_rot16(__m256i x)
{
	const __m256i m = _mm256_set_epi8(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2,
					  13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
	return _mm256_shuffle_epi8(x, m);
}

static inline __m256i v_rot8(__m256i x)
{
	const __m256i m = _mm256_set_epi8(12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1,
					  12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1);
	return _mm256_shuffle_epi8(x, m);
}

/* In-place transpose of an 8x8 matrix of 32-bit words. */
static inline __attribute__((always_inline)) void transpose8(__m256i r[8])
{
	__m256i t[8], u[8];

	for (int k = 0; k < 4; k++) {
		t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
		t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
	}
	for (int k = 0; k < 2; k++) {
		u[4 * k + 0] = _mm256_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
		u[4 * k + 1] = _mm256_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
		u[4 * k + 2] = _mm256_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
		u[4 * k + 3] = _mm256_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
	}
	for (int j = 0; j < 4; j++) {
		r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
		r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
	}
}

static inline __attribute__((always_inline)) void v_load_msg(const uint8_t *const *inputs, size_t off, __m256i m[16])
{
	for (int i = 0; i < 8; i++) {
		m[i] = _mm256_loadu_si256((const __m256i *)(inputs[i] + off));
		m[8 + i] = _mm256_loadu_si256((const __m256i *)(inputs[i] + off + 32));
	}
	transpose8(m);
	transpose8(m + 8);
}

static inline void v_store_cvs(const __m256i h[8], uint8_t *out)
{
	__m256i r[8];

	memcpy(r, h, sizeof(r));
	transpose8(r);
	for (int i = 0; i < 8; i++)
		_mm256_storeu_si256((__m256i *)(out + 32 * i), r[i]);
}

static inline void v_counters(uint64_t counter, bool inc, __m256i *lo, __m256i *hi)
{
	uint32_t l[8], h[8];

	for (int i = 0; i < 8; i++) {
		uint64_t c = counter + (inc ? (uint64_t)i : 0);
		l[i] = (uint32_t)c;
		h[i] = (uint32_t)(c >> 32);
	}
	*lo = _mm256_loadu_si256((const __m256i *)l);
	*hi = _mm256_loadu_si256((const __m256i *)h);
}

#include "blake3_simd.h"
