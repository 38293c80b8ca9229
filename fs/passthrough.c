/*
 * passthrough.c - outputs and cas/ blobs read by the kernel straight from
 * their blob files (FUSE passthrough, Linux 6.9 and later), with the
 * `passthrough` mount option.
 *
 * WHY
 * Without it, reads of an output fill the FUSE inode's own page cache,
 * which this kernel fills with 4 KiB pages: a warm read of a large output
 * runs at about half the speed of reading the blob file, whose ext4 page
 * cache uses large folios. With passthrough the kernel reads the blob file
 * itself, cold or warm, and the daemon sees no READ at all.
 *
 * WHAT IT COSTS
 * Reads no longer pass through the daemon, so they are no longer checked
 * group by group (store_reader_pread). A blob is verified when it is
 * opened instead: small blobs whole at every open, large ones whole at the
 * first open since the store was opened (or at their commit), and again
 * whenever the blob file changed since (inode, size, ctime). Damage on the
 * disk after that check is not seen by readers until the next full check
 * (a restart, or `renderctl fsck`). That is weaker than SPEC §5, which is
 * why the option is off by default.
 *
 * HOW
 * libfuse 3.14 knows nothing of passthrough, so the session runs through
 * our own I/O callbacks (fuse_session_custom_io): read() notes the
 * kernel's INIT request and whether it offers FUSE_PASSTHROUGH; writev()
 * adds the flag, with a stacking depth of 1, to libfuse's INIT reply. An
 * open registers the blob file with the kernel (FUSE_DEV_IOC_BACKING_OPEN,
 * which needs CAP_SYS_ADMIN) and answers with FOPEN_PASSTHROUGH and the
 * backing id. Every open file of one FUSE inode must use the same backing
 * file, so ids are counted per inode in a small table of the inodes open
 * now (bounded by open files, not by jobs); the last release closes the id.
 * When the kernel does not offer passthrough, or registering fails (not
 * root, a store on a stack too deep), blobs are served as without the
 * option, and the daemon says so once.
 *
 * CONCURRENCY
 * pt->mu guards the table (tab, n, cap) and the counters. init_unique and
 * offered are written by the thread that reads INIT, before the kernel
 * sends anything else, and read by the same thread when libfuse writes the
 * reply; init_seen, enabled and warned are atomics. Any handler thread
 * may call pt_get and pt_put.
 */
#include "fs_i.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

/* What <linux/fuse.h> of Linux 6.9+ adds to Debian 12's (6.1). */
#define K_FUSE_PASSTHROUGH2 (1u << 5) /* FUSE_PASSTHROUGH (1 << 37), in flags2 */
#define K_FOPEN_PASSTHROUGH (1u << 7)
/* fuse_init_out.max_stack_depth is unused[0] in the 6.1 header, and
 * fuse_open_out.backing_id its padding. */

struct k_backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};

#define K_FUSE_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct k_backing_map)
#define K_FUSE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

struct pt_ino {
	uint64_t ino;
	int32_t id; /* backing id, or -1: this inode's open files use the page cache */
	uint32_t opens;
};

struct passthrough {
	int devfd;
	uint64_t init_unique;
	bool offered;
	atomic_bool init_seen, enabled, warned;
	pthread_mutex_t mu;
	struct pt_ino *tab;
	size_t n, cap;
	uint64_t kernel, daemon; /* opens each way (under mu) */
};

static ssize_t pt_read(int fd, void *buf, size_t len, void *userdata)
{
	struct passthrough *pt = ((struct fsctx *)userdata)->pt;
	ssize_t n = read(fd, buf, len);
	const struct fuse_in_header *h = buf;

	if (!atomic_load_explicit(&pt->init_seen, memory_order_acquire) &&
	    n >= (ssize_t)(sizeof(*h) + sizeof(struct fuse_init_in)) && h->opcode == FUSE_INIT) {
		const struct fuse_init_in *in = (const void *)(h + 1);
		pt->init_unique = h->unique;
		pt->offered = (in->flags & FUSE_INIT_EXT) && (in->flags2 & K_FUSE_PASSTHROUGH2);
		atomic_store_explicit(&pt->init_seen, true, memory_order_release);
	}
	return n;
}

