/*
 * notify.c - change notification through the mountpoint (SPEC §4).
 *
 * DESIGN
 * The kernel makes inotify events only for changes that pass through the
 * VFS, so a change made inside the daemon (a job created by a write to
 * `new`, a status set by a worker) is invisible to watchers until somebody
 * performs it through the mount. The notifier thread does exactly that,
 * with the operation whose event the contract names:
 *
 *   job created     mkdir <route>/<id>, symlink jobs/<ulid>
 *   status change   open status O_WRONLY, futimens(now), close; the same
 *                   for status.json          (IN_MODIFY, IN_CLOSE_WRITE)
 *   progress, log   utimensat(now)            (IN_MODIFY)
 *   output ready    open output.<ext> O_CREAT, close (IN_CREATE,
 *                   IN_CLOSE_WRITE)
 *   job deleted     rmdir <route>/<id>, unlink jobs/<ulid>
 *
 * The handlers in ops.c recognize these requests by the requesting
 * thread's id (the FUSE request carries it; a process in another pid
 * namespace is reported as 0) together with the one operation in flight,
 * which names the parent and the name (notify_op_match). For that name
 * only, the notifier's lookups answer as if the change had not happened
 * yet (ENOENT before a create, the old entry before a removal), and the
 * create or removal itself succeeds without changing anything. No user
 * process can take this path, and no content changes through it.
 *
 * Creations need no queue: job sequence numbers are given in commit
 * order, so the thread announces every seq from the last one announced up
 * to the index's next seq. Other events go through a bounded ring. An
 * event is dropped if it repeats the newest queued event of the same job
 * for the same file (the watcher will read the newer content anyway), so
 * a slow notifier coalesces instead of falling behind; the order of one
 * job's events is kept. A full ring drops the event and counts it (the
 * engine is never made to wait).
 *
 * The thread acts through a detached clone of the mount (open_tree), not
 * the mountpoint itself: a user's `fusermount -u` never finds the mount
 * busy because of it. The superblock is then held by the clone too, so the
 * thread watches the mount table (/proc/self/mountinfo) and lets go of the
 * clone once no mount of the filesystem is left; the connection then ends
 * as it would have. Without the privilege to clone (a daemon not running
 * as root), it uses the mountpoint's path, and an unmount that races with
 * a notification can fail with EBUSY.
 *
 * THREADS AND LOCKS
 * notify_post() runs on engine workers and FUSE handler threads, some
 * holding the engine's state lock: it only takes mu briefly. mu guards
 * the ring, `created`, `stop` and the counters. op_mu guards `op`, which
 * the notifier thread writes around each syscall and handlers read. The
 * notifier thread is the only one that touches the mountpoint; it starts
 * after the mount, is told to stop (notify_stop) when the session loop
 * ends, and is joined (notify_free) only after the session is unmounted:
 * unmounting closes the connection first, so a syscall it still has in
 * flight then fails instead of waiting for a loop that is gone. Handlers
 * never wait for it, so neither `-s` nor unmount can deadlock on it.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "fs_i.h"

#define RING_CAP 16384
#define COALESCE_SCAN 32 /* how far back to look for the job's newest event */

struct gone {
	uint64_t seq;
	uint32_t uid, gid;
	char route[INDEX_ROUTE_MAX + 1];
	char name[INDEX_NAME_MAX + 1]; /* the directory's name: its name or ULID */
};

struct entry {
	uint8_t id[JOB_ID_LEN];
	uint8_t ev;
	uint64_t posted_ns;
	struct gone *gone; /* EV_DELETED, EV_RMDIR */
};

struct notifier {
	struct fsctx *fs;
	char mnt[PATH_MAX / 2]; /* leaves room for <route>/<name>/<file> */
	pthread_t thread;
	bool started;
	atomic_int tid;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct entry *ring;
	size_t head, count;
	bool created, stop, warned;
	struct notify_stats stats;

