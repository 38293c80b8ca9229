/*
 * ops.c - the FUSE low-level handlers.
 *
 * DESIGN
 * Handlers are thin: decode the node id (fs_i.h), ask the index, engine or
 * content.c, reply once. Nothing here keeps per-inode state: a node id is
 * resolved from the index each time (jobs by their persistent sequence
 * number), so memory does not grow with jobs and ids survive restarts.
 * Open files carry a struct fh: a snapshot of a generated file's content
 * (served with direct I/O, so sizes never lie to the page cache), a
 * verified blob descriptor (served zero-copy with the page cache kept), a
 * job id (log, ctl), or a `new` writer. Directory handles carry a cursor
 * so that listing a route with 100,000 jobs is one pass over the index.
 *
 * Handlers run on the session's worker threads, concurrently; they share
 * only the read-only struct fsctx and what the store and engine lock.
 * None of them touches the mountpoint.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs_i.h"

/*
 * How long the kernel may keep a name. Jobs come and go: with change
 * notification, the notifier makes every creation and removal through the
 * mount, so the kernel's view is kept current and job names may be cached
 * briefly once announced; without it, never. A name must not be cached
 * before the notifier has created it (its create would find it and make
 * no event): a job's until its creation is announced, an output's never.
 * (Dropping cached names from the daemon instead would make it wait on
 * the directory's lock, which a dying daemon may never get.)
 */
#define JOB_ENTRY_TIMEOUT 1.0
#define STATIC_TIMEOUT 1.0
#define FIXED_NAME_TIMEOUT 86400.0 /* names fixed for the life of the mount */

static double entry_timeout(struct fsctx *fs, uint64_t ino)
{
	switch (INO_KIND(ino)) {
	case NK_STATIC:
	case NK_RDIR:
	case NK_ROOT:
	case NK_SCHEMA:
	case NK_NEW:
		return FIXED_NAME_TIMEOUT;
	case NK_JOB:
	case NK_JLINK:
		/* `private`: the kernel must ask every caller (a name cached for
		 * its owner would answer another user's stat). */
		if (fs->private_)
			return 0.0;
		return notify_announced(fs, INO_LOW48(ino)) ? JOB_ENTRY_TIMEOUT : 0.0;
	case NK_JFILE:
		return fs->notifier && INO_SUB(ino) != JF_OUTPUT ? JOB_ENTRY_TIMEOUT : 0.0;
	default:
		return 0.0;
	}
}

enum fh_kind { FH_BUF, FH_BLOB, FH_READER, FH_LOG, FH_CTL, FH_NEW };

struct fh {
	enum fh_kind kind;
	char *buf;
	size_t len;
	int fd;
	uint8_t id[JOB_ID_LEN];
	struct new_file *nf;
	struct store_reader *reader;
	struct passthrough *pt; /* set: pt_put(pt, pt_ino) at release */
	uint64_t pt_ino;
	int32_t pt_id; /* > 0: the kernel reads the blob file itself */
};

/*
 * The kernel can send RELEASE for a file while a READ on it is still being
 * answered (seen with direct I/O: AddressSanitizer caught the reply reading
 * a freed buffer). Handlers that use a struct fh hold fh_lock shared for
 * as long as they use it; release takes it exclusively to free one, so it
 * waits for them. Lock order: fh_lock before anything the handler calls.
 */
static pthread_rwlock_t fh_lock = PTHREAD_RWLOCK_INITIALIZER;

struct dirh {
	uint8_t last[JOB_ID_LEN];
	off_t last_off;
	bool have_last;
};

static struct fsctx *ctx(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static void reply_err(fuse_req_t req, int rc)
{
	fuse_reply_err(req, fs_errno(rc));
}

static bool is_root_caller(fuse_req_t req)
{
	return fuse_req_ctx(req)->uid == 0;
}

static bool job_visible(struct fsctx *fs, fuse_req_t req, const struct job *j)
{
	return !fs->private_ || is_root_caller(req) || fuse_req_ctx(req)->uid == j->uid;
}

const char *job_dir_name(struct fsctx *fs, uint32_t uid, const struct job *j,
			 char buf[JOB_ID_STR_LEN + 1])
{
	uint8_t id[JOB_ID_LEN];

	/* Only a name held by several owners (per owner, or shared after a
	 * per-owner mount) can lead elsewhere: then the ULID. */
	if (j->name[0] && index_name_lookup(fs->ix, j->route, j->name, uid, id) == 0 &&
	    memcmp(id, j->id, JOB_ID_LEN) == 0)
		return j->name;
	ulid_format(j->id, buf);
	return buf;
}

/* The name a job goes by for the caller of req (job_dir_name). */
static const char *job_visible_id(struct fsctx *fs, fuse_req_t req, const struct job *j,
				  char buf[JOB_ID_STR_LEN + 1])
{
	return job_dir_name(fs, fuse_req_ctx(req)->uid, j, buf);
}

static int job_by_seq(struct fsctx *fs, uint64_t seq, struct job *j)
{
	uint8_t id[JOB_ID_LEN];
	int rc = index_job_by_seq(fs->ix, seq, id);

	return rc ? rc : index_job_get(fs->ix, id, j);
}

/* cas/ node ids carry the first 7 bytes of the blob hash (fs_i.h). */
static uint64_t cas_low(const uint8_t hash[32])
{
	uint64_t low = 0;

	for (int i = 0; i < 7; i++)
		low = low << 8 | hash[i];
	return low;
}

static int cas_hash(struct fsctx *fs, uint64_t ino, uint8_t hash[32])
{
	uint8_t prefix[7];

	for (int i = 0; i < 7; i++)
		prefix[i] = (uint8_t)(ino >> (8 * (6 - i)));
	return index_blob_find_prefix(fs->ix, prefix, 7, hash);
}

/*
 * `private`: a blob is known to a caller only if the caller owns a job
 * whose output it is (root: every blob); to anyone else it does not exist
 * (ENOENT: not even that). One lookup in the index's blobusers.
 */
static int cas_visible(struct fsctx *fs, fuse_req_t req, const uint8_t hash[32])
{
	uint32_t uid = fuse_req_ctx(req)->uid;
	int rc;

	if (!fs->private_ || uid == 0)
		return 0;
	rc = index_blob_used_by(fs->ix, hash, uid);
	return rc == STORE_E_NOTFOUND ? -ENOENT : rc;
}

/* ---- attributes ---- */

static void ms_to_ts(uint64_t ms, struct timespec *ts)
{
	ts->tv_sec = (time_t)(ms / 1000);
	ts->tv_nsec = (long)(ms % 1000) * 1000000;
}

static void attr_base(struct fsctx *fs, struct stat *st, uint64_t ino, mode_t mode,
		      uint64_t ms)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = mode;
	st->st_nlink = S_ISDIR(mode) ? 2 : 1;
	st->st_uid = fs->owner;
	st->st_gid = fs->group;
	st->st_blksize = 65536;
	ms_to_ts(ms, &st->st_mtim);
	st->st_ctim = st->st_atim = st->st_mtim;
}

