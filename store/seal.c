/*
 * seal.c - credentials sealed at rest (SPEC §7): libsodium's secretbox
 * (XSalsa20-Poly1305) under a key of the store's own, keys/credentials.seal (32
 * random bytes, 0600, made once). A sealed value is nonce | box; the index
 * keeps it (creds) until the job's final state.
 *
 * Threads: the key is read or made by store_open() and read-only after;
 * store_seal and store_unseal may be called from any thread.
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

int store_seal_key_load(struct store *st)
{
	char path[4200];
	struct stat sb;
	ssize_t n;
	int fd;

	if (sodium_init() < 0)
		return store_seterr(-EIO, "libsodium failed to initialize");
	snprintf(path, sizeof(path), "%s/keys/credentials.seal", st->dir);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		if (st->opt.read_only)
			return 0; /* nothing sealed can be read: none was made */
		randombytes_buf(st->seal_key, sizeof(st->seal_key));
		int rc = file_write_durable(path, st->seal_key, sizeof(st->seal_key), 0600, 1);
		if (rc) {
			sodium_memzero(st->seal_key, sizeof(st->seal_key));
			return rc;
		}
		st->have_seal_key = true;
		return 0;
	}
	if (fd < 0)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_uid != geteuid() ||
	    (sb.st_mode & 077) || sb.st_size != (off_t)sizeof(st->seal_key)) {
		close(fd);
		return store_seterr(-EPERM,
				    "refusing '%s': it must be a file of %zu bytes owned by the "
				    "daemon's user with mode 0600",
				    path, sizeof(st->seal_key));
	}
	n = read(fd, st->seal_key, sizeof(st->seal_key));
	close(fd);
	if (n != (ssize_t)sizeof(st->seal_key))
		return store_seterr(-EIO, "cannot read '%s'", path);
	st->have_seal_key = true;
	return 0;
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
