/*
 * store.c - opening the store: layout, crash recovery, signing keys.
 *
 * DESIGN
 * store_open() brings a store from any state a crash can leave into a
 * consistent one before anything else touches it: tmp/ is emptied
 * (partial outputs), running jobs go back to the queue or to error
 * (index_recover), and blob files that no index entry refers to (renamed
 * in but never committed, or released but not yet unlinked) are collected.
 *
 * The signing key is the one the index names ("signing_key"), loaded from
 * keys/<KEYID>.key; a store without one gets a fresh key pair. Rotation
 * writes a new pair, then switches the index to it; public keys are never
 * removed, so every signature ever made still verifies.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileutil.h"
#include "store_i.h"

static int load_or_create_key(struct store *st)
{
	uint8_t keynum[SIGN_KEYNUM_LEN];
	char path[4200], keyid[SIGN_KEYID_LEN + 1];
	int rc;

	if (st->opt.keyfile) {
		if ((rc = sign_seckey_load(st->opt.keyfile, &st->sk)) != 0)
			return rc;
	} else {
		rc = index_signing_key_get(st->ix, keynum);
		if (rc == STORE_E_NOTFOUND) {
			if (st->opt.read_only)
				return store_seterr(STORE_E_NOTFOUND, "store '%s' has no signing key",
						    st->dir);
			return store_key_rotate(st);
		}
		if (rc)
			return rc;
		sign_keyid(keynum, keyid);
		snprintf(path, sizeof(path), "%s/keys/%s.key", st->dir, keyid);
		if ((rc = sign_seckey_load(path, &st->sk)) != 0)
			return rc;
		if (memcmp(st->sk.keynum, keynum, SIGN_KEYNUM_LEN) != 0)
			return store_seterr(STORE_E_FORMAT, "'%s' holds another key than %s", path,
					    keyid);
	}
	memcpy(st->pk.keynum, st->sk.keynum, SIGN_KEYNUM_LEN);
	memcpy(st->pk.pk, st->sk.sk + 32, SIGN_PK_LEN);
	return 0;
}

int store_key_rotate(struct store *st)
{
	struct sign_seckey sk;
	struct sign_pubkey pk;
	char dir[4200];
	int rc;

	snprintf(dir, sizeof(dir), "%s/keys", st->dir);
	if ((rc = sign_keygen(&sk, &pk)) != 0)
		return rc;
	if ((rc = sign_keypair_save(dir, &sk, &pk)) != 0 ||
	    (rc = index_signing_key_set(st->ix, sk.keynum)) != 0) {
		sign_seckey_wipe(&sk);
		return rc;
	}
	pthread_rwlock_wrlock(&st->key_mu);
	st->sk = sk;
	st->pk = pk;
	pthread_rwlock_unlock(&st->key_mu);
	sign_seckey_wipe(&sk);
	return 0;
}

/*
 * What a daemon that may run as root trusts in a store (as ssh's
 * StrictModes does for ~/.ssh): the store directory and every folder above
 * it must be owned by root or by the daemon's user and writable by nobody
 * else (a folder above may be writable by others if it is sticky, as /tmp
 * is); the store's own folders and files must be real ones (no symlinks),
 * owned by the daemon's user, and writable by nobody else. Then nobody
 * else can put a symlink, a FIFO or another file where the store looks,
 * so the paths the store opens lead where they say.
 */
static int strict_err(const char *path, const char *why)
{
	return store_seterr(-EPERM,
			    "refusing store: '%s' %s (a store and the folders above it must "
			    "be owned by root or the daemon's user and writable by no one else)",
			    path, why);
}

static int check_node(const char *path, uid_t uid, bool want_dir, bool above)
{
	char why[128];
	struct stat sb;

	if (lstat(path, &sb) != 0) {
		if (errno == ENOENT && !want_dir)
			return 0; /* a file not made yet */
		return store_seterr(-errno, "cannot stat '%s': %s", path, strerror(errno));
	}
	if (S_ISLNK(sb.st_mode))
		return strict_err(path, "is a symbolic link");
	if (want_dir ? !S_ISDIR(sb.st_mode) : !S_ISREG(sb.st_mode))
		return strict_err(path, want_dir ? "is not a directory" : "is not a regular file");
	if (sb.st_uid != uid && !(above && sb.st_uid == 0)) {
		snprintf(why, sizeof(why), "is owned by uid %u, not by uid %u that runs renderfs",
			 (unsigned)sb.st_uid, (unsigned)uid);
		return strict_err(path, why);
	}
	if ((sb.st_mode & 022) && !(above && (sb.st_mode & S_ISVTX))) {
		snprintf(why, sizeof(why), "is writable by %s (mode %04o)",
			 sb.st_mode & 002 ? "others" : "its group", (unsigned)(sb.st_mode & 07777));
		return strict_err(path, why);
	}
	return 0;
}