static void size_attr(struct stat *st, uint64_t size)
{
	st->st_size = (off_t)size;
	st->st_blocks = (blkcnt_t)((size + 511) / 512);
}

static int job_file_attr(struct fsctx *fs, const struct job *j, enum job_file f,
			 struct stat *st)
{
	uint64_t size;
	mode_t mode = f == JF_CTL ? 0200 : fs->private_ ? 0600 : 0644;
	uint64_t ms = j->updated_ms;
	int rc;

	if (f == JF_OUTPUT || f == JF_OUTPUTSIG || f == JF_MANIFEST || f == JF_MANIFESTSIG ||
	    f == JF_REQUEST)
		ms = f == JF_REQUEST ? j->created_ms : j->completed_ms;
	attr_base(fs, st, INO(NK_JFILE, f, j->seq), S_IFREG | mode, ms);
	st->st_uid = j->uid;
	st->st_gid = j->gid;
	if ((rc = jf_size(fs, j, f, &size)) != 0)
		return rc;
	size_attr(st, size);
	return 0;
}

static void job_dir_attr(struct fsctx *fs, const struct job *j, struct stat *st)
{
	attr_base(fs, st, INO(NK_JOB, 0, j->seq), S_IFDIR | (fs->private_ ? 0700 : 0755),
		  j->updated_ms);
	st->st_uid = j->uid;
	st->st_gid = j->gid;
}

static int rnode_attr(struct fsctx *fs, const struct rnode *rn, struct stat *st)
{
	mode_t mode = rn->depth == 4 ? 01777 : 0755;

	attr_base(fs, st, rn->ino, S_IFDIR | mode, fs->mount_ms);
	st->st_nlink = 2 + rn->nsubdirs;
	if (rn->depth == 4)
		st->st_nlink += (nlink_t)engine_route_jobs(fs->eng, rn->path);
	return 0;
}

static int fill_attr(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct stat *st)
{
	const struct rnode *rn;
	struct job j;
	char *text;
	size_t len;
	int rc;

	switch (INO_KIND(ino)) {
	case NK_ROOT:
		attr_base(fs, st, ino, S_IFDIR | 0755, fs->mount_ms);
		st->st_nlink = 2 + 3 + fs->top_dirs;
		return 0;
	case NK_STATIC: {
		unsigned n = (unsigned)INO_LOW48(ino);
		if (n == SN_KEYS || n == SN_JOBS || n == SN_CAS) {
			attr_base(fs, st, ino, S_IFDIR | (n == SN_CAS ? 0711 : 0755), fs->mount_ms);
			return 0;
		}
		if (n == 0 || n >= SN_COUNT)
			return -ENOENT;
		if ((rc = static_render(fs, (enum static_node)n, &text, &len)) != 0)
			return rc;
		free(text);
		attr_base(fs, st, ino, S_IFREG | 0444, n == SN_STATS ? now_ms() : fs->mount_ms);
		size_attr(st, len);
		return 0;
	}
	case NK_RDIR:
		if (!(rn = fs_rnode_by_ino(fs, ino)))
			return -ENOENT;
		return rnode_attr(fs, rn, st);
	case NK_NEW:
	case NK_SCHEMA:
		if (!(rn = fs_rnode_by_ino(fs, INO(NK_RDIR, 4, INO_LOW48(ino)))))
			return -ENOENT;
		if (INO_KIND(ino) == NK_NEW) {
			/* Its size is the largest request it takes (see
			 * reply_open_parallel for why it is not 0). */
			attr_base(fs, st, ino, S_IFREG | 0666, fs->mount_ms);
			size_attr(st, fs->max_request);
		} else {
			attr_base(fs, st, ino, S_IFREG | 0444, fs->mount_ms);
			size_attr(st, strlen(rn->route->schema_text));
		}
		return 0;
	case NK_JOB:
	case NK_JFILE:
	case NK_JLINK:
		if ((rc = job_by_seq(fs, INO_LOW48(ino), &j)) != 0)
			return rc;
		if (!job_visible(fs, req, &j)) {
			rc = -ENOENT;
		} else if (INO_KIND(ino) == NK_JOB) {
			job_dir_attr(fs, &j, st);
		} else if (INO_KIND(ino) == NK_JLINK) {
			char idbuf[JOB_ID_STR_LEN + 1];
			attr_base(fs, st, ino, S_IFLNK | 0777, j.created_ms);
			st->st_uid = j.uid;
			st->st_gid = j.gid;
			size_attr(st, strlen("../") + strlen(j.route) + 1 +
					      strlen(job_visible_id(fs, req, &j, idbuf)));
		} else if (INO_SUB(ino) >= JF_COUNT || !jf_present(&j, INO_SUB(ino))) {
			rc = -ENOENT;
		} else {
			rc = job_file_attr(fs, &j, INO_SUB(ino), st);
		}
		job_release(&j);
		return rc;
	case NK_KEY:
		if ((rc = key_render(fs, INO_LOW56(ino), &text, &len)) != 0)
			return rc;
		free(text);
		attr_base(fs, st, ino, S_IFREG | 0444, fs->mount_ms);
		size_attr(st, len);
		return 0;
	case NK_CAS:
	case NK_CASSIG: {
		uint8_t hash[32];
		struct blob_info bi;
		if ((rc = cas_hash(fs, ino, hash)) != 0 || (rc = index_blob_get(fs->ix, hash, &bi)) != 0 ||
		    (rc = cas_visible(fs, req, hash)) != 0)
			return rc;
		attr_base(fs, st, ino, S_IFREG | 0444, bi.created_ms);
		size_attr(st, INO_KIND(ino) == NK_CAS ? bi.size : cassig_size(hash, bi.size));
		return 0;
	}
	}
	return -ENOENT;
}

