/*
 * blob.c - writing blobs through sinks and reading them verified.
 *
 * DESIGN
 * A sink's bytes go to a file of its own in tmp/ once they need one: when
 * a first whole group is written out, or when the content is stored (a
 * content of one group is held in memory until then, so a thousand
 * downloads in flight hold no file, and content already stored never
 * touches the disk). Where the store's file system can (probed at open:
 * O_TMPFILE and linkat), the file has no name until it is linked into
 * blobs/ as the blob itself: nothing is left in tmp/ by a crash or a
 * failure (the file system reclaims an unnamed file at its next mount, a
 * journaling one, or at its fsck), and no name in tmp/ is made, synced
 * and renamed away. Writers that fill a file by path (store_sink_path)
 * get a named one.
 * Writes are staged one 1 MiB group at a time (in a stage that grows to
 * it) so that the hasher sees large aligned pieces (its SIMD paths hash 8
 * or 16 chunks at a time) and the file sees few write()s.
 * Committing follows the order of store.h's WRITE PATH. Readers verify the
 * whole content before returning a descriptor: blobs are immutable, so
 * the descriptor then reads exactly the verified bytes unless the file is
 * modified behind the store's back while open.
 * Large blobs are also read group by group (store_reader_*): each 1 MiB
 * group is checked against its chaining value, and the values against the
 * blob's hash, as Bao does with an outboard tree. The values live only in
 * a bounded cache (filled at commit, or by one full pass at the first
 * open): NEEDSWORK: kept beside the blob, they would spare that pass
 * after a restart too.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sodium.h>
#include <unistd.h>

#include "fileutil.h"
#include "store_i.h"

/*
 * A sink stages one group (B3_GROUP_LEN) at a time: when a full group is
 * followed by more bytes it is hashed as a group and written out, so the
 * blob's hash comes from its groups' chaining values, which are kept for
 * verified reads (the group cache below) at no extra hashing cost. The
 * stage grows with what it holds (from SINK_STAGE_MIN, doubling): a
 * thousand downloads of small images in flight hold a few KiB each, not
 * a group each.
 */
#define SINK_STAGE B3_GROUP_LEN
#define SINK_STAGE_MIN (16u << 10)

struct store_sink {
	struct store *st;
	int fd;		 /* -1 until the bytes need a file (sink_file) */
	bool named;	 /* the file is path (else unnamed, or none yet) */
	char path[4200]; /* the file's name, or what messages call it */
	uint64_t size;
	size_t staged, stage_cap;
	uint8_t *stage;
	uint8_t (*cvs)[B3_OUT_LEN]; /* chaining values of the groups written */
	size_t ngroups, cap;
	bool adopting;		    /* hashing a file written by path: no writes */
};

int store_sink_open(struct store *st, struct store_sink **out)
{
	struct store_sink *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->st = st;
	s->fd = -1;
	snprintf(s->path, sizeof(s->path), "%s/tmp", st->dir);
	*out = s;
	return 0;
}

/* Link the unnamed file fd as path, the way the store found that works
 * (mode: STORE_LINK_*). -errno. */
static int link_unnamed(int fd, const char *path, int mode)
{
	char proc[64];

	if (mode == STORE_LINK_EMPTY_PATH)
		return linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH) == 0 ? 0 : -errno;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	return linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW) == 0 ? 0 : -errno;
}

void store_link_probe(struct store *st)
{
	char tmp[4200], name[4200];
	int fd;

	st->link_mode = STORE_LINK_NONE;
	snprintf(tmp, sizeof(tmp), "%s/tmp", st->dir);
	snprintf(name, sizeof(name), "%s/tmp/link-probe", st->dir);
	if ((fd = open(tmp, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600)) < 0)
		return;
	for (int mode = STORE_LINK_EMPTY_PATH; mode <= STORE_LINK_PROC; mode++) {
		unlink(name);
		if (link_unnamed(fd, name, mode) == 0) {
			st->link_mode = mode;
			unlink(name);
			break;
		}
	}
	close(fd);
}

/* The sink's file, made now if it has none: unnamed where the store can
 * link one (and named is false), else named tmp/blob-XXXXXX. */
static int sink_file(struct store_sink *s, bool named)
{
	struct store *st = s->st;

	if (s->fd >= 0)
		return 0;
	if (!named && st->link_mode != STORE_LINK_NONE) {
		snprintf(s->path, sizeof(s->path), "%s/tmp", st->dir);
		if ((s->fd = open(s->path, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600)) < 0)
			return store_seterr(-errno, "cannot create a file in '%s': %s", s->path,
					    strerror(errno));
		return 0;
	}
	snprintf(s->path, sizeof(s->path), "%s/tmp/blob-XXXXXX", st->dir);
	if ((s->fd = mkostemp(s->path, O_CLOEXEC)) < 0) {
		int rc = store_seterr(-errno, "cannot create '%s': %s", s->path, strerror(errno));
		snprintf(s->path, sizeof(s->path), "%s/tmp", st->dir);
		return rc;
	}
	s->named = true;
	return 0;
}

