/*
 * nodes.c - node ids and what the kernel asks of a node: attributes
 * (exact sizes, link counts from the index's counts, times from the job
 * record), how long it may cache them and the names, and lookup.
 *
 * DESIGN
 * Handlers are thin: decode the node id (fs_i.h), ask the index, engine or
 * content.c, reply once. Nothing here keeps per-inode state: a node id is
 * resolved from the index each time (jobs by their persistent sequence
 * number), so memory does not grow with jobs and ids survive restarts.
 *
 * Threads and locks: ops_i.h.
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

#include "ops_i.h"


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

double entry_timeout(struct fsctx *fs, uint64_t ino)
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
		/* Outputs are created by the notifier when committed: never
		 * cached before (an extra output's name, likewise). */
		return fs->notifier && INO_SUB(ino) != JF_OUTPUT && INO_SUB(ino) < JF_EXTRA0
			       ? JOB_ENTRY_TIMEOUT
			       : 0.0;
	default:
		return 0.0;
	}
}


struct fsctx *ctx(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

void reply_err(fuse_req_t req, int rc)
{
	fuse_reply_err(req, fs_errno(rc));
}

static bool is_root_caller(fuse_req_t req)
{
	return fuse_req_ctx(req)->uid == 0;
}

bool job_visible(struct fsctx *fs, fuse_req_t req, const struct job *j)
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
const char *job_visible_id(struct fsctx *fs, fuse_req_t req, const struct job *j,
				  char buf[JOB_ID_STR_LEN + 1])
{
	return job_dir_name(fs, fuse_req_ctx(req)->uid, j, buf);
}

int job_by_seq(struct fsctx *fs, uint64_t seq, struct job *j)
{
	uint8_t id[JOB_ID_LEN];
	int rc = index_job_by_seq(fs->ix, seq, id);

	return rc ? rc : index_job_get(fs->ix, id, j);
}

/* cas/ node ids carry the first 7 bytes of the blob hash (fs_i.h). */
uint64_t cas_low(const uint8_t hash[32])
{
	uint64_t low = 0;

	for (int i = 0; i < 7; i++)
		low = low << 8 | hash[i];
	return low;
}

int cas_hash(struct fsctx *fs, uint64_t ino, uint8_t hash[32])
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
int cas_node(struct fsctx *fs, fuse_req_t req, uint64_t ino, uint8_t hash[32],
	     struct blob_info *bi)
{
	int rc;

	if ((rc = cas_hash(fs, ino, hash)) != 0 || (rc = index_blob_get(fs->ix, hash, bi)) != 0)
		return rc;
	return cas_visible(fs, req, hash);
}

int cas_visible(struct fsctx *fs, fuse_req_t req, const uint8_t hash[32])
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

int fill_attr(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct stat *st)
{
	const struct rnode *rn;
	struct job j;
	char *text;
	size_t len;
	int rc;

	switch (INO_KIND(ino)) {
	case NK_ROOT:
		attr_base(fs, st, ino, S_IFDIR | 0755, fs->mount_ms);
		st->st_nlink = 2 + 4 + fs->top_dirs; /* keys, jobs, cas, ledger */
		return 0;
	case NK_STATIC: {
		unsigned n = (unsigned)INO_LOW48(ino);
		if (n == SN_KEYS || n == SN_JOBS || n == SN_CAS || n == SN_LEDGER) {
			attr_base(fs, st, ino, S_IFDIR | (n == SN_CAS ? 0711 : 0755), fs->mount_ms);
			return 0;
		}
		if (n == 0 || n >= SN_COUNT)
			return -ENOENT;
		if (n == SN_HOOKSECRET) {
			/* The caller's own, readable by the caller alone; its
			 * size is known without making it. */
			attr_base(fs, st, ino, S_IFREG | 0400, fs->mount_ms);
			st->st_uid = fuse_req_ctx(req)->uid;
			st->st_gid = fuse_req_ctx(req)->gid;
			size_attr(st, ENGINE_HOOK_SECRET_TEXT_LEN);
			return 0;
		}
		if (n == SN_USAGE) {
			/* The caller's: its size is its content's for the caller. */
			if ((rc = static_render(fs, SN_USAGE, fuse_req_ctx(req)->uid, &text,
						&len)) != 0)
				return rc;
			free(text);
			attr_base(fs, st, ino, S_IFREG | 0444, now_ms());
			size_attr(st, len);
			return 0;
		}
		if ((rc = static_render(fs, (enum static_node)n, 0, &text, &len)) != 0)
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
		} else if (INO_SUB(ino) >= JF_COUNT) {
			struct jf_extra x;
			if ((rc = jf_extra_at(fs, &j, INO_SUB(ino), &x)) == 0) {
				attr_base(fs, st, ino, S_IFREG | (fs->private_ ? 0600 : 0644),
					  j.completed_ms);
				st->st_uid = j.uid;
				st->st_gid = j.gid;
				size_attr(st, jf_extra_size(&j, &x));
			}
		} else if (!jf_present(&j, INO_SUB(ino))) {
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
	case NK_LEDGER: {
		struct attestation a;
		if (INO_SUB(ino) == LEDGER_ATTEST) {
			/* Written by the store's owner (or root) to attest now. */
			attr_base(fs, st, ino, S_IFREG | 0200, fs->mount_ms);
			return 0;
		}
		if (INO_SUB(ino) > LEDGER_SIG)
			return -ENOENT;
		if ((rc = ledger_at(fs, INO_LOW48(ino), &a)) != 0)
			return rc;
		attr_base(fs, st, ino, S_IFREG | 0444, a.end_ms);
		size_attr(st, INO_SUB(ino) == LEDGER_JSON ? a.size : strlen(a.sig));
		return 0;
	}
	case NK_CAS:
	case NK_CASSIG: {
		uint8_t hash[32];
		struct blob_info bi;
		if ((rc = cas_node(fs, req, ino, hash, &bi)) != 0)
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
double attr_timeout(struct fsctx *fs, uint64_t ino)
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
		/* stats changes at every read; webhook.secret and usage are
		 * each caller's. */
		return INO_LOW48(ino) == SN_STATS || INO_LOW48(ino) == SN_HOOKSECRET ||
				       INO_LOW48(ino) == SN_USAGE
			       ? 0.0
			       : STATIC_TIMEOUT;
	case NK_JOB:
	case NK_JLINK:
		return fs->notifier && !fs->private_ ? JOB_ENTRY_TIMEOUT : 0.0;
	case NK_JFILE:
		if (INO_SUB(ino) == JF_OUTPUT ||
		    (INO_SUB(ino) >= JF_EXTRA0 && (INO_SUB(ino) - JF_EXTRA0) % 2 == 0))
			return 3600.0;
		return fs->notifier && INO_SUB(ino) != JF_POSITION && INO_SUB(ino) != JF_ERROR &&
				       INO_SUB(ino) != JF_WEBHOOKS
			       ? JOB_ENTRY_TIMEOUT
			       : 0.0;
	default:
		return 0.0;
	}
}

void reply_entry(fuse_req_t req, struct fsctx *fs, uint64_t ino)
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

const char *const static_names[SN_COUNT] = {
	NULL, "README", "models.json", "stats", "render.pub", "keys", "jobs", "cas",
	"webhook.pub", "webhook.secret", "usage", "ledger",
};

int lookup_job(struct fsctx *fs, fuse_req_t req, const char *route, const char *name,
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
/* cas/<hex> or cas/<hex>.minisig: 0 with the hash and which, else -ENOENT. */
static int cas_name(const char *name, uint8_t hash[32], bool *sig)
{
	size_t nl = strlen(name);
	char hex[65];

	*sig = nl == 64 + 8 && strcmp(name + 64, ".minisig") == 0;
	if ((nl != 64 && !*sig) || strspn(name, "0123456789abcdef") < 64)
		return -ENOENT;
	memcpy(hex, name, 64);
	hex[64] = '\0';
	return b3_from_hex(hex, hash) == 0 ? 0 : -ENOENT;
}

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
				       INO_LOW48(dir) == SN_JOBS || INO_LOW48(dir) == SN_CAS ||
				       INO_LOW48(dir) == SN_LEDGER
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
		if (INO_LOW48(parent) == SN_LEDGER)
			return ledger_lookup(fs, name, ino);
		if (INO_LOW48(parent) == SN_CAS) {
			uint8_t hash[32];
			bool sig;
			if (cas_name(name, hash, &sig) != 0)
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
		/* output.<n>.<ext>[.minisig] */
		if (rc == -ENOENT && job_visible(fs, req, &j) && strncmp(name, "output.", 7) == 0 &&
		    name[7] >= '1' && name[7] <= '9') {
			char *end, buf[96];
			unsigned long n = strtoul(name + 7, &end, 10);
			struct jf_extra x;
			if (*end == '.' && n <= INDEX_EXTRAS_MAX &&
			    jf_extra_get(fs, &j, (unsigned)n, &x) == 0)
				for (int sig = 0; sig < 2; sig++) {
					x.sig = sig;
					if (jf_extra_shown(&x) &&
					    strcmp(jf_extra_name(&x, buf, sizeof(buf)), name) == 0) {
						*ino = INO(NK_JFILE, JF_EXTRA0 + 2 * (n - 1) + sig,
							   j.seq);
						rc = 0;
					}
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

/* A lookup of cas/<hex> waiting for the blob to come from the bucket. */
struct lookup_wait {
	struct fsctx *fs;
	fuse_req_t req;
	fuse_ino_t parent;
	char name[80];
};

static void lookup_fetched(void *arg, int rc)
{
	struct lookup_wait *w = arg;
	uint64_t ino;

	if (rc == 0)
		rc = lookup_ino(w->fs, w->req, w->parent, w->name, &ino);
	if (rc)
		reply_err(w->req, rc);
	else
		reply_entry(w->req, w->fs, ino);
	free(w);
}

/*
 * With replica=: a cas/<hex> (or .minisig) this store does not know is
 * fetched from the bucket, verified, then looked up again; true when the
 * request is answered that way (not by this thread, which goes on).
 */
static bool lookup_remote(struct fsctx *fs, fuse_req_t req, fuse_ino_t parent, const char *name)
{
	uint8_t hash[32];
	struct blob_info bi;
	struct lookup_wait *w;
	bool sig;

	/* `private`: blobs others made are root's to bring in (a user could
	 * not read them anyway: cas_visible). */
	if (!engine_replica_on(fs->eng) || (fs->private_ && fuse_req_ctx(req)->uid != 0) ||
	    INO_KIND(parent) != NK_STATIC || INO_LOW48(parent) != SN_CAS ||
	    cas_name(name, hash, &sig) != 0 || index_blob_get(fs->ix, hash, &bi) != STORE_E_NOTFOUND)
		return false;
	if (!(w = calloc(1, sizeof(*w))))
		return false;
	w->fs = fs;
	w->req = req;
	w->parent = parent;
	snprintf(w->name, sizeof(w->name), "%s", name);
	if (engine_blob_fetch(fs->eng, hash, lookup_fetched, w) != 0) {
		free(w);
		return false;
	}
	return true;
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
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
	if (rc == STORE_E_NOTFOUND && lookup_remote(fs, req, parent, name))
		return;
	if (rc)
		reply_err(req, rc);
	else
		reply_entry(req, fs, ino);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
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

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	int times = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
		    FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME;

	/* `echo > new` truncates first: nothing to truncate. Time updates are
	 * accepted and ignored (times are the job's own). */
	if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size == 0 &&
	    (INO_KIND(ino) == NK_NEW ||
	     (INO_KIND(ino) == NK_LEDGER && INO_SUB(ino) == LEDGER_ATTEST)))
		to_set &= ~FUSE_SET_ATTR_SIZE;
	if (to_set & ~times) {
		fuse_reply_err(req, EPERM);
		return;
	}
	op_getattr(req, ino, fi);
}

void op_readlink(fuse_req_t req, fuse_ino_t ino)
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

pthread_rwlock_t fh_lock = PTHREAD_RWLOCK_INITIALIZER;
