/*
 * blake3_avx512.c - BLAKE3 over 16 inputs at once with AVX-512F (compiled
 * with -mavx512f, called only when the CPU has it). See blake3_simd.h.
 * Fewer than 16 inputs fall back to the AVX2 backend (every AVX-512 CPU
 * has AVX2), which falls back to the portable code.
 */
#include <immintrin.h>

#include "blake3_i.h"

#define B3V __m512i
#define B3_LANES 16
#define B3_HASH_MANY b3_hash_many_avx512
#define B3_FALLBACK b3_hash_many_avx2

#define v_add(a, b) _mm512_add_epi32((a), (b))
#define v_xor(a, b) _mm512_xor_si512((a), (b))
#define v_set1(x) _mm512_set1_epi32((int)(x))
#define v_rot16(x) _mm512_ror_epi32((x), 16)
#define v_rot12(x) _mm512_ror_epi32((x), 12)
#define v_rot8(x) _mm512_ror_epi32((x), 8)
#define v_rot7(x) _mm512_ror_epi32((x), 7)

/*
 * In-place transpose of a 16x16 matrix of 32-bit words: 32-bit and 64-bit
 * unpacks transpose each 4x4 block within 128-bit lanes, then two rounds
 * of 128-bit lane shuffles move the blocks.
 */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16])
{
	__m512i t[16], u[16];

	for (int k = 0; k < 8; k++) {
		t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
		t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
	}
	for (int k = 0; k < 4; k++) {
		u[4 * k + 0] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
		u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
		u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
		u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
	}
	/* u[4k + j], 128-bit lane L: word 4L + j of rows 4k..4k+3. */
	for (int j = 0; j < 4; j++) {
		__m512i ab_lo = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
		__m512i ab_hi = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
		__m512i cd_lo = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
		__m512i cd_hi = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);

		r[0 + j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
		r[4 + j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
		r[8 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
		r[12 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
	}
}

/*
 * Words 0-7 (half 0) or 8-15 (half 1) of the block at off of all 16
 * inputs, transposed into m[0..7]: each row is built by two 256-bit loads
 * (input j and input j + 8), so a 64-bit unpack, a shufps and one
 * two-source permute finish the transpose (the reference assembly's
 * scheme: 8 rows need 8 temporaries, not 16). Also asks for the input two
 * blocks ahead, as the reference does.
 */
static inline __attribute__((always_inline)) void load_half(const uint8_t *const *inputs,
							     size_t off, __m512i m[8])
{
	const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
					       26, 27);
	const __m512i idx1 = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28,
					       29, 30, 31);
	__m512i a[8], q[8];

	for (int j = 0; j < 8; j++) {
		a[j] = _mm512_inserti64x4(
			_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(inputs[j] + off))),
			_mm256_loadu_si256((const __m256i *)(inputs[j + 8] + off)), 1);
		if (off % 64 == 0) {
			_mm_prefetch((const char *)(inputs[j] + off + 128), _MM_HINT_T0);
			_mm_prefetch((const char *)(inputs[j + 8] + off + 128), _MM_HINT_T0);
		}
	}
	/* q[2k]: words 0,1 | 4,5 of inputs 2k, 2k+1 (and +8); q[2k+1]: 2,3 | 6,7. */
	for (int k = 0; k < 4; k++) {
		q[2 * k] = _mm512_unpacklo_epi64(a[2 * k], a[2 * k + 1]);
		q[2 * k + 1] = _mm512_unpackhi_epi64(a[2 * k], a[2 * k + 1]);
	}
	for (int w = 0; w < 4; w++) {
		/* Word w (128-bit lanes 0, 2) and w + 4 (lanes 1, 3) of inputs
		 * 0-3 (and 8-11), then of inputs 4-7 (and 12-15). */
		const __m512i *lo = &q[w / 2], *hi = &q[4 + w / 2];
		__m512 s0, s1;

		if (w % 2 == 0) {
			s0 = _mm512_shuffle_ps(_mm512_castsi512_ps(lo[0]), _mm512_castsi512_ps(lo[2]),
					       0x88);
			s1 = _mm512_shuffle_ps(_mm512_castsi512_ps(hi[0]), _mm512_castsi512_ps(hi[2]),
					       0x88);
		} else {
			s0 = _mm512_shuffle_ps(_mm512_castsi512_ps(lo[0]), _mm512_castsi512_ps(lo[2]),
					       0xDD);
			s1 = _mm512_shuffle_ps(_mm512_castsi512_ps(hi[0]), _mm512_castsi512_ps(hi[2]),
					       0xDD);
		}
		m[w] = _mm512_permutex2var_epi32(_mm512_castps_si512(s0), idx0,
						 _mm512_castps_si512(s1));
		m[w + 4] = _mm512_permutex2var_epi32(_mm512_castps_si512(s0), idx1,
						     _mm512_castps_si512(s1));
	}
}

static inline __attribute__((always_inline)) void v_load_msg(const uint8_t *const *inputs,
							      size_t off, __m512i m[16])
{
	load_half(inputs, off, m);
	load_half(inputs, off + 32, m + 8);
}

static inline void v_store_cvs(const __m512i h[8], uint8_t *out)
{
	__m512i r[16];

	for (int i = 0; i < 8; i++) {
		r[i] = h[i];
		r[8 + i] = _mm512_setzero_si512();
	}
	transpose16(r);
	for (int i = 0; i < 16; i++)
		_mm256_storeu_si256((__m256i *)(out + 32 * i), _mm512_castsi512_si256(r[i]));
}

static inline void v_counters(uint64_t counter, bool inc, __m512i *lo, __m512i *hi)
{
	uint32_t l[16], h[16];

	for (int i = 0; i < 16; i++) {
		uint64_t c = counter + (inc ? (uint64_t)i : 0);
		l[i] = (uint32_t)c;
		h[i] = (uint32_t)(c >> 32);
	}
	*lo = _mm512_loadu_si512((const void *)l);
	*hi = _mm512_loadu_si512((const void *)h);
}

#include "blake3_simd.h"