/*
 * How long the kernel may keep a node's attributes (with
 * default_permissions it also checks permissions against them, so 0 costs
 * a GETATTR per path component). Blobs never change: caching their
 * attributes lets warm reads come straight from the kernel's page cache.
 * The route tree and the static files change only with the mount (stats
 * at every read). Job nodes change with their job: with change
 * notification, every change of a job file that makes an event passes
 * through the kernel (which refreshes or drops the attributes it holds),
 * so a second is safe; `position` and `error`, which change without an
 * event, are never cached; without notification nothing is.
 */
static double attr_timeout(struct fsctx *fs, uint64_t ino)
{
	switch (INO_KIND(ino)) {
	case NK_CAS:
		/* `private`: every caller's access is the daemon's to decide. */
		return fs->private_ ? 0.0 : 3600.0;
	case NK_ROOT:
	case NK_RDIR:
	case NK_NEW:
	case NK_SCHEMA:
	case NK_KEY:
		return STATIC_TIMEOUT;
	case NK_STATIC:
		return INO_LOW48(ino) == SN_STATS ? 0.0 : STATIC_TIMEOUT;
	case NK_JOB:
	case NK_JLINK:
		return fs->notifier && !fs->private_ ? JOB_ENTRY_TIMEOUT : 0.0;
	case NK_JFILE:
		if (INO_SUB(ino) == JF_OUTPUT)
			return 3600.0;
		return fs->notifier && INO_SUB(ino) != JF_POSITION && INO_SUB(ino) != JF_ERROR
			       ? JOB_ENTRY_TIMEOUT
			       : 0.0;
	default:
		return 0.0;
	}
}

static void reply_entry(fuse_req_t req, struct fsctx *fs, uint64_t ino)
{
	struct fuse_entry_param e;
	int rc;

	memset(&e, 0, sizeof(e));
	rc = fill_attr(fs, req, ino, &e.attr);
	if (rc) {
		reply_err(req, rc);
		return;
	}
	e.ino = ino;
	e.generation = fs->generation;
	e.attr_timeout = attr_timeout(fs, ino);
	e.entry_timeout = entry_timeout(fs, ino);
	fuse_reply_entry(req, &e);
}

/* ---- lookup ---- */

static const char *const static_names[SN_COUNT] = {
	NULL, "README", "models.json", "stats", "render.pub", "keys", "jobs", "cas",
};

static int lookup_job(struct fsctx *fs, fuse_req_t req, const char *route, const char *name,
		      struct job *j)
{
	uint8_t id[JOB_ID_LEN];
	int rc;

	/* jobs/ has ULIDs only: names are unique per route, not store-wide. */
	if (ulid_parse(name, id) != 0 &&
	    (!route || index_name_lookup(fs->ix, route, name, fuse_req_ctx(req)->uid, id) != 0))
		return -ENOENT;
	if ((rc = index_job_get(fs->ix, id, j)) != 0)
		return rc == STORE_E_NOTFOUND ? -ENOENT : rc;
	if ((route && strcmp(j->route, route) != 0) || !job_visible(fs, req, j)) {
		job_release(j);
		return -ENOENT;
	}
	return 0;
}

/*
 * "." and ".." of any directory: with export support the kernel asks for
 * them to turn a file handle (an NFS client's, say) back into a dentry
 * after it has forgotten the node, or after a restart.
 */
static int lookup_dots(struct fsctx *fs, fuse_req_t req, uint64_t dir, const char *name,
		       uint64_t *ino)
{
	const struct rnode *rn;
	struct stat st;
	struct job j;
	int rc;

	if (strcmp(name, ".") == 0) {
		*ino = dir;
		return fill_attr(fs, req, dir, &st);
	}
	switch (INO_KIND(dir)) {
	case NK_ROOT:
	case NK_STATIC:
		*ino = FUSE_ROOT_ID;
		return INO_KIND(dir) == NK_ROOT || INO_LOW48(dir) == SN_KEYS ||
				       INO_LOW48(dir) == SN_JOBS || INO_LOW48(dir) == SN_CAS
			       ? 0
			       : -ENOTDIR;
	case NK_RDIR:
		if (!(rn = fs_rnode_by_ino(fs, dir)))
			return -ENOENT;
		*ino = rn->parent ? rn->parent->ino : FUSE_ROOT_ID;
		return 0;
	case NK_JOB:
		if ((rc = job_by_seq(fs, INO_LOW48(dir), &j)) != 0)
			return rc;
		rn = fs_route_rnode(fs, j.route);
		rc = !job_visible(fs, req, &j) || !rn ? -ENOENT : 0;
		if (rn)
			*ino = rn->ino;
		job_release(&j);
		return rc;
	default:
		return -ENOTDIR;
	}
}

