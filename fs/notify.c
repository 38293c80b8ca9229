/*
 * notify.c - change notification through the mountpoint (SPEC §4).
 *
 * DESIGN
 * The kernel makes inotify events only for changes that pass through the
 * VFS, so a change made inside the daemon (a job created by a write to
 * `new`, a status set by a worker) is invisible to watchers until somebody
 * performs it through the mount. The notifier does exactly that, with
 * the operation whose event the contract names:
 *
 *   job created     mkdir <route>/<id>, symlink jobs/<ulid>
 *   status change   open status O_WRONLY, futimens(now), close; the same
 *                   for status.json          (IN_MODIFY, IN_CLOSE_WRITE)
 *   progress, log   utimensat(now)            (IN_MODIFY)
 *   output ready    open output.<ext> O_CREAT, close (IN_CREATE,
 *                   IN_CLOSE_WRITE)
 *   job deleted     rmdir <route>/<id>, unlink jobs/<ulid>
 *
 * With `private`, creations and deletions are not announced: they would be
 * events in the route directory and jobs/, which every user may watch.
 * The owner has the id from `new` and watches the job's directory, whose
 * events (0700) only the owner and root can see.
 *
 * The handlers in ops.c recognize these requests by the requester's id
 * (the FUSE request carries it: the helper's pid, below; a process in
 * another pid namespace is reported as 0) with the one operation in flight,
 * which names the parent and the name (notify_op_match). For that name
 * only, the notifier's lookups answer as if the change had not happened
 * yet (ENOENT before a create, the old entry before a removal), and the
 * create or removal itself succeeds without changing anything. No user
 * process can take this path, and no content changes through it.
 *
 * Creations need no queue: job sequence numbers are given in commit
 * order, so the thread announces every seq from the last one announced up
 * to the index's next seq. Other changes are kept per job, never dropped:
 * a queue of jobs with something to announce, in the order of their first
 * unannounced change, each with a mask of the files that changed (and,
 * for a deleted job, what its removal needs). A change of a job already
 * waiting only sets its bit: the watcher reads the newest content anyway,
 * so the last change of every file, above all a final status, is always
 * announced, however large the burst, and memory is one entry per job
 * with changes waiting (nothing for idle jobs; the queue gives its memory
 * back when it empties). A job's events are made in the order the
 * contract needs (progress, log, output, then status: the output exists
 * before `complete` is announced).
 *
 * The kernel must not hold a name the notifier is yet to create (its
 * create would find it and make no event). Rather than invalidating such
 * names, which would make the daemon wait on the directory's lock, ops.c
 * does not let them be cached: a job's until notify_announced() says its
 * creation has been made, an output's never.
 *
 * The syscalls themselves are made by a helper process (forked at start,
 * holding no descriptor of the FUSE connection), not by a thread of the
 * daemon: a thread waiting for its own daemon's answer cannot be killed
 * once the request has been read, so a `kill -9` landing then would leave
 * the daemon unkillable, holding the connection that the waiting thread
 * needs aborted. A helper only waits; when the daemon dies the connection
 * closes, its syscall fails, and it reads end-of-file from the daemon and
 * exits. The notifier thread sends it one operation at a time over a pipe
 * (a relative path and what to do) and waits for the errno; requests
 * carry the helper's pid, which is what the handlers recognise.
 *
 * The helper acts through a detached clone of the mount (open_tree), not
 * the mountpoint itself: a user's `fusermount -u` never finds the mount
 * busy because of it. The superblock is then held by the clone too, so the
 * thread watches the mount table (/proc/self/mountinfo) and ends the
 * helper once no mount of the filesystem is left; the connection then ends
 * as it would have. Without the privilege to clone (a daemon not running
 * as root), it uses the mountpoint's path, and an unmount that races with
 * a notification can fail with EBUSY.
 *
 * THREADS AND LOCKS
 * notify_post() runs on engine workers and FUSE handler threads, some
 * holding the engine's state lock: it only takes mu briefly (a queue that
 * must grow reallocates under it). mu guards the queue of pending jobs
 * and its index, `created`, `stop` and the counters. op_mu guards `op`, which
 * the notifier thread writes around each syscall and handlers read. The
 * helper is the only one that touches the mountpoint; it starts after the
 * mount, the thread is told to stop (notify_stop) when the session loop
 * ends, and both are joined (notify_free) only after the session is
 * unmounted: unmounting closes the connection first, so a syscall still in
 * flight then fails instead of waiting for a loop that is gone. Handlers
 * never wait for either, so neither `-s` nor unmount can deadlock on them.
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
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fs_i.h"

#define PEND_MIN 256 /* entries the queue starts with, and shrinks back to */