	pthread_mutex_t op_mu;
	struct notify_op op;

	/* Notifier thread only. */
	int root;		 /* the detached clone of the mount, or -1: paths */
	int mountinfo;		 /* /proc/self/mountinfo, to see unmounts */
	dev_t dev;		 /* the filesystem's device number */
	bool detached;		 /* unmounted: nothing left to notify */
	uint64_t checked_ms;
	uint64_t announced;	 /* next seq to announce */
	int dirfd;		 /* the job directory of the last event, O_PATH */
	uint8_t dir_id[JOB_ID_LEN];
	double lat_sum_ms;	 /* posting to the end of the syscalls */
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- posting (any thread) ---- */

void notify_post(void *arg, const uint8_t id[JOB_ID_LEN], const char *route,
		 enum engine_event ev, const struct job *gone)
{
	struct notifier *n = arg;
	struct gone *g = NULL;
	struct entry *e;
	char idbuf[JOB_ID_STR_LEN + 1];

	(void)route;
	if (gone) {
		if (!(g = malloc(sizeof(*g))))
			goto drop_unlocked;
		g->seq = gone->seq;
		g->uid = gone->uid;
		g->gid = gone->gid;
		snprintf(g->route, sizeof(g->route), "%s", gone->route);
		if (gone->name && gone->name[0]) {
			snprintf(g->name, sizeof(g->name), "%s", gone->name);
		} else {
			ulid_format(gone->id, idbuf);
			snprintf(g->name, sizeof(g->name), "%s", idbuf);
		}
	}
	pthread_mutex_lock(&n->mu);
	n->stats.posted++;
	if (ev == EV_CREATED) {
		n->created = true;
		pthread_cond_signal(&n->cv);
		pthread_mutex_unlock(&n->mu);
		return;
	}
	if (ev == EV_STATUS || ev == EV_PROGRESS || ev == EV_LOG) {
		for (size_t k = 0; k < n->count && k < COALESCE_SCAN; k++) {
			e = &n->ring[(n->head + n->count - 1 - k) % RING_CAP];
			if (memcmp(e->id, id, JOB_ID_LEN) != 0)
				continue;
			if (e->ev == ev) {
				n->stats.coalesced++;
				pthread_mutex_unlock(&n->mu);
				return;
			}
			break; /* the job's newest event is another kind: keep order */
		}
	}
	if (n->count == RING_CAP || n->stop) {
		bool warn = !n->warned && !n->stop;
		n->stats.dropped++;
		n->warned = true;
		pthread_mutex_unlock(&n->mu);
		free(g);
		if (warn)
			fprintf(stderr, "renderfs: change notification is %d events behind; "
					"further events are dropped until it catches up (see "
					"renderfs_notify_dropped_total in stats)\n",
				RING_CAP);
		return;
	}
	e = &n->ring[(n->head + n->count++) % RING_CAP];
	memcpy(e->id, id, JOB_ID_LEN);
	e->ev = (uint8_t)ev;
	e->posted_ns = mono_ns();
	e->gone = g;
	pthread_cond_signal(&n->cv);
	pthread_mutex_unlock(&n->mu);
	return;
drop_unlocked:
	pthread_mutex_lock(&n->mu);
	n->stats.dropped++;
	pthread_mutex_unlock(&n->mu);
}

/* ---- what the handlers ask ---- */

bool notify_op_match(struct fsctx *fs, fuse_req_t req, uint64_t parent, const char *name,
		     struct notify_op *op)
{
	struct notifier *n = fs->notifier;
	bool match;