static int lookup_ino(struct fsctx *fs, fuse_req_t req, uint64_t parent, const char *name,
		      uint64_t *ino)
{
	const struct rnode *pr = NULL;
	struct job j;
	int rc;

	if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return lookup_dots(fs, req, parent, name, ino);
	switch (INO_KIND(parent)) {
	case NK_ROOT:
		for (int n = 1; n < SN_COUNT; n++)
			if (strcmp(name, static_names[n]) == 0) {
				*ino = INO(NK_STATIC, 0, n);
				return 0;
			}
		break;
	case NK_RDIR:
		if (!(pr = fs_rnode_by_ino(fs, parent)))
			return -ENOENT;
		if (pr->depth == 4) {
			uint64_t h = INO_LOW48(pr->ino);
			if (strcmp(name, "new") == 0) {
				*ino = INO(NK_NEW, 0, h);
				return 0;
			}
			if (strcmp(name, "schema.json") == 0) {
				*ino = INO(NK_SCHEMA, 0, h);
				return 0;
			}
			if ((rc = lookup_job(fs, req, pr->path, name, &j)) != 0)
				return rc;
			*ino = INO(NK_JOB, 0, j.seq);
			job_release(&j);
			return 0;
		}
		break;
	case NK_STATIC:
		if (INO_LOW48(parent) == SN_JOBS) {
			if ((rc = lookup_job(fs, req, NULL, name, &j)) != 0)
				return rc;
			*ino = INO(NK_JLINK, 0, j.seq);
			job_release(&j);
			return 0;
		}
		if (INO_LOW48(parent) == SN_KEYS) {
			uint64_t k;
			if (key_file_id(name, &k) != 0)
				return -ENOENT;
			*ino = INO(NK_KEY, 0, 0) | (k & 0xffffffffffffffull);
			return key_render(fs, INO_LOW56(*ino), NULL, NULL);
		}
		if (INO_LOW48(parent) == SN_CAS) {
			uint8_t hash[32];
			size_t nl = strlen(name);
			bool sig = nl == 64 + 8 && strcmp(name + 64, ".minisig") == 0;
			char hex[65];
			if ((nl != 64 && !sig) || strspn(name, "0123456789abcdef") < 64)
				return -ENOENT;
			memcpy(hex, name, 64);
			hex[64] = '\0';
			if (b3_from_hex(hex, hash) != 0)
				return -ENOENT;
			struct blob_info bi;
			if ((rc = index_blob_get(fs->ix, hash, &bi)) != 0 ||
			    (rc = cas_visible(fs, req, hash)) != 0)
				return rc;
			*ino = INO(sig ? NK_CASSIG : NK_CAS, 0, 0) | cas_low(hash);
			return 0;
		}
		break;
	case NK_JOB:
		if ((rc = job_by_seq(fs, INO_LOW48(parent), &j)) != 0)
			return rc;
		rc = -ENOENT;
		if (job_visible(fs, req, &j))
			for (int f = 0; f < JF_COUNT; f++) {
				char buf[96];
				if (jf_present(&j, f) && strcmp(jf_name(&j, f, buf, sizeof(buf)), name) == 0) {
					*ino = INO(NK_JFILE, f, j.seq);
					rc = 0;
					break;
				}
			}
		job_release(&j);
		return rc;
	default:
		return -ENOTDIR;
	}
	/* Route tree children. */
	for (size_t i = 0; i < fs->nrnodes; i++) {
		const struct rnode *rn = &fs->rnodes[i];
		if (rn->parent == pr && strcmp(rn->name, name) == 0 &&
		    (pr || INO_KIND(parent) == NK_ROOT)) {
			*ino = rn->ino;
			return 0;
		}
	}
	return -ENOENT;
}

/*
 * The notifier's own lookup of the name it is about to create or remove
 * (notify.c): before a create the name is not there yet; before a removal
 * it is still there, as the node it was.
 */