/* The staged group is complete and more follows: hash it, write it. */
static int sink_group_out(struct store_sink *s)
{
	int rc;

	if (s->ngroups == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 16;
		uint8_t(*p)[B3_OUT_LEN] = realloc(s->cvs, cap * B3_OUT_LEN);
		if (!p)
			return -ENOMEM;
		s->cvs = p;
		s->cap = cap;
	}
	b3_group_cv(s->stage, s->staged, s->ngroups, s->cvs[s->ngroups]);
	s->ngroups++;
	if (!s->adopting) {
		if ((rc = sink_file(s, false)) != 0)
			return rc;
		if ((rc = write_all(s->fd, s->stage, s->staged)) != 0)
			return store_seterr(rc, "cannot write '%s': %s", s->path, strerror(-rc));
	}
	s->staged = 0;
	return 0;
}

static int sink_take(struct store_sink *s, const uint8_t *p, size_t len)
{
	int rc;

	while (len > 0) {
		if (s->staged == SINK_STAGE && (rc = sink_group_out(s)) != 0)
			return rc;
		size_t take = SINK_STAGE - s->staged;
		if (take > len)
			take = len;
		if (s->staged + take > s->stage_cap) {
			size_t cap = s->stage_cap ? s->stage_cap : SINK_STAGE_MIN;
			uint8_t *p2;
			while (cap < s->staged + take)
				cap *= 2;
			if (cap > SINK_STAGE)
				cap = SINK_STAGE;
			if (!(p2 = realloc(s->stage, cap)))
				return store_seterr(-ENOMEM, "out of memory");
			s->stage = p2;
			s->stage_cap = cap;
		}
		memcpy(s->stage + s->staged, p, take);
		s->staged += take;
		s->size += take;
		p += take;
		len -= take;
	}
	return 0;
}

int store_sink_write(struct store_sink *s, const void *buf, size_t len)
{
	return sink_take(s, buf, len);
}

/* Finish: the hash, and the last group written out. Content of one
 * group stays staged (sink_sync writes it, if it is to be stored). */
static int sink_finish(struct store_sink *s, uint8_t hash[B3_OUT_LEN])
{
	int rc;

	static const uint8_t none[1];

	if (s->ngroups == 0) {
		/* one group: hashed as usual (nothing staged: no stage yet) */
		b3_hash(s->staged ? s->stage : none, s->staged, hash);
		return 0;
	}
	if ((rc = sink_group_out(s)) != 0)
		return rc;
	b3_root_from_groups(s->cvs, s->ngroups, hash);
	return 0;
}

int store_sink_path(struct store_sink *s, const char **path)
{
	int rc;

	if (!s->named && (s->fd >= 0 || s->size))
		return store_seterr(-EINVAL, "the sink was written to already");
	if ((rc = sink_file(s, true)) == 0)
		*path = s->path;
	return rc;
}

int store_sink_adopt_file(struct store_sink *s)
{
	uint8_t buf[65536];
	int fd, rc = 0;

	if (!s->named)
		return store_seterr(-EINVAL, "the sink has no file by name (store_sink_path)");
	if (s->staged || s->size)
		return store_seterr(-EINVAL, "'%s' was written through the sink", s->path);
	s->adopting = true;
	/* The writer may have replaced the file: read what the path names now. */
	fd = open(s->path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return store_seterr(-errno, "cannot open '%s': %s", s->path, strerror(errno));
	close(s->fd);
	s->fd = fd;
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = store_seterr(-errno, "cannot read '%s': %s", s->path, strerror(errno));
			break;
		}
		if (n == 0)
			break;
		if ((rc = sink_take(s, buf, (size_t)n)) != 0)
			break;
	}
	return rc;
}

static void sink_free(struct store_sink *s)
{
	if (s->fd >= 0)
		close(s->fd);
	if (s->named)
		unlink(s->path);
	free(s->stage);
	free(s->cvs);
	free(s);
}

void store_sink_abort(struct store_sink *s)
{
	if (s)
		sink_free(s);
}

void store_blob_path(struct store *st, const uint8_t hash[B3_OUT_LEN], char *buf, size_t bufsz)
{
	char hex[B3_HEX_LEN + 1];

	b3_to_hex(hash, hex);
	snprintf(buf, bufsz, "%s/blobs/%.2s/%s", st->dir, hex, hex);
}

static pthread_mutex_t *blob_lock(struct store *st, const uint8_t hash[B3_OUT_LEN])
{
	return &st->blob_mu[hash[0] % BLOB_LOCKS];
}

static void blob_lock_all(struct store *st)
{
	for (size_t i = 0; i < BLOB_LOCKS; i++)
		pthread_mutex_lock(&st->blob_mu[i]);
}

