/*
 * backend_exec.c - any local generator as a backend `exec` (SPEC §8): a
 * program named by an argv in the models file, run once per job.
 *
 * DESIGN
 * A job runs in a worker (the CPU group; a GPU worker's group with
 * `gpu: true`), which starts the program and waits for it. What the
 * program gets:
 *   stdin               the normalized request, each `cas:` input replaced
 *                       by the path of a read-only copy of the blob
 *   RENDERFS_OUTPUT     the file to write: output.<ext> in the job's scratch
 *                       directory (<store>/tmp/exec-<job id>/, its working
 *                       directory, emptied before and removed after)
 *   RENDERFS_STATUS_FD  3, a pipe for lines `progress 0.42`, `log <text>`
 *                       and `output <path> <media type>` (an extra output)
 *   RENDERFS_JOB, RENDERFS_ROUTE, CUDA_VISIBLE_DEVICES (GPU workers),
 *   PATH, HOME and TMPDIR (the scratch directory), LANG, and the route's
 *   `env`; nothing else of the daemon's environment (keys live there).
 * stderr lines go to the job's log, secrets masked (env values whose
 * names are a secret's by schema_is_secret: HF_TOKEN, API_KEY), at most
 * EXEC_LOG_LINES lines and each cut at INDEX_LOG_LINE_MAX; lines are written in batches (one
 * durable write per EXEC_LOG_MS), never one write per line. stdout is
 * discarded.
 *
 * The program is the leader of a new session (its own process group),
 * killed with the daemon (PR_SET_PDEATHSIG; bwrap --die-with-parent).
 * Cancellation, the deadline and shutdown send SIGTERM to the group, then
 * SIGKILL after EXEC_GRACE_MS; once the leader has exited, whatever is
 * left of its group is killed. The worker waits on a pidfd and the pipes
 * with poll(), looking at run_stopping() at least every 100 ms.
 *
 * Outputs are opened beneath the scratch directory only (openat2 with
 * RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS: a symlink to a file of the host
 * is refused), must be regular files, not empty and at most max_output,
 * and are copied into the store (a file the program could still change
 * is never adopted as a blob); a media type the magic bytes can tell
 * must match. Exit 0 with a valid output is `complete`; an exit status
 * or signal is `backend_failed` with the last stderr lines, a limit that
 * was hit named as such.
 *
 * `sandbox: "bwrap"`: the program runs under bubblewrap: every namespace
 * unshared (no network), the system directories read-only, /tmp and /dev
 * fresh, the scratch directory the only writable place and the paths of
 * `read_only` visible; the store, /home and the rest of the host are not.
 * `limits` (memory: address space bytes, cpu_s, file_size bytes,
 * processes) are rlimits set before the exec. The kernel does not apply
 * RLIMIT_NPROC to root: `processes` binds only a daemon not run as root.
 *
 * Threads: configure/release on the mounting thread; run on a worker,
 * reading the route's state only.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "engine_i.h"
#include "fileutil.h"
#include "route.h"
#include "schema.h"
#include "service.h"

extern const struct backend backend_exec;

#define EXEC_GRACE_MS 2000
#define EXEC_LOG_LINES 2000 /* stderr and `log` lines a job may log */
#define EXEC_LOG_MS 200	    /* a batch of log lines at most this often */
#define EXEC_TAIL 5	    /* stderr lines kept for the error message */
#define EXEC_EXTRAS 15	    /* `output` lines at most */
#define EXEC_ARGS_MAX 256
#define EXEC_ENV_MAX 64
#define EXEC_RO_MAX 32
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

struct exec_conf {
	char *argv[EXEC_ARGS_MAX + 1]; /* argv[0] as given; path: resolved */
	size_t argc;
	char path[4096];
	bool bwrap;
	char bwrap_path[4096];
	bool gpu;
	uint64_t memory, cpu_s, file_size, processes; /* 0: no limit */
	char *env[EXEC_ENV_MAX];		      /* "NAME=value" */
	size_t nenv;
	const char *secrets[EXEC_ENV_MAX]; /* values in env[] to mask */
	size_t nsecrets;
	char *ro[EXEC_RO_MAX];
	size_t nro;
	char ext[16];
};

static const struct backend_setting exec_takes[] = {
    {"command", json_type_array},     {"sandbox", json_type_string},
    {"gpu", json_type_boolean},	      {"limits", json_type_object},
    {"env", json_type_object},	      {"output_ext", json_type_string},
    {"read_only", json_type_array},
};

static void exec_release(void *state)
{
	struct exec_conf *c = state;

	if (!c)
		return;
	for (size_t i = 0; i < c->argc; i++)
		free(c->argv[i]);
	for (size_t i = 0; i < c->nenv; i++)
		free(c->env[i]);
	for (size_t i = 0; i < c->nro; i++)
		free(c->ro[i]);
	free(c);
}

