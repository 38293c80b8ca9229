/*
 * sign.h - Ed25519 signatures in minisign's formats (libsodium).
 *
 * Signatures are minisign's prehashed kind ("ED"): Ed25519 over the
 * BLAKE2b-512 of the content, plus a global signature over
 * signature || trusted comment, so that `minisign -Vm FILE -p KEY.pub`
 * verifies them and changing the file, the signature or the trusted comment
 * makes verification fail. Legacy "Ed" signatures (over the raw content)
 * made by `minisign -l` are verified too.
 *
 * FILE FORMATS (all text, lines end in "\n", binary parts in base64):
 *
 * Public key (KEYID.pub): "untrusted comment: minisign public key <ID>\n"
 * then base64 of
 *   OFFSET SIZE DESCRIPTION
 *   0      2    signature algorithm "Ed"
 *   2      8    key number (key id; printed as uppercase hex of its
 *               little-endian value)
 *   10     32   Ed25519 public key
 *
 * Secret key (KEYID.key, mode 0600, unencrypted): an untrusted comment line
 * then base64 of
 *   0      2    "Ed"
 *   2      2    key derivation algorithm: 00 00 (none; "Sc" = scrypt-
 *               encrypted, which this code refuses)
 *   4      2    checksum algorithm "B2"
 *   6      32   KDF salt (zero)
 *   38     8    KDF opslimit (zero)
 *   46     8    KDF memlimit (zero)
 *   54     8    key number
 *   62     64   Ed25519 secret key (seed || public key)
 *   126    32   BLAKE2b-256("Ed" || key number || secret key); minisign
 *               0.11 writes zeros here for unencrypted keys, which is
 *               accepted
 *
 * Signature (FILE.minisig):
 *   "untrusted comment: <text>\n"
 *   base64 of: "ED" (2) || key number (8) || Ed25519 signature (64)
 *   "trusted comment: <text>\n"
 *   base64 of the global signature (64) over signature || trusted comment
 */
#ifndef RENDERFS_SIGN_H
#define RENDERFS_SIGN_H

#include <stddef.h>
#include <stdint.h>

#define SIGN_KEYNUM_LEN 8
#define SIGN_PK_LEN 32
#define SIGN_SK_LEN 64
#define SIGN_SIG_LEN 64
#define SIGN_PREHASH_LEN 64
#define SIGN_KEYID_LEN 16 /* hex digits, without NUL */
#define SIGN_TRUSTED_MAX 8000 /* bytes of trusted comment, without NUL */

struct sign_pubkey {
	uint8_t keynum[SIGN_KEYNUM_LEN];
	uint8_t pk[SIGN_PK_LEN];
};

/* Holds secret material: release with sign_seckey_wipe(). */
struct sign_seckey {
	uint8_t keynum[SIGN_KEYNUM_LEN];
	uint8_t sk[SIGN_SK_LEN];
};

/* A parsed signature file. */
struct sign_sig {
	uint8_t alg[2]; /* "ED" prehashed or "Ed" legacy */
	uint8_t keynum[SIGN_KEYNUM_LEN];
	uint8_t sig[SIGN_SIG_LEN];
	uint8_t global_sig[SIGN_SIG_LEN];
	char trusted[SIGN_TRUSTED_MAX + 1];
};

int sign_keygen(struct sign_seckey *sk, struct sign_pubkey *pk);
void sign_seckey_wipe(struct sign_seckey *sk);

/* 16 uppercase hex digits of the key number read as little-endian. */
void sign_keyid(const uint8_t keynum[SIGN_KEYNUM_LEN], char out[SIGN_KEYID_LEN + 1]);

/*
 * Text of a public key file, in buf (NUL-terminated). Returns the length,
 * or -ENOSPC if it does not fit (256 bytes always do).
 */
int sign_pubkey_format(const struct sign_pubkey *pk, char *buf, size_t bufsz);

/* Parse the text of a public key file, or a bare base64 key line. */
int sign_pubkey_parse(const char *text, size_t len, struct sign_pubkey *pk);

/* Load key files; errors name the file (store_lasterr()). A secret key
 * file must be a regular file, not accessible to group or others. */
int sign_pubkey_load(const char *path, struct sign_pubkey *pk);
int sign_seckey_load(const char *path, struct sign_seckey *sk);

/* Write dir/<KEYID>.key (0600, never overwritten) and dir/<KEYID>.pub,
 * both fsynced, then the directory. */
int sign_keypair_save(const char *dir, const struct sign_seckey *sk,
		      const struct sign_pubkey *pk);

/* BLAKE2b-512 of the whole content of fd, from offset 0. */
int sign_prehash_fd(int fd, uint8_t out[SIGN_PREHASH_LEN]);
void sign_prehash_buf(const void *buf, size_t len, uint8_t out[SIGN_PREHASH_LEN]);

/*
 * Make the text of a prehashed signature file for content whose BLAKE2b-512
 * is prehash. trusted must not contain CR or LF and be at most
 * SIGN_TRUSTED_MAX bytes (-EINVAL otherwise). Returns the text's length
 * (NUL-terminated in buf) or -ENOSPC if bufsz is too small (SIGN_TRUSTED_MAX
 * + 512 always suffices).
 */
int sign_make(const struct sign_seckey *sk, const uint8_t prehash[SIGN_PREHASH_LEN],
	      const char *untrusted, const char *trusted, char *buf, size_t bufsz);

/* Parse the text of a signature file. */
int sign_sig_parse(const char *text, size_t len, struct sign_sig *sig);

/*
 * Verify a parsed signature of the content in fd (read from offset 0) with
 * pk. Returns 0, STORE_E_KEYID when another key made it, STORE_E_BADSIG
 * when the content or the trusted comment do not match, or -errno.
 */
int sign_verify_fd(const struct sign_pubkey *pk, const struct sign_sig *sig, int fd)
	__attribute__((warn_unused_result));
int sign_verify_buf(const struct sign_pubkey *pk, const struct sign_sig *sig,
		    const void *buf, size_t len) __attribute__((warn_unused_result));
/* The same for content whose BLAKE2b-512 was computed as it streamed by
 * (ED signatures only; a legacy one is STORE_E_BADSIG). */
int sign_verify_prehash(const struct sign_pubkey *pk, const struct sign_sig *sig,
			const uint8_t prehash[SIGN_PREHASH_LEN]) __attribute__((warn_unused_result));

#endif
