/*
 * blake3.h - BLAKE3 hashing, written from the published specification.
 *
 * The portable C path is always compiled and is the oracle; SIMD backends
 * (AVX2: 8 chunks at a time, AVX-512: 16) are chosen at run time and must
 * produce the same bytes. Large inputs can be hashed by several threads:
 * the input is cut into aligned subtrees whose chaining values are merged
 * exactly as the single-threaded tree would merge them.
 *
 * Thread safety: a struct b3_hasher belongs to one thread at a time. The
 * backend selection is process-wide; b3_set_backend() is meant for tests
 * and tools and must not race with hashing.
 */
#ifndef RENDERFS_BLAKE3_H
#define RENDERFS_BLAKE3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define B3_OUT_LEN 32
#define B3_KEY_LEN 32
#define B3_BLOCK_LEN 64
#define B3_CHUNK_LEN 1024
#define B3_MAX_DEPTH 54
#define B3_HEX_LEN (2 * B3_OUT_LEN) /* without the terminating NUL */

enum b3_backend {
	B3_BACKEND_AUTO = 0,
	B3_BACKEND_PORTABLE,
	B3_BACKEND_AVX2,
	B3_BACKEND_AVX512,
};

/* One chunk (up to 1024 bytes) being absorbed. */
struct b3_chunk_state {
	uint32_t cv[8];
	uint64_t chunk_counter;
	uint8_t buf[B3_BLOCK_LEN];
	uint8_t buf_len;
	uint8_t blocks_compressed;
	uint8_t flags;
};

struct b3_hasher {
	uint32_t key[8];
	struct b3_chunk_state chunk;
	uint8_t cv_stack_len;
	/* One chaining value per 1 bit of the number of completed chunks. */
	uint8_t cv_stack[(B3_MAX_DEPTH + 1) * B3_OUT_LEN];
};

void b3_hasher_init(struct b3_hasher *h);
void b3_hasher_init_keyed(struct b3_hasher *h, const uint8_t key[B3_KEY_LEN]);
/* context is a NUL-terminated, hard-coded, globally unique string. */
void b3_hasher_init_derive_key(struct b3_hasher *h, const char *context);

void b3_hasher_update(struct b3_hasher *h, const void *input, size_t len);

/*
 * Like b3_hasher_update(), with up to `threads` threads hashing the whole
 * subtrees of the input in parallel. The result is identical.
 */
void b3_hasher_update_mt(struct b3_hasher *h, const void *input, size_t len,
			 unsigned threads);

/* Extendable output: any out_len; the first 32 bytes are the hash. The
 * hasher is not modified and may be updated further. */
void b3_hasher_finalize(const struct b3_hasher *h, uint8_t *out, size_t out_len);

/* One-shot helpers. */
void b3_hash(const void *input, size_t len, uint8_t out[B3_OUT_LEN]);
void b3_hash_mt(const void *input, size_t len, unsigned threads,
		uint8_t out[B3_OUT_LEN]);

/*
 * Hash a whole file from its descriptor (from offset 0, through mmap when
 * possible, otherwise with read()). Returns 0 or -errno; *size_out receives
 * the number of bytes hashed when not NULL.
 */
int b3_hash_fd(int fd, unsigned threads, uint8_t out[B3_OUT_LEN], uint64_t *size_out);

/*
 * Groups: content longer than B3_GROUP_LEN is a sequence of 1 MiB groups,
 * each a complete subtree of BLAKE3's tree (1024 chunks at an aligned
 * index; the last may be shorter), so a reader who knows the groups'
 * chaining values can check any group on its own, and the values
 * themselves against the hash (as Bao does). b3_group_cv() gives group
 * number `group` of len bytes (0 < len <= B3_GROUP_LEN); the content's
 * hash is b3_root_from_groups() of all n >= 2 of them. Content of one
 * group is hashed as usual (b3_hash).
 */
#define B3_GROUP_LEN (1024 * B3_CHUNK_LEN)
void b3_group_cv(const void *input, size_t len, uint64_t group, uint8_t cv[B3_OUT_LEN]);
void b3_group_cv_mt(const void *input, size_t len, uint64_t group, unsigned threads,
		    uint8_t cv[B3_OUT_LEN]);
void b3_root_from_groups(const uint8_t (*cvs)[B3_OUT_LEN], size_t n, uint8_t out[B3_OUT_LEN]);

/* Lowercase hex of a 32-byte hash; hex must hold B3_HEX_LEN + 1 bytes. */
void b3_to_hex(const uint8_t hash[B3_OUT_LEN], char hex[B3_HEX_LEN + 1]);
/* Parse exactly 64 lowercase hex digits. Returns 0 or -EINVAL. */
int b3_from_hex(const char *hex, uint8_t hash[B3_OUT_LEN]);

/*
 * Backend control. b3_set_backend() returns 0, or -ENOTSUP when the CPU (or
 * the build) lacks it. RENDERFS_B3_BACKEND=portable|avx2|avx512 in the
 * environment selects one at first use.
 */
int b3_set_backend(enum b3_backend b);
enum b3_backend b3_get_backend(void);
bool b3_backend_available(enum b3_backend b);
const char *b3_backend_name(enum b3_backend b);

#endif
