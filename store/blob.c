/*
 * blob.c - writing blobs through sinks and reading them verified.
 *
 * DESIGN
 * A sink owns one file in tmp/ and a BLAKE3 hasher. Writes are staged in a
 * 256 KiB buffer so that the hasher sees large aligned pieces (its SIMD
 * paths hash 8 or 16 chunks at a time) and the file sees few write()s.
 * Committing follows the order of store.h's WRITE PATH. Readers verify the
 * whole content before returning a descriptor: blobs are immutable, so
 * the descriptor then reads exactly the verified bytes unless the file is
 * modified behind the store's back while open.
 * NEEDSWORK: verified range reads without a full pass (a BLAKE3 outboard
 * tree per blob, as in Bao) would let large cold reads start at once.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileutil.h"
#include "store_i.h"

#define SINK_STAGE (256 * 1024)

struct store_sink {
	struct store *st;
	int fd;
	char path[4200];
	struct b3_hasher hasher;
	uint64_t size;
	size_t staged;
	uint8_t *stage;
};

int store_sink_open(struct store *st, struct store_sink **out)
{
	struct store_sink *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->stage = malloc(SINK_STAGE);
	if (!s->stage) {
		free(s);
		return -ENOMEM;
	}
	snprintf(s->path, sizeof(s->path), "%s/tmp/blob-XXXXXX", st->dir);
	s->fd = mkostemp(s->path, O_CLOEXEC);
	if (s->fd < 0) {
		int rc = store_seterr(-errno, "cannot create '%s': %s", s->path, strerror(errno));
		free(s->stage);
		free(s);
		return rc;
	}
	s->st = st;
	b3_hasher_init(&s->hasher);
	*out = s;
	return 0;
}

static int sink_flush(struct store_sink *s)
{
	int rc;

	if (s->staged == 0)
		return 0;
	b3_hasher_update(&s->hasher, s->stage, s->staged);
	rc = write_all(s->fd, s->stage, s->staged);
	if (rc)
		return store_seterr(rc, "cannot write '%s': %s", s->path, strerror(-rc));
	s->staged = 0;
	return 0;
}

int store_sink_write(struct store_sink *s, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	int rc;

	while (len > 0) {
		size_t take = SINK_STAGE - s->staged;
		if (take > len)
			take = len;
		memcpy(s->stage + s->staged, p, take);
		s->staged += take;
		s->size += take;
		p += take;
		len -= take;
		if (s->staged == SINK_STAGE && (rc = sink_flush(s)) != 0)
			return rc;
	}
	return 0;
}

const char *store_sink_path(const struct store_sink *s)
{
	return s->path;
}

int store_sink_adopt_file(struct store_sink *s)
{
	uint8_t buf[SINK_STAGE < 65536 ? SINK_STAGE : 65536];
	int fd, rc = 0;

	if (s->staged || s->size)
		return store_seterr(-EINVAL, "'%s' was written through the sink", s->path);
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
		b3_hasher_update(&s->hasher, buf, (size_t)n);
		s->size += (uint64_t)n;
	}
	return rc;
}

void store_sink_abort(struct store_sink *s)
{
	if (!s)
		return;
	close(s->fd);
	unlink(s->path);
	free(s->stage);
	free(s);
}

void store_blob_path(struct store *st, const uint8_t hash[B3_OUT_LEN], char *buf, size_t bufsz)
{
	char hex[B3_HEX_LEN + 1];

	b3_to_hex(hash, hex);
	snprintf(buf, bufsz, "%s/blobs/%.2s/%s", st->dir, hex, hex);
}

int store_job_commit_output(struct store *st, const uint8_t job[JOB_ID_LEN],
			    struct store_sink *s, const char *media_type, const char *device,
			    uint8_t hash_out[B3_OUT_LEN])
{
	uint8_t hash[B3_OUT_LEN];
	char path[4200], dir[4200];
	struct blob_info bi;
	bool dedup;
	int rc;

	if ((rc = sink_flush(s)) != 0)
		goto fail;
	b3_hasher_finalize(&s->hasher, hash, sizeof(hash));
	store_blob_path(st, hash, path, sizeof(path));
	snprintf(dir, sizeof(dir), "%.*s", (int)(strrchr(path, '/') - path), path);

	pthread_mutex_lock(&st->blob_mu);
	rc = index_blob_get(st->ix, hash, &bi);
	dedup = rc == 0 && access(path, F_OK) == 0;
	if (rc != 0 && rc != STORE_E_NOTFOUND)
		goto unlock;
	if (!dedup) {
		if (fchmod(s->fd, 0444) != 0 || fsync(s->fd) != 0) {
			rc = store_seterr(-errno, "cannot write '%s': %s", s->path,
					  strerror(errno));
			goto unlock;
		}
		if (mkdir(dir, 0755) == 0) {
			/* The new folder's own entry must be durable too. */
			char parent[4200];

			snprintf(parent, sizeof(parent), "%s/blobs", st->dir);
			if ((rc = dir_fsync(parent)) != 0)
				goto unlock;
		} else if (errno != EEXIST) {
			rc = store_seterr(-errno, "cannot create '%s': %s", dir, strerror(errno));
			goto unlock;
		}
		if (rename(s->path, path) != 0) {
			rc = store_seterr(-errno, "cannot rename '%s' to '%s': %s", s->path, path,
					  strerror(errno));
			goto unlock;
		}
		s->path[0] = '\0';
		if ((rc = dir_fsync(dir)) != 0)
			goto unlock;
	}
	rc = index_job_attach_output(st->ix, job, hash, s->size, media_type, device, false);
	if (rc == 0) {
		if (dedup)
			st->dedup_hits++;
		else
			st->blobs_written++;
		st->bytes_written += s->size;
		if (hash_out)
			memcpy(hash_out, hash, B3_OUT_LEN);
	}
	/* On failure a renamed file stays unreferenced: store_gc() or the
	 * next open collects it (never while blob_mu is held elsewhere). */
