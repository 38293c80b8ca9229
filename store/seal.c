/*
 * seal.c - credentials sealed at rest (SPEC §7): libsodium's secretbox
 * (XSalsa20-Poly1305) under a key of the store's own, keys/credentials.seal (32
 * random bytes, 0600, made once). A sealed value is nonce | box; the index
 * keeps it (creds) until the job's final state.
 *
 * keys/webhook.seed (32 random bytes, 0600, made once) is the seed of the
 * store's Ed25519 webhook key (SPEC §13: v1a signatures, webhook.pub).
 * Each owner's webhook secret (v1, HMAC-SHA256) is 32 random bytes made on
 * first use and kept sealed in the index (usersecrets).
 *
 * Threads: the keys are read or made by store_open() and read-only after;
 * the rest may be called from any thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fileutil.h"
#include "store_i.h"

/*
 * A 32-byte secret of the store's own in keys/<name> (0600, owned by the
 * daemon's user), made once: into buf, *have set. A read-only store
 * without one has none.
 */
static int secret_file_load(struct store *st, const char *name, uint8_t buf[32], bool *have)
{
	char path[4200];
	struct stat sb;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/keys/%s", st->dir, name);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		if (st->opt.read_only)
			return 0; /* nothing sealed can be read: none was made */
		randombytes_buf(buf, 32);
		int rc = file_write_durable(path, buf, 32, 0600, 1);
		if (rc) {
			sodium_memzero(buf, 32);
			return rc;
		}
		*have = true;
		return 0;
	}
	if (fd < 0)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_uid != geteuid() ||
	    (sb.st_mode & 077) || sb.st_size != 32) {
		close(fd);
		return store_seterr(-EPERM,
				    "refusing '%s': it must be a file of 32 bytes owned by the "
				    "daemon's user with mode 0600",
				    path);
	}
	n = read(fd, buf, 32);
	close(fd);
	if (n != 32)
		return store_seterr(-EIO, "cannot read '%s'", path);
	*have = true;
	return 0;
}

int store_seal_key_load(struct store *st)
{
	uint8_t seed[32];
	bool have = false;
	int rc;

	if (sodium_init() < 0)
		return store_seterr(-EIO, "libsodium failed to initialize");
	if ((rc = secret_file_load(st, "credentials.seal", st->seal_key, &st->have_seal_key)) != 0)
		return rc;
	/* The webhook key (SPEC §13, v1a): an Ed25519 pair from its seed. */
	if ((rc = secret_file_load(st, "webhook.seed", seed, &have)) != 0)
		return rc;
	if (have) {
		crypto_sign_seed_keypair(st->hook_pk, st->hook_sk, seed);
		st->have_hook_key = true;
	}
	sodium_memzero(seed, sizeof(seed));
	return 0;
}

int store_webhook_pubkey(struct store *st, uint8_t pk[32])
{
	if (!st->have_hook_key)
		return store_seterr(-EROFS, "this store has no webhook key (read-only)");
	memcpy(pk, st->hook_pk, 32);
	return 0;
}

int store_webhook_sign(struct store *st, const void *msg, size_t len, uint8_t sig[64])
{
	if (!st->have_hook_key)
		return store_seterr(-EROFS, "this store has no webhook key (read-only)");
	crypto_sign_detached(sig, NULL, msg, len, st->hook_sk);
	return 0;
}

int store_user_secret(struct store *st, uint32_t uid, uint8_t secret[32])
{
	void *sealed = NULL;
	size_t slen, plen = 0;
	uint8_t *plain = NULL;
	bool existed;
	int rc;

	for (int round = 0; round < 2; round++) {
		rc = index_user_secret_get(st->ix, uid, &sealed, &slen);
		if (rc == 0) {
			rc = store_unseal(st, sealed, slen, &plain, &plen);
			free(sealed);
			if (rc)
				return rc;
			if (plen != 32) {
				store_unsealed_free(plain);
				return store_seterr(STORE_E_INDEX, "uid %u's webhook secret is damaged",
						    uid);
			}
			memcpy(secret, plain, 32);
			store_unsealed_free(plain);
			return 0;
		}
		if (rc != STORE_E_NOTFOUND || round)
			return rc;
		/* None yet: made now; a concurrent first use may put its own
		 * first, which is then the one read back. */
		uint8_t fresh[32];
		uint8_t *box = NULL;
		size_t blen;

		randombytes_buf(fresh, sizeof(fresh));
		rc = store_seal(st, fresh, sizeof(fresh), &box, &blen);
		sodium_memzero(fresh, sizeof(fresh));
		if (rc)
			return rc;
		rc = index_user_secret_put(st->ix, uid, box, blen, &existed);
		free(box);
		if (rc)
			return rc;
	}
	return STORE_E_NOTFOUND;
}

int store_seal(struct store *st, const void *plain, size_t len, uint8_t **out, size_t *outlen)
{
	size_t n = crypto_secretbox_NONCEBYTES + crypto_secretbox_MACBYTES + len;
	uint8_t *b;

	if (!st->have_seal_key)
		return store_seterr(-EROFS, "this store cannot seal credentials (read-only)");
	if (!(b = malloc(n)))
		return -ENOMEM;
	randombytes_buf(b, crypto_secretbox_NONCEBYTES);
	crypto_secretbox_easy(b + crypto_secretbox_NONCEBYTES, plain, len, b, st->seal_key);
	*out = b;
	*outlen = n;
	return 0;
}

int store_unseal(struct store *st, const void *sealed, size_t len, uint8_t **out,
		 size_t *outlen)
{
	const uint8_t *s = sealed;
	size_t n;
	uint8_t *p;

	if (!st->have_seal_key || len < crypto_secretbox_NONCEBYTES + crypto_secretbox_MACBYTES)
		return store_seterr(STORE_E_INDEX, "sealed credentials that cannot be opened");
	n = len - crypto_secretbox_NONCEBYTES - crypto_secretbox_MACBYTES;
	if (!(p = sodium_malloc(n + 1)))
		return -ENOMEM;
	if (crypto_secretbox_open_easy(p, s + crypto_secretbox_NONCEBYTES,
				       len - crypto_secretbox_NONCEBYTES, s, st->seal_key) != 0) {
		sodium_free(p);
		return store_seterr(STORE_E_INDEX,
				    "sealed credentials do not open with keys/credentials.seal");
	}
	p[n] = '\0';
	*out = p;
	*outlen = n;
	return 0;
}

void store_unsealed_free(uint8_t *p)
{
	if (p)
		sodium_free(p); /* wiped */
}