	if (!n || (req && (fuse_req_ctx(req)->pid != atomic_load(&n->tid) ||
			   fuse_req_ctx(req)->pid == 0)))
		return false;
	pthread_mutex_lock(&n->op_mu);
	match = n->op.kind != NOP_NONE && n->op.parent == parent &&
		strcmp(n->op.name, name) == 0;
	if (match && op)
		*op = n->op;
	pthread_mutex_unlock(&n->op_mu);
	return match;
}

bool notify_is_self(struct fsctx *fs, fuse_req_t req)
{
	struct notifier *n = fs->notifier;

	return n && fuse_req_ctx(req)->pid != 0 && fuse_req_ctx(req)->pid == atomic_load(&n->tid);
}

/* ---- the notifier thread ---- */

static void set_op(struct notifier *n, enum notify_op_kind kind, uint64_t parent,
		   const char *name, uint64_t ino, uint32_t uid, uint32_t gid)
{
	pthread_mutex_lock(&n->op_mu);
	n->op.kind = kind;
	n->op.parent = parent;
	snprintf(n->op.name, sizeof(n->op.name), "%s", name);
	n->op.ino = ino;
	n->op.uid = uid;
	n->op.gid = gid;
	pthread_mutex_unlock(&n->op_mu);
	/* A name about to be created may be in the kernel's cache already
	 * (a user looked the job up first): drop it, so that the create
	 * reaches the filesystem and makes its event. Until the operation is
	 * done, lookups of the name are not cached (ops.c), so that it cannot
	 * come back meanwhile. */
	if (kind == NOP_MKDIR || kind == NOP_SYMLINK || kind == NOP_CREATE)
		fuse_lowlevel_notify_inval_entry(n->fs->se, parent, name, strlen(name));
}

static void clear_op(struct notifier *n)
{
	pthread_mutex_lock(&n->op_mu);
	n->op.kind = NOP_NONE;
	pthread_mutex_unlock(&n->op_mu);
}

/* A syscall's result: ENOENT means the job (or file) went away meanwhile,
 * which its own later event covers; anything else is counted. */
static void account(struct notifier *n, int rc)
{
	pthread_mutex_lock(&n->mu);
	if (rc == 0)
		n->stats.made++;
	else if (rc != ENOENT)
		n->stats.failed++;
	pthread_mutex_unlock(&n->mu);
}

static void close_dir(struct notifier *n)
{
	if (n->dirfd >= 0)
		close(n->dirfd);
	n->dirfd = -1;
}

/* Paths are relative to the clone (at()), or absolute without one. */
static int at(struct notifier *n)
{
	return n->root >= 0 ? n->root : AT_FDCWD;
}

static const char *base(struct notifier *n)
{
	return n->root >= 0 ? "." : n->mnt;
}

static int job_path(struct notifier *n, const char *route, const char *name, char *buf,
		    size_t len)
{
	int k = snprintf(buf, len, "%s/%s/%s", base(n), route, name);

	return k < 0 || (size_t)k >= len ? -ENAMETOOLONG : 0;
}

/*
 * Whether the mount table changed so that no mount of the filesystem is
 * left (the user unmounted it): then drop the clone, which was the last
 * thing holding it. Checked at most ten times a second.
 */
static void check_mounted(struct notifier *n)
{
	struct pollfd p = {n->mountinfo, POLLPRI, 0};
	char key[32], *buf = NULL;
	size_t cap = 0, len = 0;
	bool found = false;
	ssize_t got;

	if (n->root < 0 || n->mountinfo < 0 || now_ms() - n->checked_ms < 100)
		return;
	n->checked_ms = now_ms();
	if (poll(&p, 1, 0) != 1 || !(p.revents & (POLLPRI | POLLERR)))
		return;
	snprintf(key, sizeof(key), " %u:%u ", major(n->dev), minor(n->dev));
	if (lseek(n->mountinfo, 0, SEEK_SET) != 0)
		return;
	for (;;) {
		if (len + 4096 + 1 > cap) {
			char *nb = realloc(buf, cap ? cap * 2 : 16384);
			if (!nb) {
				free(buf);
				return;
			}
			buf = nb;
			cap = cap ? cap * 2 : 16384;
		}
		got = read(n->mountinfo, buf + len, cap - len - 1);
		if (got <= 0)
			break;
		len += (size_t)got;
	}
	if (got == 0) {
		buf[len] = '\0';
		found = strstr(buf, key) != NULL;
		if (!found) {
			close(n->root);
			n->root = -1;
			n->detached = true;
		}
	}
	free(buf);
}

static void announce_job(struct notifier *n, uint64_t seq)
{
	struct fsctx *fs = n->fs;
	const struct rnode *rn;
	uint8_t id[JOB_ID_LEN];
	char path[PATH_MAX], target[PATH_MAX], idbuf[JOB_ID_STR_LEN + 1], ulid[JOB_ID_STR_LEN + 1];
	const char *name;
	struct job j;
	int rc;

	if (index_job_by_seq(fs->ix, seq, id) != 0 || index_job_get(fs->ix, id, &j) != 0)
		return; /* deleted already */
	if (n->detached) {
		job_release(&j);
		return;
	}
	rn = fs_route_rnode(fs, j.route);
	name = j.name[0] ? j.name : (ulid_format(j.id, idbuf), idbuf);
	ulid_format(j.id, ulid);
	if (rn && job_path(n, j.route, name, path, sizeof(path)) == 0) {
		set_op(n, NOP_MKDIR, rn->ino, name, INO(NK_JOB, 0, j.seq), j.uid, j.gid);
		rc = mkdirat(at(n), path, 0755) == 0 ? 0 : errno;
		clear_op(n);
		account(n, rc);
		snprintf(target, sizeof(target), "../%s/%s", j.route, name);
		snprintf(path, sizeof(path), "%s/jobs/%s", base(n), ulid);
		set_op(n, NOP_SYMLINK, INO(NK_STATIC, 0, SN_JOBS), ulid, INO(NK_JLINK, 0, j.seq),
		       j.uid, j.gid);
		rc = symlinkat(target, at(n), path) == 0 ? 0 : errno;
		clear_op(n);
		account(n, rc);
	}
	job_release(&j);
}

/* Announce the creation of every job with a seq below limit. */
static void announce_upto(struct notifier *n, uint64_t limit)
{
	while (n->announced < limit) {
		bool stop;
		pthread_mutex_lock(&n->mu);
		stop = n->stop;
		pthread_mutex_unlock(&n->mu);
		if (stop)
			return;
		announce_job(n, n->announced++);
	}
}

static void removed(struct notifier *n, const uint8_t id[JOB_ID_LEN], const struct gone *g,
		    bool dir_too)
{
	const struct rnode *rn = fs_route_rnode(n->fs, g->route);
	char path[PATH_MAX], ulid[JOB_ID_STR_LEN + 1];
	int rc;

	announce_upto(n, g->seq + 1);
	if (memcmp(n->dir_id, id, JOB_ID_LEN) == 0)
		close_dir(n);
	if (n->detached)
		return;
	if (dir_too && rn && job_path(n, g->route, g->name, path, sizeof(path)) == 0) {
		set_op(n, NOP_RMDIR, rn->ino, g->name, INO(NK_JOB, 0, g->seq), g->uid, g->gid);
		rc = unlinkat(at(n), path, AT_REMOVEDIR) == 0 ? 0 : errno;
		clear_op(n);
		account(n, rc);
	}
	ulid_format(id, ulid);
	snprintf(path, sizeof(path), "%s/jobs/%s", base(n), ulid);
	set_op(n, NOP_UNLINK, INO(NK_STATIC, 0, SN_JOBS), ulid, INO(NK_JLINK, 0, g->seq), g->uid,
	       g->gid);
	rc = unlinkat(at(n), path, 0) == 0 ? 0 : errno;
	clear_op(n);
	account(n, rc);
}

/*
 * IN_MODIFY, and IN_CLOSE_WRITE with close_write. (An O_TRUNC open would
 * make IN_MODIFY without the SETATTR, but the kernel then asks for
 * security.capability: no fewer requests.)
 */
static void touch(struct notifier *n, const char *file, bool close_write)
{
	static const struct timespec now[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
	int rc = 0, fd;

	if (!close_write) {
		account(n, utimensat(n->dirfd, file, now, 0) == 0 ? 0 : errno);
		return;
	}
	fd = openat(n->dirfd, file, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		account(n, errno);
		return;
	}
	if (futimens(fd, now) != 0)
		rc = errno;
	if (close(fd) != 0 && rc == 0)
		rc = errno;
	account(n, rc);
}

static void changed(struct notifier *n, const uint8_t id[JOB_ID_LEN], enum engine_event ev)
{
	struct fsctx *fs = n->fs;
	char path[PATH_MAX], idbuf[JOB_ID_STR_LEN + 1], out[96];
	const char *name;
	struct job j;
	int rc, fd;

	if (index_job_get(fs->ix, id, &j) != 0)
		return; /* deleted: its removal event follows */
	announce_upto(n, j.seq + 1);
	if (n->detached) {
		job_release(&j);
		return;
	}
	if (n->dirfd < 0 || memcmp(n->dir_id, id, JOB_ID_LEN) != 0) {
		close_dir(n);
		name = j.name[0] ? j.name : (ulid_format(j.id, idbuf), idbuf);
		errno = 0;
		if (job_path(n, j.route, name, path, sizeof(path)) != 0 ||
		    (n->dirfd = openat(at(n), path, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
			account(n, errno ? errno : ENAMETOOLONG);
			job_release(&j);
			return;
		}
		memcpy(n->dir_id, id, JOB_ID_LEN);
	}
	switch (ev) {
	case EV_STATUS:
		touch(n, "status", true);
		touch(n, "status.json", true);
		/* `error` changes with the status but makes no event: drop
		 * the attributes the kernel may hold for it (ops.c). */
		fuse_lowlevel_notify_inval_inode(fs->se, INO(NK_JFILE, JF_ERROR, j.seq), 0, 0);
		break;
	case EV_PROGRESS:
		touch(n, "progress", false);
		break;
	case EV_LOG:
		touch(n, "log", false);
		break;
	case EV_OUTPUT:
		if (!jf_present(&j, JF_OUTPUT))
			break;
		jf_name(&j, JF_OUTPUT, out, sizeof(out));
		set_op(n, NOP_CREATE, INO(NK_JOB, 0, j.seq), out, INO(NK_JFILE, JF_OUTPUT, j.seq),
		       j.uid, j.gid);
		fd = openat(n->dirfd, out, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
		rc = fd < 0 ? errno : 0;
		clear_op(n);
		if (fd >= 0 && close(fd) != 0)
			rc = errno;
		account(n, rc);
		break;
	default:
		break;
	}
	job_release(&j);
}

static void *notifier_main(void *arg)
{
	struct notifier *n = arg;
	struct entry e;
	uint64_t next;

	struct stat st;

	atomic_store(&n->tid, (int)gettid());
	/* In this thread: the loop may need to serve what this asks. */
	n->root = (int)syscall(SYS_open_tree, AT_FDCWD, n->mnt, OPEN_TREE_CLONE | O_CLOEXEC);
	if (n->root >= 0 && fstat(n->root, &st) == 0) {
		n->dev = st.st_dev;
		n->mountinfo = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
	} else if (n->root >= 0) {
		close(n->root);
		n->root = -1;
	}
	pthread_mutex_lock(&n->mu);
	for (;;) {
		if (!n->stop && n->count == 0 && !n->created) {
			pthread_mutex_unlock(&n->mu);
			close_dir(n); /* hold nothing open on the mount while idle */
			pthread_mutex_lock(&n->mu);
			while (!n->stop && n->count == 0 && !n->created) {
				struct timespec ts;
				clock_gettime(CLOCK_REALTIME, &ts);
				ts.tv_nsec += 200 * 1000000;
				if (ts.tv_nsec >= 1000000000) {
					ts.tv_sec++;
					ts.tv_nsec -= 1000000000;
				}
				if (pthread_cond_timedwait(&n->cv, &n->mu, &ts) == ETIMEDOUT) {
					pthread_mutex_unlock(&n->mu);
					check_mounted(n);
					pthread_mutex_lock(&n->mu);
				}
			}
		}
		if (n->stop)
			break;
		pthread_mutex_unlock(&n->mu);
		check_mounted(n);
		pthread_mutex_lock(&n->mu);
		if (n->count) {
			e = n->ring[n->head];
			n->head = (n->head + 1) % RING_CAP;
			n->count--;
			pthread_mutex_unlock(&n->mu);
			if (e.gone)
				removed(n, e.id, e.gone, e.ev == EV_DELETED);
			else
				changed(n, e.id, (enum engine_event)e.ev);
			free(e.gone);
			uint64_t lat = mono_ns() - e.posted_ns;
			pthread_mutex_lock(&n->mu);
			n->stats.latency_ns_sum += lat;
			n->stats.latency_count++;
			if (lat > n->stats.latency_ns_max)
				n->stats.latency_ns_max = lat;
		} else {
			n->created = false;
			pthread_mutex_unlock(&n->mu);
			if (index_next_seq(n->fs->ix, &next) == 0)
				announce_upto(n, next);
			pthread_mutex_lock(&n->mu);
		}
	}
	pthread_mutex_unlock(&n->mu);
	close_dir(n);
	if (n->root >= 0)
		close(n->root);
	if (n->mountinfo >= 0)
		close(n->mountinfo);
	n->root = n->mountinfo = -1;
	return NULL;
}

int notify_start(struct fsctx *fs, const char *mountpoint, struct notifier **out)
{
	struct notifier *n = calloc(1, sizeof(*n));
	int rc;

	if (!n)
		return -ENOMEM;
	if (strlen(mountpoint) >= sizeof(n->mnt)) {
		free(n);
		return -ENAMETOOLONG;
	}
	snprintf(n->mnt, sizeof(n->mnt), "%s", mountpoint);
	n->fs = fs;
	n->dirfd = n->root = n->mountinfo = -1;
	n->ring = malloc(RING_CAP * sizeof(*n->ring));
	if (!n->ring) {
		free(n);
		return -ENOMEM;
	}
	pthread_mutex_init(&n->mu, NULL);
	pthread_cond_init(&n->cv, NULL);
	pthread_mutex_init(&n->op_mu, NULL);
	/* Jobs that exist before the mount are not news. */
	if ((rc = index_next_seq(fs->ix, &n->announced)) != 0 ||
	    (rc = -pthread_create(&n->thread, NULL, notifier_main, n)) != 0) {
		notify_stop(n);
		notify_free(n);
		return rc;
	}
	n->started = true;
	*out = n;
	return 0;
}

void notify_stop(struct notifier *n)
{
	if (!n)
		return;
	pthread_mutex_lock(&n->mu);
	n->stop = true;
	pthread_cond_signal(&n->cv);
	pthread_mutex_unlock(&n->mu);
}

void notify_free(struct notifier *n)
{
	if (!n)
		return;
	if (n->started)
		pthread_join(n->thread, NULL);
	for (size_t k = 0; k < n->count; k++)
		free(n->ring[(n->head + k) % RING_CAP].gone);
	pthread_mutex_destroy(&n->mu);
	pthread_cond_destroy(&n->cv);
	pthread_mutex_destroy(&n->op_mu);
	free(n->ring);
	free(n);
}

void notify_get_stats(struct notifier *n, struct notify_stats *s)
{
	memset(s, 0, sizeof(*s));
	if (!n)
		return;
	pthread_mutex_lock(&n->mu);
	*s = n->stats;
	s->queued = n->count;
	pthread_mutex_unlock(&n->mu);
}