struct gone {
	uint64_t seq;
	uint32_t uid, gid;
	char route[INDEX_ROUTE_MAX + 1];
	char name[INDEX_NAME_MAX + 1]; /* the directory's name: its name or ULID */
};

/* Bits of struct pend.mask, in the order their events are made. */
enum pend_bit { PB_PROGRESS = 1, PB_LOG = 2, PB_OUTPUT = 4, PB_STATUS = 8 };

/* A job with changes not announced yet. */
struct pend {
	uint8_t id[JOB_ID_LEN];
	uint8_t mask;	    /* enum pend_bit */
	uint64_t posted_ns; /* its oldest change not announced */
	struct gone *gone;  /* deleted: its removal (its changes are moot then) */
	bool by_rmdir;	    /* removed by rmdir through the mount: the
			       directory is gone already */
};

/*
 * The queue: a ring of struct pend by absolute position (pos % cap), and
 * an open-addressing index from job id to position (linear probing,
 * backward-shift deletion) so that a job already waiting is found at once.
 * Both grow by doubling and shrink back when the queue empties.
 */
struct pendq {
	struct pend *ring;
	uint64_t head, count, cap;  /* positions [head, head + count) */
	uint64_t *slot;		    /* position + 1; 0: empty */
	uint64_t nslots;
};
struct notifier {
	struct fsctx *fs;
	char mnt[PATH_MAX / 2]; /* leaves room for <route>/<name>/<file> */
	pthread_t thread;
	bool started;
	atomic_int tid; /* the helper's pid: what its requests carry */

	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct pendq q;
	bool created, stop;
	struct notify_stats stats;

	pthread_mutex_t op_mu;
	struct notify_op op;

	/* Jobs with a lower seq have been announced (read by handlers). */
	_Atomic uint64_t announced_pub;

	/* Notifier thread only. */
	pid_t helper;		 /* the process that makes the syscalls */
	int cmd_fd, res_fd;	 /* pipes to and from it */
	bool cloned;		 /* it works through a clone of the mount */
	int mountinfo;		 /* /proc/self/mountinfo, to see unmounts */
	dev_t dev;		 /* the filesystem's device number */
	bool detached;		 /* unmounted, or the helper is gone */
	bool mount_seen;	 /* mountinfo read once since it was opened */
	uint64_t checked_ms;
	uint64_t announced;	 /* next seq to announce */
};

/* ---- the helper process ---- */

enum helper_op { HOP_MKDIR = 1, HOP_SYMLINK, HOP_RMDIR, HOP_UNLINK, HOP_TOUCH, HOP_TOUCH_CLOSE,
		 HOP_CREATE };

#define HELPER_PATH 1024

/* One operation; under PIPE_BUF, so written and read whole. */
struct helper_cmd {
	uint8_t op;
	char path[HELPER_PATH];	  /* relative to the mount's root */
	char target[HELPER_PATH]; /* HOP_SYMLINK */
};

/* What the helper says first: whether it cloned the mount, and its device. */
struct helper_hello {
	int32_t cloned;
	uint64_t dev;
};