static ssize_t pt_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	struct passthrough *pt = ((struct fsctx *)userdata)->pt;

	if (pt->offered && !atomic_load(&pt->enabled) && count == 2 &&
	    iov[0].iov_len == sizeof(struct fuse_out_header) &&
	    iov[1].iov_len >= sizeof(struct fuse_init_out)) {
		const struct fuse_out_header *oh = iov[0].iov_base;
		struct fuse_init_out *out = iov[1].iov_base;
		if (oh->unique == pt->init_unique && oh->error == 0 &&
		    !(out->flags & FUSE_WRITEBACK_CACHE)) {
			out->flags |= FUSE_INIT_EXT;
			out->flags2 |= K_FUSE_PASSTHROUGH2;
			out->unused[0] = 1; /* max_stack_depth */
			atomic_store(&pt->enabled, true);
		}
	}
	return writev(fd, iov, count);
}

static ssize_t pt_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
			      unsigned int flags, void *userdata)
{
	(void)userdata;
	return splice(fdin, offin, fdout, offout, len, flags);
}

int pt_setup(struct fsctx *fs, struct fuse_session *se)
{
	static const struct fuse_custom_io io = {
		.read = pt_read,
		.writev = pt_writev,
		.splice_send = pt_splice_send,
	};
	struct passthrough *pt = calloc(1, sizeof(*pt));
	int rc;

	if (!pt)
		return -ENOMEM;
	pt->devfd = fuse_session_fd(se);
	pthread_mutex_init(&pt->mu, NULL);
	fs->pt = pt;
	if ((rc = fuse_session_custom_io(se, &io, pt->devfd)) != 0) {
		fs->pt = NULL;
		pt_free(pt);
		return rc;
	}
	return 0;
}

void pt_free(struct passthrough *pt)
{
	if (!pt)
		return;
	free(pt->tab);
	pthread_mutex_destroy(&pt->mu);
	free(pt);
}

static void pt_warn(struct passthrough *pt, const char *why)
{
	if (!atomic_exchange(&pt->warned, true))
		fprintf(stderr,
			"renderfs: passthrough unavailable (%s): outputs are served through "
			"the daemon\n",
			why);
}

/* With pt->mu held: the entry of ino, or NULL. */
static struct pt_ino *pt_find(struct passthrough *pt, uint64_t ino)
{
	for (size_t i = 0; i < pt->n; i++)
		if (pt->tab[i].ino == ino)
			return &pt->tab[i];
	return NULL;
}

/* With pt->mu held: room for one more entry, or -ENOMEM. */
static int pt_grow(struct passthrough *pt)
{
	size_t cap;
	struct pt_ino *t;

	if (pt->n < pt->cap)
		return 0;
	cap = pt->cap ? pt->cap * 2 : 16;
	if (!(t = realloc(pt->tab, cap * sizeof(*t))))
		return -ENOMEM;
	pt->tab = t;
	pt->cap = cap;
	return 0;
}

int32_t pt_get(struct passthrough *pt, uint64_t ino, int fd)
{
	struct pt_ino *e;
	int32_t id = -1;

	if (!pt)
		return -1;
	pthread_mutex_lock(&pt->mu);
	if (!atomic_load(&pt->enabled)) {
		pt_warn(pt, "the kernel does not offer FUSE passthrough");
		goto out;
	}
	if ((e = pt_find(pt, ino)) != NULL) {
		e->opens++;
		id = e->id;
		goto out;
	}
	if (pt_grow(pt) != 0)
		goto out; /* this open is served by the daemon */
	struct k_backing_map map = {.fd = fd};
	int r = ioctl(pt->devfd, K_FUSE_DEV_IOC_BACKING_OPEN, &map);
	if (r > 0) {
		id = r;
	} else {
		char why[128];
		snprintf(why, sizeof(why), "registering a blob file: %s", strerror(errno));
		pt_warn(pt, why);
	}
	/* Later opens of this inode, while any is open, use the same way. */
	pt->tab[pt->n++] = (struct pt_ino){ino, id, 1};
out:
	if (id > 0)
		pt->kernel++;
	else
		pt->daemon++;
	pthread_mutex_unlock(&pt->mu);
	return id;
}

