/*
 * test_sign.c - minisign-compatible signatures: a golden vector, interop
 * with the stock minisign in both directions, tampering, bad key files,
 * and key rotation in a store.
 */
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "fileutil.h"
#include "store.h"

static char dir[64];

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
}

static int load_sig(const char *path, struct sign_sig *sig)
{
	char *text;
	size_t len;
	int rc = file_read_small(path, 16384, &text, &len);

	if (rc)
		return rc;
	rc = sign_sig_parse(text, len, sig);
	free(text);
	return rc;
}

static int verify_file(const struct sign_pubkey *pk, const char *file, const char *sigpath)
{
	struct sign_sig sig;
	int fd, rc;

	if ((rc = load_sig(sigpath, &sig)) != 0)
		return rc;
	fd = open(file, O_RDONLY);
	if (fd < 0)
		return -errno;
	rc = sign_verify_fd(pk, &sig, fd);
	close(fd);
	return rc;
}

/* Our code reproduces the golden signature byte for byte, and minisign
 * accepts it. */
static void test_golden(void)
{
	struct sign_seckey sk;
	struct sign_pubkey pk, golden_pk;
	uint8_t seed[32], ph[64];
	const char *msg = "renderfs golden vector\n";
	char buf[9000], *want;
	size_t wlen;
	int n;

	for (int i = 0; i < 32; i++)
		seed[i] = (uint8_t)i;
	REQUIRE(sodium_init() >= 0, "sodium_init");
	crypto_sign_seed_keypair(pk.pk, sk.sk, seed);
	memcpy(sk.keynum, "rndrfs01", 8);
	memcpy(pk.keynum, sk.keynum, 8);
	sign_prehash_buf(msg, strlen(msg), ph);
	n = sign_make(&sk, ph, "renderfs golden signature",
		      "renderfs job=GOLDEN route=image/synth/default/t2i size=23", buf, sizeof(buf));
	REQUIRE(n > 0, "sign_make");
	REQUIRE(file_read_small(VECTOR_PATH("sign_golden.minisig"), 16384, &want, &wlen) == 0,
		"read golden");
	CHECK((size_t)n == wlen && memcmp(buf, want, wlen) == 0, "golden signature differs:\n%s",
	      buf);
	free(want);
	CHECK(sign_pubkey_load(VECTOR_PATH("sign_golden.pub"), &golden_pk) == 0, "golden pub");
	CHECK(memcmp(golden_pk.pk, pk.pk, 32) == 0 && memcmp(golden_pk.keynum, pk.keynum, 8) == 0,
	      "golden public key");
	n = sign_pubkey_format(&pk, buf, sizeof(buf));
	CHECK(n > 0 && strstr(buf, "minisign public key 3130736672646E72\n"), "pub format: %s",
	      buf);
	CHECK(verify_file(&pk, VECTOR_PATH("sign_golden.txt"), VECTOR_PATH("sign_golden.minisig")) ==
		      0,
	      "our verifier on the golden vector");
	if (have_tool("minisign"))
		CHECK(run_cmd("minisign -Vq -m %s -x %s -p %s", VECTOR_PATH("sign_golden.txt"),
			      VECTOR_PATH("sign_golden.minisig"),
			      VECTOR_PATH("sign_golden.pub")) == 0,
		      "minisign rejects the golden vector");
	sign_seckey_wipe(&sk);
}