static int conf_fail(struct exec_conf *c, char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int conf_fail(struct exec_conf *c, char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	exec_release(c);
	return -EINVAL;
}

/* name as execvp would find it in PATH (or as given when it has a '/'),
 * an executable regular file, into out. */
static bool find_program(const char *name, char *out, size_t outlen)
{
	const char *path = getenv("PATH");
	struct stat st;

	if (strchr(name, '/')) {
		snprintf(out, outlen, "%s", name);
		return stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0;
	}
	if (!path || !*path)
		path = DEFAULT_PATH;
	for (const char *p = path; *p;) {
		const char *end = strchrnul(p, ':');
		if (end > p && (size_t)snprintf(out, outlen, "%.*s/%s", (int)(end - p), p, name) <
				       outlen &&
		    stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0)
			return true;
		p = *end ? end + 1 : end;
	}
	return false;
}

static int parse_limits(struct exec_conf *c, json_object *lim, char *err, size_t errlen)
{
	json_object_object_foreach(lim, k, v)
	{
		uint64_t *to = strcmp(k, "memory") == 0	   ? &c->memory
			       : strcmp(k, "cpu_s") == 0	   ? &c->cpu_s
			       : strcmp(k, "file_size") == 0  ? &c->file_size
			       : strcmp(k, "processes") == 0 ? &c->processes
							      : NULL;
		if (!to)
			return conf_fail(c, err, errlen,
					 "unknown limit '%s' (limits are memory, cpu_s, file_size, "
					 "processes)", k);
		errno = 0;
		int64_t x = json_object_get_int64(v);
		if (!json_object_is_type(v, json_type_int) || errno || x <= 0)
			return conf_fail(c, err, errlen, "'limits.%s' must be a positive integer", k);
		*to = (uint64_t)x;
	}
	return 0;
}

static int exec_configure(struct route *rt, json_object *settings, void **state, char *err,
			  size_t errlen)
{
	struct exec_conf *c;
	json_object *v;
	int rc = backend_settings_check(&backend_exec, settings, exec_takes,
					sizeof(exec_takes) / sizeof(exec_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	if (!settings || !json_object_object_get_ex(settings, "command", &v) ||
	    json_object_array_length(v) == 0 || json_object_array_length(v) > EXEC_ARGS_MAX)
		return conf_fail(c, err, errlen,
				 "'command' must be an array of 1 to %d strings (the program and "
				 "its arguments; never a shell string)", EXEC_ARGS_MAX);
	for (size_t i = 0; i < json_object_array_length(v); i++) {
		json_object *a = json_object_array_get_idx(v, i);
		if (!json_object_is_type(a, json_type_string) ||
		    (i == 0 && !json_object_get_string_len(a)))
			return conf_fail(c, err, errlen, "'command[%zu]' must be a string", i);
		if (!(c->argv[c->argc] = strdup(json_object_get_string(a))))
			return conf_fail(c, err, errlen, "out of memory");
		c->argc++;
	}
	if (strchr(c->argv[0], '/') && c->argv[0][0] != '/' && rt->origin &&
	    strchr(rt->origin, '/')) {
		/* A relative path names a program beside the models file. */
		const char *slash = strrchr(rt->origin, '/');
		char *abs = NULL;
		if (asprintf(&abs, "%.*s/%s", (int)(slash - rt->origin), rt->origin, c->argv[0]) < 0)
			return conf_fail(c, err, errlen, "out of memory");
		free(c->argv[0]);
		c->argv[0] = abs;
	}
	if (!find_program(c->argv[0], c->path, sizeof(c->path)))
		return conf_fail(c, err, errlen,
				 "'command[0]': no executable program '%s'%s", c->argv[0],
				 strchr(c->argv[0], '/') ? "" : " in the daemon's PATH");
	if (json_object_object_get_ex(settings, "sandbox", &v)) {
		const char *s = json_object_get_string(v);
		if (strcmp(s, "bwrap") == 0)
			c->bwrap = true;
		else if (strcmp(s, "none") != 0)
			return conf_fail(c, err, errlen, "'sandbox' must be \"none\" or \"bwrap\"");
		if (c->bwrap && !find_program("bwrap", c->bwrap_path, sizeof(c->bwrap_path)))
			return conf_fail(c, err, errlen,
					 "'sandbox': bwrap is not in the daemon's PATH (install "
					 "bubblewrap)");
	}
	if (json_object_object_get_ex(settings, "gpu", &v))
		c->gpu = json_object_get_boolean(v);
	rt->cpu_only = !c->gpu;
	if (json_object_object_get_ex(settings, "limits", &v) &&
	    (rc = parse_limits(c, v, err, errlen)) != 0)
		return rc;
	if (json_object_object_get_ex(settings, "env", &v)) {
		json_object_object_foreach(v, k, val)
		{
			size_t n = strspn(k, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
					     "0123456789");
			if (!*k || k[n] || (k[0] >= '0' && k[0] <= '9') ||
			    strncmp(k, "RENDERFS_", 9) == 0)
				return conf_fail(c, err, errlen,
						 "'env': '%s' is not a variable name a route may set", k);
			if (!json_object_is_type(val, json_type_string))
				return conf_fail(c, err, errlen, "'env.%s' must be a string", k);
			if (c->nenv == EXEC_ENV_MAX)
				return conf_fail(c, err, errlen, "'env' has more than %d variables",
						 EXEC_ENV_MAX);
			if (asprintf(&c->env[c->nenv], "%s=%s", k, json_object_get_string(val)) < 0)
				return conf_fail(c, err, errlen, "out of memory");
			if (schema_is_secret(k) && json_object_get_string_len(val) >= 4)
				c->secrets[c->nsecrets++] = strchr(c->env[c->nenv], '=') + 1;
			c->nenv++;
		}
	}
	if (json_object_object_get_ex(settings, "read_only", &v)) {
		for (size_t i = 0; i < json_object_array_length(v); i++) {
			json_object *a = json_object_array_get_idx(v, i);
			const char *p = json_object_get_string(a);
			if (!json_object_is_type(a, json_type_string) || p[0] != '/' ||
			    access(p, F_OK) != 0)
				return conf_fail(c, err, errlen,
						 "'read_only[%zu]' must be the absolute path of a file or "
						 "directory that exists", i);
			if (c->nro == EXEC_RO_MAX || !(c->ro[c->nro++] = strdup(p)))
				return conf_fail(c, err, errlen, "'read_only': at most %d paths",
						 EXEC_RO_MAX);
		}
	}
	snprintf(c->ext, sizeof(c->ext), "%s", route_media_ext(rt->media_type));
	if (json_object_object_get_ex(settings, "output_ext", &v)) {
		const char *x = json_object_get_string(v);
		size_t n = strspn(x, "abcdefghijklmnopqrstuvwxyz0123456789");
		if (!*x || x[n] || n >= sizeof(c->ext))
			return conf_fail(c, err, errlen,
					 "'output_ext' must be 1 to 15 lowercase letters and digits");
		snprintf(c->ext, sizeof(c->ext), "%s", x);
	}
	*state = c;
	return 0;
}

/* ---- one run ---- */

struct exec_run {
	struct run *r;
	const struct exec_conf *c;
	int scratch;		/* its directory */
	char dir[4200];
	/* Log lines waiting for their batch's write. */
	char *batch[64];
	size_t nbatch;
	uint64_t batch_ms;
	unsigned logged;
	bool log_full;
	char tail[EXEC_TAIL][256]; /* the last stderr lines */
	unsigned ntail;
	struct {
		char path[512];
		char type[64];
	} extra[EXEC_EXTRAS];
	size_t nextra;
	bool extra_refused;
};

static void flush_log(struct exec_run *x)
{
	if (x->nbatch)
		run_log_lines(x->r, "", (const char *const *)x->batch, x->nbatch);
	for (size_t i = 0; i < x->nbatch; i++)
		free(x->batch[i]);
	x->nbatch = 0;
	x->batch_ms = now_ms();
}

/* Replace each of the route's env secrets in s by *** (in place: s
 * only shrinks). */
static void mask_secrets(const struct exec_run *x, char *s)
{
	for (size_t i = 0; i < x->c->nsecrets; i++) {
		size_t n = strlen(x->c->secrets[i]);
		for (char *p = strstr(s, x->c->secrets[i]); p; p = strstr(p + 3, x->c->secrets[i])) {
			memcpy(p, "***", 3);
			memmove(p + 3, p + n, strlen(p + n) + 1);
		}
	}
}

/* Queue one line of the program's for the log, secrets masked. */
static void log_program_line(struct exec_run *x, const char *line)
{
	char *s;

	if (x->log_full)
		return;
	if (++x->logged > EXEC_LOG_LINES) {
		x->log_full = true;
		line = "(the program's further output is not logged)";
	}
	if (!(s = strndup(line, INDEX_LOG_LINE_MAX - 64)))
		return;
	mask_secrets(x, s);
	for (char *p = s; *p; p++)
		if ((unsigned char)*p < 0x20 && *p != '\t')
			*p = ' ';
	x->batch[x->nbatch++] = s;
	if (x->nbatch == sizeof(x->batch) / sizeof(x->batch[0]))
		flush_log(x);
}

static void stderr_line(struct exec_run *x, char *line)
{
	char *t = x->tail[x->ntail++ % EXEC_TAIL], *m = strdup(line);
	size_t n;

	/* The last lines go into the job's error message: masked too, whole
	 * before they are cut to fit (a secret cut in two would not match). */
	t[0] = '\0';
	if (m) {
		mask_secrets(x, m);
		n = strnlen(m, sizeof(x->tail[0]) - 1);
		memcpy(t, m, n);
		t[n] = '\0';
		free(m);
	}
	log_program_line(x, line);
}

static void status_line(struct exec_run *x, char *line)
{
	if (strncmp(line, "progress ", 9) == 0) {
		char *end;
		double f = strtod(line + 9, &end);
		if (end > line + 9 && f >= 0 && f <= 1)
			run_progress(x->r, f);
	} else if (strncmp(line, "log ", 4) == 0) {
		log_program_line(x, line + 4);
	} else if (strncmp(line, "output ", 7) == 0) {
		char *path = line + 7, *type = strrchr(path, ' ');
		if (!type || x->nextra == EXEC_EXTRAS ||
		    (size_t)(type - path) >= sizeof(x->extra[0].path) ||
		    strlen(type + 1) >= sizeof(x->extra[0].type) || !strchr(type + 1, '/')) {
			if (!x->extra_refused)
				log_program_line(x, "an `output` status line was refused (`output "
						    "<path> <media type>`, at most 15)");
			x->extra_refused = true;
			return;
		}
		*type++ = '\0';
		snprintf(x->extra[x->nextra].path, sizeof(x->extra[0].path), "%s", path);
		snprintf(x->extra[x->nextra].type, sizeof(x->extra[0].type), "%s", type);
		x->nextra++;
	}
}

/* A line reader over one pipe: complete lines to fn, a line longer than
 * the buffer in pieces. 1: read some; 0: nothing now; -1: end of file or
 * an error (what was left given as a line). */
struct lines {
	int fd;
	char buf[4096];
	size_t len;
};

static int read_lines(struct exec_run *x, struct lines *l, void (*fn)(struct exec_run *, char *))
{
	ssize_t n = read(l->fd, l->buf + l->len, sizeof(l->buf) - 1 - l->len);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n <= 0) {
		if (l->len) {
			l->buf[l->len] = '\0';
			fn(x, l->buf);
			l->len = 0;
		}
		return -1;
	}
	l->len += (size_t)n;
	for (;;) {
		char *nl = memchr(l->buf, '\n', l->len);
		size_t used;

		if (!nl && l->len == sizeof(l->buf) - 1)
			nl = l->buf + l->len; /* a line too long: cut */
		if (!nl)
			break;
		used = (size_t)(nl - l->buf);
		*nl = '\0';
		if (used && l->buf[used - 1] == '\r')
			l->buf[used - 1] = '\0';
		fn(x, l->buf);
		if (used < l->len)
			used++; /* the newline */
		memmove(l->buf, l->buf + used, l->len - used);
		l->len -= used;
	}
	return 1;
}

/* Read what the pipe holds now, then close it. */
static void drain(struct exec_run *x, struct lines *l, void (*fn)(struct exec_run *, char *))
{
	if (l->fd < 0)
		return;
	while (read_lines(x, l, fn) > 0)
		;
	if (l->len) {
		l->buf[l->len] = '\0';
		fn(x, l->buf);
		l->len = 0;
	}
	close(l->fd);
	l->fd = -1;
}

/* ---- the scratch directory ---- */

static int scratch_open(struct exec_run *x)
{
	struct run *r = x->r;
	char id[JOB_ID_STR_LEN + 1];
	int tmp;

	ulid_format(r->job.id, id);
	snprintf(x->dir, sizeof(x->dir), "%s/tmp/exec-%s", store_dir(engine_store(r->e)), id);
	tmp = open(store_dir(engine_store(r->e)), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (tmp < 0)
		return run_fail(r, -errno, "store", "cannot open the store: %s", strerror(errno));
	x->scratch = openat(tmp, x->dir + strlen(store_dir(engine_store(r->e))) + 1,
			    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (x->scratch >= 0) { /* an earlier attempt's */
		dir_empty(x->scratch);
		close(x->scratch);
	} else {
		mkdirat(tmp, x->dir + strlen(store_dir(engine_store(r->e))) + 1, 0700);
	}
	x->scratch = openat(tmp, x->dir + strlen(store_dir(engine_store(r->e))) + 1,
			    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	close(tmp);
	if (x->scratch < 0)
		return run_fail(r, -errno, "store", "cannot make the scratch directory %s: %s",
				x->dir, strerror(errno));
	return 0;
}

static void scratch_remove(struct exec_run *x)
{
	if (x->scratch < 0)
		return;
	dir_empty(x->scratch);
	close(x->scratch);
	x->scratch = -1;
	rmdir(x->dir);
}

/* ---- outputs ---- */

/* Open path (absolute inside the scratch directory, or relative to it)
 * for reading, beneath it only and through no symlink. */
static int open_beneath(struct exec_run *x, const char *path)
{
	struct open_how how = {.flags = O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY,
			       .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
					  RESOLVE_NO_MAGICLINKS};
	size_t n = strlen(x->dir);

	if (path[0] == '/') {
		if (strncmp(path, x->dir, n) != 0 || path[n] != '/')
			return -EPERM;
		path += n + 1;
	}
	int fd = (int)syscall(SYS_openat2, x->scratch, path, &how, sizeof(how));
	return fd < 0 ? -errno : fd;
}

/* Copy the program's file into a sink, checked: 0 with *out, or failed. */
static int take_file(struct exec_run *x, const char *path, const char *type,
		     struct store_sink **out)
{
	struct run *r = x->r;
	uint8_t head[16];
	size_t headlen = 0;
	uint64_t total = 0;
	struct stat st;
	char buf[1 << 16];
	int fd = open_beneath(x, path), rc;

	*out = NULL;
	if (fd < 0)
		return run_fail(r, fd, "output_invalid",
				fd == -EPERM || fd == -EXDEV || fd == -ELOOP
					? "%s is not a file in the job's scratch directory"
					: "the program wrote no %s",
				path);
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return run_fail(r, -EINVAL, "output_invalid", "%s is not a regular file", path);
	}
	if (st.st_size == 0 || (uint64_t)st.st_size > r->route->max_output) {
		close(fd);
		return run_fail(r, -EFBIG, "output_invalid", "%s is %s (%lld bytes; at most %llu)",
				path, st.st_size ? "too large" : "empty", (long long)st.st_size,
				(unsigned long long)r->route->max_output);
	}
	fcntl(fd, F_SETFL, 0);
	if ((rc = store_sink_open(engine_store(r->e), out)) != 0) {
		close(fd);
		return run_fail(r, rc, "store", "cannot store the output: %s", store_lasterr());
	}
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = run_fail(r, -errno, "output_invalid", "cannot read %s: %s", path,
				      strerror(errno));
			break;
		}
		if (n == 0)
			break;
		if (headlen < sizeof(head)) {
			size_t k = (size_t)n < sizeof(head) - headlen ? (size_t)n
								       : sizeof(head) - headlen;
			memcpy(head + headlen, buf, k);
			headlen += k;
		}
		total += (uint64_t)n;
		if (total > r->route->max_output) {
			rc = run_fail(r, -EFBIG, "output_invalid", "%s grew past %llu bytes", path,
				      (unsigned long long)r->route->max_output);
			break;
		}
		if ((rc = store_sink_write(*out, buf, (size_t)n)) != 0) {
			rc = run_fail(r, rc, "store", "cannot store the output: %s",
				      store_lasterr());
			break;
		}
	}
	close(fd);
	if (rc == 0 && !svc_magic_fits(type, head, headlen)) {
		const char *got = svc_sniff(head, headlen);
		rc = run_fail(r, -EINVAL, "output_invalid", "%s is %s, not %s", path,
			      got ? got : "of no media type its first bytes tell", type);
	}
	if (rc) {
		store_sink_abort(*out);
		*out = NULL;
	}
	return rc;
}

/* ---- the child ---- */

struct child_setup {
	const struct exec_conf *c;
	char *const *argv;
	char *const *envp;
	const char *dir;
	int in, err, status, devnull, report; /* report: the exec's errno goes there */
	pid_t parent;
};

static void child_fail(const struct child_setup *s)
{
	int e = errno;

	(void)!write(s->report, &e, sizeof(e));
	_exit(127);
}

static void child_limit(const struct child_setup *s, int what, uint64_t v)
{
	struct rlimit rl = {(rlim_t)v, (rlim_t)v};

	if (what == RLIMIT_CPU)
		rl.rlim_max = (rlim_t)v + 5; /* SIGXCPU first, then SIGKILL */
	if (v && setrlimit(what, &rl) != 0)
		child_fail(s);
}

/* After fork: async-signal-safe calls only. */
static void child_main(const struct child_setup *s)
{
	int fds[4] = {s->in, s->devnull, s->err, s->status};
	sigset_t all;

	if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != s->parent)
		_exit(127);
	setsid();
	/* Move the four out of the way of 0-3 before placing them. */
	for (int i = 0; i < 4; i++)
		if ((fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 10)) < 0)
			child_fail(s);
	for (int i = 0; i < 4; i++)
		if (dup2(fds[i], i) < 0)
			child_fail(s);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	if (chdir(s->dir) != 0)
		child_fail(s);
	child_limit(s, RLIMIT_AS, s->c->memory);
	child_limit(s, RLIMIT_CPU, s->c->cpu_s);
	child_limit(s, RLIMIT_FSIZE, s->c->file_size);
	child_limit(s, RLIMIT_NPROC, s->c->processes);
	child_limit(s, RLIMIT_CORE, 0);
	execve(s->c->bwrap ? s->c->bwrap_path : s->c->path, s->argv, s->envp);
	child_fail(s);
}

