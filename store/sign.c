/*
 * sign.c - minisign-compatible keys and signatures with libsodium.
 *
 * DESIGN
 * Everything is byte-compatible with minisign 0.11 (see sign.h for the
 * formats), so the stock tool verifies our signatures and we verify its
 * own. Parsing is strict about structure and lengths and names the file
 * in every error; verification results carry warn_unused_result. Secret
 * key bytes live only in struct sign_seckey and transient buffers, which
 * are wiped with sodium_memzero.
 */
#include "sign.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fileutil.h"

#define SECKEY_BIN_LEN 158
#define PUBKEY_BIN_LEN 42
#define SIG_BIN_LEN 74
#define COMMENT_PREFIX "untrusted comment: "
#define TRUSTED_PREFIX "trusted comment: "
#define KEYFILE_MAX 4096
#define SIGFILE_MAX (SIGN_TRUSTED_MAX + 2048)

static int sodium_ready(void)
{
	return sodium_init() < 0 ? store_seterr(-EIO, "libsodium failed to initialize") : 0;
}

int sign_keygen(struct sign_seckey *sk, struct sign_pubkey *pk)
{
	int rc = sodium_ready();

	if (rc)
		return rc;
	randombytes_buf(sk->keynum, sizeof(sk->keynum));
	crypto_sign_keypair(pk->pk, sk->sk);
	memcpy(pk->keynum, sk->keynum, sizeof(pk->keynum));
	return 0;
}

void sign_seckey_wipe(struct sign_seckey *sk)
{
	sodium_memzero(sk, sizeof(*sk));
}

static uint64_t le64(const uint8_t b[8])
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = v << 8 | b[i];
	return v;
}

void sign_keyid(const uint8_t keynum[SIGN_KEYNUM_LEN], char out[SIGN_KEYID_LEN + 1])
{
	snprintf(out, SIGN_KEYID_LEN + 1, "%016" PRIX64, le64(keynum));
}

static size_t b64_encode(char *out, size_t outsz, const uint8_t *bin, size_t len)
{
	if (outsz < sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL))
		return 0;
	sodium_bin2base64(out, outsz, bin, len, sodium_base64_VARIANT_ORIGINAL);
	return strlen(out);
}

/* Decode one base64 line into exactly want bytes. */
static int b64_decode_exact(const char *line, size_t len, uint8_t *out, size_t want)
{
	size_t got = 0;

	if (sodium_base642bin(out, want, line, len, NULL, &got, NULL,
			      sodium_base64_VARIANT_ORIGINAL) != 0 ||
	    got != want)
		return -1;
	return 0;
}

/*
 * Split text into at most max lines (without "\n", trailing "\r" removed);
 * a final empty line after the last "\n" is not counted.
 */
struct line {
	const char *p;
	size_t len;
};

static int split_lines(const char *text, size_t len, struct line *lines, int max)
{
	int n = 0;
	size_t i = 0;

	while (i < len) {
		size_t j = i;
		while (j < len && text[j] != '\n')
			j++;
		if (n == max)
			return -1;
		lines[n].p = text + i;
		lines[n].len = j - i;
		if (lines[n].len > 0 && lines[n].p[lines[n].len - 1] == '\r')
			lines[n].len--;
		n++;
		i = j + 1;
	}
	return n;
}

static int has_prefix(const struct line *l, const char *prefix)
{
	size_t n = strlen(prefix);
	return l->len >= n && memcmp(l->p, prefix, n) == 0;
}

int sign_pubkey_format(const struct sign_pubkey *pk, char *buf, size_t bufsz)
{
	uint8_t bin[PUBKEY_BIN_LEN];
	char b64[128];
	int n;

	memcpy(bin, "Ed", 2);
	memcpy(bin + 2, pk->keynum, SIGN_KEYNUM_LEN);
	memcpy(bin + 10, pk->pk, SIGN_PK_LEN);
	if (!b64_encode(b64, sizeof(b64), bin, sizeof(bin)))
		return -ENOSPC;
	/* minisign prints the key id without leading zeros. */
	n = snprintf(buf, bufsz, COMMENT_PREFIX "minisign public key %" PRIX64 "\n%s\n",
		     le64(pk->keynum), b64);
	return n < 0 || (size_t)n >= bufsz ? -ENOSPC : n;
}