static bool full_io(int fd, void *buf, size_t len, bool rd)
{
	char *p = buf;

	while (len) {
		ssize_t k = rd ? read(fd, p, len) : write(fd, p, len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return false;
		p += k;
		len -= (size_t)k;
	}
	return true;
}

/*
 * The helper's life: only syscalls from here on (it is the child of a
 * threaded process). Paths are relative to the clone of the mount, or to
 * the mountpoint when it could not clone.
 */
static void __attribute__((noreturn)) helper_main(const char *mnt, int cmd_fd, int res_fd)
{
	static const struct timespec now[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
	static struct helper_cmd c;
	static char abs_path[PATH_MAX];
	static const int ignored[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGUSR1, SIGUSR2};
	struct helper_hello hello = {0, 0};
	struct sigaction sa;
	struct stat st;
	size_t ml = strlen(mnt);
	int base, fd, rc, cfd, rfd;

	/* It keeps its two pipes (as 3 and 4) and nothing else; above all no
	 * descriptor of the FUSE connection, whose closing must not wait for
	 * it. Signals meant for the daemon's group are not for it: it ends
	 * when the daemon's end of the pipe does. */
	cfd = fcntl(cmd_fd, F_DUPFD, 100);
	rfd = fcntl(res_fd, F_DUPFD, 100);
	if (cfd < 0 || rfd < 0 || dup2(cfd, 3) < 0 || dup2(rfd, 4) < 0)
		_exit(1);
	close_range(5, ~0u, 0);
	cmd_fd = 3;
	res_fd = 4;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	for (size_t i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++)
		sigaction(ignored[i], &sa, NULL);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	base = (int)syscall(SYS_open_tree, AT_FDCWD, mnt, OPEN_TREE_CLONE | O_CLOEXEC);
	if (base >= 0 && fstat(base, &st) == 0) {
		hello.cloned = 1;
		hello.dev = st.st_dev;
	} else {
		if (base >= 0)
			close(base);
		base = AT_FDCWD;
	}
	if (!full_io(res_fd, &hello, sizeof(hello), false))
		_exit(0);
	while (full_io(cmd_fd, &c, sizeof(c), true)) {
		const char *path = c.path;

		c.path[HELPER_PATH - 1] = c.target[HELPER_PATH - 1] = '\0';
		if (base == AT_FDCWD) {
			size_t pl = strlen(c.path);
			if (ml + 1 + pl >= sizeof(abs_path)) {
				rc = ENAMETOOLONG;
				goto reply;
			}
			memcpy(abs_path, mnt, ml);
			abs_path[ml] = '/';
			memcpy(abs_path + ml + 1, c.path, pl + 1);
			path = abs_path;
		}
		rc = 0;
		switch (c.op) {
		case HOP_MKDIR:
			rc = mkdirat(base, path, 0755) ? errno : 0;
			break;
		case HOP_SYMLINK:
			rc = symlinkat(c.target, base, path) ? errno : 0;
			break;
		case HOP_RMDIR:
			rc = unlinkat(base, path, AT_REMOVEDIR) ? errno : 0;
			break;
		case HOP_UNLINK:
			rc = unlinkat(base, path, 0) ? errno : 0;
			break;
		case HOP_TOUCH:
			rc = utimensat(base, path, now, 0) ? errno : 0;
			break;
		case HOP_TOUCH_CLOSE:
		case HOP_CREATE:
			fd = c.op == HOP_CREATE
				     ? openat(base, path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644)
				     : openat(base, path, O_WRONLY | O_CLOEXEC);
			if (fd < 0) {
				rc = errno;
				break;
			}
			if (c.op == HOP_TOUCH_CLOSE && futimens(fd, now) != 0)
				rc = errno;
			if (close(fd) != 0 && rc == 0)
				rc = errno;
			break;
		default:
			rc = EINVAL;
		}
reply:
		if (!full_io(res_fd, &rc, sizeof(rc), false))
			break;
	}
	_exit(0);
}

/* Ask the helper to do one operation; its errno, or EPIPE when it is gone. */
static int helper_run(struct notifier *n, enum helper_op op, const char *path,
		      const char *target)
{
	static struct helper_cmd c; /* notifier thread only */
	int rc;

	if (n->detached || n->cmd_fd < 0)
		return EPIPE;
	memset(&c, 0, sizeof(c));
	c.op = (uint8_t)op;
	if (strlen(path) >= sizeof(c.path) || (target && strlen(target) >= sizeof(c.target)))
		return ENAMETOOLONG;
	memcpy(c.path, path, strlen(path) + 1);
	if (target)
		memcpy(c.target, target, strlen(target) + 1);
	if (!full_io(n->cmd_fd, &c, sizeof(c), false) ||
	    !full_io(n->res_fd, &rc, sizeof(rc), true)) {
		if (!n->detached)
			fprintf(stderr, "renderfs: the change notification helper is gone; "
					"no more inotify events\n");
		n->detached = true;
		return EPIPE;
	}
	return rc;
}

static int helper_start(struct notifier *n)
{
	int to[2], from[2];
	pid_t pid;

	if (pipe2(to, O_CLOEXEC) != 0)
		return -errno;
	if (pipe2(from, O_CLOEXEC) != 0) {
		close(to[0]);
		close(to[1]);
		return -errno;
	}
	pid = fork();
	if (pid == 0)
		helper_main(n->mnt, to[0], from[1]);
	close(to[0]);
	close(from[1]);
	if (pid < 0) {
		close(to[1]);
		close(from[0]);
		return -errno;
	}
	n->helper = pid;
	n->cmd_fd = to[1];
	n->res_fd = from[0];
	/* Its hello can wait for the session loop (open_tree may ask the
	 * filesystem), so the notifier thread reads it (helper_hello). */
	return 0;
}

static void helper_stop(struct notifier *n)
{
	if (n->cmd_fd >= 0)
		close(n->cmd_fd);
	if (n->res_fd >= 0)
		close(n->res_fd);
	n->cmd_fd = n->res_fd = -1;
	if (n->helper > 0)
		waitpid(n->helper, NULL, 0);
	n->helper = 0;
}

/* ---- the queue of jobs with changes (mu held) ---- */

static uint64_t id_hash(const uint8_t id[JOB_ID_LEN])
{
	uint64_t h = 0;

	/* A ULID's last 10 bytes are random; the first 6 a time. */
	memcpy(&h, id + JOB_ID_LEN - 8, 8);
	return h * 0x9E3779B97F4A7C15ull;
}

static struct pend *q_at(struct pendq *q, uint64_t pos)
{
	return &q->ring[pos % q->cap];
}

/* The index slot of the job's entry, or of the empty slot where it goes. */
static uint64_t q_slot(struct pendq *q, const uint8_t id[JOB_ID_LEN])
{
	uint64_t i = id_hash(id) & (q->nslots - 1);

	while (q->slot[i] && memcmp(q_at(q, q->slot[i] - 1)->id, id, JOB_ID_LEN) != 0)
		i = (i + 1) & (q->nslots - 1);
	return i;
}

/* Make the ring and index cap entries big (a power of two, >= count). */
static int q_resize(struct pendq *q, uint64_t cap)
{
	struct pend *ring = malloc(cap * sizeof(*ring));
	uint64_t *slot = calloc(cap * 2, sizeof(*slot));

	if (!ring || !slot) {
		free(ring);
		free(slot);
		return -ENOMEM;
	}
	for (uint64_t k = 0; k < q->count; k++)
		ring[(q->head + k) % cap] = *q_at(q, q->head + k);
	free(q->ring);
	free(q->slot);
	q->ring = ring;
	q->cap = cap;
	q->slot = slot;
	q->nslots = cap * 2;
	for (uint64_t k = 0; k < q->count; k++)
		q->slot[q_slot(q, q_at(q, q->head + k)->id)] = q->head + k + 1;
	return 0;
}

/* The waiting entry of a job, made (at the tail) if there is none; NULL
 * without memory. */
static struct pend *q_get(struct pendq *q, const uint8_t id[JOB_ID_LEN], uint64_t now)
{
	uint64_t i, pos;
	struct pend *p;

	if (q->count == q->cap && q_resize(q, q->cap * 2) != 0)
		return NULL;
	i = q_slot(q, id);
	if (q->slot[i])
		return q_at(q, q->slot[i] - 1);
	pos = q->head + q->count++;
	q->slot[i] = pos + 1;
	p = q_at(q, pos);
	memset(p, 0, sizeof(*p));
	memcpy(p->id, id, JOB_ID_LEN);
	p->posted_ns = now;
	return p;
}

/* Take the oldest entry off the queue into *out. */
static void q_pop(struct pendq *q, struct pend *out)
{
	uint64_t i = q_slot(q, q_at(q, q->head)->id), j;

	*out = *q_at(q, q->head);
	q->head++;
	q->count--;
	/* Backward-shift deletion keeps every probe sequence unbroken. */
	q->slot[i] = 0;
	for (j = (i + 1) & (q->nslots - 1); q->slot[j]; j = (j + 1) & (q->nslots - 1)) {
		uint64_t home = id_hash(q_at(q, q->slot[j] - 1)->id) & (q->nslots - 1);
		if (((j - home) & (q->nslots - 1)) >= ((j - i) & (q->nslots - 1))) {
			q->slot[i] = q->slot[j];
			q->slot[j] = 0;
			i = j;
		}
	}
	if (q->count == 0 && q->cap > PEND_MIN) {
		q->head = 0;
		q_resize(q, PEND_MIN); /* on failure it keeps the larger one */
	}
}

/* ---- posting (any thread) ---- */

void notify_post(void *arg, const uint8_t id[JOB_ID_LEN], const char *route,
		 enum engine_event ev, const struct job *gone)
{
	struct notifier *n = arg;
	struct gone *g = NULL;
	struct pend *p;
	char idbuf[JOB_ID_STR_LEN + 1];
	uint8_t bit;

	(void)route;
	if (gone) {
		if (!(g = malloc(sizeof(*g))))
			goto nomem;
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
	bit = ev == EV_PROGRESS ? PB_PROGRESS
	      : ev == EV_LOG	? PB_LOG
	      : ev == EV_OUTPUT ? PB_OUTPUT
	      : ev == EV_STATUS ? PB_STATUS
				: 0;
	pthread_mutex_lock(&n->mu);
	n->stats.posted++;
	if (ev == EV_CREATED) {
		n->created = true;
		pthread_cond_signal(&n->cv);
		pthread_mutex_unlock(&n->mu);
		return;
	}
	if (n->stop) {
		pthread_mutex_unlock(&n->mu);
		free(g);
		return;
	}
	if (!(p = q_get(&n->q, id, mono_ns()))) {
		pthread_mutex_unlock(&n->mu);
		free(g);
		goto nomem;
	}
	if ((p->mask & bit) || (p->gone && g))
		n->stats.coalesced++;
	p->mask |= bit;
	if (g) {
		free(p->gone);
		p->gone = g;
		p->by_rmdir = ev == EV_RMDIR;
	}
	pthread_cond_signal(&n->cv);
	pthread_mutex_unlock(&n->mu);
	return;
nomem:
	/* Only without memory is a change not announced: counted, and said. */
	pthread_mutex_lock(&n->mu);
	n->stats.dropped++;
	pthread_mutex_unlock(&n->mu);
	fprintf(stderr, "renderfs: out of memory: a change of a job is not announced to "
			"inotify watchers\n");
}

/* ---- what the handlers ask ---- */

bool notify_is_helper(struct fsctx *fs, fuse_req_t req)
{
	struct notifier *n = fs->notifier;

	return n && fuse_req_ctx(req)->pid != 0 && fuse_req_ctx(req)->pid == atomic_load(&n->tid);
}

bool notify_op_match(struct fsctx *fs, fuse_req_t req, uint64_t parent, const char *name,
		     struct notify_op *op)
{
	struct notifier *n = fs->notifier;
	bool match;

	if (!notify_is_helper(fs, req))
		return false;
	pthread_mutex_lock(&n->op_mu);
	match = n->op.kind != NOP_NONE && n->op.parent == parent &&
		strcmp(n->op.name, name) == 0;
	if (match && op)
		*op = n->op;
	pthread_mutex_unlock(&n->op_mu);
	return match;
}

bool notify_announced(struct fsctx *fs, uint64_t seq)
{
	return fs->notifier && seq < atomic_load(&fs->notifier->announced_pub);
}

/* ---- what the notifier thread does for each event ---- */

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
	else if (rc != ENOENT && !(rc == EPIPE && n->detached))
		n->stats.failed++;
	pthread_mutex_unlock(&n->mu);
}

/* Paths sent to the helper are relative to the mount's root. */
static int job_path(const char *route, const char *name, const char *file, char *buf,
		    size_t len)
{
	int k = file ? snprintf(buf, len, "%s/%s/%s", route, name, file)
		     : snprintf(buf, len, "%s/%s", route, name);

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

	if (!n->cloned || n->detached || n->mountinfo < 0 || now_ms() - n->checked_ms < 100)
		return;
	n->checked_ms = now_ms();
	/* The first look reads the table whatever poll says: an unmount
	 * before mountinfo was opened is no change to it. */
	if (n->mount_seen && (poll(&p, 1, 0) != 1 || !(p.revents & (POLLPRI | POLLERR))))
		return;
	n->mount_seen = true;
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
			/* the helper's exit drops the clone */
			n->detached = true;
			helper_stop(n);
		}
	}
	free(buf);
}