static void notifier_lookup(fuse_req_t req, struct fsctx *fs, const struct notify_op *op)
{
	struct fuse_entry_param e;

	if (op->kind == NOP_MKDIR || op->kind == NOP_SYMLINK || op->kind == NOP_CREATE) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	attr_base(fs, &e.attr, op->ino,
		  op->kind == NOP_RMDIR ? S_IFDIR | (fs->private_ ? 0700 : 0755) : S_IFLNK | 0777,
		  now_ms());
	e.attr.st_uid = op->uid;
	e.attr.st_gid = op->gid;
	e.ino = op->ino;
	e.generation = fs->generation;
	fuse_reply_entry(req, &e);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fsctx *fs = ctx(req);
	struct notify_op op;
	uint64_t ino;
	int rc;

	if (notify_op_match(fs, req, parent, name, &op)) {
		notifier_lookup(req, fs, &op);
		return;
	}
	rc = lookup_ino(fs, req, parent, name, &ino);
	if (rc)
		reply_err(req, rc);
	else
		reply_entry(req, fs, ino);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fsctx *fs = ctx(req);
	struct stat st;
	int rc = fill_attr(fs, req, ino, &st);

	(void)fi;
	if (rc)
		reply_err(req, rc);
	else
		fuse_reply_attr(req, &st, attr_timeout(fs, ino));
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	int times = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
		    FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME;

	/* `echo > new` truncates first: nothing to truncate. Time updates are
	 * accepted and ignored (times are the job's own). */
	if ((to_set & FUSE_SET_ATTR_SIZE) && INO_KIND(ino) == NK_NEW && attr->st_size == 0)
		to_set &= ~FUSE_SET_ATTR_SIZE;
	if (to_set & ~times) {
		fuse_reply_err(req, EPERM);
		return;
	}
	op_getattr(req, ino, fi);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
	struct fsctx *fs = ctx(req);
	char target[ROUTE_PATH_MAX + 128], idbuf[JOB_ID_STR_LEN + 1];
	struct job j;
	int rc;

	if (INO_KIND(ino) != NK_JLINK) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if ((rc = job_by_seq(fs, INO_LOW48(ino), &j)) != 0) {
		reply_err(req, rc);
		return;
	}
	snprintf(target, sizeof(target), "../%s/%s", j.route, job_visible_id(fs, req, &j, idbuf));
	job_release(&j);
	fuse_reply_readlink(req, target);
}