int sign_pubkey_parse(const char *text, size_t len, struct sign_pubkey *pk)
{
	struct line lines[3];
	uint8_t bin[PUBKEY_BIN_LEN];
	int n = split_lines(text, len, lines, 3);
	const struct line *key;

	if (n == 1)
		key = &lines[0];
	else if (n == 2 && has_prefix(&lines[0], COMMENT_PREFIX))
		key = &lines[1];
	else
		return STORE_E_FORMAT;
	if (b64_decode_exact(key->p, key->len, bin, sizeof(bin)) != 0)
		return STORE_E_FORMAT;
	if (memcmp(bin, "Ed", 2) != 0)
		return STORE_E_FORMAT;
	memcpy(pk->keynum, bin + 2, SIGN_KEYNUM_LEN);
	memcpy(pk->pk, bin + 10, SIGN_PK_LEN);
	return 0;
}

int sign_pubkey_load(const char *path, struct sign_pubkey *pk)
{
	char *text;
	size_t len;
	int rc = file_read_small(path, KEYFILE_MAX, &text, &len);

	if (rc)
		return rc;
	rc = sign_pubkey_parse(text, len, pk);
	free(text);
	if (rc)
		return store_seterr(rc, "'%s' is not a minisign public key", path);
	return 0;
}

static void seckey_checksum(const uint8_t keynum[8], const uint8_t sk[64], uint8_t chk[32])
{
	crypto_generichash_state st;

	crypto_generichash_init(&st, NULL, 0, 32);
	crypto_generichash_update(&st, (const uint8_t *)"Ed", 2);
	crypto_generichash_update(&st, keynum, 8);
	crypto_generichash_update(&st, sk, 64);
	crypto_generichash_final(&st, chk, 32);
}

int sign_seckey_load(const char *path, struct sign_seckey *sk)
{
	uint8_t bin[SECKEY_BIN_LEN], chk[32], pk_check[32], sk_check[64], zero[32] = {0};
	struct line lines[3];
	struct stat st;
	char *text = NULL;
	size_t len;
	int rc, n;

	if ((rc = sodium_ready()) != 0)
		return rc;
	if (stat(path, &st) != 0)
		return store_seterr(-errno, "cannot open secret key '%s': %s", path,
				    strerror(errno));
	if (!S_ISREG(st.st_mode))
		return store_seterr(STORE_E_FORMAT, "secret key '%s' is not a regular file", path);
	if (st.st_mode & 077)
		return store_seterr(STORE_E_KEYPERM,
				    "secret key '%s' has mode %04o: it must not be accessible "
				    "to group or others (chmod 600)",
				    path, (unsigned)(st.st_mode & 07777));
	if ((rc = file_read_small(path, KEYFILE_MAX, &text, &len)) != 0)
		return rc;
	n = split_lines(text, len, lines, 3);
	rc = STORE_E_FORMAT;
	if (n != 2 || !has_prefix(&lines[0], COMMENT_PREFIX) ||
	    b64_decode_exact(lines[1].p, lines[1].len, bin, sizeof(bin)) != 0) {
		store_seterr(rc, "'%s' is not a minisign secret key", path);
		goto out;
	}
	if (memcmp(bin, "Ed", 2) != 0 || memcmp(bin + 4, "B2", 2) != 0) {
		store_seterr(rc, "secret key '%s' uses an unsupported algorithm", path);
		goto out;
	}
	if (bin[2] != 0 || bin[3] != 0) {
		store_seterr(rc,
			     "secret key '%s' is password-protected; renderfs needs an "
			     "unencrypted key (renderctl keygen, or minisign -G -W)",
			     path);
		goto out;
	}
	memcpy(sk->keynum, bin + 54, SIGN_KEYNUM_LEN);
	memcpy(sk->sk, bin + 62, SIGN_SK_LEN);
	seckey_checksum(sk->keynum, sk->sk, chk);
	if (memcmp(bin + 126, zero, 32) != 0 && sodium_memcmp(bin + 126, chk, 32) != 0) {
		store_seterr(rc, "secret key '%s' fails its checksum (damaged file)", path);
		goto out;
	}
	/* The key must be self-consistent: the public half is derived. */
	crypto_sign_seed_keypair(pk_check, sk_check, sk->sk);
	if (sodium_memcmp(pk_check, sk->sk + 32, 32) != 0) {
		store_seterr(rc, "secret key '%s' is inconsistent (damaged file)", path);
		goto out;
	}
	rc = 0;
out:
	if (rc)
		sign_seckey_wipe(sk);
	sodium_memzero(bin, sizeof(bin));
	sodium_memzero(sk_check, sizeof(sk_check));
	if (text) {
		sodium_memzero(text, len);
		free(text);
	}
	return rc;
}