void pt_get_stats(struct passthrough *pt, struct pt_stats *s)
{
	pthread_mutex_lock(&pt->mu);
	s->kernel = pt->kernel;
	s->daemon = pt->daemon;
	pthread_mutex_unlock(&pt->mu);
}

int pt_join(struct passthrough *pt, uint64_t ino, int32_t *id)
{
	struct pt_ino *e;
	int rc = 0;

	*id = -1;
	if (!pt || !atomic_load(&pt->enabled))
		return 0; /* no open goes through the kernel */
	pthread_mutex_lock(&pt->mu);
	if ((e = pt_find(pt, ino)) != NULL) {
		e->opens++;
		*id = e->id;
	} else if (pt_grow(pt) == 0) {
		/* No file has it open: it is served by the daemon until this
		 * open ends, so a reader's open racing with it goes the same way
		 * (the kernel refuses an open that differs from one it holds). */
		pt->tab[pt->n++] = (struct pt_ino){ino, -1, 1};
	} else {
		rc = -ENOMEM;
	}
	pthread_mutex_unlock(&pt->mu);
	return rc;
}

void pt_put(struct passthrough *pt, uint64_t ino)
{
	struct pt_ino *e;

	if (!pt)
		return;
	pthread_mutex_lock(&pt->mu);
	if ((e = pt_find(pt, ino)) != NULL && --e->opens == 0) {
		if (e->id > 0) {
			uint32_t id = (uint32_t)e->id;
			if (ioctl(pt->devfd, K_FUSE_DEV_IOC_BACKING_CLOSE, &id) != 0)
				fprintf(stderr, "renderfs: closing passthrough id %u: %s\n", id,
					strerror(errno));
		}
		*e = pt->tab[--pt->n];
	}
	pthread_mutex_unlock(&pt->mu);
}

static struct fuse_open_out open_out(const struct fuse_file_info *fi, int32_t id)
{
	return (struct fuse_open_out){
		.fh = fi->fh,
		.open_flags = K_FOPEN_PASSTHROUGH | (fi->noflush ? FOPEN_NOFLUSH : 0),
		.padding = (uint32_t)id, /* backing_id */
	};
}

int pt_reply_create(fuse_req_t req, const struct fuse_entry_param *e,
		    const struct fuse_file_info *fi, int32_t id)
{
	struct {
		struct fuse_entry_out entry;
		struct fuse_open_out open;
	} out;
	const struct stat *st = &e->attr;

	memset(&out, 0, sizeof(out));
	out.entry.nodeid = e->ino;
	out.entry.generation = e->generation;
	out.entry.entry_valid = (uint64_t)e->entry_timeout;
	out.entry.entry_valid_nsec = (uint32_t)((e->entry_timeout - (double)out.entry.entry_valid) * 1e9);
	out.entry.attr_valid = (uint64_t)e->attr_timeout;
	out.entry.attr_valid_nsec = (uint32_t)((e->attr_timeout - (double)out.entry.attr_valid) * 1e9);
	out.entry.attr = (struct fuse_attr){
		.ino = st->st_ino,
		.size = (uint64_t)st->st_size,
		.blocks = (uint64_t)st->st_blocks,
		.atime = (uint64_t)st->st_atim.tv_sec,
		.mtime = (uint64_t)st->st_mtim.tv_sec,
		.ctime = (uint64_t)st->st_ctim.tv_sec,
		.atimensec = (uint32_t)st->st_atim.tv_nsec,
		.mtimensec = (uint32_t)st->st_mtim.tv_nsec,
		.ctimensec = (uint32_t)st->st_ctim.tv_nsec,
		.mode = st->st_mode,
		.nlink = (uint32_t)st->st_nlink,
		.uid = st->st_uid,
		.gid = st->st_gid,
		.rdev = (uint32_t)st->st_rdev,
		.blksize = (uint32_t)st->st_blksize,
	};
	out.open = open_out(fi, id);
	return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

int pt_reply_open(fuse_req_t req, const struct fuse_file_info *fi, int32_t id)
{
	struct fuse_open_out out = open_out(fi, id);

	return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}