/* Our keys and signatures, checked by minisign; tampering is caught. */
static void test_ours_to_minisign(void)
{
	struct sign_seckey sk;
	struct sign_pubkey pk;
	char keyid[17], pub[256], key[256], file[128], sig[128], text[9000];
	uint8_t ph[64];
	int fd, n;

	REQUIRE(sign_keygen(&sk, &pk) == 0, "keygen");
	REQUIRE(sign_keypair_save(dir, &sk, &pk) == 0, "save: %s", store_lasterr());
	sign_keyid(sk.keynum, keyid);
	snprintf(pub, sizeof(pub), "%s/%s.pub", dir, keyid);
	snprintf(key, sizeof(key), "%s/%s.key", dir, keyid);
	struct stat sb;
	CHECK(stat(key, &sb) == 0 && (sb.st_mode & 0777) == 0600, "secret key mode %o",
	      sb.st_mode & 0777);

	snprintf(file, sizeof(file), "%s/out.bin", dir);
	snprintf(sig, sizeof(sig), "%s/out.bin.minisig", dir);
	write_text(file, "some output bytes\n");
	fd = open(file, O_RDONLY);
	REQUIRE(sign_prehash_fd(fd, ph) == 0, "prehash");
	close(fd);
	n = sign_make(&sk, ph, "renderfs", "renderfs job=X route=a/b/c/d blake3=00 size=18", text,
		      sizeof(text));
	REQUIRE(n > 0, "sign_make");
	write_text(sig, text);
	CHECK(verify_file(&pk, file, sig) == 0, "our verifier: %s", store_lasterr());

	/* The loaded secret key signs identically. */
	struct sign_seckey sk2;
	CHECK(sign_seckey_load(key, &sk2) == 0 && memcmp(sk2.sk, sk.sk, 64) == 0,
	      "reload secret key: %s", store_lasterr());
	sign_seckey_wipe(&sk2);

	if (!have_tool("minisign")) {
		printf("SKIP minisign interop: minisign is not installed (apt-get install "
		       "minisign)\n");
		sign_seckey_wipe(&sk);
		return;
	}
	CHECK(run_cmd("minisign -Vq -m %s -p %s", file, pub) == 0, "minisign rejects ours");
	/* minisign signs with our secret key file, and we verify it. */
	CHECK(run_cmd("minisign -S -s %s -m %s -x %s.m -t 'signed by minisign' >/dev/null", key,
		      file, sig) == 0,
	      "minisign cannot use our secret key");
	char msig[160];
	snprintf(msig, sizeof(msig), "%s.m", sig);
	CHECK(verify_file(&pk, file, msig) == 0, "our verifier on minisign's signature");

	/* Tampering: the file, the signature, the trusted comment. */
	write_text(file, "some output bytes!\n");
	CHECK(run_cmd("minisign -Vq -m %s -p %s 2>/dev/null", file, pub) != 0,
	      "minisign accepts a modified file");
	CHECK(verify_file(&pk, file, sig) == STORE_E_BADSIG, "ours accepts a modified file");
	write_text(file, "some output bytes\n");

	char bad[9000];
	snprintf(bad, sizeof(bad), "%s", text);
	char *tc = strstr(bad, "size=18");
	tc[5] = '9'; /* trusted comment changed */
	write_text(sig, bad);
	CHECK(run_cmd("minisign -Vq -m %s -p %s 2>/dev/null", file, pub) != 0,
	      "minisign accepts a changed trusted comment");
	CHECK(verify_file(&pk, file, sig) == STORE_E_BADSIG, "ours accepts a changed comment");

	snprintf(bad, sizeof(bad), "%s", text);
	char *line2 = strchr(bad, '\n') + 1;
	line2[20] = line2[20] == 'A' ? 'B' : 'A'; /* signature bytes changed */
	write_text(sig, bad);
	CHECK(run_cmd("minisign -Vq -m %s -p %s 2>/dev/null", file, pub) != 0,
	      "minisign accepts a changed signature");
	CHECK(verify_file(&pk, file, sig) != 0, "ours accepts a changed signature");
	write_text(sig, text);
	CHECK(run_cmd("minisign -Vq -m %s -p %s", file, pub) == 0, "restored signature");
	sign_seckey_wipe(&sk);
}