/* ---- directories ---- */

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dirh *d = calloc(1, sizeof(*d));

	(void)ino;
	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	fi->fh = (uintptr_t)d;
	fuse_reply_open(req, fi);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	free((struct dirh *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

struct dirbuf {
	fuse_req_t req;
	struct fsctx *fs;
	char *p;
	size_t size, used;
	bool plus;
	bool full;
};

/* Add one entry whose successor is at next_off; false when the buffer is
 * full (the entry was not added). */
static bool dir_add(struct dirbuf *b, const char *name, uint64_t ino, mode_t type,
		    off_t next_off)
{
	size_t n;

	if (b->plus) {
		struct fuse_entry_param e;
		memset(&e, 0, sizeof(e));
		if (strcmp(name, ".") != 0 && strcmp(name, "..") != 0 &&
		    fill_attr(b->fs, b->req, ino, &e.attr) == 0) {
			e.ino = ino;
			e.generation = b->fs->generation;
			e.entry_timeout = entry_timeout(b->fs, ino);
			e.attr_timeout = attr_timeout(b->fs, ino);
		} else {
			e.attr.st_ino = ino;
			e.attr.st_mode = type;
		}
		n = fuse_add_direntry_plus(b->req, b->p + b->used, b->size - b->used, name, &e,
					   next_off);
	} else {
		struct stat st = {.st_ino = ino, .st_mode = type};
		n = fuse_add_direntry(b->req, b->p + b->used, b->size - b->used, name, &st,
				      next_off);
	}
	if (n > b->size - b->used) {
		b->full = true;
		return false;
	}
	b->used += n;
	return true;
}

typedef int (*list_fn)(struct index *, const void *key, const uint8_t *after, size_t max,
		       uint8_t (*ids)[JOB_ID_LEN], size_t *n);

static int list_route(struct index *ix, const void *key, const uint8_t *after, size_t max,
		      uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	return index_list_by_route(ix, key, after, max, ids, n);
}

static int list_all(struct index *ix, const void *key, const uint8_t *after, size_t max,
		    uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	(void)key;
	return index_list_all(ix, after, max, ids, n);
}

/*
 * Job entries, in id order, each with the offset base + 1 + its seq: an
 * offset names the job listed last, not a position, so it stays valid
 * across reopen, restart and deletions (NFS clients resume listings with
 * it). The handle's cursor makes a sequential listing one pass; another
 * offset resumes after that job, or, if it is gone, at the first job
 * created after it (seq order is id order).
 */
static int dir_jobs(struct dirbuf *b, struct dirh *d, list_fn list, const void *key,
		    off_t base, off_t off, bool links)
{
	uint8_t ids[128][JOB_ID_LEN];
	uint8_t after[JOB_ID_LEN];
	bool have_after = false;
	int rc;

	if (off > base) {
		uint64_t seq = (uint64_t)(off - base - 1);
		if (d->have_last && d->last_off == off) {
			memcpy(after, d->last, JOB_ID_LEN);
		} else if (index_job_by_seq(b->fs->ix, seq, after) != 0) {
			seq++;
			rc = index_job_seq_at_or_after(b->fs->ix, &seq, after);
			if (rc == STORE_E_NOTFOUND)
				return 0;
			if (rc)
				return rc;
			/* just before it, so that the listing includes it */
			for (int i = JOB_ID_LEN - 1; i >= 0 && after[i]-- == 0; i--)
				;
		}
		have_after = true;
	}
	for (;;) {
		size_t n = 0;

		if ((rc = list(b->fs->ix, key, have_after ? after : NULL, 128, ids, &n)) != 0)
			return rc;
		if (n == 0)
			return 0;
		for (size_t i = 0; i < n; i++) {
			struct job j;
			char idbuf[JOB_ID_STR_LEN + 1];

			memcpy(after, ids[i], JOB_ID_LEN);
			have_after = true;
			if (index_job_get(b->fs->ix, ids[i], &j) != 0)
				continue;
			if (!job_visible(b->fs, b->req, &j)) {
				job_release(&j);
				continue;
			}
			if (links)
				ulid_format(j.id, idbuf);
			off_t next = base + 1 + (off_t)j.seq;
			bool ok = dir_add(b, links ? idbuf : job_visible_id(b->fs, b->req, &j, idbuf),
					  links ? INO(NK_JLINK, 0, j.seq) : INO(NK_JOB, 0, j.seq),
					  links ? S_IFLNK : S_IFDIR, next);
			job_release(&j);
			if (!ok)
				return 0;
			memcpy(d->last, ids[i], JOB_ID_LEN);
			d->have_last = true;
			d->last_off = next;
		}
	}
}

/*
 * cas/: each blob and its .minisig, in hash order. Like job entries, an
 * offset names the entry listed last: base + 1 + (the blob's first 7 hash
 * bytes << 1 | whether it was the .minisig), so listings resume after
 * reopen and collection (a collected blob's successors follow it).
 */
static int dir_cas(struct dirbuf *b, off_t base, off_t off)
{
	uint8_t hashes[64][32], after[32];
	bool have = false, sig_next = false;
	int rc;

	/* `private`: blobs are listed to root only (cas_visible). */
	if (b->fs->private_ && fuse_req_ctx(b->req)->uid != 0)
		return 0;

	if (off > base) {
		uint64_t c = (uint64_t)(off - base - 1), low = c >> 1;
		uint8_t prefix[7];

		for (int i = 0; i < 7; i++)
			prefix[i] = (uint8_t)(low >> (8 * (6 - i)));
		rc = index_blob_find_prefix(b->fs->ix, prefix, 7, after);
		if (rc == 0) {
			sig_next = !(c & 1); /* its .minisig has not been listed yet */
		} else if (rc == STORE_E_NOTFOUND) {
			memcpy(after, prefix, 7); /* after every hash with that prefix */
			memset(after + 7, 0xff, sizeof(after) - 7);
		} else {
			return rc;
		}
		have = true;
	}
	for (;;) {
		size_t n = 0;
		char hex[80];

		if (sig_next) {
			uint64_t low = cas_low(after);
			b3_to_hex(after, hex);
			snprintf(hex + 64, sizeof(hex) - 64, ".minisig");
			if (!dir_add(b, hex, INO(NK_CASSIG, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1 | 1)))
				return 0;
			sig_next = false;
		}
		if ((rc = index_blob_list(b->fs->ix, have ? after : NULL, 64, hashes, &n)) != 0)
			return rc;
		if (n == 0)
			return 0;
		for (size_t i = 0; i < n; i++) {
			uint64_t low = cas_low(hashes[i]);
			memcpy(after, hashes[i], 32);
			have = true;
			b3_to_hex(hashes[i], hex);
			if (!dir_add(b, hex, INO(NK_CAS, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1)))
				return 0;
			snprintf(hex + 64, sizeof(hex) - 64, ".minisig");
			if (!dir_add(b, hex, INO(NK_CASSIG, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1 | 1)))
				return 0;
		}
	}
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi, bool plus)
{
	struct fsctx *fs = ctx(req);
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	struct dirbuf b = {req, fs, NULL, size, 0, plus, false};
	const struct rnode *self = NULL;
	const char *names[64];
	char outname[2][96]; /* output.<ext>, output.<ext>.minisig */
	uint64_t inos[64];
	mode_t types[64];
	int nfixed = 0, rc = 0;

	b.p = malloc(size);
	if (!b.p) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	names[nfixed] = ".";
	inos[nfixed] = ino;
	types[nfixed++] = S_IFDIR;
	names[nfixed] = "..";
	inos[nfixed] = FUSE_ROOT_ID;
	types[nfixed++] = S_IFDIR;
	switch (INO_KIND(ino)) {
	case NK_ROOT:
		for (int n = 1; n < SN_COUNT; n++) {
			names[nfixed] = static_names[n];
			inos[nfixed] = INO(NK_STATIC, 0, n);
			types[nfixed++] = n >= SN_KEYS ? S_IFDIR : S_IFREG;
		}
		break;
	case NK_RDIR:
		if (!(self = fs_rnode_by_ino(fs, ino))) {
			rc = -ENOENT;
			goto out;
		}
		if (self->parent)
			inos[1] = self->parent->ino;
		if (self->depth == 4) {
			names[nfixed] = "new";
			inos[nfixed] = INO(NK_NEW, 0, INO_LOW48(ino));
			types[nfixed++] = S_IFREG;
			names[nfixed] = "schema.json";
			inos[nfixed] = INO(NK_SCHEMA, 0, INO_LOW48(ino));
			types[nfixed++] = S_IFREG;
		}
		break;
	case NK_JOB: {
		struct job j;
		if ((rc = job_by_seq(fs, INO_LOW48(ino), &j)) != 0)
			goto out;
		const struct rnode *rn = fs_route_rnode(fs, j.route);
		if (rn)
			inos[1] = rn->ino;
		for (int f = 0; f < JF_COUNT; f++) {
			if (!jf_present(&j, f))
				continue;
			names[nfixed] = f == JF_OUTPUT || f == JF_OUTPUTSIG
						? jf_name(&j, f, outname[f == JF_OUTPUTSIG], 96)
						: jf_name(&j, f, NULL, 0);
			inos[nfixed] = INO(NK_JFILE, f, j.seq);
			types[nfixed++] = S_IFREG;
		}
		job_release(&j);
		break;
	}
	case NK_STATIC:
		break;
	default:
		rc = -ENOTDIR;
		goto out;
	}
	if (INO_KIND(ino) == NK_ROOT || (self && self->depth < 4)) {
		for (size_t i = 0; i < fs->nrnodes && nfixed < 64; i++)
			if (fs->rnodes[i].parent == self) {
				names[nfixed] = fs->rnodes[i].name;
				inos[nfixed] = fs->rnodes[i].ino;
				types[nfixed++] = S_IFDIR;
			}
	}
	for (off_t i = off; i < nfixed; i++)
		if (!dir_add(&b, names[i], inos[i], types[i], i + 1))
			goto done;
	if (self && self->depth == 4) {
		rc = dir_jobs(&b, d, list_route, self->path, nfixed, off, false);
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_JOBS) {
		rc = dir_jobs(&b, d, list_all, NULL, nfixed, off, true);
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_KEYS) {
		char dir[4200];
		DIR *dd;
		struct dirent *de;
		off_t ord = nfixed;
		snprintf(dir, sizeof(dir), "%s/keys", store_dir(fs->st));
		if ((dd = opendir(dir)) != NULL) {
			while ((de = readdir(dd)) != NULL) {
				uint64_t k;
				if (key_file_id(de->d_name, &k) != 0)
					continue;
				if (ord++ < off)
					continue;
				if (!dir_add(&b, de->d_name, INO(NK_KEY, 0, 0) | (k & 0xffffffffffffffull),
					     S_IFREG, ord))
					break;
			}
			closedir(dd);
		}
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_CAS) {
		rc = dir_cas(&b, nfixed, off);
	}
done:
	if (rc == 0) {
		fuse_reply_buf(req, b.p, b.used);
		free(b.p);
		return;
	}
out:
	free(b.p);
	reply_err(req, rc);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, false);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			   struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, true);
}