/* ---- argv and environment ---- */

struct strv {
	char **v;
	size_t n, cap;
	bool oom;
};

static void sv_add(struct strv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sv_add(struct strv *s, const char *fmt, ...)
{
	va_list ap;
	char *str;

	if (s->n + 2 > s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 64;
		char **v = realloc(s->v, cap * sizeof(*v));
		if (!v) {
			s->oom = true;
			return;
		}
		s->v = v;
		s->cap = cap;
	}
	va_start(ap, fmt);
	if (vasprintf(&str, fmt, ap) < 0) {
		s->oom = true;
		str = NULL;
	}
	va_end(ap);
	if (str) {
		s->v[s->n++] = str;
		s->v[s->n] = NULL;
	}
}

static void sv_free(struct strv *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->v[i]);
	free(s->v);
}

/* A system directory in the sandbox: read-only, or the symlink it is. */
static void bwrap_system(struct strv *a, const char *path)
{
	char target[4096];
	struct stat st;
	ssize_t n = readlink(path, target, sizeof(target) - 1);

	if (n > 0) {
		target[n] = '\0';
		sv_add(a, "--symlink");
		sv_add(a, "%s", target);
		sv_add(a, "%s", path);
	} else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
		sv_add(a, "--ro-bind");
		sv_add(a, "%s", path);
		sv_add(a, "%s", path);
	}
}