static void announce_job(struct notifier *n, uint64_t seq)
{
	struct fsctx *fs = n->fs;
	const struct rnode *rn;
	uint8_t id[JOB_ID_LEN];
	char path[HELPER_PATH], target[HELPER_PATH], idbuf[JOB_ID_STR_LEN + 1],
		ulid[JOB_ID_STR_LEN + 1];
	const char *name;
	struct job j;

	if (index_job_by_seq(fs->ix, seq, id) != 0 || index_job_get(fs->ix, id, &j) != 0)
		return; /* deleted already */
	rn = fs_route_rnode(fs, j.route);
	name = job_dir_name(fs, 0, &j, idbuf); /* as the helper (root) finds it */
	ulid_format(j.id, ulid);
	/* `private`: any user may watch a route directory or jobs/, so a
	 * creation there is not announced (see the README). */
	if (rn && !fs->private_ && job_path(j.route, name, NULL, path, sizeof(path)) == 0) {
		set_op(n, NOP_MKDIR, rn->ino, name, INO(NK_JOB, 0, j.seq), j.uid, j.gid);
		account(n, helper_run(n, HOP_MKDIR, path, NULL));
		clear_op(n);
		snprintf(target, sizeof(target), "../%s/%s", j.route, name);
		snprintf(path, sizeof(path), "jobs/%s", ulid);
		set_op(n, NOP_SYMLINK, INO(NK_STATIC, 0, SN_JOBS), ulid, INO(NK_JLINK, 0, j.seq),
		       j.uid, j.gid);
		account(n, helper_run(n, HOP_SYMLINK, path, target));
		clear_op(n);
	}
	job_release(&j);
}