/* ---- files ---- */

static void fh_free(struct fh *h)
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
static int fh_join_backing(struct fsctx *fs, struct fh *h, uint64_t ino)
{
	int rc = pt_join(fs->pt, ino, &h->pt_id);

	if (rc == 0) {
		h->pt = fs->pt;
		h->pt_ino = ino;
	}
	return rc;
}

static int open_blob_for_writing(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct fh *h)
{
	if (!notify_is_helper(fs, req))
		return -EPERM;
	return fh_join_backing(fs, h, ino);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
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
	    !(INO_KIND(ino) == NK_JFILE && INO_SUB(ino) == JF_CTL)) {
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
		rc = static_render(fs, (enum static_node)INO_LOW48(ino), &h->buf, &h->len);
		break;
	case NK_KEY:
		rc = key_render(fs, INO_LOW56(ino), &h->buf, &h->len);
		break;
	case NK_CAS:
	case NK_CASSIG: {
		uint8_t hash[32];
		struct blob_info bi;
		if ((rc = cas_hash(fs, ino, hash)) != 0 || (rc = index_blob_get(fs->ix, hash, &bi)) != 0 ||
		    (rc = cas_visible(fs, req, hash)) != 0)
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
	fuse_reply_err(req, EPERM);
}

static void op_flush_locked(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	fuse_reply_err(req, h->kind == FH_NEW ? -new_file_flush(h->nf) : 0);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	pthread_rwlock_rdlock(&fh_lock);
	op_read_locked(req, ino, size, off, fi);
	pthread_rwlock_unlock(&fh_lock);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	pthread_rwlock_rdlock(&fh_lock);
	op_write_locked(req, ino, data, size, off, fi);
	pthread_rwlock_unlock(&fh_lock);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	pthread_rwlock_rdlock(&fh_lock);
	op_flush_locked(req, ino, fi);
	pthread_rwlock_unlock(&fh_lock);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	pthread_rwlock_wrlock(&fh_lock);
	fh_free((struct fh *)(uintptr_t)fi->fh);
	pthread_rwlock_unlock(&fh_lock);
	fuse_reply_err(req, 0);
}

/* ---- removal ---- */

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fsctx *fs = ctx(req);
	struct notify_op op;
	struct job j;
	int rc;

	if (notify_op_match(fs, req, parent, name, &op) && op.kind == NOP_UNLINK) {
		fuse_reply_err(req, 0); /* the job is gone already */
		return;
	}
	if (INO_KIND(parent) != NK_JOB) {
		fuse_reply_err(req, EPERM);
		return;
	}
	if ((rc = job_by_seq(fs, INO_LOW48(parent), &j)) != 0) {
		reply_err(req, rc);
		return;
	}
	rc = -ENOENT;
	if (!job_visible(fs, req, &j)) {
		rc = -ENOENT;
	} else if (fuse_req_ctx(req)->uid != 0 && fuse_req_ctx(req)->uid != j.uid) {
		rc = -EACCES;
	} else {
		for (int f = 0; f < JF_COUNT; f++) {
			char buf[96];
			if (!jf_present(&j, f) || strcmp(jf_name(&j, f, buf, sizeof(buf)), name) != 0)
				continue;
			/* Unlinking the output releases its blob. */
			rc = store_job_hide(fs->st, j.id, (uint16_t)(1u << f), f == JF_OUTPUT);
			break;
		}
	}
	job_release(&j);
	reply_err(req, rc);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fsctx *fs = ctx(req);
	const struct rnode *rn = fs_rnode_by_ino(fs, parent);
	struct notify_op op;
	struct job j;
	int rc;

	if (notify_op_match(fs, req, parent, name, &op) && op.kind == NOP_RMDIR) {
		fuse_reply_err(req, 0); /* the job is gone already */
		return;
	}
	if (!rn || rn->depth != 4) {
		fuse_reply_err(req, EPERM);
		return;
	}
	if ((rc = lookup_job(fs, req, rn->path, name, &j)) != 0) {
		reply_err(req, rc);
		return;
	}
	if (fuse_req_ctx(req)->uid != 0 && fuse_req_ctx(req)->uid != j.uid)
		rc = -EPERM;
	else
		rc = engine_delete(fs->eng, j.id, true);
	job_release(&j);
	reply_err(req, rc);
}

