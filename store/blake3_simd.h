/*
 * blake3_simd.h - the BLAKE3 compression of B3_LANES inputs at once, one
 * input per 32-bit lane, written once for every vector width.
 *
 * DESIGN
 * A backend file (blake3_avx2.c, blake3_avx512.c) defines the vector type
 * and the handful of operations below, then includes this file, which
 * provides the rounds and B3_HASH_MANY, the backend's b3_hash_many_fn.
 * Message words are transposed so that vector j holds word j of every
 * input; the 7 rounds then run the column/diagonal G steps on whole
 * vectors, taking message words through b3_msg_schedule instead of
 * permuting. Inputs left over (fewer than B3_LANES) go to B3_FALLBACK.
 *
 * The includer defines:
 *   B3V                 vector type of B3_LANES uint32_t lanes
 *   v_add v_xor v_set1  lane-wise add, xor, broadcast
 *   v_rot16 v_rot12 v_rot8 v_rot7   rotate right by n
 *   v_load_msg(inputs, off, m)      m[j] = word j of block at off, all lanes
 *   v_store_cvs(h, out)             out + 32*i = h[0..7] of lane i
 *   v_counters(counter, inc, lo, hi)
 *   B3_HASH_MANY, B3_FALLBACK
 */

/*
 * Four G functions side by side, one step at a time: the column step
 * (a, b, c, d) = (i, 4 + i, 8 + i, 12 + i) or the diagonal step (b, c, d
 * rotated by i), as the reference assembly does: four independent
 * operations in a row keep both vector ports busy where one G at a time
 * leaves them waiting on its chain. GCC schedules x86 code only after
 * register allocation, and that pass is off for the AVX-512 file
 * (store/CMakeLists.txt), so this order is the order executed. The AVX2
 * backend (16 registers, the message spilled) measured faster one G at a
 * time, as b3v_round does for it.
 */
/* Keeps a + m + b as (a + m) + b: b is the last input to be ready, and
 * the compiler's reassociation would otherwise add it first. */
#define B3V_ORDER(w, x, y, z) __asm__("" : "+v"(w), "+v"(x), "+v"(y), "+v"(z))
#define B3V_A(i) (i)
#define B3V_B(i, diag) (4 + (((i) + (diag)) & 3))
#define B3V_C(i, diag) (8 + (((i) + 2 * (diag)) & 3))
#define B3V_D(i, diag) (12 + (((i) + 3 * (diag)) & 3))

/* One half of the four G functions: second = 0 takes the first message
 * word of each and rotates by 16 and 12, second = 1 the other word and
 * rotates by 8 and 7 (a constant: the branches fold away). */
static inline __attribute__((always_inline)) void b3v_half4(B3V *v, const B3V *m,
							     const uint8_t *s, int diag, int second)
{
	for (int i = 0; i < 4; i++)
		v[B3V_A(i)] = v_add(v[B3V_A(i)], m[s[2 * i + second]]);
	B3V_ORDER(v[0], v[1], v[2], v[3]);
	for (int i = 0; i < 4; i++)
		v[B3V_A(i)] = v_add(v[B3V_A(i)], v[B3V_B(i, diag)]);
	for (int i = 0; i < 4; i++)
		v[B3V_D(i, diag)] = v_xor(v[B3V_D(i, diag)], v[B3V_A(i)]);
	for (int i = 0; i < 4; i++)
		v[B3V_D(i, diag)] = second ? v_rot8(v[B3V_D(i, diag)]) : v_rot16(v[B3V_D(i, diag)]);
	for (int i = 0; i < 4; i++)
		v[B3V_C(i, diag)] = v_add(v[B3V_C(i, diag)], v[B3V_D(i, diag)]);
	for (int i = 0; i < 4; i++)
		v[B3V_B(i, diag)] = v_xor(v[B3V_B(i, diag)], v[B3V_C(i, diag)]);
	for (int i = 0; i < 4; i++)
		v[B3V_B(i, diag)] = second ? v_rot7(v[B3V_B(i, diag)]) : v_rot12(v[B3V_B(i, diag)]);
}

static inline __attribute__((always_inline)) void b3v_g4(B3V *v, const B3V *m, const uint8_t *s,
							  int diag)
{
	b3v_half4(v, m, s, diag, 0);
	b3v_half4(v, m, s, diag, 1);
}