/* minisign's keys and signatures, checked by us. */
static void test_minisign_to_ours(void)
{
	char pub[128], key[128], file[128], sig[128];
	struct sign_pubkey pk;
	struct sign_seckey sk;

	if (!have_tool("minisign"))
		return;
	snprintf(pub, sizeof(pub), "%s/m.pub", dir);
	snprintf(key, sizeof(key), "%s/m.key", dir);
	snprintf(file, sizeof(file), "%s/m.txt", dir);
	snprintf(sig, sizeof(sig), "%s/m.txt.minisig", dir);
	REQUIRE(run_cmd("minisign -G -W -p %s -s %s >/dev/null", pub, key) == 0, "minisign -G");
	write_text(file, "made elsewhere\n");
	REQUIRE(run_cmd("minisign -S -s %s -m %s -t 'trusted words' >/dev/null", key, file) == 0,
		"minisign -S");
	CHECK(sign_pubkey_load(pub, &pk) == 0, "load minisign pub: %s", store_lasterr());
	CHECK(verify_file(&pk, file, sig) == 0, "verify minisign signature: %s", store_lasterr());
	struct sign_sig s;
	CHECK(load_sig(sig, &s) == 0 && strcmp(s.trusted, "trusted words") == 0, "trusted comment");
	write_text(file, "made elsewhere, then changed\n");
	CHECK(verify_file(&pk, file, sig) == STORE_E_BADSIG, "modified file accepted");
	write_text(file, "made elsewhere\n");

	/* Legacy (non-prehashed) signatures. */
	REQUIRE(run_cmd("minisign -S -l -s %s -m %s -x %s.legacy >/dev/null", key, file, sig) == 0,
		"minisign -S -l");
	char legacy[160];
	snprintf(legacy, sizeof(legacy), "%s.legacy", sig);
	CHECK(verify_file(&pk, file, legacy) == 0, "legacy signature: %s", store_lasterr());

	/* minisign's unencrypted secret key works for us, and minisign
	 * verifies what we sign with it. */
	REQUIRE(chmod(key, 0600) == 0, "chmod");
	CHECK(sign_seckey_load(key, &sk) == 0, "load minisign key: %s", store_lasterr());
	uint8_t ph[64];
	char text[9000];
	sign_prehash_buf("made elsewhere\n", 15, ph);
	int n = sign_make(&sk, ph, "x", "signed by renderfs with a minisign key", text,
			  sizeof(text));
	CHECK(n > 0, "sign");
	write_text(sig, text);
	CHECK(run_cmd("minisign -Vq -m %s -p %s", file, pub) == 0, "minisign rejects ours");
	/* A key from another pair does not verify it. */
	struct sign_pubkey other;
	struct sign_seckey osk;
	sign_keygen(&osk, &other);
	CHECK(verify_file(&other, file, sig) == STORE_E_KEYID, "wrong key id accepted");
	sign_seckey_wipe(&osk);
	sign_seckey_wipe(&sk);
}

static void test_bad_keys(void)
{
	struct sign_seckey sk;
	struct sign_pubkey pk;
	char keyid[17], key[256], bad[256], *text;
	size_t len;
	int rc;

	REQUIRE(sign_keygen(&sk, &pk) == 0, "keygen");
	REQUIRE(sign_keypair_save(dir, &sk, &pk) == 0, "save");
	sign_keyid(sk.keynum, keyid);
	snprintf(key, sizeof(key), "%s/%s.key", dir, keyid);

	REQUIRE(chmod(key, 0644) == 0, "chmod");
	rc = sign_seckey_load(key, &sk);
	CHECK(rc == STORE_E_KEYPERM && strstr(store_lasterr(), key), "0644 key: %d %s", rc,
	      store_lasterr());
	chmod(key, 0600);

	REQUIRE(file_read_small(key, 4096, &text, &len) == 0, "read key");
	snprintf(bad, sizeof(bad), "%s/bad.key", dir);
	/* One changed base64 character inside the secret key bytes. */
	char *b64 = strchr(text, '\n') + 1;
	b64[100] = b64[100] == 'A' ? 'B' : 'A';
	REQUIRE(file_write_durable(bad, text, len, 0600, 0) == 0, "write");
	rc = sign_seckey_load(bad, &sk);
	CHECK(rc == STORE_E_FORMAT && strstr(store_lasterr(), bad), "flipped key: %d %s", rc,
	      store_lasterr());
	/* Truncated. */
	REQUIRE(file_write_durable(bad, text, len / 2, 0600, 0) == 0, "write");
	rc = sign_seckey_load(bad, &sk);
	CHECK(rc == STORE_E_FORMAT && strstr(store_lasterr(), bad), "truncated key: %s",
	      store_lasterr());
	/* Marked as scrypt-encrypted. */
	free(text);
	REQUIRE(file_read_small(key, 4096, &text, &len) == 0, "read key");
	uint8_t bin[158];
	size_t got;
	b64 = strchr(text, '\n') + 1;
	sodium_base642bin(bin, sizeof(bin), b64, strcspn(b64, "\n"), NULL, &got, NULL,
			  sodium_base64_VARIANT_ORIGINAL);
	memcpy(bin + 2, "Sc", 2);
	char enc[512];
	strcpy(enc, "untrusted comment: x\n");
	sodium_bin2base64(enc + strlen(enc), sizeof(enc) - strlen(enc), bin, sizeof(bin),
			  sodium_base64_VARIANT_ORIGINAL);
	strcat(enc, "\n");
	REQUIRE(file_write_durable(bad, enc, strlen(enc), 0600, 0) == 0, "write");
	rc = sign_seckey_load(bad, &sk);
	CHECK(rc == STORE_E_FORMAT && strstr(store_lasterr(), "password"), "encrypted key: %s",
	      store_lasterr());
	free(text);
	/* Not a file at all / missing. */
	CHECK(sign_seckey_load(dir, &sk) != 0, "directory as key");
	snprintf(bad, sizeof(bad), "%s/missing.key", dir);
	rc = sign_seckey_load(bad, &sk);
	CHECK(rc == -ENOENT && strstr(store_lasterr(), bad), "missing key: %s", store_lasterr());
	/* Public key garbage. */
	REQUIRE(file_write_durable(bad, "hello\nworld\n", 12, 0644, 0) == 0, "write");
	rc = sign_pubkey_load(bad, &pk);
	CHECK(rc == STORE_E_FORMAT && strstr(store_lasterr(), bad), "garbage pub: %s",
	      store_lasterr());
	/* Signature garbage. */
	struct sign_sig s;
	CHECK(sign_sig_parse("x\ny\nz\nw\n", 8, &s) == STORE_E_FORMAT, "garbage signature");
	CHECK(sign_sig_parse("", 0, &s) == STORE_E_FORMAT, "empty signature");
}