int sign_keypair_save(const char *dir, const struct sign_seckey *sk,
		      const struct sign_pubkey *pk)
{
	uint8_t bin[SECKEY_BIN_LEN];
	char path[4096], keyid[SIGN_KEYID_LEN + 1], b64[256], text[512], pubtext[256];
	int n, rc;

	sign_keyid(sk->keynum, keyid);
	memset(bin, 0, sizeof(bin));
	memcpy(bin, "Ed", 2);
	memcpy(bin + 4, "B2", 2);
	memcpy(bin + 54, sk->keynum, SIGN_KEYNUM_LEN);
	memcpy(bin + 62, sk->sk, SIGN_SK_LEN);
	seckey_checksum(sk->keynum, sk->sk, bin + 126);
	b64_encode(b64, sizeof(b64), bin, sizeof(bin));
	n = snprintf(text, sizeof(text), COMMENT_PREFIX "renderfs secret key %s (unencrypted)\n%s\n",
		     keyid, b64);
	snprintf(path, sizeof(path), "%s/%s.key", dir, keyid);
	rc = file_write_durable(path, text, (size_t)n, 0600, 1);
	sodium_memzero(bin, sizeof(bin));
	sodium_memzero(b64, sizeof(b64));
	sodium_memzero(text, sizeof(text));
	if (rc)
		return rc;
	n = sign_pubkey_format(pk, pubtext, sizeof(pubtext));
	if (n < 0)
		return n;
	snprintf(path, sizeof(path), "%s/%s.pub", dir, keyid);
	return file_write_durable(path, pubtext, (size_t)n, 0644, 0);
}