static void blob_unlock_all(struct store *st)
{
	for (size_t i = BLOB_LOCKS; i-- > 0;)
		pthread_mutex_unlock(&st->blob_mu[i]);
}

/* The sink's bytes on disk (a staged content's file made now), read-only
 * from here on. */
static int sink_sync(struct store_sink *s)
{
	int rc;

	if (s->fd < 0) { /* (an adopted file is open) */
		if ((rc = sink_file(s, false)) != 0)
			return rc;
		if (s->staged && (rc = write_all(s->fd, s->stage, s->staged)) != 0)
			return store_seterr(rc, "cannot write '%s': %s", s->path, strerror(-rc));
	}
	if (fchmod(s->fd, 0444) != 0 || fsync(s->fd) != 0)
		return store_seterr(-errno, "cannot write '%s': %s", s->path, strerror(errno));
	return 0;
}

/* The synced file of s named path: renamed, or linked if it has no name.
 * A file already there (one no index entry names: left by a crash) is
 * replaced, as a rename replaces it: the unnamed file is given a name in
 * tmp/ first. -errno. */
static int name_file(struct store *st, struct store_sink *s, const char *path)
{
	int rc;

	if (s->named)
		return rename(s->path, path) == 0 ? 0 : -errno;
	if ((rc = link_unnamed(s->fd, path, st->link_mode)) != -EEXIST)
		return rc;
	for (int tries = 0; tries < 100; tries++) {
		uint32_t r;
		randombytes_buf(&r, sizeof(r));
		snprintf(s->path, sizeof(s->path), "%s/tmp/blob-%08x", st->dir, r);
		if ((rc = link_unnamed(s->fd, s->path, st->link_mode)) == 0) {
			s->named = true;
			return rename(s->path, path) == 0 ? 0 : -errno;
		}
		if (rc != -EEXIST)
			break;
	}
	snprintf(s->path, sizeof(s->path), "%s/tmp", st->dir);
	return rc;
}

/* The sink's file as path, making path's folder dir the first time one of
 * its blobs is placed (a mkdir at every commit would take blobs/'s lock at
 * every commit), the folder's own entry durable before the blob goes in. */
static int place(struct store *st, struct store_sink *s, const char *path, const char *dir)
{
	char parent[4200];
	int rc;

	if ((rc = name_file(st, s, path)) == 0)
		return 0;
	if (rc != -ENOENT || (s->named && access(s->path, F_OK) != 0))
		goto fail;
	/* Made here, or just now by another commit that may not have made
	 * its entry durable yet: this one's blob needs it either way. */
	if (mkdir(dir, 0755) != 0 && errno != EEXIST)
		return store_seterr(-errno, "cannot create '%s': %s", dir, strerror(errno));
	snprintf(parent, sizeof(parent), "%s/blobs", st->dir);
	if ((rc = dir_fsync(parent)) != 0)
		return rc;
	if ((rc = name_file(st, s, path)) == 0)
		return 0;
fail:
	return store_seterr(rc, "cannot %s '%s' as '%s': %s", s->named ? "rename" : "link",
			    s->path, path, strerror(-rc));
}

/* Make the sink's file (synced) the blob file at path (in dir), durably. */
static int sink_rename(struct store *st, struct store_sink *s, const char *path,
		       const char *dir)
{
	int rc = place(st, s, path, dir);

	if (rc)
		return rc;
	s->named = false; /* the blob's name now: not the sink's to remove */
	return dir_fsync(dir);
}

static int sink_place(struct store *st, struct store_sink *s, const char *path, const char *dir)
{
	int rc = sink_sync(s);

	return rc ? rc : sink_rename(st, s, path, dir);
}

int store_blob_write(struct store *st, const void *data, size_t len, uint8_t hash[B3_OUT_LEN])
{
	struct store_sink *s;
	char path[4200], dir[4200];
	int rc;

	if ((rc = store_sink_open(st, &s)) != 0)
		return rc;
	if ((rc = sink_take(s, data, len)) == 0 && (rc = sink_finish(s, hash)) == 0) {
		store_blob_path(st, hash, path, sizeof(path));
		snprintf(dir, sizeof(dir), "%.*s", (int)(strrchr(path, '/') - path), path);
		if (access(path, F_OK) != 0)
			rc = sink_place(st, s, path, dir);
	}
	sink_free(s);
	return rc;
}

static int commit(struct store *st, const uint8_t job[JOB_ID_LEN], struct store_sink *s,
		  const char *media_type, const char *device, unsigned extra,
		  bool queued, void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err),
		  uint8_t hash_out[B3_OUT_LEN]);

int store_job_commit_output(struct store *st, const uint8_t job[JOB_ID_LEN],
			    struct store_sink *s, const char *media_type, const char *device,
			    uint8_t hash_out[B3_OUT_LEN])
{
	return commit(st, job, s, media_type, device, 0, false, NULL, hash_out);
}