/* Announce the creation of every job with a seq below limit. */
static void announce_upto(struct notifier *n, uint64_t limit)
{
	while (n->announced < limit && !n->detached) {
		bool stop;
		pthread_mutex_lock(&n->mu);
		stop = n->stop;
		pthread_mutex_unlock(&n->mu);
		if (stop)
			return;
		announce_job(n, n->announced);
		atomic_store(&n->announced_pub, ++n->announced);
	}
}

static void removed(struct notifier *n, const uint8_t id[JOB_ID_LEN], const struct gone *g,
		    bool dir_too)
{
	const struct rnode *rn = fs_route_rnode(n->fs, g->route);
	char path[HELPER_PATH], ulid[JOB_ID_STR_LEN + 1];

	announce_upto(n, g->seq + 1);
	if (n->fs->private_)
		return; /* as for creations (announce_job) */
	if (dir_too && rn && job_path(g->route, g->name, NULL, path, sizeof(path)) == 0) {
		set_op(n, NOP_RMDIR, rn->ino, g->name, INO(NK_JOB, 0, g->seq), g->uid, g->gid);
		account(n, helper_run(n, HOP_RMDIR, path, NULL));
		clear_op(n);
	}
	ulid_format(id, ulid);
	snprintf(path, sizeof(path), "jobs/%s", ulid);
	set_op(n, NOP_UNLINK, INO(NK_STATIC, 0, SN_JOBS), ulid, INO(NK_JLINK, 0, g->seq), g->uid,
	       g->gid);
	account(n, helper_run(n, HOP_UNLINK, path, NULL));
	clear_op(n);
}