static const char *const system_dirs[] = {"/usr", "/bin", "/sbin", "/lib", "/lib32",
					  "/lib64", "/libx32", "/etc", "/opt"};
#define NSYSTEM (sizeof(system_dirs) / sizeof(system_dirs[0]))

static bool under_system(const char *path)
{
	for (size_t i = 0; i < NSYSTEM; i++) {
		size_t n = strlen(system_dirs[i]);
		if (strncmp(path, system_dirs[i], n) == 0 && path[n] == '/')
			return true;
	}
	return false;
}

static void build_argv(struct exec_run *x, struct strv *a)
{
	const struct exec_conf *c = x->c;

	if (c->bwrap) {
		sv_add(a, "%s", c->bwrap_path);
		for (size_t i = 0; i < NSYSTEM; i++)
			bwrap_system(a, system_dirs[i]);
		sv_add(a, "--proc");
		sv_add(a, "/proc");
		sv_add(a, "--dev");
		sv_add(a, "/dev");
		sv_add(a, "--tmpfs");
		sv_add(a, "/tmp");
		if (x->r->gpu >= 0) {
			static const char *const nodes[] = {"/dev/nvidiactl", "/dev/nvidia-uvm",
							    "/dev/nvidia-uvm-tools"};
			for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
				sv_add(a, "--dev-bind-try");
				sv_add(a, "%s", nodes[i]);
				sv_add(a, "%s", nodes[i]);
			}
			sv_add(a, "--dev-bind-try");
			sv_add(a, "/dev/nvidia%d", x->r->gpu);
			sv_add(a, "/dev/nvidia%d", x->r->gpu);
		}
		if (!under_system(c->path)) { /* the program itself */
			sv_add(a, "--ro-bind");
			sv_add(a, "%s", c->path);
			sv_add(a, "%s", c->path);
		}
		for (size_t i = 0; i < c->nro; i++) {
			sv_add(a, "--ro-bind");
			sv_add(a, "%s", c->ro[i]);
			sv_add(a, "%s", c->ro[i]);
		}
		sv_add(a, "--bind");
		sv_add(a, "%s", x->dir);
		sv_add(a, "%s", x->dir);
		sv_add(a, "--chdir");
		sv_add(a, "%s", x->dir);
		sv_add(a, "--unshare-all");
		sv_add(a, "--die-with-parent");
		sv_add(a, "--new-session");
		sv_add(a, "--");
		sv_add(a, "%s", c->path);
	} else {
		sv_add(a, "%s", c->path);
	}
	for (size_t i = 1; i < c->argc; i++)
		sv_add(a, "%s", c->argv[i]);
}