int store_job_commit_output_queued(struct store *st, const uint8_t job[JOB_ID_LEN],
				   struct store_sink *s, const char *media_type,
				   const char *device, uint8_t hash_out[B3_OUT_LEN],
				   void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err))
{
	return commit(st, job, s, media_type, device, 0, true, failed, hash_out);
}

int store_job_commit_extra(struct store *st, const uint8_t job[JOB_ID_LEN], unsigned n,
			   struct store_sink *s, const char *media_type, uint8_t hash_out[B3_OUT_LEN])
{
	return commit(st, job, s, media_type, NULL, n, false, NULL, hash_out);
}

/* The output (extra 0) or output `extra` of job: see WRITE PATH. The
 * output's reference is waited for, or queued (failed: called if it
 * cannot be written). */
static int commit(struct store *st, const uint8_t job[JOB_ID_LEN], struct store_sink *s,
		  const char *media_type, const char *device, unsigned extra,
		  bool queued, void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err),
		  uint8_t hash_out[B3_OUT_LEN])
{
	uint8_t hash[B3_OUT_LEN];
	char path[4200], dir[4200];
	struct blob_info bi;
	pthread_mutex_t *mu;
	bool dedup, known, synced = false;
	int rc;

	if ((rc = sink_finish(s, hash)) != 0)
		goto fail;
	store_blob_path(st, hash, path, sizeof(path));
	snprintf(dir, sizeof(dir), "%.*s", (int)(strrchr(path, '/') - path), path);

	/* A new blob's bytes are flushed before its lock is taken (the
	 * other commits' renames and index writes go on meanwhile); content
	 * already stored needs no flush, and content that was stored but
	 * went in between is flushed under the lock. */
	if (access(path, F_OK) != 0) {
		if ((rc = sink_sync(s)) != 0)
			goto fail;
		synced = true;
	}
	mu = blob_lock(st, hash);
	pthread_mutex_lock(mu);
	rc = index_blob_get(st->ix, hash, &bi);
	known = rc == 0;
	dedup = known && access(path, F_OK) == 0;
	if (rc != 0 && rc != STORE_E_NOTFOUND)
		goto unlock;
	if (!dedup && (rc = synced ? sink_rename(st, s, path, dir)
				   : sink_place(st, s, path, dir)) != 0)
		goto unlock;
	/* Queued under the lock: a write that a later holder of the lock
	 * makes (a delete that frees this blob, say) comes after it, and
	 * store_gc waits for it (index_writes_settle). */
	if (extra)
		rc = index_job_attach_extra(st->ix, job, extra, hash, s->size, media_type);
	else if (queued)
		rc = index_job_attach_output_async(st->ix, job, hash, s->size, media_type, device,
						   failed);
	else
		rc = index_job_attach_output(st->ix, job, hash, s->size, media_type, device,
					     false);
	/* A blob the cache had dropped (its record kept, the bucket has
	 * it) is here again. */
	if (rc == 0 && known && !dedup)
		rc = index_replica_fetched(st->ix, hash, s->size, media_type);
	if (rc == 0) {
		if (dedup)
			st->dedup_hits++;
		else
			st->blobs_written++;
		st->bytes_written += s->size;
		if (hash_out)
			memcpy(hash_out, hash, B3_OUT_LEN);
		if (s->ngroups > 1) {
			struct stat sb;
			if (stat(path, &sb) == 0)
				cv_cache_put(st, hash, &sb, s->size, s->cvs, s->ngroups);
		}
	}
	/* On failure a renamed file stays unreferenced: store_gc() or the
	 * next open collects it (never while its lock is held elsewhere). */
unlock:
	pthread_mutex_unlock(mu);
fail:
	sink_free(s);
	return rc;
}

int store_blob_fetched(struct store *st, struct store_sink *s, const uint8_t want[B3_OUT_LEN],
		       const char *media_type, int (*check)(void *arg, uint64_t size), void *arg)
{
	uint8_t hash[B3_OUT_LEN];
	char path[4200], dir[4200], hex[B3_HEX_LEN + 1];
	pthread_mutex_t *mu;
	bool synced = false;
	int rc;

	if ((rc = sink_finish(s, hash)) != 0)
		goto fail;
	if (memcmp(hash, want, B3_OUT_LEN) != 0) {
		b3_to_hex(hash, hex);
		rc = store_seterr(STORE_E_CORRUPT, "the content hashes to %s, not to its name", hex);
		st->integrity_failures++;
		goto fail;
	}
	if (check && (rc = check(arg, s->size)) != 0) {
		if (rc == STORE_E_CORRUPT)
			st->integrity_failures++;
		goto fail;
	}
	store_blob_path(st, hash, path, sizeof(path));
	snprintf(dir, sizeof(dir), "%.*s", (int)(strrchr(path, '/') - path), path);
	if (access(path, F_OK) != 0) { /* flushed before the lock, as a commit's */
		if ((rc = sink_sync(s)) != 0)
			goto fail;
		synced = true;
	}
	mu = blob_lock(st, hash);
	pthread_mutex_lock(mu);
	if (access(path, F_OK) == 0 ||
	    (rc = synced ? sink_rename(st, s, path, dir) : sink_place(st, s, path, dir)) == 0)
		rc = index_replica_fetched(st->ix, hash, s->size, media_type);
	if (rc == 0) {
		st->blobs_written++;
		st->bytes_written += s->size;
	}
	pthread_mutex_unlock(mu);
fail:
	sink_free(s);
	return rc;
}