unlock:
	pthread_mutex_unlock(&st->blob_mu);
fail:
	close(s->fd);
	if (s->path[0])
		unlink(s->path);
	free(s->stage);
	free(s);
	return rc;
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
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		st->integrity_failures++;
		return store_seterr(errno == ENOENT ? STORE_E_CORRUPT : -errno,
				    "blob file '%s' cannot be opened: %s", path, strerror(errno));
	}
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || (uint64_t)sb.st_size != bi.size) {
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

/* With blob_mu held: unlink the file of a blob the index just let go. */
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

	pthread_mutex_lock(&st->blob_mu);
	rc = index_job_hide(st->ix, job, mask, release_output, &freed, hash);
	if (rc == 0 && freed)
		blob_unlink_freed(st, hash);
	pthread_mutex_unlock(&st->blob_mu);
	return rc;
}

int store_job_delete(struct store *st, const uint8_t job[JOB_ID_LEN])
{
	uint8_t hash[B3_OUT_LEN];
	bool freed;
	int rc;

	pthread_mutex_lock(&st->blob_mu);
	rc = index_job_delete(st->ix, job, &freed, hash);
	if (rc == 0 && freed)
		blob_unlink_freed(st, hash);
	pthread_mutex_unlock(&st->blob_mu);
	return rc;
}

int store_clear_tmp(struct store *st, uint64_t *removed)
{
	char path[4200];
	struct dirent *de;
	DIR *d;

	snprintf(path, sizeof(path), "%s/tmp", st->dir);
	d = opendir(path);
	if (!d)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		if (unlinkat(dirfd(d), de->d_name, 0) == 0)
			(*removed)++;
	}
	closedir(d);
	return 0;
}

static int gc_dir(struct store *st, const char *sub, uint64_t *collected)
{
	char path[4200];
	struct dirent *de;
	DIR *d;

	snprintf(path, sizeof(path), "%s/blobs/%s", st->dir, sub);
	d = opendir(path);
	if (!d)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	while ((de = readdir(d)) != NULL) {
		uint8_t hash[B3_OUT_LEN];
		struct blob_info bi;
		int rc;

		if (de->d_name[0] == '.')
			continue;
		/* Not a blob name, or not in its right folder: never ours to
		 * keep; in the right place: keep it if the index knows it. */
		if (b3_from_hex(de->d_name, hash) == 0 && strncmp(de->d_name, sub, 2) == 0) {
			rc = index_blob_get(st->ix, hash, &bi);
			if (rc == 0)
				continue;
			if (rc != STORE_E_NOTFOUND) {
				closedir(d);
				return rc;
			}
		}
		if (unlinkat(dirfd(d), de->d_name, 0) == 0)
			(*collected)++;
	}
	closedir(d);
	return 0;
}

int store_gc(struct store *st, uint64_t *collected)
{
	char path[4200];
	struct dirent *de;
	DIR *d;
	int rc = 0;

	*collected = 0;
	snprintf(path, sizeof(path), "%s/blobs", st->dir);
	d = opendir(path);
	if (!d)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	pthread_mutex_lock(&st->blob_mu);
	while ((de = readdir(d)) != NULL && rc == 0) {
		if (de->d_name[0] == '.' || de->d_type != DT_DIR || strlen(de->d_name) != 2)
			continue;
		rc = gc_dir(st, de->d_name, collected);
	}
	pthread_mutex_unlock(&st->blob_mu);
	closedir(d);
	return rc;
}