static void build_env(struct exec_run *x, const char *output, struct strv *e)
{
	struct run *r = x->r;
	char id[JOB_ID_STR_LEN + 1];

	ulid_format(r->job.id, id);
	sv_add(e, "PATH=%s", DEFAULT_PATH);
	sv_add(e, "HOME=%s", x->dir);
	sv_add(e, "TMPDIR=%s", x->dir);
	sv_add(e, "LANG=C.UTF-8");
	for (size_t i = 0; i < x->c->nenv; i++)
		sv_add(e, "%s", x->c->env[i]);
	sv_add(e, "RENDERFS_OUTPUT=%s", output);
	sv_add(e, "RENDERFS_STATUS_FD=3");
	sv_add(e, "RENDERFS_JOB=%s", r->job.name && r->job.name[0] ? r->job.name : id);
	sv_add(e, "RENDERFS_ROUTE=%s", r->route->path);
	if (r->gpu >= 0)
		sv_add(e, "CUDA_VISIBLE_DEVICES=%d", r->gpu);
}

/* ---- running it ---- */

/* Why the program ended, for the error message, into msg. */
static void describe_end(struct exec_run *x, int status, char *msg, size_t len)
{
	const struct exec_conf *c = x->c;
	char tail[EXEC_TAIL * 258] = "";
	size_t n = 0;
	bool oom = false;

	for (unsigned i = x->ntail > EXEC_TAIL ? x->ntail - EXEC_TAIL : 0; i < x->ntail; i++) {
		const char *l = x->tail[i % EXEC_TAIL];
		if (strcasestr(l, "memoryerror") || strcasestr(l, "cannot allocate memory") ||
		    strcasestr(l, "out of memory") || strcasestr(l, "bad_alloc") ||
		    strcasestr(l, "memory exhausted"))
			oom = true;
		n += (size_t)snprintf(tail + n, sizeof(tail) - n, "%s%s", n ? " | " : "", l);
		if (n >= sizeof(tail))
			n = sizeof(tail) - 1;
	}
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGXCPU)
		snprintf(msg, len, "exceeded the CPU time limit of %llu s",
			 (unsigned long long)c->cpu_s);
	else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && c->cpu_s)
		snprintf(msg, len, "killed (SIGKILL; the CPU time limit is %llu s)%s%s",
			 (unsigned long long)c->cpu_s, n ? ": " : "", tail);
	else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ)
		snprintf(msg, len, "exceeded the file size limit of %llu bytes",
			 (unsigned long long)c->file_size);
	else if (c->memory && (oom || (WIFSIGNALED(status) && (WTERMSIG(status) == SIGSEGV ||
							       WTERMSIG(status) == SIGABRT))))
		snprintf(msg, len, "exceeded memory limit of %llu MiB%s%s",
			 (unsigned long long)(c->memory >> 20), n ? ": " : "", tail);
	else if (WIFSIGNALED(status))
		snprintf(msg, len, "killed by signal %d (%s)%s%s", WTERMSIG(status),
			 strsignal(WTERMSIG(status)), n ? ": " : "", tail);
	else
		snprintf(msg, len, "exit status %d%s%s", WEXITSTATUS(status), n ? ": " : "",
			 n ? tail : " (nothing on stderr)");
}