int store_blob_drop(struct store *st, const uint8_t hash[B3_OUT_LEN], uint64_t *size)
{
	char path[4200];
	bool freed;
	int rc;

	pthread_mutex_lock(blob_lock(st, hash));
	if ((rc = index_replica_drop(st->ix, hash, size, &freed)) == 0) {
		store_blob_path(st, hash, path, sizeof(path));
		if (unlink(path) != 0 && errno != ENOENT)
			store_seterr(0, "cannot remove '%s': %s", path, strerror(errno));
	}
	pthread_mutex_unlock(blob_lock(st, hash));
	return rc;
}

void store_blob_trusted(const uint8_t hash[B3_OUT_LEN], uint64_t size, char *buf, size_t len)
{
	char hex[B3_HEX_LEN + 1];

	b3_to_hex(hash, hex);
	snprintf(buf, len, "renderfs blake3=%s size=%llu", hex, (unsigned long long)size);
}

/* A blob file that is missing, or not a regular file (a FIFO, a device, a
 * symlink put in its place), is damage to the store: STORE_E_CORRUPT (EIO). */
static int blob_open_err(const char *path, int rc)
{
	if (rc == -ENOENT || rc == -ELOOP || rc == -EINVAL)
		return store_seterr(STORE_E_CORRUPT, "blob file '%s' %s", path,
				    rc == -ENOENT ? "is missing" : "is not a regular file");
	return store_seterr(rc, "blob file '%s' cannot be opened: %s", path, strerror(-rc));
}

int store_blob_open(struct store *st, const uint8_t hash[B3_OUT_LEN], int *fd_out,
		    uint64_t *size_out)
{
	uint8_t got[B3_OUT_LEN];
	char path[4200];
	struct blob_info bi;
	struct stat sb;
	uint64_t size;
	int fd, rc;

	if ((rc = index_blob_get(st->ix, hash, &bi)) != 0)
		return rc;
	store_blob_path(st, hash, path, sizeof(path));
	if ((rc = file_open_regular(path, &fd, &sb)) != 0) {
		st->integrity_failures++;
		return blob_open_err(path, rc);
	}
	if ((uint64_t)sb.st_size != bi.size) {
		close(fd);
		st->integrity_failures++;
		return store_seterr(STORE_E_CORRUPT, "blob file '%s' has %lld bytes, not %llu",
				    path, (long long)sb.st_size, (unsigned long long)bi.size);
	}
	rc = b3_hash_fd(fd, st->opt.hash_threads, got, &size);
	if (rc) {
		close(fd);
		return store_seterr(rc, "cannot read blob file '%s': %s", path, strerror(-rc));
	}
	if (memcmp(got, hash, B3_OUT_LEN) != 0 || size != bi.size) {
		close(fd);
		st->integrity_failures++;
		return store_seterr(STORE_E_CORRUPT,
				    "blob file '%s' does not match its hash (damaged or modified)",
				    path);
	}
	*fd_out = fd;
	if (size_out)
		*size_out = size;
	return 0;
}

/* ---- verified reads by group ---- */

/*
 * The group cache: chaining values of the groups of recently used large
 * blobs, each set checked against the blob's hash when it entered the
 * cache (computed while committing, or by one full pass at the first
 * open). Readers check every group they serve against it, so no byte
 * leaves the store unverified, yet opening a blob again costs nothing.
 * Bounded: CV_CACHE entries, least recently used replaced. Keyed by hash,
 * inode and size, so a blob file replaced behind the store is a miss.
 * Protected by st->cv_mu: cv_cache[], cv_clock.
 */
static int64_t ctime_ns(const struct stat *sb)
{
	return (int64_t)sb->st_ctim.tv_sec * 1000000000 + sb->st_ctim.tv_nsec;
}

