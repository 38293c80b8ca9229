/*
 * ops.c - the FUSE low-level operations table, and the handlers that
 * refuse or remove: unlink, rmdir, create (of `new` only), mkdir, mknod,
 * links and renames (refused), xattrs, statfs, init.
 *
 * Handlers live by what they own: nodes.c (attributes, lookup), dirs.c
 * (listings), files.c (open files). Threads and locks: ops_i.h.
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
		/* Outputs after the first: hidden one by one (their blobs go
		 * with the job). */
		if (rc == -ENOENT && strncmp(name, "output.", 7) == 0 && name[7] >= '1' &&
		    name[7] <= '9') {
			char *end, buf[96];
			unsigned long n = strtoul(name + 7, &end, 10);
			struct jf_extra x;
			if (*end == '.' && n <= INDEX_EXTRAS_MAX &&
			    jf_extra_get(fs, &j, (unsigned)n, &x) == 0)
				for (int sig = 0; sig < 2 && rc == -ENOENT; sig++) {
					x.sig = sig;
					if (jf_extra_shown(&x) &&
					    strcmp(jf_extra_name(&x, buf, sizeof(buf)), name) == 0)
						rc = index_job_hide_extra(fs->ix, j.id, (unsigned)n,
									  sig ? 2 : 1);
				}
		}
	}
	job_release(&j);
	reply_err(req, rc);
}

/* A deletion's answer that came later (its run had to let go first): on
 * the engine's deleting thread. */
static void rmdir_answered(void *arg, int rc)
{
	reply_err(arg, rc);
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
		rc = engine_delete(fs->eng, j.id, true, rmdir_answered, req);
	job_release(&j);
	if (rc != ENGINE_LATER) /* else answered once the run lets go */
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