/* Start the program and follow it to its end: 0 with *status, or failed
 * (the child, if started, is gone). */
static int follow(struct exec_run *x, char *const *argv, char *const *envp, const char *input,
		  int *status)
{
	struct run *r = x->r;
	int in[2] = {-1, -1}, err[2] = {-1, -1}, st[2] = {-1, -1}, rep[2] = {-1, -1};
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC), pidfd = -1, rc = 0;
	struct lines le = {.fd = -1}, ls = {.fd = -1};
	size_t inlen = strlen(input), inoff = 0;
	uint64_t term_ms = 0;
	bool exited = false;
	pid_t pid;

	if (devnull < 0 || pipe2(in, O_CLOEXEC) || pipe2(err, O_CLOEXEC) || pipe2(st, O_CLOEXEC) ||
	    pipe2(rep, O_CLOEXEC)) {
		rc = run_fail(r, -errno, "backend_failed", "cannot make pipes: %s", strerror(errno));
		goto out;
	}
	struct child_setup s = {x->c, argv, envp, x->dir, in[0], err[1], st[1], devnull, rep[1],
				getpid()};
	pid = fork();
	if (pid < 0) {
		rc = run_fail(r, -errno, "backend_failed", "cannot start the program: %s",
			      strerror(errno));
		goto out;
	}
	if (pid == 0)
		child_main(&s);
	close(in[0]);
	close(err[1]);
	close(st[1]);
	close(rep[1]);
	in[0] = err[1] = st[1] = rep[1] = -1;
	int e = 0;
	if (read(rep[0], &e, sizeof(e)) == sizeof(e)) { /* the exec failed */
		waitpid(pid, NULL, 0);
		rc = run_fail(r, -e, "backend_failed", "cannot run %s: %s", x->c->path,
			      strerror(e));
		goto out;
	}
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	le.fd = err[0];
	ls.fd = st[0];
	err[0] = st[0] = -1; /* le and ls own them now */
	fcntl(in[1], F_SETFL, O_NONBLOCK);
	fcntl(err[0], F_SETFL, O_NONBLOCK);
	fcntl(st[0], F_SETFL, O_NONBLOCK);
	if (!inlen) {
		close(in[1]);
		in[1] = -1;
	}
	while (!exited || le.fd >= 0 || ls.fd >= 0) {
		struct pollfd p[4] = {{in[1], POLLOUT, 0}, {le.fd, POLLIN, 0}, {ls.fd, POLLIN, 0},
				      {exited ? -1 : pidfd, POLLIN, 0}};
		uint64_t now = now_ms();

		if (!exited && run_stopping(r) != STOP_NONE) {
			if (!term_ms) {
				kill(-pid, SIGTERM);
				term_ms = now;
			} else if (now - term_ms >= EXEC_GRACE_MS) {
				kill(-pid, SIGKILL);
			}
		}
		if (exited) {
			/* The leader is gone and its group killed: what the pipes
			 * hold now, then done (a process that left the group may
			 * hold them open forever). */
			drain(x, &le, stderr_line);
			drain(x, &ls, status_line);
			break;
		}
		if (poll(p, 4, pidfd < 0 ? 20 : 100) < 0 && errno != EINTR) {
			rc = run_fail(r, -errno, "backend_failed", "poll: %s", strerror(errno));
			kill(-pid, SIGKILL);
			waitpid(pid, status, 0);
			goto out;
		}
		if (in[1] >= 0 && (p[0].revents & (POLLOUT | POLLERR | POLLHUP))) {
			ssize_t n = write(in[1], input + inoff, inlen - inoff);
			if (n > 0)
				inoff += (size_t)n;
			if ((n < 0 && errno != EAGAIN && errno != EINTR) || inoff == inlen) {
				close(in[1]); /* done, or the program does not read it */
				in[1] = -1;
			}
		}
		if (le.fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    read_lines(x, &le, stderr_line) < 0) {
			close(le.fd);
			le.fd = -1;
		}
		if (ls.fd >= 0 && (p[2].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    read_lines(x, &ls, status_line) < 0) {
			close(ls.fd);
			ls.fd = -1;
		}
		if (pidfd < 0 || (p[3].revents & POLLIN)) {
			pid_t w = waitpid(pid, status, pidfd < 0 ? WNOHANG : 0);
			if (w == pid) {
				exited = true;
				kill(-pid, SIGKILL); /* what is left of its group */
			}
		}
		if (x->nbatch && now_ms() - x->batch_ms >= EXEC_LOG_MS)
			flush_log(x);
	}
	flush_log(x);
out:
	if (le.fd >= 0)
		close(le.fd);
	if (ls.fd >= 0)
		close(ls.fd);
	err[0] = st[0] = -1; /* closed above */
	for (int i = 0; i < 2; i++) {
		if (in[i] >= 0)
			close(in[i]);
		if (err[i] >= 0)
			close(err[i]);
		if (st[i] >= 0)
			close(st[i]);
		if (rep[i] >= 0)
			close(rep[i]);
	}
	if (pidfd >= 0)
		close(pidfd);
	if (devnull >= 0)
		close(devnull);
	return rc;
}