void cv_cache_put(struct store *st, const uint8_t hash[B3_OUT_LEN], const struct stat *sb,
		  uint64_t size, const uint8_t (*cvs)[B3_OUT_LEN], size_t n)
{
	uint8_t(*copy)[B3_OUT_LEN] = malloc(n * B3_OUT_LEN);
	struct cv_entry *victim;

	if (!copy)
		return; /* only a cache */
	memcpy(copy, cvs, n * B3_OUT_LEN);
	pthread_mutex_lock(&st->cv_mu);
	victim = &st->cv_cache[0];
	for (int i = 0; i < CV_CACHE; i++) {
		struct cv_entry *e = &st->cv_cache[i];
		if (e->cvs && memcmp(e->hash, hash, B3_OUT_LEN) == 0) {
			victim = e;
			break;
		}
		if (!e->cvs || (victim->cvs && e->used < victim->used))
			victim = e;
	}
	free(victim->cvs);
	memcpy(victim->hash, hash, B3_OUT_LEN);
	victim->ino = (uint64_t)sb->st_ino;
	victim->ctime_ns = ctime_ns(sb);
	victim->size = size;
	victim->cvs = copy;
	victim->n = n;
	victim->used = ++st->cv_clock;
	pthread_mutex_unlock(&st->cv_mu);
}

/* A copy of the cached values, or NULL. */
static uint8_t (*cv_cache_get(struct store *st, const uint8_t hash[B3_OUT_LEN],
			      const struct stat *sb, uint64_t size, size_t n))[B3_OUT_LEN]
{
	uint8_t(*copy)[B3_OUT_LEN] = NULL;

	pthread_mutex_lock(&st->cv_mu);
	for (int i = 0; i < CV_CACHE; i++) {
		struct cv_entry *e = &st->cv_cache[i];
		if (e->cvs && memcmp(e->hash, hash, B3_OUT_LEN) == 0 && e->ino == (uint64_t)sb->st_ino &&
		    e->ctime_ns == ctime_ns(sb) && e->size == size && e->n == n) {
			if ((copy = malloc(n * B3_OUT_LEN)) != NULL)
				memcpy(copy, e->cvs, n * B3_OUT_LEN);
			e->used = ++st->cv_clock;
			break;
		}
	}
	pthread_mutex_unlock(&st->cv_mu);
	return copy;
}

void cv_cache_release(struct store *st)
{
	for (int i = 0; i < CV_CACHE; i++) {
		free(st->cv_cache[i].cvs);
		st->cv_cache[i].cvs = NULL;
	}
}

struct store_reader {
	struct store *st;
	pthread_mutex_t mu; /* guards cur, buf */
	int fd;
	uint64_t size;
	size_t n;			 /* groups */
	uint8_t hash[B3_OUT_LEN];
	uint8_t (*cvs)[B3_OUT_LEN];	 /* n > 1: the groups' values */
	char path[4200];
	int64_t cur;			 /* group in buf, -1: none */
	uint8_t *buf;
};

static int read_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
	while (len > 0) {
		ssize_t r = pread(fd, buf, len, (off_t)off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -EIO; /* shorter than the index says */
		buf += r;
		len -= (size_t)r;
		off += (uint64_t)r;
	}
	return 0;
}

static int corrupt(struct store_reader *r, const char *what)
{
	r->st->integrity_failures++;
	return store_seterr(STORE_E_CORRUPT,
			    "blob file '%s' does not match its hash (%s): damaged or modified",
			    r->path, what);
}

/* One pass over the whole file: the groups' values, checked against the
 * hash, into r->cvs (and the cache). */
static int reader_full_pass(struct store_reader *r, const struct stat *sb)
{
	uint8_t root[B3_OUT_LEN];
	int rc;

	if (!(r->cvs = malloc(r->n * B3_OUT_LEN)))
		return -ENOMEM;
	for (size_t g = 0; g < r->n; g++) {
		size_t len = g + 1 < r->n ? B3_GROUP_LEN : (size_t)(r->size - g * B3_GROUP_LEN);
		if ((rc = read_full(r->fd, r->buf, len, g * B3_GROUP_LEN)) != 0)
			return store_seterr(rc, "cannot read blob file '%s': %s", r->path,
					    strerror(-rc));
		b3_group_cv_mt(r->buf, len, g, r->st->opt.hash_threads, r->cvs[g]);
	}
	b3_root_from_groups(r->cvs, r->n, root);
	if (memcmp(root, r->hash, B3_OUT_LEN) != 0)
		return corrupt(r, "full check");
	cv_cache_put(r->st, r->hash, sb, r->size, r->cvs, r->n);
	return 0;
}

