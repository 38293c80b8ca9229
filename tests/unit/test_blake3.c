/*
 * test_blake3.c - BLAKE3 against the official vectors (hash, keyed hash,
 * derive key, extended output), every backend against the portable one,
 * threaded against single-threaded, incremental against one-shot, and
 * against b3sum on random files.
 */
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "blake3_i.h"
#include "check.h"

static void fill_vector_input(uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(i % 251);
}

static void to_hex(const uint8_t *b, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		snprintf(out + 2 * i, 3, "%02x", b[i]);
}

static const enum b3_backend all_backends[] = {B3_BACKEND_PORTABLE, B3_BACKEND_AVX2,
					       B3_BACKEND_AVX512};

static void test_official_vectors(void)
{
	json_object *root = json_object_from_file(VECTOR_PATH("blake3_test_vectors.json"));
	json_object *cases, *key_o, *ctx_o;

	REQUIRE(root != NULL, "cannot read the vectors file");
	REQUIRE(json_object_object_get_ex(root, "cases", &cases), "no cases");
	json_object_object_get_ex(root, "key", &key_o);
	json_object_object_get_ex(root, "context_string", &ctx_o);
	const char *key = json_object_get_string(key_o);
	const char *ctx = json_object_get_string(ctx_o);
	size_t ncases = json_object_array_length(cases);
	CHECK(ncases >= 35, "only %zu cases", ncases);

	for (size_t bi = 0; bi < sizeof(all_backends) / sizeof(all_backends[0]); bi++) {
		if (b3_set_backend(all_backends[bi]) != 0) {
			printf("backend %s not available on this CPU\n",
			       b3_backend_name(all_backends[bi]));
			continue;
		}
		for (size_t i = 0; i < ncases; i++) {
			json_object *c = json_object_array_get_idx(cases, i), *o;
			json_object_object_get_ex(c, "input_len", &o);
			size_t len = (size_t)json_object_get_int64(o);
			uint8_t *in = malloc(len ? len : 1);
			const char *modes[] = {"hash", "keyed_hash", "derive_key"};

			fill_vector_input(in, len);
			for (int m = 0; m < 3; m++) {
				json_object_object_get_ex(c, modes[m], &o);
				const char *want = json_object_get_string(o);
				size_t outlen = strlen(want) / 2;
				uint8_t out[256];
				char hex[513];
				struct b3_hasher h;

				if (m == 0)
					b3_hasher_init(&h);
				else if (m == 1)
					b3_hasher_init_keyed(&h, (const uint8_t *)key);
				else
					b3_hasher_init_derive_key(&h, ctx);
				b3_hasher_update(&h, in, len);
				b3_hasher_finalize(&h, out, outlen);
				to_hex(out, outlen, hex);
				CHECK(strcmp(hex, want) == 0, "%s len %zu mode %s",
				      b3_backend_name(all_backends[bi]), len, modes[m]);
				/* The default-length output is the XOF's prefix. */
				b3_hasher_finalize(&h, out, 32);
				to_hex(out, 32, hex);
				CHECK(strncmp(hex, want, 64) == 0, "32-byte prefix len %zu", len);

				/* Byte-at-a-time updates give the same hash. */
				if (m == 0 && len <= 8192) {
					b3_hasher_init(&h);
					for (size_t k = 0; k < len; k++)
						b3_hasher_update(&h, in + k, 1);
					b3_hasher_finalize(&h, out, 32);
					to_hex(out, 32, hex);
					CHECK(strncmp(hex, want, 64) == 0, "bytewise len %zu", len);
				}
			}
			free(in);
		}
	}
	b3_set_backend(B3_BACKEND_AUTO);
	json_object_put(root);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void fill_random(uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)rnd();
}

/* Backends, thread counts and split points all agree with portable. */
static void test_agreement(void)
{
	const size_t sizes[] = {0,	 1,	 64,	   1023,	1024,	       1025,
				2048,	 3072,	 16383,	   16384,	65535,	       65536,
				65537,	 131072, 1 << 20, (1 << 20) + 7, (8 << 20) + 3};
	size_t max = (8 << 20) + 3;
	uint8_t *buf = malloc(max);

	fill_random(buf, max);
	for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
		size_t len = sizes[s];
		uint8_t ref[32], out[32];

		b3_set_backend(B3_BACKEND_PORTABLE);
		b3_hash(buf, len, ref);
		for (size_t bi = 1; bi < 3; bi++) {
			if (b3_set_backend(all_backends[bi]) != 0)
				continue;
			b3_hash(buf, len, out);
			CHECK(memcmp(ref, out, 32) == 0, "%s len %zu",
			      b3_backend_name(all_backends[bi]), len);
		}
		b3_set_backend(B3_BACKEND_AUTO);
		for (unsigned t = 2; t <= 8; t *= 2) {
			b3_hash_mt(buf, len, t, out);
			CHECK(memcmp(ref, out, 32) == 0, "threads %u len %zu", t, len);
		}
		/* Irregular incremental splits. */
		struct b3_hasher h;
		size_t off = 0;
		b3_hasher_init(&h);
		while (off < len) {
			size_t step = 1 + rnd() % 70000;
			if (step > len - off)
				step = len - off;
			b3_hasher_update_mt(&h, buf + off, step, 1 + (unsigned)(rnd() % 3));
			off += step;
		}
		b3_hasher_finalize(&h, out, 32);
		CHECK(memcmp(ref, out, 32) == 0, "incremental len %zu", len);
	}
	free(buf);
}

