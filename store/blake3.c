/*
 * blake3.c - BLAKE3 tree hashing: portable compression, the incremental
 * hasher, parallel subtree hashing, backend dispatch.
 *
 * DESIGN
 * The input is split into 1024-byte chunks, each compressed block by block
 * into a chaining value (CV); CVs are merged pairwise by parent nodes into
 * a binary tree whose left subtrees are always complete powers of two.
 *
 * The hasher keeps the partial chunk and a stack of CVs of complete
 * subtrees. Merging is lazy: a CV is merged with its left neighbour only
 * once more input proves it is not the root (the root alone is compressed
 * with the ROOT flag). So update() can take whole aligned power-of-two
 * subtrees of its input at once: each is hashed as two halves, by
 * hash_subtree(), which hashes up to B3_BATCH chunks per call to the SIMD
 * backend, reduces their CVs level by level with the same backend, and
 * above that splits into halves, optionally in two threads. Every path
 * computes the exact tree of the specification, which is why the portable
 * backend, the SIMD backends and any thread count agree byte for byte.
 *
 * Ownership: nothing here allocates except b3_hash_fd()'s read buffer and
 * mapping, released before it returns.
 */
#include "blake3.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3_i.h"

/* Chunks hashed by one leaf call of hash_subtree(); a power of two. 256
 * measured ~15% faster than 64 (fewer portable parent compressions). */
#define B3_BATCH 256
/* Subtrees smaller than this are not worth a thread (in chunks). */
#define B3_MIN_PARALLEL_CHUNKS 256