static void changed(struct notifier *n, const uint8_t id[JOB_ID_LEN], enum engine_event ev)
{
	struct fsctx *fs = n->fs;
	char path[HELPER_PATH], idbuf[JOB_ID_STR_LEN + 1], out[96];
	const char *name;
	struct job j;

	if (index_job_get(fs->ix, id, &j) != 0)
		return; /* deleted: its removal event follows */
	announce_upto(n, j.seq + 1);
	name = job_dir_name(fs, 0, &j, idbuf); /* as the helper (root) finds it */
	switch (ev) {
	case EV_STATUS:
		/* IN_MODIFY then IN_CLOSE_WRITE on each */
		if (job_path(j.route, name, "status", path, sizeof(path)) == 0)
			account(n, helper_run(n, HOP_TOUCH_CLOSE, path, NULL));
		if (job_path(j.route, name, "status.json", path, sizeof(path)) == 0)
			account(n, helper_run(n, HOP_TOUCH_CLOSE, path, NULL));
		break;
	case EV_PROGRESS:
	case EV_LOG:
		if (job_path(j.route, name, ev == EV_LOG ? "log" : "progress", path,
			     sizeof(path)) == 0)
			account(n, helper_run(n, HOP_TOUCH, path, NULL));
		break;
	case EV_OUTPUT:
		if (!jf_present(&j, JF_OUTPUT))
			break;
		jf_name(&j, JF_OUTPUT, out, sizeof(out));
		if (job_path(j.route, name, out, path, sizeof(path)) != 0)
			break;
		set_op(n, NOP_CREATE, INO(NK_JOB, 0, j.seq), out, INO(NK_JFILE, JF_OUTPUT, j.seq),
		       j.uid, j.gid);
		account(n, helper_run(n, HOP_CREATE, path, NULL));
		clear_op(n);
		/* The outputs after the first, committed before it. */
		if (j.flags & JOB_F_EXTRAS) {
			struct job_output *x = calloc(INDEX_EXTRAS_MAX, sizeof(*x));
			size_t nx = 0;
			if (x && jf_extras(fs, &j, x, INDEX_EXTRAS_MAX, &nx) == 0)
				for (size_t i = 0; i < nx; i++) {
					struct jf_extra e = {(unsigned)i + 1, false, x[i]};
					if (!jf_extra_shown(&e))
						continue;
					jf_extra_name(&e, out, sizeof(out));
					if (job_path(j.route, name, out, path, sizeof(path)) != 0)
						continue;
					set_op(n, NOP_CREATE, INO(NK_JOB, 0, j.seq), out,
					       INO(NK_JFILE, JF_EXTRA0 + 2 * i, j.seq), j.uid, j.gid);
					account(n, helper_run(n, HOP_CREATE, path, NULL));
					clear_op(n);
				}
			free(x);
		}
		break;
	default:
		break;
	}
	job_release(&j);
}

