/*
 * files.c - open files. Each carries a struct fh: a snapshot of a
 * generated file's content (served with direct I/O, so sizes never lie to
 * the page cache), a verified blob descriptor (served zero-copy with the
 * page cache kept, or by the kernel through passthrough), a job id (log,
 * ctl), or a `new` writer.
 *
 * Threads and locks: ops_i.h (fh_lock: a handler holds it shared while it
 * uses a struct fh; release takes it exclusively to free one).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "ops_i.h"


/* ---- files ---- */

void fh_free(struct fh *h)
{
	if (!h)
		return;
	free(h->buf);
	if (h->kind == FH_BLOB && h->fd >= 0)
		close(h->fd);
	store_reader_close(h->reader);
	pt_put(h->pt, h->pt_ino);
	new_file_release(h->nf);
	free(h);
}

/*
 * Writers of `new` run in parallel: without FOPEN_PARALLEL_DIRECT_WRITES
 * the kernel serializes every direct write to an inode, so 16 writers
 * would wait for each other's durable commit instead of sharing one
 * (group commit). libfuse 3.14 cannot say it, so the open reply is built
 * here (struct fuse_open_out of the kernel ABI, <linux/fuse.h>). The
 * kernel allows parallel writes only below EOF, which is why `new`
 * reports max_request as its size.
 */