/* Every entry of <real>/<sub>: a directory (want_dir) or a regular file. */
static int check_entries(const char *real, const char *sub, uid_t uid, bool want_dir)
{
	char path[PATH_MAX + 512];
	struct dirent *de;
	DIR *d;
	int rc = 0, fd;

	snprintf(path, sizeof(path), "%s/%s", real, sub);
	fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 || !(d = fdopendir(fd))) {
		rc = store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return rc;
	}
	while (rc == 0 && (de = readdir(d)) != NULL)
		if (de->d_name[0] != '.') {
			snprintf(path, sizeof(path), "%s/%s/%s", real, sub, de->d_name);
			rc = check_node(path, uid, want_dir, false);
		}
	closedir(d);
	return rc;
}

static int check_layout(const char *dir)
{
	static const char *dirs[] = {"index", "blobs", "tmp", "keys"};
	static const char *files[] = {"lock", "index/data.mdb", "index/lock.mdb"};
	char real[PATH_MAX], path[PATH_MAX + 512];
	uid_t uid = geteuid();
	int rc;

	if (!realpath(dir, real))
		return store_seterr(-errno, "cannot resolve '%s': %s", dir, strerror(errno));
	/* The folders above, from / down, then the store itself. */
	for (char *slash = real + 1;; slash++) {
		char c;
		slash = strchr(slash, '/');
		if (!slash)
			break;
		c = *slash;
		*slash = '\0';
		rc = check_node(real, uid, true, true);
		*slash = c;
		if (rc)
			return rc;
	}
	if ((rc = check_node("/", uid, true, true)) != 0 ||
	    (rc = check_node(real, uid, true, false)) != 0)
		return rc;
	for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", real, dirs[i]);
		if ((rc = check_node(path, uid, true, false)) != 0)
			return rc;
	}
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", real, files[i]);
		if ((rc = check_node(path, uid, false, false)) != 0)
			return rc;
	}
	/* Keys, and the blob folders (their files are opened O_NOFOLLOW and
	 * checked to be regular files when read). */
	if ((rc = check_entries(real, "keys", uid, false)) != 0)
		return rc;
	return check_entries(real, "blobs", uid, true);
}