/* The helper's first words: whether it cloned the mount. */
static void helper_hello(struct notifier *n)
{
	struct helper_hello hello;

	atomic_store(&n->tid, (int)n->helper);
	if (!full_io(n->res_fd, &hello, sizeof(hello), true)) {
		fprintf(stderr, "renderfs: the change notification helper did not start; "
				"no inotify events\n");
		n->detached = true;
		return;
	}
	n->cloned = hello.cloned != 0;
	n->dev = (dev_t)hello.dev;
	if (n->cloned)
		n->mountinfo = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
}

static void *notifier_main(void *arg)
{
	struct notifier *n = arg;
	struct pend e;
	uint64_t next;

	helper_hello(n);
	pthread_mutex_lock(&n->mu);
	for (;;) {
		while (!n->stop && n->q.count == 0 && !n->created) {
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
		if (n->stop)
			break;
		pthread_mutex_unlock(&n->mu);
		check_mounted(n);
		pthread_mutex_lock(&n->mu);
		if (n->q.count) {
			q_pop(&n->q, &e);
			pthread_mutex_unlock(&n->mu);
			if (e.gone) {
				removed(n, e.id, e.gone, !e.by_rmdir);
			} else {
				static const enum engine_event order[] = {EV_PROGRESS, EV_LOG,
									   EV_OUTPUT, EV_STATUS};
				for (size_t k = 0; k < 4; k++)
					if (e.mask & (1u << k))
						changed(n, e.id, order[k]);
			}
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
	if (n->mountinfo >= 0)
		close(n->mountinfo);
	n->mountinfo = -1;
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
	n->cmd_fd = n->res_fd = n->mountinfo = -1;
	if (q_resize(&n->q, PEND_MIN) != 0) {
		free(n);
		return -ENOMEM;
	}
	pthread_mutex_init(&n->mu, NULL);
	pthread_cond_init(&n->cv, NULL);
	pthread_mutex_init(&n->op_mu, NULL);
	/* Jobs that exist before the mount are not news. */
	if ((rc = index_next_seq(fs->ix, &n->announced)) == 0)
		atomic_store(&n->announced_pub, n->announced);
	if (rc != 0 || (rc = helper_start(n)) != 0 ||
	    (rc = -pthread_create(&n->thread, NULL, notifier_main, n)) != 0) {
		notify_stop(n);
		notify_free(n);
		return rc;
	}
	n->started = true;
	pthread_setname_np(n->thread, "rfs-notify");
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
	helper_stop(n);
	for (uint64_t k = 0; k < n->q.count; k++)
		free(q_at(&n->q, n->q.head + k)->gone);
	pthread_mutex_destroy(&n->mu);
	pthread_cond_destroy(&n->cv);
	pthread_mutex_destroy(&n->op_mu);
	free(n->q.ring);
	free(n->q.slot);
	free(n);
}

void notify_get_stats(struct notifier *n, struct notify_stats *s)
{
	memset(s, 0, sizeof(*s));
	if (!n)
		return;
	uint64_t next = 0, announced = atomic_load(&n->announced_pub);

	pthread_mutex_lock(&n->mu);
	*s = n->stats;
	s->queued = n->q.count;
	pthread_mutex_unlock(&n->mu);
	/* Creations wait too: every seq not announced yet. */
	if (index_next_seq(n->fs->ix, &next) == 0 && next > announced && !n->fs->private_)
		s->queued += next - announced;
}