static int reply_open_parallel(fuse_req_t req, struct fuse_file_info *fi)
{
	struct fuse_open_out out = {
		.fh = fi->fh,
		.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
	};

	return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

/*
 * An output or cas/ blob: small ones (one group) are verified whole at
 * open and served zero-copy from the blob file; larger ones through a
 * store reader that verifies each 1 MiB group it serves, so that opening
 * a large blob again does not re-read it all. Either way the kernel keeps
 * the verified pages cached across opens.
 */
static int open_blob(struct fsctx *fs, uint64_t ino, const uint8_t hash[32], struct fh *h,
		     struct fuse_file_info *fi)
{
	struct blob_info bi;
	uint64_t size;
	int rc = index_blob_get(fs->ix, hash, &bi);

	if (rc)
		return rc;
	engine_blob_read(fs->eng, hash);
	fi->direct_io = 0;
	fi->keep_cache = 1;
	if (bi.size <= B3_GROUP_LEN) {
		h->kind = FH_BLOB;
		rc = store_blob_open(fs->st, hash, &h->fd, &size);
	} else {
		h->kind = FH_READER;
		rc = store_reader_open(fs->st, hash, &h->reader, &size);
	}
	if (rc == STORE_E_CORRUPT)
		fprintf(stderr, "renderfs: refusing to serve a blob: %s\n", store_lasterr());
	if (rc == 0 && fs->pt) {
		/* Verified just now (or, for a large blob, since the store opened
		 * and the file last changed): the kernel may read it itself. */
		h->pt = fs->pt;
		h->pt_ino = ino;
		h->pt_id = pt_get(fs->pt, ino, h->kind == FH_BLOB ? h->fd : store_reader_fd(h->reader));
	}
	return rc;
}

/*
 * Blobs are never written, but the notifier opens an output write-only to
 * make IN_CLOSE_WRITE, and a user may open one read-write. With
 * passthrough, every open file of an inode must go the same way, and the
 * kernel opens the blob file with the open's own flags and the daemon's
 * credentials: a user's open for writing is refused (it would be a
 * writable blob file), and the notifier's goes the way of the inode's
 * other open files (it writes nothing); with none open, it keeps readers
 * that open meanwhile on the daemon's way until it is closed, since which
 * of two racing opens the kernel takes first is not ours to choose.
 * Without passthrough such opens are served as before and their writes
 * fail with EPERM. Called with fs->pt.
 */
int fh_join_backing(struct fsctx *fs, struct fh *h, uint64_t ino)
{
	int rc = pt_join(fs->pt, ino, &h->pt_id);

	if (rc == 0) {
		h->pt = fs->pt;
		h->pt_ino = ino;
	}
	return rc;
}

int open_blob_for_writing(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct fh *h)
{
	if (!notify_is_helper(fs, req))
		return -EPERM;
	return fh_join_backing(fs, h, ino);
}

/*
 * With replica=: the blob a read of node ino needs (an output, a cas/
 * blob, or either's signature), when the cache dropped its file; the
 * bucket has it. 0 and *hash, or -ENOENT for nodes that need none.
 */
static int blob_to_fetch(struct fsctx *fs, fuse_req_t req, uint64_t ino, uint8_t hash[32])
{
	struct blob_info bi;
	struct job j;
	int rc = -ENOENT;

	if (!engine_replica_on(fs->eng))
		return -ENOENT;
	switch (INO_KIND(ino)) {
	case NK_CAS:
	case NK_CASSIG:
		if (cas_node(fs, req, ino, hash, &bi) != 0)
			return -ENOENT;
		rc = 0;
		break;
	case NK_JFILE: {
		enum job_file f = INO_SUB(ino);
		struct jf_extra x;
		if (job_by_seq(fs, INO_LOW48(ino), &j) != 0)
			return -ENOENT;
		if (!job_visible(fs, req, &j)) {
			rc = -ENOENT; /* the open says so */
		} else if ((f == JF_OUTPUT || f == JF_OUTPUTSIG) && (j.flags & JOB_F_HAS_OUTPUT)) {
			memcpy(hash, j.output_hash, 32);
			rc = 0;
		} else if ((unsigned)f >= JF_COUNT && jf_extra_at(fs, &j, (unsigned)f, &x) == 0) {
			memcpy(hash, x.out.hash, 32);
			rc = 0;
		}
		job_release(&j);
		break;
	}
	default:
		return -ENOENT;
	}
	return rc == 0 && engine_blob_remote(fs->eng, hash) ? 0 : -ENOENT;
}

static void open_when_here(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
			   bool fetched);
static void open_node(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

/* An open waiting for its blob to come back from the bucket. */
struct open_wait {
	fuse_req_t req;
	fuse_ino_t ino;
	struct fuse_file_info fi;
};

static void open_fetched(void *arg, int rc)
{
	struct open_wait *w = arg;

	if (rc)
		reply_err(w->req, rc == -ENOENT ? -EIO : rc); /* it was there: lost is EIO */
	else
		open_when_here(w->req, w->ino, &w->fi, true);
	free(w);
}

void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	open_when_here(req, ino, fi, false);
}

static void open_when_here(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
			   bool fetched)
{
	struct fsctx *fs = ctx(req);
	uint8_t want[32];

	/* A blob the cache dropped comes back first; the FUSE thread does
	 * not wait for it: the open is answered when it is here. */
	if (!fetched && (fi->flags & O_ACCMODE) != O_WRONLY && blob_to_fetch(fs, req, ino, want) == 0) {
		struct open_wait *w = calloc(1, sizeof(*w));
		int rc;
		if (!w) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		w->req = req;
		w->ino = ino;
		w->fi = *fi;
		if ((rc = engine_blob_fetch(fs->eng, want, open_fetched, w)) != 0) {
			free(w);
			reply_err(req, rc);
		}
		return;
	}
	open_node(req, ino, fi);
}

static void open_node(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fsctx *fs = ctx(req);
	struct fh *h = calloc(1, sizeof(*h));
	const struct fuse_ctx *c = fuse_req_ctx(req);
	struct job j;
	bool have_job = false;
	int rc = 0;

	if (!h) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	h->fd = -1;
	h->kind = FH_BUF;
	fi->direct_io = 1;
	/* libfuse asks for atomic O_TRUNC: only `new` (and ctl) accept it. */
	if ((fi->flags & O_TRUNC) && INO_KIND(ino) != NK_NEW &&
	    !(INO_KIND(ino) == NK_JFILE && INO_SUB(ino) == JF_CTL) &&
	    !(INO_KIND(ino) == NK_LEDGER && INO_SUB(ino) == LEDGER_ATTEST)) {
		free(h);
		fuse_reply_err(req, EPERM);
		return;
	}
	switch (INO_KIND(ino)) {
	case NK_NEW: {
		const struct rnode *rn = fs_rnode_by_ino(fs, INO(NK_RDIR, 4, INO_LOW48(ino)));
		if (!rn) {
			rc = -ENOENT;
			break;
		}
		h->kind = FH_NEW;
		rc = new_file_open(fs, rn->route, c->uid, c->gid, (fi->flags & O_APPEND) != 0,
				   &h->nf);
		break;
	}
	case NK_SCHEMA: {
		const struct rnode *rn = fs_rnode_by_ino(fs, INO(NK_RDIR, 4, INO_LOW48(ino)));
		if (!rn)
			rc = -ENOENT;
		else if (!(h->buf = strdup(rn->route->schema_text)))
			rc = -ENOMEM;
		else
			h->len = strlen(h->buf);
		break;
	}
	case NK_STATIC:
		rc = static_render(fs, (enum static_node)INO_LOW48(ino), c->uid, &h->buf, &h->len);
		break;
	case NK_KEY:
		rc = key_render(fs, INO_LOW56(ino), &h->buf, &h->len);
		break;
	case NK_LEDGER: {
		struct attestation a;
		if (INO_SUB(ino) == LEDGER_ATTEST) {
			/* The store's owner's (and root's): a signed record of
			 * everyone's usage is theirs to make. */
			if (c->uid != 0 && c->uid != fs->owner)
				rc = -EACCES;
			else if ((fi->flags & O_ACCMODE) == O_RDONLY)
				rc = -EACCES;
			else
				h->kind = FH_ATTEST;
			break;
		}
		if ((rc = ledger_at(fs, INO_LOW48(ino), &a)) != 0)
			break;
		if (INO_SUB(ino) == LEDGER_SIG) {
			if (!(h->buf = strdup(a.sig)))
				rc = -ENOMEM;
			else
				h->len = strlen(a.sig);
		} else if ((fi->flags & O_ACCMODE) != O_WRONLY) {
			rc = open_blob(fs, ino, a.hash, h, fi);
		}
		break;
	}
	case NK_CAS:
	case NK_CASSIG: {
		uint8_t hash[32];
		struct blob_info bi;
		if ((rc = cas_node(fs, req, ino, hash, &bi)) != 0)
			break;
		if (INO_KIND(ino) == NK_CASSIG) {
			rc = cassig_render(fs, hash, bi.size, &h->buf, &h->len);
			break;
		}
		if (fs->pt && (fi->flags & O_ACCMODE) != O_RDONLY)
			rc = open_blob_for_writing(fs, req, ino, h);
		else
			rc = open_blob(fs, ino, hash, h, fi);
		break;
	}
	case NK_JFILE: {
		enum job_file f = INO_SUB(ino);
		if ((rc = job_by_seq(fs, INO_LOW48(ino), &j)) != 0)
			break;
		have_job = true;
		if (job_visible(fs, req, &j) && (unsigned)f >= JF_COUNT) {
			/* An output after the first, or its signature. */
			struct jf_extra x;
			if ((rc = jf_extra_at(fs, &j, (unsigned)f, &x)) != 0)
				break;
			memcpy(h->id, j.id, JOB_ID_LEN);
			if ((fi->flags & O_ACCMODE) == O_WRONLY)
				break; /* nothing to read (the notifier opens files so) */
			rc = x.sig ? jf_extra_sig(fs, &j, &x, &h->buf, &h->len)
				   : open_blob(fs, ino, x.out.hash, h, fi);
			break;
		}
		if (!job_visible(fs, req, &j) || f >= JF_COUNT || !jf_present(&j, f)) {
			rc = -ENOENT;
			break;
		}
		memcpy(h->id, j.id, JOB_ID_LEN);
		if (f == JF_CTL) {
			h->kind = FH_CTL;
		} else if (f == JF_LOG) {
			h->kind = FH_LOG;
		} else if (f == JF_OUTPUT && fs->pt && (fi->flags & O_ACCMODE) != O_RDONLY) {
			rc = open_blob_for_writing(fs, req, ino, h);
		} else if ((fi->flags & O_ACCMODE) == O_WRONLY) {
			/* nothing to read (the notifier opens files so) */
		} else if (f == JF_OUTPUT) {
			rc = open_blob(fs, ino, j.output_hash, h, fi);
		} else {
			rc = jf_render(fs, &j, f, &h->buf, &h->len);
		}
		break;
	}
	default:
		rc = -EISDIR;
		break;
	}
	if (have_job)
		job_release(&j);
	/* Generated files may be opened for writing (change notification
	 * opens them so); writes to them fail with EPERM. */
	if (rc) {
		fh_free(h);
		reply_err(req, rc);
		return;
	}
	fi->fh = (uintptr_t)h;
	/* Only `new` reports anything at close (an incomplete request). */
	fi->noflush = h->kind != FH_NEW;
	if ((INO_KIND(ino) == NK_NEW ? reply_open_parallel(req, fi)
	     : h->pt_id > 0	     ? pt_reply_open(req, fi, h->pt_id)
				     : fuse_reply_open(req, fi)) != 0)
		fh_free(h); /* the open was interrupted */
}

static void op_read_locked(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct fsctx *fs = ctx(req);
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;
	char *buf;
	size_t got = 0;
	int rc;

	(void)ino;
	switch (h->kind) {
	case FH_BLOB: {
		struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
		bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
		bv.buf[0].fd = h->fd;
		bv.buf[0].pos = off;
		fuse_reply_data(req, &bv, FUSE_BUF_SPLICE_MOVE);
		return;
	}
	case FH_READER: {
		if (!(buf = malloc(size))) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		ssize_t n = store_reader_pread(h->reader, buf, size, (uint64_t)off);
		if (n < 0) {
			fprintf(stderr, "renderfs: read refused: %s\n", store_lasterr());
			reply_err(req, (int)n);
		} else {
			fuse_reply_buf(req, buf, (size_t)n);
		}
		free(buf);
		return;
	}
	case FH_BUF:
		if ((size_t)off >= h->len)
			fuse_reply_buf(req, NULL, 0);
		else
			fuse_reply_buf(req, h->buf + off,
				       h->len - (size_t)off < size ? h->len - (size_t)off : size);
		return;
	case FH_CTL:
	case FH_ATTEST:
		fuse_reply_buf(req, NULL, 0);
		return;
	case FH_LOG:
		if (!(buf = malloc(size))) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		rc = index_job_log_read(fs->ix, h->id, (uint64_t)off, buf, size, &got);
		if (rc)
			reply_err(req, rc);
		else
			fuse_reply_buf(req, buf, got);
		free(buf);
		return;
	case FH_NEW: {
		if (!(buf = malloc(size))) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		ssize_t n = new_file_read(h->nf, buf, size, (uint64_t)off);
		if (n < 0)
			fuse_reply_err(req, (int)-n);
		else
			fuse_reply_buf(req, buf, (size_t)n);
		free(buf);
		return;
	}
	}
	fuse_reply_err(req, EBADF);
}

/* ctl: one command per line. */
static int ctl_command(struct fsctx *fs, const uint8_t id[JOB_ID_LEN], const char *line)
{
	enum job_priority p;

	if (strcmp(line, "cancel") == 0)
		return engine_cancel(fs->eng, id);
	if (strcmp(line, "retry") == 0)
		return engine_retry(fs->eng, id);
	if (strcmp(line, "redeliver") == 0)
		return engine_redeliver(fs->eng, id);
	if (strncmp(line, "priority ", 9) == 0) {
		if (job_priority_parse(line + 9, &p) != 0)
			return -EINVAL;
		return engine_set_priority(fs->eng, id, p);
	}
	return -EINVAL;
}

static void op_write_locked(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct fsctx *fs = ctx(req);
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	if (h->kind == FH_NEW) {
		ssize_t n = new_file_write(h->nf, data, size, (uint64_t)off);
		if (n < 0)
			fuse_reply_err(req, (int)-n);
		else
			fuse_reply_write(req, (size_t)n);
		return;
	}
	if (h->kind == FH_CTL) {
		struct job j;
		char line[128];
		size_t i = 0;
		int rc = index_job_get(fs->ix, h->id, &j);

		if (rc) {
			reply_err(req, rc);
			return;
		}
		if (fuse_req_ctx(req)->uid != 0 && fuse_req_ctx(req)->uid != j.uid)
			rc = -EPERM;
		job_release(&j);
		while (rc == 0 && i < size) {
			size_t n = 0;
			while (i < size && data[i] != '\n' && n < sizeof(line) - 1)
				line[n++] = data[i++];
			if (i < size && data[i] != '\n') {
				rc = -EINVAL; /* a line too long for any command */
				break;
			}
			i++;
			line[n] = '\0';
			while (n && (line[n - 1] == ' ' || line[n - 1] == '\r'))
				line[--n] = '\0';
			if (n == 0)
				continue;
			rc = ctl_command(fs, h->id, line);
			if (rc)
				fprintf(stderr, "renderfs: ctl '%s': %s\n", line,
					rc == -EINVAL ? "unknown command (cancel, retry, priority "
							"low|normal|high)"
						      : store_lasterr());
		}
		if (rc)
			reply_err(req, rc);
		else
			fuse_reply_write(req, size);
		return;
	}
	if (h->kind == FH_ATTEST) {
		/* Any write attests the period from the last attestation to
		 * now ("attest\n" by convention); EALREADY if it is empty. */
		struct attestation a;
		int rc = engine_attest(fs->eng, &a);
		if (rc == STORE_E_STATE)
			rc = -EALREADY;
		if (rc) {
			fprintf(stderr, "renderfs: attest: %s\n", store_lasterr());
			reply_err(req, rc);
		} else {
			fuse_reply_write(req, size);
		}
		return;
	}
	fuse_reply_err(req, EPERM);
}

static void op_flush_locked(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	fuse_reply_err(req, h->kind == FH_NEW ? -new_file_flush(h->nf) : 0);
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	pthread_rwlock_rdlock(&fh_lock);
	op_read_locked(req, ino, size, off, fi);
	pthread_rwlock_unlock(&fh_lock);
}

/*
 * With replica=: a write to `new` whose requests name blobs (cas:<hex>)
 * this store does not know waits, without a thread, for them to come
 * from the bucket, then goes on as written (the file takes writes in any
 * order of offsets). A blob the bucket does not have either is refused by
 * the submission as usual.
 */
struct write_wait {
	fuse_req_t req;
	fuse_ino_t ino;
	struct fuse_file_info fi;
	off_t off;
	size_t size;
	atomic_int pending;
	char data[];
};

static void write_fetched(void *arg, int rc)
{
	struct write_wait *w = arg;

	(void)rc; /* the submission says what is missing */
	if (atomic_fetch_sub(&w->pending, 1) != 1)
		return;
	pthread_rwlock_rdlock(&fh_lock);
	op_write_locked(w->req, w->ino, w->data, w->size, w->off, &w->fi);
	pthread_rwlock_unlock(&fh_lock);
	free(w);
}

static bool write_after_fetch(struct fsctx *fs, fuse_req_t req, fuse_ino_t ino, const char *data,
			      size_t size, off_t off, struct fuse_file_info *fi)
{
	uint8_t want[INDEX_INPUTS_MAX][32];
	size_t n = 0;
	struct write_wait *w;

	/* `private`: a request may name only its owner's blobs: those the
	 * cache dropped come back; others' are not fetched for it. */
	bool own_only = fs->private_ && fuse_req_ctx(req)->uid != 0;
	uint32_t uid = fuse_req_ctx(req)->uid;

	if (INO_KIND(ino) != NK_NEW || !engine_replica_on(fs->eng) || size < 68)
		return false;
	for (const char *p = data; n < INDEX_INPUTS_MAX && (p = memmem(p, size - (size_t)(p - data), "cas:", 4));
	     p += 4) {
		char hex[65];
		struct blob_info bi;
		bool dup = false;

		if ((size_t)(p - data) + 68 > size)
			break;
		memcpy(hex, p + 4, 64);
		hex[64] = '\0';
		if (strspn(hex, "0123456789abcdef") != 64 || b3_from_hex(hex, want[n]) != 0)
			continue;
		/* Unknown here, or known with its file only in the bucket. */
		if (index_blob_get(fs->ix, want[n], &bi) == STORE_E_NOTFOUND) {
			if (own_only)
				continue;
		} else if (!engine_blob_remote(fs->eng, want[n]) ||
			   (own_only && index_blob_used_by(fs->ix, want[n], uid) != 0)) {
			continue;
		}
		for (size_t i = 0; i < n && !dup; i++)
			dup = memcmp(want[i], want[n], 32) == 0;
		if (!dup)
			n++;
	}
	if (n == 0 || !(w = malloc(sizeof(*w) + size)))
		return false;
	w->req = req;
	w->ino = ino;
	w->fi = *fi;
	w->off = off;
	w->size = size;
	memcpy(w->data, data, size);
	atomic_init(&w->pending, (int)n + 1);
	for (size_t i = 0; i < n; i++)
		if (engine_blob_fetch(fs->eng, want[i], write_fetched, w) != 0)
			atomic_fetch_sub(&w->pending, 1);
	write_fetched(w, 0); /* the caller's own count */
	return true;
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	if (write_after_fetch(ctx(req), req, ino, data, size, off, fi))
		return;
	pthread_rwlock_rdlock(&fh_lock);
	op_write_locked(req, ino, data, size, off, fi);
	pthread_rwlock_unlock(&fh_lock);
}

void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	pthread_rwlock_rdlock(&fh_lock);
	op_flush_locked(req, ino, fi);
	pthread_rwlock_unlock(&fh_lock);
}

void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	pthread_rwlock_wrlock(&fh_lock);
	fh_free((struct fh *)(uintptr_t)fi->fh);
	pthread_rwlock_unlock(&fh_lock);
	fuse_reply_err(req, 0);
}