/* Rotation: new key, old public key kept, old signatures still verify. */
static void test_rotation(void)
{
	char sdir[128], pubpath[256], text[9000], keyid[17], file[128], sigf[160];
	struct store_options opt = {0};
	struct sign_pubkey a, b, old;
	struct store *st;
	int fd, n;

	snprintf(sdir, sizeof(sdir), "%s/store", dir);
	REQUIRE(store_open(sdir, &opt, &st) == 0, "store_open: %s", store_lasterr());
	store_pubkey(st, &a);
	snprintf(file, sizeof(file), "%s/payload", dir);
	write_text(file, "payload\n");
	fd = open(file, O_RDONLY);
	n = store_sign_fd(st, fd, "renderfs test=rotation", text, sizeof(text));
	close(fd);
	REQUIRE(n > 0, "sign");
	snprintf(sigf, sizeof(sigf), "%s.minisig", file);
	write_text(sigf, text);
	REQUIRE(store_key_rotate(st) == 0, "rotate: %s", store_lasterr());
	store_pubkey(st, &b);
	CHECK(memcmp(a.keynum, b.keynum, 8) != 0, "rotation kept the key id");
	store_close(st);

	/* Reopening uses the new key; the old public key is still there. */
	REQUIRE(store_open(sdir, &opt, &st) == 0, "reopen: %s", store_lasterr());
	store_pubkey(st, &old);
	CHECK(memcmp(old.keynum, b.keynum, 8) == 0, "reopen did not load the rotated key");
	store_close(st);
	sign_keyid(a.keynum, keyid);
	snprintf(pubpath, sizeof(pubpath), "%s/keys/%s.pub", sdir, keyid);
	CHECK(sign_pubkey_load(pubpath, &old) == 0, "old public key kept: %s", store_lasterr());
	CHECK(verify_file(&old, file, sigf) == 0, "old signature after rotation");
	if (have_tool("minisign"))
		CHECK(run_cmd("minisign -Vq -m %s -p %s", file, pubpath) == 0,
		      "minisign, old key after rotation");
}

int main(void)
{
	test_tmpdir(dir, "sign");
	test_golden();
	test_ours_to_minisign();
	test_minisign_to_ours();
	test_bad_keys();
	test_rotation();
	rm_rf(dir);
	return check_done("test_sign");
}