static int make_layout(const char *dir)
{
	static const char *subs[] = {"index", "blobs", "tmp", "keys"};
	char path[4200];
	int rc;

	if ((rc = dir_ensure(dir, 0755)) != 0)
		return rc;
	for (size_t i = 0; i < sizeof(subs) / sizeof(subs[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, subs[i]);
		if ((rc = dir_ensure(path, strcmp(subs[i], "blobs") ? 0700 : 0755)) != 0)
			return rc;
	}
	return 0;
}

int store_open(const char *dir, const struct store_options *opt, struct store **out)
{
	struct index_options iopt = {0};
	struct index_recovery ir;
	char path[4200];
	struct store *st;
	int rc;

	if (strlen(dir) >= sizeof(st->dir) - 128)
		return store_seterr(-ENAMETOOLONG, "store path too long: '%s'", dir);
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	snprintf(st->dir, sizeof(st->dir), "%s", dir);
	if (opt)
		st->opt = *opt;
	if (st->opt.max_attempts == 0)
		st->opt.max_attempts = 3;
	if (st->opt.hash_threads == 0)
		st->opt.hash_threads = 2;
	st->lock_fd = -1;
	for (size_t i = 0; i < BLOB_LOCKS; i++)
		pthread_mutex_init(&st->blob_mu[i], NULL);
	pthread_mutex_init(&st->cv_mu, NULL);
	pthread_rwlock_init(&st->key_mu, NULL);

	if (!st->opt.read_only) {
		if ((rc = make_layout(dir)) != 0 || (rc = check_layout(dir)) != 0)
			goto fail;
		/* Recovery assumes nobody else is running jobs from this store. */
		snprintf(path, sizeof(path), "%s/lock", dir);
		st->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (st->lock_fd < 0) {
			rc = store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
			goto fail;
		}
		if (flock(st->lock_fd, LOCK_EX | LOCK_NB) != 0) {
			rc = store_seterr(errno == EWOULDBLOCK ? -EBUSY : -errno,
					  "store '%s' is in use by another process", dir);
			goto fail;
		}
	}
	iopt.map_size = st->opt.map_size;
	iopt.read_only = st->opt.read_only;
	snprintf(path, sizeof(path), "%s/index", dir);
	if ((rc = index_open(path, &iopt, &st->ix)) != 0)
		goto fail;
	if (!st->opt.read_only) {
		if ((rc = store_clear_tmp(st, &st->recovery.tmp_removed)) != 0)
			goto fail;
		store_link_probe(st);
		if ((rc = index_recover(st->ix, st->opt.max_attempts, &ir)) != 0)
			goto fail;
		st->recovery.requeued = ir.requeued;
		st->recovery.interrupted = ir.interrupted;
		st->recovery.completed = ir.completed;
		if ((rc = store_gc(st, &st->recovery.blobs_collected)) != 0)
			goto fail;
	}
	if ((rc = load_or_create_key(st)) != 0 || (rc = store_seal_key_load(st)) != 0)
		goto fail;
	*out = st;
	return 0;
fail:
	store_close(st);
	return rc;
}

void store_close(struct store *st)
{
	if (!st)
		return;
	index_close(st->ix);
	if (st->lock_fd >= 0)
		close(st->lock_fd);
	sign_seckey_wipe(&st->sk);
	explicit_bzero(st->seal_key, sizeof(st->seal_key));
	explicit_bzero(st->hook_sk, sizeof(st->hook_sk));
	for (size_t i = 0; i < BLOB_LOCKS; i++)
		pthread_mutex_destroy(&st->blob_mu[i]);
	cv_cache_release(st);
	pthread_mutex_destroy(&st->cv_mu);
	pthread_rwlock_destroy(&st->key_mu);
	free(st);
}

struct index *store_index(struct store *st)
{
	return st->ix;
}

const char *store_dir(struct store *st)
{
	return st->dir;
}

void store_get_recovery(struct store *st, struct store_recovery *r)
{
	*r = st->recovery;
}

void store_pubkey(struct store *st, struct sign_pubkey *pk)
{
	pthread_rwlock_rdlock(&st->key_mu);
	*pk = st->pk;
	pthread_rwlock_unlock(&st->key_mu);
}

/* Sign content whose BLAKE2b-512 is prehash with the current key. */
static int sign_prehashed(struct store *st, const uint8_t prehash[SIGN_PREHASH_LEN],
			  const char *trusted, char *buf, size_t bufsz)
{
	char untrusted[64], keyid[SIGN_KEYID_LEN + 1];
	int rc;

	pthread_rwlock_rdlock(&st->key_mu);
	sign_keyid(st->sk.keynum, keyid);
	snprintf(untrusted, sizeof(untrusted), "signature from renderfs key %s", keyid);
	rc = sign_make(&st->sk, prehash, untrusted, trusted, buf, bufsz);
	pthread_rwlock_unlock(&st->key_mu);
	return rc;
}

int store_sign_fd(struct store *st, int fd, const char *trusted, char *buf, size_t bufsz)
{
	uint8_t prehash[SIGN_PREHASH_LEN];
	int rc = sign_prehash_fd(fd, prehash);

	if (rc)
		return store_seterr(rc, "cannot read the content to sign: %s", strerror(-rc));
	return sign_prehashed(st, prehash, trusted, buf, bufsz);
}

int store_sign_buf(struct store *st, const void *data, size_t len, const char *trusted,
		   char *buf, size_t bufsz)
{
	uint8_t prehash[SIGN_PREHASH_LEN];

	sign_prehash_buf(data, len, prehash);
	return sign_prehashed(st, prehash, trusted, buf, bufsz);
}

void store_get_stats(struct store *st, struct store_stats *s)
{
	s->blobs_written = st->blobs_written;
	s->dedup_hits = st->dedup_hits;
	s->integrity_failures = st->integrity_failures;
	s->bytes_written = st->bytes_written;
}
