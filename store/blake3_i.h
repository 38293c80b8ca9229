/*
 * blake3_i.h - constants and backend interface shared by the BLAKE3 files.
 */
#ifndef RENDERFS_BLAKE3_I_H
#define RENDERFS_BLAKE3_I_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum {
	B3_CHUNK_START = 1 << 0,
	B3_CHUNK_END = 1 << 1,
	B3_PARENT = 1 << 2,
	B3_ROOT = 1 << 3,
	B3_KEYED_HASH = 1 << 4,
	B3_DERIVE_KEY_CONTEXT = 1 << 5,
	B3_DERIVE_KEY_MATERIAL = 1 << 6,
};

extern const uint32_t b3_iv[8];
/* b3_msg_schedule[r][i]: the message word used at position i of round r,
 * i.e. the specification's permutation applied r times (test_blake3
 * derives it from the permutation). Static so that unrolled rounds see
 * constant indices. */
static const uint8_t b3_msg_schedule[7][16] = {
	{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
	{2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
	{3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
	{10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
	{12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
	{9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
	{11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t b3_load32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

static inline void b3_store32(uint8_t *p, uint32_t w)
{
	p[0] = (uint8_t)w;
	p[1] = (uint8_t)(w >> 8);
	p[2] = (uint8_t)(w >> 16);
	p[3] = (uint8_t)(w >> 24);
}

/*
 * Hash `n` inputs of `blocks` whole blocks each, writing n chaining values
 * (32 bytes each) to out. Input i uses counter + i when inc_counter, else
 * counter. The first block gets flags | flags_start, the last
 * flags | flags_end. Chunks: blocks = 16, CHUNK_START/CHUNK_END, inc.
 * Parents: blocks = 1, flags including PARENT, no start/end, no inc.
 */
typedef void (*b3_hash_many_fn)(const uint8_t *const *inputs, size_t n, size_t blocks,
				const uint32_t key[8], uint64_t counter, bool inc_counter,
				uint8_t flags, uint8_t flags_start, uint8_t flags_end,
				uint8_t *out);

void b3_compress_in_place(uint32_t cv[8], const uint8_t block[64], uint8_t block_len,
			  uint64_t counter, uint8_t flags);
void b3_compress_xof(const uint32_t cv[8], const uint8_t block[64], uint8_t block_len,
		     uint64_t counter, uint8_t flags, uint8_t out[64]);

void b3_hash_many_portable(const uint8_t *const *inputs, size_t n, size_t blocks,
			   const uint32_t key[8], uint64_t counter, bool inc_counter,
			   uint8_t flags, uint8_t flags_start, uint8_t flags_end, uint8_t *out);
#ifdef RENDERFS_B3_X86
void b3_hash_many_avx2(const uint8_t *const *inputs, size_t n, size_t blocks,
		       const uint32_t key[8], uint64_t counter, bool inc_counter,
		       uint8_t flags, uint8_t flags_start, uint8_t flags_end, uint8_t *out);
void b3_hash_many_avx512(const uint8_t *const *inputs, size_t n, size_t blocks,
			 const uint32_t key[8], uint64_t counter, bool inc_counter,
			 uint8_t flags, uint8_t flags_start, uint8_t flags_end, uint8_t *out);
#endif

#endif