static void op_eperm_entry(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	(void)parent;
	(void)name;
	(void)mode;
	fuse_reply_err(req, EPERM);
}

/* The notifier's mkdir and symlink: the job exists already. */
static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct fsctx *fs = ctx(req);
	struct notify_op op;

	if (notify_op_match(fs, req, parent, name, &op) && op.kind == NOP_MKDIR)
		reply_entry(req, fs, op.ino);
	else
		op_eperm_entry(req, parent, name, mode);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		     dev_t rdev)
{
	(void)rdev;
	op_eperm_entry(req, parent, name, mode);
}

/* The notifier's create of output.<ext>: the file exists already. */
static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	struct fsctx *fs = ctx(req);
	struct fuse_entry_param e;
	struct notify_op op;
	struct fh *h;
	int rc;

	if (!notify_op_match(fs, req, parent, name, &op) || op.kind != NOP_CREATE) {
		op_eperm_entry(req, parent, name, mode);
		return;
	}
	memset(&e, 0, sizeof(e));
	if ((rc = fill_attr(fs, req, op.ino, &e.attr)) != 0) {
		reply_err(req, rc);
		return;
	}
	if (!(h = calloc(1, sizeof(*h)))) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	h->kind = FH_BUF;
	h->fd = -1;
	e.ino = op.ino;
	e.generation = fs->generation;
	e.attr_timeout = attr_timeout(fs, op.ino);
	e.entry_timeout = entry_timeout(fs, op.ino);
	fi->noflush = 1;
	fi->fh = (uintptr_t)h;
	fi->direct_io = 1;
	/* A reader may have opened the output already (it is listed from its
	 * commit), or be opening it now: this open must go the same way as
	 * theirs (open_blob_for_writing). */
	if ((rc = fh_join_backing(fs, h, op.ino)) != 0) {
		fh_free(h);
		reply_err(req, rc);
		return;
	}
	if ((h->pt_id > 0 ? pt_reply_create(req, &e, fi, h->pt_id) : fuse_reply_create(req, &e, fi)) != 0)
		fh_free(h);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	struct fsctx *fs = ctx(req);
	struct notify_op op;

	(void)link;
	if (notify_op_match(fs, req, parent, name, &op) && op.kind == NOP_SYMLINK)
		reply_entry(req, fs, op.ino);
	else
		op_eperm_entry(req, parent, name, 0);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char *name)
{
	(void)ino;
	op_eperm_entry(req, parent, name, 0);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t np,
		      const char *nn, unsigned int flags)
{
	(void)np;
	(void)nn;
	(void)flags;
	op_eperm_entry(req, parent, name, 0);
}

/* ---- xattrs, statfs ---- */

/*
 * No file here has extended attributes. ENOSYS tells the kernel so once
 * for the whole mount: it then answers every getxattr itself (EOPNOTSUPP)
 * instead of asking for each file, which `ls -l` does three times a file
 * (SELinux label, access and default ACLs): most of its time on a large
 * route before. (SPEC §1 asked for ENODATA per attribute.)
 */
static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	(void)ino;
	(void)name;
	(void)size;
	fuse_reply_err(req, ENOSYS);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	(void)ino;
	if (size == 0)
		fuse_reply_xattr(req, 0);
	else
		fuse_reply_buf(req, NULL, 0);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
			size_t size, int flags)
{
	(void)ino;
	(void)name;
	(void)value;
	(void)size;
	(void)flags;
	fuse_reply_err(req, ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	(void)ino;
	(void)name;
	fuse_reply_err(req, ENODATA);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct fsctx *fs = ctx(req);
	struct statvfs sv;

	(void)ino;
	if (statvfs(store_dir(fs->st), &sv) != 0) {
		fuse_reply_err(req, errno);
		return;
	}
	sv.f_namemax = 255;
	fuse_reply_statfs(req, &sv);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	if (conn->capable & FUSE_CAP_SPLICE_WRITE)
		conn->want |= FUSE_CAP_SPLICE_WRITE;
	if (conn->capable & FUSE_CAP_SPLICE_MOVE)
		conn->want |= FUSE_CAP_SPLICE_MOVE;
	if (conn->capable & FUSE_CAP_EXPORT_SUPPORT)
		conn->want |= FUSE_CAP_EXPORT_SUPPORT;
	if (conn->capable & FUSE_CAP_READDIRPLUS)
		conn->want |= FUSE_CAP_READDIRPLUS;
	conn->want &= ~(unsigned)FUSE_CAP_READDIRPLUS_AUTO;
	/* `new` takes 1 MiB writes where the kernel allows. */
	conn->max_write = 1 << 20;
	conn->max_readahead = 1 << 20;
	/* A RELEASE is a background request: with the kernel's 12 at a time
	 * they queue behind every reader's next open, each holding one of the
	 * daemon's descriptors, and a few hundred readers opening and closing
	 * in a loop exhaust them in seconds (test_hardening.py). The kernel
	 * caps this for unprivileged mounts (max_user_bgreq). */
	conn->max_background = 1024;
	conn->congestion_threshold = 768;
}

const struct fuse_lowlevel_ops fs_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.readlink = op_readlink,
	.mknod = op_mknod,
	.mkdir = op_mkdir,
	.unlink = op_unlink,
	.rmdir = op_rmdir,
	.symlink = op_symlink,
	.rename = op_rename,
	.link = op_link,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.readdirplus = op_readdirplus,
	.releasedir = op_releasedir,
	.statfs = op_statfs,
	.setxattr = op_setxattr,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.removexattr = op_removexattr,
	.create = op_create,
};