const uint32_t b3_iv[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
			   0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

/* ---- portable compression ---- */

static inline uint32_t ror32(uint32_t w, unsigned c)
{
	return (w >> c) | (w << (32 - c));
}

static inline void g(uint32_t s[16], int a, int b, int c, int d, uint32_t mx, uint32_t my)
{
	s[a] = s[a] + s[b] + mx;
	s[d] = ror32(s[d] ^ s[a], 16);
	s[c] = s[c] + s[d];
	s[b] = ror32(s[b] ^ s[c], 12);
	s[a] = s[a] + s[b] + my;
	s[d] = ror32(s[d] ^ s[a], 8);
	s[c] = s[c] + s[d];
	s[b] = ror32(s[b] ^ s[c], 7);
}

static inline __attribute__((always_inline)) void round_fn(uint32_t s[16], const uint32_t m[16],
							  const uint8_t *sch)
{
	g(s, 0, 4, 8, 12, m[sch[0]], m[sch[1]]);
	g(s, 1, 5, 9, 13, m[sch[2]], m[sch[3]]);
	g(s, 2, 6, 10, 14, m[sch[4]], m[sch[5]]);
	g(s, 3, 7, 11, 15, m[sch[6]], m[sch[7]]);
	g(s, 0, 5, 10, 15, m[sch[8]], m[sch[9]]);
	g(s, 1, 6, 11, 12, m[sch[10]], m[sch[11]]);
	g(s, 2, 7, 8, 13, m[sch[12]], m[sch[13]]);
	g(s, 3, 4, 9, 14, m[sch[14]], m[sch[15]]);
}

/*
 * The rounds are written out so that every index is a constant: the state
 * and the message then live in registers, and the permutation of the
 * specification becomes the schedule (b3_msg_schedule) instead of copies.
 */
static void compress_core(const uint32_t cv[8], const uint8_t block[64], uint8_t block_len,
			  uint64_t counter, uint8_t flags, uint32_t s[16])
{
	uint32_t m[16];

	for (int i = 0; i < 16; i++)
		m[i] = b3_load32(block + 4 * i);
	for (int i = 0; i < 8; i++)
		s[i] = cv[i];
	s[8] = b3_iv[0];
	s[9] = b3_iv[1];
	s[10] = b3_iv[2];
	s[11] = b3_iv[3];
	s[12] = (uint32_t)counter;
	s[13] = (uint32_t)(counter >> 32);
	s[14] = block_len;
	s[15] = flags;
	round_fn(s, m, b3_msg_schedule[0]);
	round_fn(s, m, b3_msg_schedule[1]);
	round_fn(s, m, b3_msg_schedule[2]);
	round_fn(s, m, b3_msg_schedule[3]);
	round_fn(s, m, b3_msg_schedule[4]);
	round_fn(s, m, b3_msg_schedule[5]);
	round_fn(s, m, b3_msg_schedule[6]);
}

void b3_compress_in_place(uint32_t cv[8], const uint8_t block[64], uint8_t block_len,
			  uint64_t counter, uint8_t flags)
{
	uint32_t s[16];

	compress_core(cv, block, block_len, counter, flags, s);
	for (int i = 0; i < 8; i++)
		cv[i] = s[i] ^ s[i + 8];
}

void b3_compress_xof(const uint32_t cv[8], const uint8_t block[64], uint8_t block_len,
		     uint64_t counter, uint8_t flags, uint8_t out[64])
{
	uint32_t s[16];

	compress_core(cv, block, block_len, counter, flags, s);
	for (int i = 0; i < 8; i++) {
		b3_store32(out + 4 * i, s[i] ^ s[i + 8]);
		b3_store32(out + 32 + 4 * i, s[i + 8] ^ cv[i]);
	}
}

static void cv_to_bytes(const uint32_t cv[8], uint8_t out[32])
{
	for (int i = 0; i < 8; i++)
		b3_store32(out + 4 * i, cv[i]);
}

void b3_hash_many_portable(const uint8_t *const *inputs, size_t n, size_t blocks,
			   const uint32_t key[8], uint64_t counter, bool inc_counter,
			   uint8_t flags, uint8_t flags_start, uint8_t flags_end, uint8_t *out)
{
	for (size_t i = 0; i < n; i++) {
		uint32_t cv[8];
		uint8_t block_flags = flags | flags_start;

		memcpy(cv, key, sizeof(cv));
		for (size_t b = 0; b < blocks; b++) {
			if (b + 1 == blocks)
				block_flags |= flags_end;
			b3_compress_in_place(cv, inputs[i] + b * 64, 64,
					     counter + (inc_counter ? i : 0), block_flags);
			block_flags = flags;
		}
		cv_to_bytes(cv, out + 32 * i);
	}
}

/* ---- backend dispatch ---- */

static b3_hash_many_fn b3_hash_many_impl;
static enum b3_backend b3_current;
static pthread_once_t b3_once = PTHREAD_ONCE_INIT;

bool b3_backend_available(enum b3_backend b)
{
	switch (b) {
	case B3_BACKEND_AUTO:
	case B3_BACKEND_PORTABLE:
		return true;
#ifdef RENDERFS_B3_X86
	case B3_BACKEND_AVX2:
		return __builtin_cpu_supports("avx2");
	case B3_BACKEND_AVX512:
		return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2");
#else
	case B3_BACKEND_AVX2:
	case B3_BACKEND_AVX512:
		return false;
#endif
	}
	return false;
}

const char *b3_backend_name(enum b3_backend b)
{
	switch (b) {
	case B3_BACKEND_AUTO:
		return "auto";
	case B3_BACKEND_PORTABLE:
		return "portable";
	case B3_BACKEND_AVX2:
		return "avx2";
	case B3_BACKEND_AVX512:
		return "avx512";
	}
	return "unknown";
}

static void b3_select(enum b3_backend b)
{
	if (b == B3_BACKEND_AUTO) {
		b = B3_BACKEND_PORTABLE;
		if (b3_backend_available(B3_BACKEND_AVX512))
			b = B3_BACKEND_AVX512;
		else if (b3_backend_available(B3_BACKEND_AVX2))
			b = B3_BACKEND_AVX2;
	}
	b3_current = b;
	switch (b) {
#ifdef RENDERFS_B3_X86
	case B3_BACKEND_AVX2:
		b3_hash_many_impl = b3_hash_many_avx2;
		break;
	case B3_BACKEND_AVX512:
		b3_hash_many_impl = b3_hash_many_avx512;
		break;
#endif
	default:
		b3_current = B3_BACKEND_PORTABLE;
		b3_hash_many_impl = b3_hash_many_portable;
		break;
	}
}

static void b3_init_once(void)
{
	const char *env = getenv("RENDERFS_B3_BACKEND");
	enum b3_backend b = B3_BACKEND_AUTO;

	if (env) {
		for (int i = B3_BACKEND_PORTABLE; i <= B3_BACKEND_AVX512; i++)
			if (strcmp(env, b3_backend_name((enum b3_backend)i)) == 0 &&
			    b3_backend_available((enum b3_backend)i))
				b = (enum b3_backend)i;
	}
	b3_select(b);
}

static b3_hash_many_fn hash_many(void)
{
	pthread_once(&b3_once, b3_init_once);
	return b3_hash_many_impl;
}

int b3_set_backend(enum b3_backend b)
{
	pthread_once(&b3_once, b3_init_once);
	if (!b3_backend_available(b))
		return -ENOTSUP;
	b3_select(b);
	return 0;
}

enum b3_backend b3_get_backend(void)
{
	pthread_once(&b3_once, b3_init_once);
	return b3_current;
}

/* ---- chunk state ---- */

static void chunk_init(struct b3_chunk_state *c, const uint32_t key[8], uint64_t counter,
		       uint8_t flags)
{
	memcpy(c->cv, key, sizeof(c->cv));
	c->chunk_counter = counter;
	memset(c->buf, 0, sizeof(c->buf));
	c->buf_len = 0;
	c->blocks_compressed = 0;
	c->flags = flags;
}

static size_t chunk_len(const struct b3_chunk_state *c)
{
	return (size_t)B3_BLOCK_LEN * c->blocks_compressed + c->buf_len;
}

static uint8_t chunk_start_flag(const struct b3_chunk_state *c)
{
	return c->blocks_compressed == 0 ? B3_CHUNK_START : 0;
}

/* The caller never passes more than fits in the chunk. */
static void chunk_update(struct b3_chunk_state *c, const uint8_t *in, size_t len)
{
	while (len > 0) {
		if (c->buf_len == B3_BLOCK_LEN) {
			b3_compress_in_place(c->cv, c->buf, B3_BLOCK_LEN, c->chunk_counter,
					     c->flags | chunk_start_flag(c));
			c->blocks_compressed++;
			c->buf_len = 0;
			memset(c->buf, 0, sizeof(c->buf));
		}
		size_t take = B3_BLOCK_LEN - c->buf_len;
		if (take > len)
			take = len;
		memcpy(c->buf + c->buf_len, in, take);
		c->buf_len += (uint8_t)take;
		in += take;
		len -= take;
	}
}

/* The last compression of a node, not yet done: chunk end, parent or root. */
struct b3_output {
	uint32_t cv[8];
	uint8_t block[64];
	uint8_t block_len;
	uint64_t counter;
	uint8_t flags;
};

static struct b3_output chunk_output(const struct b3_chunk_state *c)
{
	struct b3_output o;

	memcpy(o.cv, c->cv, sizeof(o.cv));
	memcpy(o.block, c->buf, sizeof(o.block));
	o.block_len = c->buf_len;
	o.counter = c->chunk_counter;
	o.flags = c->flags | chunk_start_flag(c) | B3_CHUNK_END;
	return o;
}

static struct b3_output parent_output(const uint8_t block[64], const uint32_t key[8],
				      uint8_t flags)
{
	struct b3_output o;

	memcpy(o.cv, key, sizeof(o.cv));
	memcpy(o.block, block, 64);
	o.block_len = 64;
	o.counter = 0;
	o.flags = flags | B3_PARENT;
	return o;
}

static void output_cv(const struct b3_output *o, uint8_t out[32])
{
	uint32_t cv[8];

	memcpy(cv, o->cv, sizeof(cv));
	b3_compress_in_place(cv, o->block, o->block_len, o->counter, o->flags);
	cv_to_bytes(cv, out);
}

static void output_root(const struct b3_output *o, uint8_t *out, size_t out_len)
{
	uint64_t block_counter = 0;
	uint8_t buf[64];

	while (out_len > 0) {
		b3_compress_xof(o->cv, o->block, o->block_len, block_counter, o->flags | B3_ROOT,
				buf);
		size_t take = out_len < 64 ? out_len : 64;
		memcpy(out, buf, take);
		out += take;
		out_len -= take;
		block_counter++;
	}
}

/* ---- subtrees ---- */

struct subtree_job {
	const uint8_t *input;
	uint64_t chunks;
	uint64_t counter;
	const uint32_t *key;
	uint8_t flags;
	unsigned threads;
	uint8_t cv[32];
};

static void hash_subtree(struct subtree_job *j);

static void *subtree_thread(void *arg)
{
	hash_subtree(arg);
	return NULL;
}

static void parent_cv(const uint8_t left[32], const uint8_t right[32], const uint32_t key[8],
		      uint8_t flags, uint8_t out[32])
{
	uint8_t block[64];
	struct b3_output o;

	memcpy(block, left, 32);
	memcpy(block + 32, right, 32);
	o = parent_output(block, key, flags);
	output_cv(&o, out);
}

/*
 * CV of a complete subtree of j->chunks chunks (a power of two), whose
 * first chunk has index j->counter. Never the root.
 */
/*
 * A subtree of at most B3_BATCH chunks: all chunks in one backend call,
 * then each level of parents in one call. Not inlined, so that its 14 KiB
 * of arrays are not part of every frame of the recursion above it.
 */
static __attribute__((noinline)) void hash_leaf_batch(struct subtree_job *j)
{
	const uint8_t *ptrs[B3_BATCH];
	uint8_t cvs[B3_BATCH * 32], next[B3_BATCH / 2 * 32];
	size_t n = (size_t)j->chunks;
	b3_hash_many_fn fn = hash_many();

	for (size_t i = 0; i < n; i++)
		ptrs[i] = j->input + i * B3_CHUNK_LEN;
	fn(ptrs, n, B3_CHUNK_LEN / B3_BLOCK_LEN, j->key, j->counter, true, j->flags,
	   B3_CHUNK_START, B3_CHUNK_END, cvs);
	while (n > 1) {
		n /= 2;
		for (size_t i = 0; i < n; i++)
			ptrs[i] = cvs + 64 * i;
		fn(ptrs, n, 1, j->key, 0, false, j->flags | B3_PARENT, 0, 0, next);
		memcpy(cvs, next, n * 32);
	}
	memcpy(j->cv, cvs, 32);
}

static void hash_subtree(struct subtree_job *j)
{
	if (j->chunks <= B3_BATCH) {
		hash_leaf_batch(j);
		return;
	}

	uint64_t half = j->chunks / 2;
	struct subtree_job l = {j->input, half, j->counter, j->key, j->flags, 1, {0}};
	struct subtree_job r = {j->input + half * B3_CHUNK_LEN, half, j->counter + half,
				j->key, j->flags, 1, {0}};
	pthread_t tid;
	bool threaded = false;

	if (j->threads > 1 && half >= B3_MIN_PARALLEL_CHUNKS / 2) {
		l.threads = j->threads / 2;
		r.threads = j->threads - l.threads;
		threaded = pthread_create(&tid, NULL, subtree_thread, &l) == 0;
		if (!threaded)
			r.threads = 1; /* no thread to spare: do both halves here */
	}
	if (!threaded)
		hash_subtree(&l);
	hash_subtree(&r);
	if (threaded)
		pthread_join(tid, NULL);
	parent_cv(l.cv, r.cv, j->key, j->flags, j->cv);
}

/* ---- groups: verified reads of large content ---- */

static uint64_t round_down_pow2(uint64_t x);

/* CV of the chunks of in (len > 0 bytes) whose first chunk has index
 * counter; they form one subtree of the whole tree (see blake3.h). */
static void range_cv(const uint8_t *in, size_t len, uint64_t counter, unsigned threads,
		     uint8_t out[32])
{
	uint64_t chunks = (len + B3_CHUNK_LEN - 1) / B3_CHUNK_LEN;

	if (chunks <= 1) {
		struct b3_chunk_state c;
		struct b3_output o;

		chunk_init(&c, b3_iv, counter, 0);
		chunk_update(&c, in, len);
		o = chunk_output(&c);
		output_cv(&o, out);
	} else if (len == chunks * B3_CHUNK_LEN && (chunks & (chunks - 1)) == 0) {
		struct subtree_job j = {in, chunks, counter, b3_iv, 0, threads, {0}};

		hash_subtree(&j);
		memcpy(out, j.cv, 32);
	} else {
		/* BLAKE3's rule: the left subtree holds the largest power of
		 * two of chunks that leaves at least one for the right. */
		uint64_t left = round_down_pow2(chunks - 1);
		uint8_t l[32], r[32];

		range_cv(in, (size_t)left * B3_CHUNK_LEN, counter, threads, l);
		range_cv(in + left * B3_CHUNK_LEN, len - (size_t)left * B3_CHUNK_LEN,
			 counter + left, 1, r);
		parent_cv(l, r, b3_iv, 0, out);
	}
}

void b3_group_cv(const void *input, size_t len, uint64_t group, uint8_t cv[B3_OUT_LEN])
{
	range_cv(input, len, group * (B3_GROUP_LEN / B3_CHUNK_LEN), 1, cv);
}

void b3_group_cv_mt(const void *input, size_t len, uint64_t group, unsigned threads,
		    uint8_t cv[B3_OUT_LEN])
{
	range_cv(input, len, group * (B3_GROUP_LEN / B3_CHUNK_LEN), threads ? threads : 1, cv);
}

static void groups_node(const uint8_t (*cvs)[32], size_t n, bool root, uint8_t out[32])
{
	uint64_t left;
	uint8_t block[64];

	if (n == 1) {
		memcpy(out, cvs[0], 32);
		return;
	}
	left = round_down_pow2(n - 1);
	groups_node(cvs, (size_t)left, false, block);
	groups_node(cvs + left, n - (size_t)left, false, block + 32);
	if (root) {
		struct b3_output o = parent_output(block, b3_iv, 0);
		output_root(&o, out, 32);
	} else {
		struct b3_output o = parent_output(block, b3_iv, 0);
		output_cv(&o, out);
	}
}

void b3_root_from_groups(const uint8_t (*cvs)[B3_OUT_LEN], size_t n, uint8_t out[B3_OUT_LEN])
{
	groups_node(cvs, n, true, out);
}

/* ---- the hasher ---- */

static void hasher_init_base(struct b3_hasher *h, const uint32_t key[8], uint8_t flags)
{
	memcpy(h->key, key, sizeof(h->key));
	chunk_init(&h->chunk, key, 0, flags);
	h->cv_stack_len = 0;
}

void b3_hasher_init(struct b3_hasher *h)
{
	hasher_init_base(h, b3_iv, 0);
}

void b3_hasher_init_keyed(struct b3_hasher *h, const uint8_t key[B3_KEY_LEN])
{
	uint32_t k[8];

	for (int i = 0; i < 8; i++)
		k[i] = b3_load32(key + 4 * i);
	hasher_init_base(h, k, B3_KEYED_HASH);
}

void b3_hasher_init_derive_key(struct b3_hasher *h, const char *context)
{
	struct b3_hasher ctx;
	uint8_t key[B3_KEY_LEN];
	uint32_t k[8];

	hasher_init_base(&ctx, b3_iv, B3_DERIVE_KEY_CONTEXT);
	b3_hasher_update(&ctx, context, strlen(context));
	b3_hasher_finalize(&ctx, key, sizeof(key));
	for (int i = 0; i < 8; i++)
		k[i] = b3_load32(key + 4 * i);
	hasher_init_base(h, k, B3_DERIVE_KEY_MATERIAL);
}

/*
 * Merge the stack down to one entry per 1 bit of total_chunks: everything
 * left of a subtree that is known not to be the last.
 */
static void merge_cv_stack(struct b3_hasher *h, uint64_t total_chunks)
{
	size_t post = (size_t)__builtin_popcountll(total_chunks);

	while (h->cv_stack_len > post) {
		uint8_t *left = h->cv_stack + (h->cv_stack_len - 2) * 32;
		uint8_t out[32];

		parent_cv(left, left + 32, h->key, h->chunk.flags, out);
		memcpy(left, out, 32);
		h->cv_stack_len--;
	}
}

static void push_cv(struct b3_hasher *h, const uint8_t cv[32], uint64_t chunk_counter)
{
	merge_cv_stack(h, chunk_counter);
	memcpy(h->cv_stack + h->cv_stack_len * 32, cv, 32);
	h->cv_stack_len++;
}

static uint64_t round_down_pow2(uint64_t x)
{
	return (uint64_t)1 << (63 - __builtin_clzll(x));
}

void b3_hasher_update_mt(struct b3_hasher *h, const void *input, size_t len, unsigned threads)
{
	const uint8_t *in = input;

	if (threads == 0)
		threads = 1;
	if (chunk_len(&h->chunk) > 0) {
		size_t take = B3_CHUNK_LEN - chunk_len(&h->chunk);
		if (take > len)
			take = len;
		chunk_update(&h->chunk, in, take);
		in += take;
		len -= take;
		if (len == 0)
			return;
		/* The chunk is full and more input follows: it is not the root. */
		struct b3_output o = chunk_output(&h->chunk);
		uint8_t cv[32];
		uint64_t counter = h->chunk.chunk_counter;

		output_cv(&o, cv);
		push_cv(h, cv, counter);
		chunk_init(&h->chunk, h->key, counter + 1, h->chunk.flags);
	}

	while (len > B3_CHUNK_LEN) {
		uint64_t counter = h->chunk.chunk_counter;
		uint64_t chunks = round_down_pow2(len / B3_CHUNK_LEN);

		/* A subtree must start at a multiple of its own size. */
		while (counter & (chunks - 1))
			chunks /= 2;
		if (chunks == 1) {
			struct b3_chunk_state c;
			struct b3_output o;
			uint8_t cv[32];

			chunk_init(&c, h->key, counter, h->chunk.flags);
			chunk_update(&c, in, B3_CHUNK_LEN);
			o = chunk_output(&c);
			output_cv(&o, cv);
			push_cv(h, cv, counter);
		} else {
			/* Two halves: the right one may be the last input, hence
			 * not merged until more arrives. */
			uint64_t half = chunks / 2;
			struct subtree_job whole = {in, chunks, counter, h->key, h->chunk.flags,
						    threads, {0}};
			struct subtree_job l = whole, r = whole;

			l.chunks = r.chunks = half;
			r.input = in + half * B3_CHUNK_LEN;
			r.counter = counter + half;
			if (threads > 1 && half >= B3_MIN_PARALLEL_CHUNKS / 2) {
				pthread_t tid;

				l.threads = threads / 2;
				r.threads = threads - l.threads;
				if (pthread_create(&tid, NULL, subtree_thread, &l) == 0) {
					hash_subtree(&r);
					pthread_join(tid, NULL);
				} else {
					l.threads = r.threads = 1;
					hash_subtree(&l);
					hash_subtree(&r);
				}
			} else {
				l.threads = r.threads = 1;
				hash_subtree(&l);
				hash_subtree(&r);
			}
			push_cv(h, l.cv, counter);
			push_cv(h, r.cv, counter + half);
		}
		h->chunk.chunk_counter = counter + chunks;
		in += chunks * B3_CHUNK_LEN;
		len -= chunks * B3_CHUNK_LEN;
	}

	if (len > 0) {
		chunk_update(&h->chunk, in, len);
		merge_cv_stack(h, h->chunk.chunk_counter);
	}
}

void b3_hasher_update(struct b3_hasher *h, const void *input, size_t len)
{
	b3_hasher_update_mt(h, input, len, 1);
}

void b3_hasher_finalize(const struct b3_hasher *h, uint8_t *out, size_t out_len)
{
	struct b3_output o;
	size_t remaining;

	if (h->cv_stack_len == 0) {
		o = chunk_output(&h->chunk);
		output_root(&o, out, out_len);
		return;
	}
	if (chunk_len(&h->chunk) > 0) {
		remaining = h->cv_stack_len;
		o = chunk_output(&h->chunk);
	} else {
		/* The last two CVs on the stack are the root's children. */
		remaining = h->cv_stack_len - 2u;
		o = parent_output(h->cv_stack + remaining * 32, h->key, h->chunk.flags);
	}
	while (remaining > 0) {
		uint8_t block[64];

		remaining--;
		memcpy(block, h->cv_stack + remaining * 32, 32);
		output_cv(&o, block + 32);
		o = parent_output(block, h->key, h->chunk.flags);
	}
	output_root(&o, out, out_len);
}

void b3_hash(const void *input, size_t len, uint8_t out[B3_OUT_LEN])
{
	b3_hash_mt(input, len, 1, out);
}

void b3_hash_mt(const void *input, size_t len, unsigned threads, uint8_t out[B3_OUT_LEN])
{
	struct b3_hasher h;

	b3_hasher_init(&h);
	b3_hasher_update_mt(&h, input, len, threads);
	b3_hasher_finalize(&h, out, B3_OUT_LEN);
}

int b3_hash_fd(int fd, unsigned threads, uint8_t out[B3_OUT_LEN], uint64_t *size_out)
{
	struct b3_hasher h;
	struct stat st;
	uint64_t total = 0;

	b3_hasher_init(&h);
	if (fstat(fd, &st) != 0)
		return -errno;
	if (S_ISREG(st.st_mode) && st.st_size > 0) {
		/* No MAP_POPULATE: with several threads, each faults in its own
		 * part of the file in parallel, which measured faster. */
		void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE,
				 fd, 0);
		if (map != MAP_FAILED) {
			b3_hasher_update_mt(&h, map, (size_t)st.st_size, threads);
			munmap(map, (size_t)st.st_size);
			b3_hasher_finalize(&h, out, B3_OUT_LEN);
			if (size_out)
				*size_out = (uint64_t)st.st_size;
			return 0;
		}
	}

	/* Not mappable (pipe, special file): read it in 1 MiB pieces. */
	const size_t bufsz = 1 << 20;
	uint8_t *buf = malloc(bufsz);
	off_t off = 0;
	int rc = 0;

	if (!buf)
		return -ENOMEM;
	for (;;) {
		ssize_t n = pread(fd, buf, bufsz, off);
		if (n < 0 && errno == ESPIPE)
			n = read(fd, buf, bufsz);
		else if (n > 0)
			off += n;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			break;
		}
		if (n == 0)
			break;
		b3_hasher_update_mt(&h, buf, (size_t)n, threads);
		total += (uint64_t)n;
	}
	free(buf);
	if (rc == 0) {
		b3_hasher_finalize(&h, out, B3_OUT_LEN);
		if (size_out)
			*size_out = total;
	}
	return rc;
}

void b3_to_hex(const uint8_t hash[B3_OUT_LEN], char hex[B3_HEX_LEN + 1])
{
	static const char digits[] = "0123456789abcdef";

	for (int i = 0; i < B3_OUT_LEN; i++) {
		hex[2 * i] = digits[hash[i] >> 4];
		hex[2 * i + 1] = digits[hash[i] & 15];
	}
	hex[B3_HEX_LEN] = '\0';
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int b3_from_hex(const char *hex, uint8_t hash[B3_OUT_LEN])
{
	for (int i = 0; i < B3_OUT_LEN; i++) {
		int hi = hexval(hex[2 * i]), lo;

		if (hi < 0)
			return -EINVAL;
		lo = hexval(hex[2 * i + 1]);
		if (lo < 0)
			return -EINVAL;
		hash[i] = (uint8_t)(hi << 4 | lo);
	}
	return hex[B3_HEX_LEN] == '\0' ? 0 : -EINVAL;
}