static inline __attribute__((always_inline)) void b3v_g(B3V *v, int a, int b, int c, int d, B3V mx,
							 B3V my)
{
	v[a] = v_add(v_add(v[a], v[b]), mx);
	v[d] = v_rot16(v_xor(v[d], v[a]));
	v[c] = v_add(v[c], v[d]);
	v[b] = v_rot12(v_xor(v[b], v[c]));
	v[a] = v_add(v_add(v[a], v[b]), my);
	v[d] = v_rot8(v_xor(v[d], v[a]));
	v[c] = v_add(v[c], v[d]);
	v[b] = v_rot7(v_xor(v[b], v[c]));
}

static inline __attribute__((always_inline)) void b3v_round(B3V *v, const B3V *m, const uint8_t *s)
{
#if B3_LANES == 16
	b3v_g4(v, m, s, 0);
	b3v_g4(v, m, s + 8, 1);
#else
	b3v_g(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
	b3v_g(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
	b3v_g(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
	b3v_g(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
	b3v_g(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
	b3v_g(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
	b3v_g(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
	b3v_g(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
#endif
}

/*
 * The state's first eight vectors are the chaining values between blocks
 * (as in the reference assembly), so that the 16 state vectors and the 16
 * message vectors are all that is live in the rounds: with 32 vector
 * registers (AVX-512) nothing spills. The per-block constants (IV words,
 * counters, block length) are reloaded from memory each block through a
 * pointer the compiler cannot see through; hoisted out of the loop they
 * would take registers the rounds need and be spilled anyway.
 */
static void b3v_hash_lanes(const uint8_t *const *inputs, size_t blocks, const uint32_t key[8],
			   uint64_t counter, bool inc_counter, uint8_t flags, uint8_t flags_start,
			   uint8_t flags_end, uint8_t *out)
{
	B3V v[16], m[16], k[6];
	uint8_t block_flags = flags | flags_start;

	for (int i = 0; i < 8; i++)
		v[i] = v_set1(key[i]);
	for (int i = 0; i < 4; i++)
		k[i] = v_set1(b3_iv[i]);
	v_counters(counter, inc_counter, &k[4], &k[5]);
	for (size_t b = 0; b < blocks; b++) {
		const B3V *kp = k;

		__asm__("" : "+r"(kp));
		if (b + 1 == blocks)
			block_flags |= flags_end;
		v_load_msg(inputs, b * 64, m);
		v[8] = kp[0];
		v[9] = kp[1];
		v[10] = kp[2];
		v[11] = kp[3];
		v[12] = kp[4];
		v[13] = kp[5];
		v[14] = v_set1(64);
		v[15] = v_set1(block_flags);
		/* Unrolled so that the schedule indices are constants. */
		b3v_round(v, m, b3_msg_schedule[0]);
		b3v_round(v, m, b3_msg_schedule[1]);
		b3v_round(v, m, b3_msg_schedule[2]);
		b3v_round(v, m, b3_msg_schedule[3]);
		b3v_round(v, m, b3_msg_schedule[4]);
		b3v_round(v, m, b3_msg_schedule[5]);
		b3v_round(v, m, b3_msg_schedule[6]);
		for (int i = 0; i < 8; i++)
			v[i] = v_xor(v[i], v[i + 8]);
		block_flags = flags;
	}
	v_store_cvs(v, out);
}

void B3_HASH_MANY(const uint8_t *const *inputs, size_t n, size_t blocks, const uint32_t key[8],
		  uint64_t counter, bool inc_counter, uint8_t flags, uint8_t flags_start,
		  uint8_t flags_end, uint8_t *out)
{
	while (n >= B3_LANES) {
		b3v_hash_lanes(inputs, blocks, key, counter, inc_counter, flags, flags_start,
			       flags_end, out);
		if (inc_counter)
			counter += B3_LANES;
		inputs += B3_LANES;
		n -= B3_LANES;
		out += B3_LANES * 32;
	}
	if (n > 0)
		B3_FALLBACK(inputs, n, blocks, key, counter, inc_counter, flags, flags_start,
			    flags_end, out);
}