static int run_b3sum(const char *path, char hex[65])
{
	char cmd[512];
	FILE *p;
	int ok;

	snprintf(cmd, sizeof(cmd), "b3sum --no-names '%s'", path);
	p = popen(cmd, "r");
	if (!p)
		return -1;
	ok = fscanf(p, "%64s", hex) == 1;
	return pclose(p) == 0 && ok ? 0 : -1;
}

static void test_b3sum(void)
{
	const size_t sizes[] = {0, 1, 1023, 1024, 1025, 65535, 65536, 65537, (1 << 20) + 7,
				100u << 20};
	char path[] = "/tmp/renderfs-b3-XXXXXX";
	char want[65], got[65];

	if (system("command -v b3sum >/dev/null 2>&1") != 0) {
		printf("SKIP b3sum comparison: b3sum is not installed (apt-get install b3sum)\n");
		return;
	}
	for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
		size_t len = sizes[s];
		uint8_t *buf = malloc(len ? len : 1), out[32];
		int fd = mkstemp(path);

		REQUIRE(fd >= 0, "mkstemp: %s", strerror(errno));
		fill_random(buf, len);
		CHECK(write(fd, buf, len) == (ssize_t)len, "write");
		CHECK(run_b3sum(path, want) == 0, "b3sum failed");
		for (unsigned t = 1; t <= 2; t++) {
			CHECK(b3_hash_fd(fd, t, out, NULL) == 0, "hash_fd");
			b3_to_hex(out, got);
			CHECK(strcmp(want, got) == 0, "size %zu threads %u: b3sum %s, ours %s", len,
			      t, want, got);
		}
		close(fd);
		unlink(path);
		free(buf);
		memcpy(path + strlen(path) - 6, "XXXXXX", 6);
	}
}

static void test_hex(void)
{
	uint8_t h[32], back[32];
	char hex[65];

	b3_hash("abc", 3, h);
	b3_to_hex(h, hex);
	CHECK(b3_from_hex(hex, back) == 0 && memcmp(h, back, 32) == 0, "hex round trip");
	hex[5] = 'G';
	CHECK(b3_from_hex(hex, back) == -EINVAL, "bad digit");
	CHECK(b3_from_hex("abcd", back) == -EINVAL, "short");
}

/* Group chaining values recombine to the hash, and each group's value
 * changes when any byte of that group does. */
static void test_groups(void)
{
	static const size_t sizes[] = {B3_GROUP_LEN + 1,	 2 * B3_GROUP_LEN,
				       3 * B3_GROUP_LEN + 5, 4 * B3_GROUP_LEN + B3_CHUNK_LEN,
				       5 * B3_GROUP_LEN - 1, 8 * B3_GROUP_LEN,
				       9 * B3_GROUP_LEN + 777};
	size_t max = 9 * B3_GROUP_LEN + 777;
	uint8_t *buf = malloc(max), (*cvs)[32] = malloc(16 * 32), ref[32], out[32];

	REQUIRE(buf && cvs, "out of memory");
	for (size_t i = 0; i < max; i++)
		buf[i] = (uint8_t)(i * 2654435761u >> 13);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		size_t len = sizes[k], n = (len + B3_GROUP_LEN - 1) / B3_GROUP_LEN;

		b3_hash(buf, len, ref);
		for (size_t g = 0; g < n; g++) {
			size_t gl = g + 1 < n ? B3_GROUP_LEN : len - g * B3_GROUP_LEN;
			b3_group_cv(buf + g * B3_GROUP_LEN, gl, g, cvs[g]);
		}
		b3_root_from_groups(cvs, n, out);
		CHECK(memcmp(ref, out, 32) == 0, "groups of %zu bytes", len);
		uint8_t before[32];
		memcpy(before, cvs[n - 1], 32);
		buf[len - 1] ^= 1;
		b3_group_cv(buf + (n - 1) * B3_GROUP_LEN, len - (n - 1) * B3_GROUP_LEN, n - 1,
			    cvs[n - 1]);
		CHECK(memcmp(before, cvs[n - 1], 32) != 0, "a changed byte changes its group");
		buf[len - 1] ^= 1;
	}
	free(buf);
	free(cvs);
}

/* The schedule the rounds use is the specification's permutation
 * applied once per round. */
static void test_schedule(void)
{
	static const uint8_t perm[16] = {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8};
	uint8_t words[16], next[16];

	for (int i = 0; i < 16; i++)
		words[i] = (uint8_t)i;
	for (int r = 0; r < 7; r++) {
		CHECK(memcmp(words, b3_msg_schedule[r], 16) == 0, "schedule of round %d", r);
		for (int i = 0; i < 16; i++)
			next[i] = words[perm[i]];
		memcpy(words, next, 16);
	}
}

int main(void)
{
	printf("blake3 default backend: %s\n", b3_backend_name(b3_get_backend()));
	test_schedule();
	test_official_vectors();
	test_agreement();
	test_b3sum();
	test_hex();
	test_groups();
	return check_done("test_blake3");
}