int store_reader_open(struct store *st, const uint8_t hash[B3_OUT_LEN], struct store_reader **out,
		      uint64_t *size_out)
{
	struct store_reader *r;
	struct blob_info bi;
	struct stat sb;
	int rc;

	if ((rc = index_blob_get(st->ix, hash, &bi)) != 0)
		return rc;
	if (!(r = calloc(1, sizeof(*r))) || !(r->buf = malloc(B3_GROUP_LEN))) {
		free(r);
		return -ENOMEM;
	}
	pthread_mutex_init(&r->mu, NULL);
	r->st = st;
	r->cur = -1;
	r->size = bi.size;
	r->n = bi.size ? (size_t)((bi.size + B3_GROUP_LEN - 1) / B3_GROUP_LEN) : 1;
	memcpy(r->hash, hash, B3_OUT_LEN);
	store_blob_path(st, hash, r->path, sizeof(r->path));
	r->fd = -1;
	if ((rc = file_open_regular(r->path, &r->fd, &sb)) != 0) {
		st->integrity_failures++;
		rc = blob_open_err(r->path, rc);
		goto fail;
	}
	if ((uint64_t)sb.st_size != bi.size) {
		rc = corrupt(r, "wrong size");
		goto fail;
	}
	posix_fadvise(r->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	if (r->n > 1 && !(r->cvs = cv_cache_get(st, hash, &sb, r->size, r->n)) &&
	    (rc = reader_full_pass(r, &sb)) != 0)
		goto fail;
	*out = r;
	if (size_out)
		*size_out = r->size;
	return 0;
fail:
	store_reader_close(r);
	return rc;
}

int store_reader_fd(const struct store_reader *r)
{
	return r->fd;
}

/* With r->mu held: group g into r->buf, verified. */
static int reader_load(struct store_reader *r, uint64_t g)
{
	size_t len = g + 1 < r->n ? B3_GROUP_LEN : (size_t)(r->size - g * B3_GROUP_LEN);
	uint8_t cv[B3_OUT_LEN];
	int rc;

	if ((rc = read_full(r->fd, r->buf, len, g * B3_GROUP_LEN)) != 0)
		return store_seterr(rc, "cannot read blob file '%s': %s", r->path, strerror(-rc));
	/* The next group comes from the disk while this one is hashed. */
	if (g + 1 < r->n)
		posix_fadvise(r->fd, (off_t)((g + 1) * B3_GROUP_LEN), B3_GROUP_LEN,
			      POSIX_FADV_WILLNEED);
	if (r->n == 1) {
		b3_hash(r->buf, len, cv);
		if (memcmp(cv, r->hash, B3_OUT_LEN) != 0)
			return corrupt(r, "whole content");
	} else {
		b3_group_cv_mt(r->buf, len, g, r->st->opt.hash_threads, cv);
		if (memcmp(cv, r->cvs[g], B3_OUT_LEN) != 0)
			return corrupt(r, "a group");
	}
	r->cur = (int64_t)g;
	return 0;
}

ssize_t store_reader_pread(struct store_reader *r, void *buf, size_t len, uint64_t off)
{
	uint8_t *out = buf;
	size_t done = 0;
	int rc = 0;

	pthread_mutex_lock(&r->mu);
	while (done < len && off < r->size) {
		uint64_t g = off / B3_GROUP_LEN, goff = off % B3_GROUP_LEN;
		size_t glen = g + 1 < r->n ? B3_GROUP_LEN : (size_t)(r->size - g * B3_GROUP_LEN);
		size_t take = glen - goff < len - done ? glen - goff : len - done;

		if ((int64_t)g != r->cur && (rc = reader_load(r, g)) != 0) {
			r->cur = -1;
			break;
		}
		memcpy(out + done, r->buf + goff, take);
		done += take;
		off += take;
	}
	pthread_mutex_unlock(&r->mu);
	return rc ? rc : (ssize_t)done;
}

void store_reader_close(struct store_reader *r)
{
	if (!r)
		return;
	if (r->fd >= 0)
		close(r->fd);
	pthread_mutex_destroy(&r->mu);
	free(r->cvs);
	free(r->buf);
	free(r);
}

/* With its lock held: unlink the file of a blob the index just let go. */
static void blob_unlink_freed(struct store *st, const uint8_t hash[B3_OUT_LEN])
{
	char path[4200];

	store_blob_path(st, hash, path, sizeof(path));
	/* The index no longer refers to it; failing to unlink only leaves
	 * garbage for store_gc(). */
	if (unlink(path) != 0 && errno != ENOENT)
		store_seterr(0, "cannot remove '%s': %s", path, strerror(errno));
}

int store_job_hide(struct store *st, const uint8_t job[JOB_ID_LEN], uint16_t mask,
		   bool release_output)
{
	uint8_t hash[B3_OUT_LEN];
	bool freed;
	int rc;

	blob_lock_all(st); /* the blob it frees, if any, is known only then */
	rc = index_job_hide(st->ix, job, mask, release_output, &freed, hash);
	if (rc == 0 && freed)
		blob_unlink_freed(st, hash);
	blob_unlock_all(st);
	return rc;
}

int store_job_delete(struct store *st, const uint8_t job[JOB_ID_LEN])
{
	struct index_freed freed;
	int rc;

	blob_lock_all(st);
	rc = index_job_delete(st->ix, job, &freed);
	for (size_t i = 0; rc == 0 && i < freed.n; i++)
		blob_unlink_freed(st, freed.hash[i]);
	blob_unlock_all(st);
	return rc;
}

/* opendir() that never follows a symlink (the store's folders were
 * checked at open; this keeps it so for a folder swapped since). */
static DIR *dir_open_nofollow(int at, const char *path)
{
	int fd = openat(at, path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *d;

	if (fd < 0)
		return NULL;
	if (!(d = fdopendir(fd)))
		close(fd);
	return d;
}

int store_clear_tmp(struct store *st, uint64_t *removed)
{
	char path[4200];
	struct dirent *de;
	DIR *d;

	snprintf(path, sizeof(path), "%s/tmp", st->dir);
	d = dir_open_nofollow(AT_FDCWD, path);
	if (!d)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		/* unlinkat removes a symlink itself, never what it names; a
		 * directory is a local program's scratch (backend_exec.c). */
		if (unlinkat(dirfd(d), de->d_name, 0) == 0) {
			(*removed)++;
		} else if (errno == EISDIR) {
			dir_remove_tree(dirfd(d), de->d_name);
			(*removed)++;
		}
	}
	closedir(d);
	return 0;
}

/*
 * Move a stray file into lost+found/ (never delete it: an index that lost
 * an entry may still have a job naming it; `renderctl fsck --adopt` puts
 * back what jobs name). A name already there gets a suffix.
 */
static int to_lost_found(struct store *st, int from, const char *name)
{
	char path[4200], dst[300];
	int lf, rc = 0;

	snprintf(path, sizeof(path), "%s/" STORE_LOST_FOUND, st->dir);
	if (mkdir(path, 0700) != 0 && errno != EEXIST)
		return store_seterr(-errno, "cannot create '%s': %s", path, strerror(errno));
	lf = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (lf < 0)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	for (int i = 0;; i++) {
		if (i == 0)
			snprintf(dst, sizeof(dst), "%s", name);
		else
			snprintf(dst, sizeof(dst), "%s.%d", name, i);
		if (renameat2(from, name, lf, dst, RENAME_NOREPLACE) == 0)
			break;
		if (errno != EEXIST || i == 1000) {
			rc = store_seterr(-errno, "cannot move '%s' into '%s': %s", name, path,
					  strerror(errno));
			break;
		}
	}
	if (rc == 0 && fsync(lf) != 0)
		rc = store_seterr(-errno, "cannot fsync '%s': %s", path, strerror(errno));
	close(lf);
	return rc;
}

static int gc_dir(struct store *st, int blobs, const char *sub, uint64_t *collected)
{
	struct dirent *de;
	DIR *d;
	int rc = 0;

	d = dir_open_nofollow(blobs, sub);
	if (!d)
		return store_seterr(-errno, "cannot open '%s/blobs/%s': %s", st->dir, sub,
				    strerror(errno));
	while (rc == 0 && (de = readdir(d)) != NULL) {
		uint8_t hash[B3_OUT_LEN];
		struct blob_info bi;

		if (de->d_name[0] == '.')
			continue;
		/* Not a blob name, or not in its right folder: never ours to
		 * keep; in the right place: keep it if the index knows it. */
		if (b3_from_hex(de->d_name, hash) == 0 && strncmp(de->d_name, sub, 2) == 0) {
			rc = index_blob_get(st->ix, hash, &bi);
			if (rc == 0)
				continue;
			if (rc != STORE_E_NOTFOUND)
				break;
		}
		if ((rc = to_lost_found(st, dirfd(d), de->d_name)) == 0)
			(*collected)++;
	}
	if (rc == 0 && *collected && fsync(dirfd(d)) != 0)
		rc = store_seterr(-errno, "cannot fsync '%s/blobs/%s': %s", st->dir, sub,
				  strerror(errno));
	closedir(d);
	return rc;
}

int store_gc(struct store *st, uint64_t *collected)
{
	char path[4200];
	struct dirent *de;
	DIR *d;
	int rc = 0;

	*collected = 0;
	snprintf(path, sizeof(path), "%s/blobs", st->dir);
	d = dir_open_nofollow(AT_FDCWD, path);
	if (!d)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	blob_lock_all(st);
	/* A blob placed before the lock was taken may have its reference
	 * queued, not yet written (store_job_commit_output_queued). */
	if ((rc = index_writes_settle(st->ix)) != 0) {
		blob_unlock_all(st);
		closedir(d);
		return rc;
	}
	while ((de = readdir(d)) != NULL && rc == 0) {
		if (de->d_name[0] == '.' || de->d_type != DT_DIR || strlen(de->d_name) != 2)
			continue;
		rc = gc_dir(st, dirfd(d), de->d_name, collected);
	}
	blob_unlock_all(st);
	closedir(d);
	return rc;
}