int sign_prehash_fd(int fd, uint8_t out[SIGN_PREHASH_LEN])
{
	crypto_generichash_state st;
	uint8_t buf[1 << 16];
	off_t off = 0;

	crypto_generichash_init(&st, NULL, 0, SIGN_PREHASH_LEN);
	for (;;) {
		ssize_t n = pread(fd, buf, sizeof(buf), off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		crypto_generichash_update(&st, buf, (size_t)n);
		off += n;
	}
	crypto_generichash_final(&st, out, SIGN_PREHASH_LEN);
	return 0;
}

void sign_prehash_buf(const void *buf, size_t len, uint8_t out[SIGN_PREHASH_LEN])
{
	crypto_generichash(out, SIGN_PREHASH_LEN, buf, len, NULL, 0);
}

static int comment_ok(const char *c)
{
	return strchr(c, '\n') == NULL && strchr(c, '\r') == NULL;
}

int sign_make(const struct sign_seckey *sk, const uint8_t prehash[SIGN_PREHASH_LEN],
	      const char *untrusted, const char *trusted, char *buf, size_t bufsz)
{
	uint8_t bin[SIG_BIN_LEN], global[SIGN_SIG_LEN], msg[SIGN_SIG_LEN + SIGN_TRUSTED_MAX];
	char b64sig[128], b64global[128];
	size_t tlen = strlen(trusted);
	int rc, n;

	if ((rc = sodium_ready()) != 0)
		return rc;
	if (!comment_ok(trusted) || !comment_ok(untrusted) || tlen > SIGN_TRUSTED_MAX)
		return store_seterr(-EINVAL, "comments must be one line of at most %d bytes",
				    SIGN_TRUSTED_MAX);
	memcpy(bin, "ED", 2);
	memcpy(bin + 2, sk->keynum, SIGN_KEYNUM_LEN);
	crypto_sign_detached(bin + 10, NULL, prehash, SIGN_PREHASH_LEN, sk->sk);
	memcpy(msg, bin + 10, SIGN_SIG_LEN);
	memcpy(msg + SIGN_SIG_LEN, trusted, tlen);
	crypto_sign_detached(global, NULL, msg, SIGN_SIG_LEN + tlen, sk->sk);
	b64_encode(b64sig, sizeof(b64sig), bin, sizeof(bin));
	b64_encode(b64global, sizeof(b64global), global, sizeof(global));
	n = snprintf(buf, bufsz, COMMENT_PREFIX "%s\n%s\n" TRUSTED_PREFIX "%s\n%s\n", untrusted,
		     b64sig, trusted, b64global);
	return n < 0 || (size_t)n >= bufsz ? -ENOSPC : n;
}

int sign_sig_parse(const char *text, size_t len, struct sign_sig *sig)
{
	struct line lines[5];
	uint8_t bin[SIG_BIN_LEN];
	size_t plen = strlen(TRUSTED_PREFIX), tlen;
	int n = split_lines(text, len, lines, 5);

	if (n != 4 || !has_prefix(&lines[0], COMMENT_PREFIX) ||
	    !has_prefix(&lines[2], TRUSTED_PREFIX))
		return STORE_E_FORMAT;
	if (b64_decode_exact(lines[1].p, lines[1].len, bin, sizeof(bin)) != 0)
		return STORE_E_FORMAT;
	if (memcmp(bin, "ED", 2) != 0 && memcmp(bin, "Ed", 2) != 0)
		return STORE_E_FORMAT;
	if (b64_decode_exact(lines[3].p, lines[3].len, sig->global_sig, SIGN_SIG_LEN) != 0)
		return STORE_E_FORMAT;
	tlen = lines[2].len - plen;
	if (tlen > SIGN_TRUSTED_MAX || memchr(lines[2].p + plen, '\0', tlen))
		return STORE_E_FORMAT;
	memcpy(sig->alg, bin, 2);
	memcpy(sig->keynum, bin + 2, SIGN_KEYNUM_LEN);
	memcpy(sig->sig, bin + 10, SIGN_SIG_LEN);
	memcpy(sig->trusted, lines[2].p + plen, tlen);
	sig->trusted[tlen] = '\0';
	return 0;
}

static int verify_common(const struct sign_pubkey *pk, const struct sign_sig *sig,
			 const uint8_t *msg, size_t msglen)
{
	uint8_t gmsg[SIGN_SIG_LEN + SIGN_TRUSTED_MAX];
	size_t tlen = strlen(sig->trusted);

	if (memcmp(sig->keynum, pk->keynum, SIGN_KEYNUM_LEN) != 0) {
		char a[SIGN_KEYID_LEN + 1], b[SIGN_KEYID_LEN + 1];

		sign_keyid(sig->keynum, a);
		sign_keyid(pk->keynum, b);
		return store_seterr(STORE_E_KEYID, "signature made by key %s, not by key %s", a, b);
	}
	if (crypto_sign_verify_detached(sig->sig, msg, msglen, pk->pk) != 0)
		return store_seterr(STORE_E_BADSIG, "signature does not match the content");
	memcpy(gmsg, sig->sig, SIGN_SIG_LEN);
	memcpy(gmsg + SIGN_SIG_LEN, sig->trusted, tlen);
	if (crypto_sign_verify_detached(sig->global_sig, gmsg, SIGN_SIG_LEN + tlen, pk->pk) != 0)
		return store_seterr(STORE_E_BADSIG, "trusted comment signature does not verify");
	return 0;
}

int sign_verify_prehash(const struct sign_pubkey *pk, const struct sign_sig *sig,
			const uint8_t prehash[SIGN_PREHASH_LEN])
{
	int rc = sodium_ready();

	if (rc)
		return rc;
	if (memcmp(sig->alg, "ED", 2) != 0)
		return store_seterr(STORE_E_BADSIG, "not a prehashed (ED) signature");
	return verify_common(pk, sig, prehash, SIGN_PREHASH_LEN);
}

int sign_verify_buf(const struct sign_pubkey *pk, const struct sign_sig *sig, const void *buf,
		    size_t len)
{
	uint8_t prehash[SIGN_PREHASH_LEN];
	int rc = sodium_ready();

	if (rc)
		return rc;
	if (memcmp(sig->alg, "ED", 2) == 0) {
		sign_prehash_buf(buf, len, prehash);
		return verify_common(pk, sig, prehash, sizeof(prehash));
	}
	return verify_common(pk, sig, buf, len);
}

int sign_verify_fd(const struct sign_pubkey *pk, const struct sign_sig *sig, int fd)
{
	uint8_t prehash[SIGN_PREHASH_LEN];
	struct stat st;
	int rc = sodium_ready();

	if (rc)
		return rc;
	if (memcmp(sig->alg, "ED", 2) == 0) {
		if ((rc = sign_prehash_fd(fd, prehash)) != 0)
			return rc;
		return verify_common(pk, sig, prehash, sizeof(prehash));
	}
	/* Legacy signatures cover the raw content: read it whole. */
	if (fstat(fd, &st) != 0)
		return -errno;
	if (st.st_size > (off_t)1 << 30)
		return store_seterr(-EFBIG, "legacy signatures are verified for files up to 1 GiB");
	uint8_t *buf = malloc((size_t)st.st_size + 1);
	size_t got = 0;
	if (!buf)
		return -ENOMEM;
	while (got < (size_t)st.st_size) {
		ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			free(buf);
			return n < 0 ? -errno : -EIO;
		}
		got += (size_t)n;
	}
	rc = verify_common(pk, sig, buf, got);
	free(buf);
	return rc;
}