static int exec_run(struct run *r)
{
	struct exec_run x = {.r = r, .c = r->route->backend_state, .scratch = -1};
	struct strv argv = {0}, envp = {0};
	struct store_sink *sink = NULL;
	char output[4300], *input = NULL, msg[ENGINE_ERR_MAX];
	int status = 0, rc;

	x.batch_ms = now_ms();
	if ((rc = scratch_open(&x)) != 0)
		return rc;
	if ((rc = run_request_input_files(r, x.scratch, x.dir, &input)) != 0)
		goto out;
	snprintf(output, sizeof(output), "%s/output.%s", x.dir, x.c->ext);
	build_argv(&x, &argv);
	build_env(&x, output, &envp);
	if (argv.oom || envp.oom) {
		rc = run_fail(r, -ENOMEM, "backend_failed", "out of memory");
		goto out;
	}
	if ((rc = follow(&x, argv.v, envp.v, input, &status)) != 0)
		goto out;
	if (run_stopping(r) != STOP_NONE) {
		rc = -ECANCELED;
		goto out;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		describe_end(&x, status, msg, sizeof(msg));
		rc = run_fail(r, -EIO, "backend_failed", "%s", msg);
		goto out;
	}
	/* Extra outputs first: the first output's commit announces them. */
	for (size_t i = 0; i < x.nextra; i++) {
		if ((rc = take_file(&x, x.extra[i].path, x.extra[i].type, &sink)) != 0 ||
		    (rc = run_commit_extra(r, (unsigned)i + 1, sink, x.extra[i].type, NULL)) != 0)
			goto out;
	}
	if ((rc = take_file(&x, output, r->route->media_type, &sink)) != 0)
		goto out;
	char device[32];
	snprintf(device, sizeof(device), r->gpu >= 0 ? "gpu %d" : "cpu", r->gpu);
	rc = run_commit_output(r, sink, r->route->media_type, device);
out:
	free(input);
	sv_free(&argv);
	sv_free(&envp);
	scratch_remove(&x);
	return rc;
}

const struct backend backend_exec = {
    .name = "exec",
    .max_input = UINT64_MAX,
    .configure = exec_configure,
    .run = exec_run,
    .release = exec_release,
};
