/*
 * client.c - renderctl submit, wait and ls (client.h): what a shell user
 * reaches for instead of `exec 3<>new` and inotifywait.
 *
 * DESIGN
 *
 * The client uses the mount's files only (SPEC §2, §3): a request goes
 * through the route's `new` opened O_RDWR, one object per write(), and
 * the line read back is the job's id or `error: <message>` (the write's
 * errno says the kind); a job is followed by watching its directory with
 * inotify (SPEC §4: MODIFY on status, progress and log) and reading its
 * files after each batch of events, the watch set before the first read
 * so that no change falls between them. Nothing is polled: the only
 * timeout is a re-read every 10 s, for a mount with `nonotify`.
 *
 * Requests are sent as the user wrote them: options (--name, --priority,
 * --timeout, --webhook) are added around the original bytes (a bare input
 * becomes {"input": <bytes>, ...}; an envelope gets the keys before its
 * closing brace), so the daemon judges exactly what the user wrote
 * (duplicate keys, number forms) and says what is wrong.
 *
 * The mount is found from --mount, else $RENDERFS_MOUNT, else the current
 * directory or one above it, else the only renderfs mount in
 * /proc/self/mountinfo.
 */
#include "client.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#include <json-c/json.h>

#include "err.h"
#include "fileutil.h"
#include "ledger.h"

#define FUSE_SUPER_MAGIC 0x65735546
#define CLIENT_INPUT_MAX (256u << 20) /* bytes of requests read at once */
#define CLIENT_JOBS_MAX 4096	      /* jobs one command follows */
#define CLIENT_REREAD_MS 10000

static const char *prog = "renderctl";

/* ---- small file helpers ---- */

static bool is_dir(const char *p)
{
	struct stat st;

	return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Whether dir is the root of a renderfs mount. */
static bool mount_root(const char *dir)
{
	struct statfs sf;
	char p[PATH_MAX];

	if (statfs(dir, &sf) != 0 || (unsigned long)sf.f_type != FUSE_SUPER_MAGIC)
		return false;
	snprintf(p, sizeof(p), "%s/models.json", dir);
	if (access(p, R_OK) != 0)
		return false;
	snprintf(p, sizeof(p), "%s/jobs", dir);
	return is_dir(p);
}

/* The mount (see DESIGN) into out: 0, or -1 with a message printed. */
static int find_mount(const char *given, char *out, size_t len)
{
	char cwd[PATH_MAX], line[4096];
	char found[PATH_MAX] = "";
	int n = 0;
	FILE *f;

	if (!given)
		given = getenv("RENDERFS_MOUNT");
	if (given && *given) {
		if (!realpath(given, cwd) || !mount_root(cwd)) {
			fprintf(stderr, "%s: '%s' is not a renderfs mount\n", prog, given);
			return -1;
		}
		snprintf(out, len, "%s", cwd);
		return 0;
	}
	if (getcwd(cwd, sizeof(cwd))) {
		for (;;) {
			if (mount_root(cwd)) {
				snprintf(out, len, "%s", cwd);
				return 0;
			}
			char *slash = strrchr(cwd, '/');
			if (!slash || slash == cwd)
				break;
			*slash = '\0';
		}
	}
	/* mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SRC ... */
	if ((f = fopen("/proc/self/mountinfo", "re")) != NULL) {
		while (fgets(line, sizeof(line), f)) {
			char mp[PATH_MAX], *dash = strstr(line, " - fuse.renderfs ");
			if (!dash || sscanf(line, "%*s %*s %*s %*s %4095s", mp) != 1)
				continue;
			/* Octal escapes (\040 for a space) as the kernel writes them. */
			char *w = mp;
			for (const char *s = mp; *s; s++) {
				if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] && s[3]) {
					*w++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
					s += 3;
				} else {
					*w++ = *s;
				}
			}
			*w = '\0';
			if (mount_root(mp) && strcmp(mp, found) != 0) {
				snprintf(found, sizeof(found), "%s", mp);
				n++;
			}
		}
		fclose(f);
	}
	if (n == 1) {
		snprintf(out, len, "%s", found);
		return 0;
	}
	fprintf(stderr,
		"%s: %s; say which with --mount DIR or RENDERFS_MOUNT, or run from inside "
		"the mount\n",
		prog, n ? "there are several renderfs mounts" : "no renderfs mount found");
	return -1;
}

/* ---- following jobs ---- */

enum jstate { J_WAITING, J_COMPLETE, J_ERROR, J_CANCELLED, J_GONE };

struct wjob {
	char dir[PATH_MAX];
	int wd;
	enum jstate state;
	double progress;
	off_t log_at;	/* bytes of the log already shown (plain mode) */
	char last[160]; /* the log's latest line (terminal mode) */
};

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

/* The job's status, progress and log, read again. */
static void refresh(struct wjob *j, bool tty, size_t njobs)
{
	char p[PATH_MAX + 16], *buf;
	size_t n;
	int rc;

	snprintf(p, sizeof(p), "%s/status", j->dir);
	if ((rc = file_read_small(p, 64, &buf, &n)) != 0) {
		if (rc == -ENOENT || !is_dir(j->dir))
			j->state = J_GONE;
		return;
	}
	j->state = strncmp(buf, "complete", 8) == 0    ? J_COMPLETE
		   : strncmp(buf, "error", 5) == 0     ? J_ERROR
		   : strncmp(buf, "cancelled", 9) == 0 ? J_CANCELLED
						       : J_WAITING;
	free(buf);
	snprintf(p, sizeof(p), "%s/progress", j->dir);
	if (file_read_small(p, 64, &buf, &n) == 0) {
		j->progress = strtod(buf, NULL);
		free(buf);
	}
	snprintf(p, sizeof(p), "%s/log", j->dir);
	int fd = open(p, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		if (fd >= 0)
			close(fd);
		return;
	}
	if (tty) {
		/* The latest complete line, from the log's last 4 KiB. */
		char tail[4096];
		off_t from = st.st_size > (off_t)sizeof(tail) - 1 ? st.st_size - (off_t)sizeof(tail) + 1 : 0;
		ssize_t k = pread(fd, tail, sizeof(tail) - 1, from);
		if (k > 0) {
			tail[k] = '\0';
			while (k > 0 && tail[k - 1] == '\n')
				tail[--k] = '\0';
			char *nl = strrchr(tail, '\n'), *line = nl ? nl + 1 : tail;
			/* Without its time stamp: "2026-...Z text". */
			char *sp = strchr(line, ' ');
			snprintf(j->last, sizeof(j->last), "%.159s",
				 sp && sp - line == 24 ? sp + 1 : line);
		}
	} else {
		/* New lines, as they are, to stderr. */
		char chunk[8192];
		while (j->log_at < st.st_size) {
			ssize_t k = pread(fd, chunk, sizeof(chunk), j->log_at);
			if (k <= 0)
				break;
			/* Whole lines only: a line still being written waits. */
			ssize_t end = k;
			while (end > 0 && chunk[end - 1] != '\n')
				end--;
			if (end == 0)
				break;
			if (njobs > 1) {
				const char *id = strrchr(j->dir, '/');
				for (ssize_t a = 0; a < end;) {
					char *nl = memchr(chunk + a, '\n', (size_t)(end - a));
					fprintf(stderr, "%s: %.*s\n", id ? id + 1 : j->dir,
						(int)(nl - (chunk + a)), chunk + a);
					a = nl - chunk + 1;
				}
			} else {
				fwrite(chunk, 1, (size_t)end, stderr);
			}
			j->log_at += end;
		}
	}
	close(fd);
}

static int term_width(void)
{
	struct winsize ws;

	if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20)
		return ws.ws_col;
	return 80;
}

/* The bar: "[#####.....]  42% <latest log line>", one line, redrawn. */
static void draw(const struct wjob *jobs, size_t n)
{
	const struct wjob *j = NULL;
	size_t done = 0;
	int width = term_width(), fill, at;
	char line[512];

	for (size_t i = 0; i < n; i++) {
		if (jobs[i].state != J_WAITING)
			done++;
		else if (!j)
			j = &jobs[i];
	}
	if (!j)
		return;
	fill = (int)(j->progress * 20 + 0.5);
	at = snprintf(line, sizeof(line), "[%.*s%.*s] %3d%% ", fill, "####################",
		      20 - fill, "....................", (int)(j->progress * 100 + 0.5));
	if (n > 1)
		at += snprintf(line + at, sizeof(line) - (size_t)at, "%zu/%zu done ", done, n);
	snprintf(line + at, sizeof(line) - (size_t)at, "%s", j->last);
	fprintf(stderr, "\r%.*s\033[K", width - 1, line);
	fflush(stderr);
}

/* Ask on the terminal whether to cancel; true for yes. */
static bool ask_cancel(size_t n)
{
	char ans[16] = "";
	FILE *tty = fopen("/dev/tty", "r+e");

	if (!tty)
		return false;
	fprintf(tty, "\r\033[Kcancel the job%s? [y/N] ", n == 1 ? "" : "s");
	fflush(tty);
	if (!fgets(ans, sizeof(ans), tty))
		ans[0] = '\0';
	fclose(tty);
	return ans[0] == 'y' || ans[0] == 'Y';
}

static void cancel_jobs(struct wjob *jobs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char p[PATH_MAX + 8];
		int fd;
		if (jobs[i].state != J_WAITING)
			continue;
		snprintf(p, sizeof(p), "%s/ctl", jobs[i].dir);
		if ((fd = open(p, O_WRONLY | O_CLOEXEC)) < 0 || write(fd, "cancel\n", 7) != 7)
			fprintf(stderr, "%s: cannot cancel '%s': %s\n", prog, jobs[i].dir,
				strerror(errno));
		if (fd >= 0)
			close(fd);
	}
}

/* What a finished job says: its outputs on stdout, else its error. */
static int report(const struct wjob *j)
{
	char p[PATH_MAX + 16], *buf;
	json_object *o = NULL, *v;
	int code = CLIENT_EXIT_ERROR;
	size_t n;

	if (j->state == J_GONE) {
		fprintf(stderr, "%s: %s: the job was deleted\n", prog, j->dir);
		return CLIENT_EXIT_ERROR;
	}
	if (j->state == J_CANCELLED) {
		fprintf(stderr, "%s: %s: cancelled\n", prog, j->dir);
		return CLIENT_EXIT_CANCELLED;
	}
	snprintf(p, sizeof(p), "%s/status.json", j->dir);
	if (file_read_small(p, 1 << 20, &buf, &n) == 0) {
		o = json_tokener_parse(buf);
		free(buf);
	}
	if (j->state == J_COMPLETE) {
		json_object *outs = NULL;
		if (o && json_object_object_get_ex(o, "outputs", &outs) &&
		    json_object_is_type(outs, json_type_array) && json_object_array_length(outs)) {
			for (size_t i = 0; i < json_object_array_length(outs); i++)
				if (json_object_object_get_ex(json_object_array_get_idx(outs, i), "name",
							      &v))
					printf("%s/%s\n", j->dir, json_object_get_string(v));
		} else if (o && json_object_object_get_ex(o, "output", &outs) &&
			   json_object_object_get_ex(outs, "name", &v)) {
			printf("%s/%s\n", j->dir, json_object_get_string(v));
		} else {
			printf("%s\n", j->dir);
		}
		code = CLIENT_EXIT_COMPLETE;
	} else {
		json_object *e = NULL, *c = NULL, *m = NULL;
		if (o && json_object_object_get_ex(o, "error", &e) && e) {
			json_object_object_get_ex(e, "code", &c);
			json_object_object_get_ex(e, "message", &m);
		}
		fprintf(stderr, "%s: %s: error: %s: %s\n", prog, j->dir,
			c ? json_object_get_string(c) : "?", m ? json_object_get_string(m) : "");
	}
	json_object_put(o);
	return code;
}

/*
 * Follow the jobs until each has ended; report each; the worst's exit
 * status (error, else cancelled, else complete). ask: Ctrl-C asks
 * whether to cancel (submit on a terminal); cancel: Ctrl-C cancels.
 */
static int follow(struct wjob *jobs, size_t n, bool ask, bool cancel)
{
	bool tty = isatty(STDERR_FILENO), drawn = false, cancelling = false;
	struct sigaction sa = {.sa_handler = on_sigint}, old;
	int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK), worst = CLIENT_EXIT_COMPLETE;

	if (in < 0) {
		fprintf(stderr, "%s: inotify: %s\n", prog, strerror(errno));
		return CLIENT_EXIT_USAGE;
	}
	for (size_t i = 0; i < n; i++) {
		jobs[i].wd = inotify_add_watch(in, jobs[i].dir,
					       IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE |
						   IN_DELETE_SELF | IN_MOVE_SELF);
		if (jobs[i].wd < 0) {
			fprintf(stderr, "%s: '%s': %s\n", prog, jobs[i].dir,
				errno == ENOENT ? "no such job" : strerror(errno));
			close(in);
			return CLIENT_EXIT_USAGE;
		}
	}
	/* SIGINT is blocked but while ppoll() waits, so that a Ctrl-C
	 * between two waits is not lost: it ends the next one at once. */
	sigset_t block, waitmask;
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &waitmask);
	sigdelset(&waitmask, SIGINT);
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old); /* no SA_RESTART: ppoll() returns */
	for (;;) {
		size_t waiting = 0;
		for (size_t i = 0; i < n; i++) {
			if (jobs[i].state == J_WAITING)
				refresh(&jobs[i], tty, n);
			waiting += jobs[i].state == J_WAITING;
		}
		if (!waiting)
			break;
		if (tty) {
			draw(jobs, n);
			drawn = true;
		}
		struct pollfd pf = {.fd = in, .events = POLLIN};
		struct timespec ts = {.tv_sec = CLIENT_REREAD_MS / 1000};
		ppoll(&pf, 1, &ts, &waitmask);
		if (interrupted) {
			interrupted = 0;
			if (cancelling)
				continue;
			if (cancel || (ask && ask_cancel(waiting))) {
				cancel_jobs(jobs, n);
				cancelling = true;
				continue;
			}
			if (drawn)
				fprintf(stderr, "\r\033[K");
			fprintf(stderr, "%s: interrupted; the job%s go%s on\n", prog,
				waiting == 1 ? "" : "s", waiting == 1 ? "es" : "");
			sigaction(SIGINT, &old, NULL);
			sigprocmask(SIG_UNBLOCK, &block, NULL);
			close(in);
			return CLIENT_EXIT_INTERRUPT;
		}
		/* The events only say "look again": drain them. */
		char evbuf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
		while (read(in, evbuf, sizeof(evbuf)) > 0) {
		}
	}
	sigaction(SIGINT, &old, NULL);
	sigprocmask(SIG_UNBLOCK, &block, NULL);
	close(in);
	if (drawn)
		fprintf(stderr, "\r\033[K");
	for (size_t i = 0; i < n; i++) {
		int c = report(&jobs[i]);
		if (c == CLIENT_EXIT_ERROR || (c == CLIENT_EXIT_CANCELLED && worst == 0))
			worst = c;
	}
	fflush(stdout);
	return worst;
}

/* ---- submit ---- */

/* Read all of fd (bounded): malloc'ed, NUL-terminated, or NULL. */
static char *slurp(int fd, size_t *len)
{
	size_t cap = 65536, n = 0;
	char *buf = malloc(cap + 1);

	while (buf) {
		if (n == cap) {
			char *b;
			if (cap >= CLIENT_INPUT_MAX || !(b = realloc(buf, cap * 2 + 1))) {
				free(buf);
				errno = EFBIG;
				return NULL;
			}
			buf = b;
			cap *= 2;
		}
		ssize_t k = read(fd, buf + n, cap - n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			free(buf);
			return NULL;
		}
		if (k == 0)
			break;
		n += (size_t)k;
	}
	if (buf) {
		buf[n] = '\0';
		*len = n;
	}
	return buf;
}

/* JSON string s, quoted, appended to out (cap bytes). */
static void put_str(char *out, size_t cap, size_t *at, const char *s)
{
	json_object *o = json_object_new_string(s);
	const char *t = o ? json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN) : "\"\"";
	int k = snprintf(out + *at, cap - *at, "%s", t);

	if (k > 0)
		*at += (size_t)k < cap - *at ? (size_t)k : cap - *at - 1;
	json_object_put(o);
}

struct sub_opts {
	const char *name, *priority, *webhook;
	long timeout;
};

/* The text to write for one object (text, len bytes, env: whether it is
 * an envelope): malloc'ed, newline-terminated. */
static char *with_options(const char *text, size_t len, bool env, const struct sub_opts *o)
{
	size_t cap = len + 1024 + (o->name ? strlen(o->name) * 6 : 0) +
		     (o->webhook ? strlen(o->webhook) * 6 : 0);
	char *out = malloc(cap), opts[8192];
	size_t at = 0;

	if (!out)
		return NULL;
	if (o->name) {
		at += (size_t)snprintf(opts + at, sizeof(opts) - at, ",\"name\":");
		put_str(opts, sizeof(opts), &at, o->name);
	}
	if (o->priority) {
		at += (size_t)snprintf(opts + at, sizeof(opts) - at, ",\"priority\":");
		put_str(opts, sizeof(opts), &at, o->priority);
	}
	if (o->timeout > 0)
		at += (size_t)snprintf(opts + at, sizeof(opts) - at, ",\"timeout_s\":%ld", o->timeout);
	if (o->webhook) {
		at += (size_t)snprintf(opts + at, sizeof(opts) - at, ",\"webhook\":");
		put_str(opts, sizeof(opts), &at, o->webhook);
	}
	if (at == 0)
		snprintf(out, cap, "%.*s\n", (int)len, text);
	else if (env) /* {... "input": ...} -> {... "input": ..., options} */
		snprintf(out, cap, "%.*s%s}\n", (int)(len - 1), text, opts); /* text[len-1]: '}' */
	else
		snprintf(out, cap, "{\"input\":%.*s%s}\n", (int)len, text, opts);
	return out;
}

static int submit_usage(void)
{
	fprintf(stderr,
		"usage: %s submit ROUTE [FILE|-] [--wait] [--name N] [--priority low|normal|high]\n"
		"                 [--timeout S] [--webhook URL] [--mount DIR] "
		"[--cancel-on-interrupt]\n",
		prog);
	return CLIENT_EXIT_USAGE;
}

int client_submit(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"wait", no_argument, NULL, 'w'},	  {"name", required_argument, NULL, 'n'},
	    {"priority", required_argument, NULL, 'p'},
	    {"timeout", required_argument, NULL, 't'},
	    {"webhook", required_argument, NULL, 'W'},
	    {"mount", required_argument, NULL, 'm'},
	    {"cancel-on-interrupt", no_argument, NULL, 'c'},
	    {NULL, 0, NULL, 0},
	};
	struct sub_opts so = {0};
	const char *mountopt = NULL, *route, *file = "-";
	bool wait = false, cancel = false;
	char mnt[PATH_MAX], newp[PATH_MAX * 2], *input;
	size_t len, at = 0, njobs = 0;
	struct wjob *jobs = NULL;
	int c, fd, code = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'w':
			wait = true;
			break;
		case 'n':
			so.name = optarg;
			break;
		case 'p':
			so.priority = optarg;
			break;
		case 't': {
			char *end;
			so.timeout = strtol(optarg, &end, 10);
			if (*end || so.timeout <= 0) {
				fprintf(stderr, "%s: --timeout takes seconds, more than 0\n", prog);
				return CLIENT_EXIT_USAGE;
			}
			break;
		}
		case 'W':
			so.webhook = optarg;
			break;
		case 'm':
			mountopt = optarg;
			break;
		case 'c':
			cancel = true;
			break;
		default:
			return submit_usage();
		}
	}
	if (optind >= argc || argc - optind > 2)
		return submit_usage();
	route = argv[optind];
	if (argc - optind == 2)
		file = argv[optind + 1];
	while (*route == '/')
		route++;
	if (find_mount(mountopt, mnt, sizeof(mnt)) != 0)
		return CLIENT_EXIT_USAGE;
	snprintf(newp, sizeof(newp), "%s/%s/new", mnt, route);
	if (access(newp, W_OK) != 0) {
		fprintf(stderr, "%s: no route '%s' in %s (see %s/models.json)\n", prog, route, mnt,
			mnt);
		return CLIENT_EXIT_USAGE;
	}
	if (strcmp(file, "-") == 0) {
		input = slurp(STDIN_FILENO, &len);
	} else {
		int in = open(file, O_RDONLY | O_CLOEXEC);
		input = in >= 0 ? slurp(in, &len) : NULL;
		if (in >= 0)
			close(in);
	}
	if (!input) {
		fprintf(stderr, "%s: cannot read '%s': %s\n", prog, file, strerror(errno));
		return CLIENT_EXIT_USAGE;
	}
	if ((fd = open(newp, O_RDWR | O_CLOEXEC)) < 0) {
		fprintf(stderr, "%s: cannot open '%s': %s\n", prog, newp, strerror(errno));
		free(input);
		return CLIENT_EXIT_USAGE;
	}
	if (!(jobs = calloc(CLIENT_JOBS_MAX, sizeof(*jobs)))) {
		fprintf(stderr, "%s: out of memory\n", prog);
		close(fd);
		free(input);
		return CLIENT_EXIT_USAGE;
	}
	/* One object at a time, as the user wrote it (JSON Lines or
	 * concatenated objects: a batch). */
	json_tokener *tok = json_tokener_new_ex(64);
	while (tok) {
		json_object *o;
		size_t start;
		char *text, line[4096];
		ssize_t k;

		at += strspn(input + at, " \t\r\n");
		if (at >= len)
			break;
		start = at;
		json_tokener_reset(tok);
		o = json_tokener_parse_ex(tok, input + at, (int)(len - at));
		if (!o || json_tokener_get_error(tok) != json_tokener_success ||
		    !json_object_is_type(o, json_type_object)) {
			fprintf(stderr, "%s: %s: object %zu is not a JSON object%s%s\n", prog, file,
				njobs + 1, o ? "" : ": ",
				o ? "" : json_tokener_error_desc(json_tokener_get_error(tok)));
			json_object_put(o);
			code = CLIENT_EXIT_USAGE;
			break;
		}
		at += json_tokener_get_parse_end(tok);
		if (njobs == CLIENT_JOBS_MAX || (so.name && njobs == 1)) {
			fprintf(stderr, "%s: %s\n", prog,
				so.name ? "--name names one job: the input holds several"
					: "too many requests in one submit");
			json_object_put(o);
			code = CLIENT_EXIT_USAGE;
			break;
		}
		text = with_options(input + start, at - start,
				    json_object_object_get_ex(o, "input", NULL), &so);
		json_object_put(o);
		if (!text) {
			fprintf(stderr, "%s: out of memory\n", prog);
			code = CLIENT_EXIT_USAGE;
			break;
		}
		k = write(fd, text, strlen(text));
		int werr = k < 0 ? errno : 0;
		free(text);
		ssize_t r = read(fd, line, sizeof(line) - 1);
		line[r > 0 ? r : 0] = '\0';
		line[strcspn(line, "\n")] = '\0';
		if (k < 0 || strncmp(line, "error:", 6) == 0 || !line[0]) {
			fprintf(stderr, "%s: %s: %s%s%s\n", prog, route,
				line[0] ? line + (strncmp(line, "error: ", 7) == 0 ? 7 : 0)
					: "refused",
				werr ? ": " : "", werr ? strerror(werr) : "");
			code = CLIENT_EXIT_USAGE;
			break;
		}
		if (snprintf(jobs[njobs].dir, sizeof(jobs[njobs].dir), "%s/%s/%s", mnt, route,
			     line) >= (int)sizeof(jobs[njobs].dir)) {
			fprintf(stderr, "%s: the job's path is too long\n", prog);
			code = CLIENT_EXIT_USAGE;
			break;
		}
		printf("%s\n", jobs[njobs].dir);
		njobs++;
	}
	fflush(stdout);
	if (tok)
		json_tokener_free(tok);
	free(input);
	if (close(fd) != 0 && code == 0) {
		fprintf(stderr, "%s: %s: %s\n", prog, route, strerror(errno));
		code = CLIENT_EXIT_USAGE;
	}
	if (njobs == 0 && code == 0) {
		fprintf(stderr, "%s: %s: no request in the input\n", prog, file);
		code = CLIENT_EXIT_USAGE;
	}
	if (wait && code == 0)
		code = follow(jobs, njobs, isatty(STDIN_FILENO), cancel);
	free(jobs);
	return code;
}

/* ---- wait ---- */

int client_wait(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"cancel-on-interrupt", no_argument, NULL, 'c'},
	    {NULL, 0, NULL, 0},
	};
	bool cancel = false;
	struct wjob *jobs;
	int c, code;
	size_t n;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c != 'c') {
			fprintf(stderr, "usage: %s wait JOBDIR... [--cancel-on-interrupt]\n", prog);
			return CLIENT_EXIT_USAGE;
		}
		cancel = true;
	}
	n = (size_t)(argc - optind);
	if (n == 0 || n > CLIENT_JOBS_MAX) {
		fprintf(stderr, "usage: %s wait JOBDIR... [--cancel-on-interrupt] (at most %d)\n",
			prog, CLIENT_JOBS_MAX);
		return CLIENT_EXIT_USAGE;
	}
	if (!(jobs = calloc(n, sizeof(*jobs))))
		return CLIENT_EXIT_USAGE;
	for (size_t i = 0; i < n; i++) {
		char p[PATH_MAX + 16];
		snprintf(p, sizeof(p), "%s/status", argv[optind + i]);
		if (!realpath(argv[optind + i], jobs[i].dir) || access(p, R_OK) != 0) {
			fprintf(stderr, "%s: '%s' is not a job directory\n", prog, argv[optind + i]);
			free(jobs);
			return CLIENT_EXIT_USAGE;
		}
		/* Plain mode shows only what comes after the wait began. */
		snprintf(p, sizeof(p), "%s/log", jobs[i].dir);
		struct stat st;
		if (stat(p, &st) == 0)
			jobs[i].log_at = st.st_size;
	}
	code = follow(jobs, n, false, cancel);
	free(jobs);
	return code;
}

/* ---- ls ---- */

struct lrow {
	char id[80], route[300], status[16], owner[40], when[32];
	double progress;
	time_t created;
};

static time_t parse_time(const char *s)
{
	struct tm tm = {0};

	if (!s || !strptime(s, "%Y-%m-%dT%H:%M:%S", &tm))
		return 0;
	return timegm(&tm);
}

static void age(time_t t, char *out, size_t len)
{
	long s = (long)(time(NULL) - t);

	if (!t)
		snprintf(out, len, "-");
	else if (s < 120)
		snprintf(out, len, "%lds", s < 0 ? 0 : s);
	else if (s < 7200)
		snprintf(out, len, "%ldm", s / 60);
	else if (s < 172800)
		snprintf(out, len, "%ldh", s / 3600);
	else
		snprintf(out, len, "%ldd", s / 86400);
}

/* One job's row from its status.json; false when it is gone. */
static bool row(const char *dir, struct lrow *r)
{
	char p[PATH_MAX + 16], *buf;
	json_object *o, *v;
	size_t n;

	if (snprintf(p, sizeof(p), "%s/status.json", dir) >= (int)sizeof(p) ||
	    file_read_small(p, 1 << 16, &buf, &n) != 0)
		return false;
	o = json_tokener_parse(buf);
	free(buf);
	if (!o)
		return false;
	if (json_object_object_get_ex(o, "id", &v))
		snprintf(r->id, sizeof(r->id), "%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "route", &v))
		snprintf(r->route, sizeof(r->route), "%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "status", &v))
		snprintf(r->status, sizeof(r->status), "%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "progress", &v))
		r->progress = json_object_get_double(v);
	if (json_object_object_get_ex(o, "owner", &v)) {
		uid_t uid = (uid_t)json_object_get_int64(v);
		struct passwd *pw = getpwuid(uid);
		snprintf(r->owner, sizeof(r->owner), "%s",
			 pw ? pw->pw_name : json_object_get_string(v));
	}
	if (json_object_object_get_ex(o, "created_at", &v)) {
		snprintf(r->when, sizeof(r->when), "%s", json_object_get_string(v));
		r->created = parse_time(r->when);
	}
	json_object_put(o);
	return r->id[0] != '\0';
}

static int by_created(const void *a, const void *b)
{
	const struct lrow *x = a, *y = b;

	return strcmp(x->when, y->when);
}

int client_ls(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"status", required_argument, NULL, 's'},
	    {"mount", required_argument, NULL, 'm'},
	    {NULL, 0, NULL, 0},
	};
	const char *want = NULL, *mountopt = NULL, *route = NULL;
	char mnt[PATH_MAX], dirp[PATH_MAX * 2];
	struct lrow *rows = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 's') {
			want = optarg;
		} else if (c == 'm') {
			mountopt = optarg;
		} else {
			fprintf(stderr, "usage: %s ls [ROUTE] [--status S] [--mount DIR]\n", prog);
			return CLIENT_EXIT_USAGE;
		}
	}
	if (argc - optind > 1) {
		fprintf(stderr, "usage: %s ls [ROUTE] [--status S] [--mount DIR]\n", prog);
		return CLIENT_EXIT_USAGE;
	}
	if (argc - optind == 1)
		for (route = argv[optind]; *route == '/';)
			route++;
	if (find_mount(mountopt, mnt, sizeof(mnt)) != 0)
		return CLIENT_EXIT_USAGE;
	/* jobs/ links every job the caller may see; a route's directory
	 * holds its own. */
	snprintf(dirp, sizeof(dirp), "%s/%s", mnt, route ? route : "jobs");
	if (!(d = opendir(dirp))) {
		fprintf(stderr, "%s: cannot list '%s': %s\n", prog, dirp, strerror(errno));
		return CLIENT_EXIT_USAGE;
	}
	while ((de = readdir(d)) != NULL) {
		char job[PATH_MAX * 3 + 256];
		if (de->d_name[0] == '.' || strcmp(de->d_name, "new") == 0 ||
		    strcmp(de->d_name, "schema.json") == 0)
			continue;
		if (n == cap) {
			struct lrow *g = realloc(rows, (cap ? cap * 2 : 64) * sizeof(*rows));
			if (!g)
				break;
			rows = g;
			cap = cap ? cap * 2 : 64;
		}
		memset(&rows[n], 0, sizeof(rows[n]));
		snprintf(job, sizeof(job), "%s/%s", dirp, de->d_name);
		if (!row(job, &rows[n]))
			continue; /* deleted meanwhile, or not a job */
		if (want && strcmp(rows[n].status, want) != 0)
			continue;
		n++;
	}
	closedir(d);
	qsort(rows, n, sizeof(*rows), by_created);
	printf("%-26s %-9s %8s %5s %-12s %s\n", "ID", "STATUS", "PROGRESS", "AGE", "OWNER",
	       "ROUTE");
	for (size_t i = 0; i < n; i++) {
		char a[32];
		age(rows[i].created, a, sizeof(a));
		printf("%-26s %-9s %7d%% %5s %-12s %s\n", rows[i].id, rows[i].status,
		       (int)(rows[i].progress * 100 + 0.5), a, rows[i].owner, rows[i].route);
	}
	free(rows);
	return 0;
}

/* ---- usage (SPEC §14) ---- */

/* The days' summaries added into one (milliseconds summed as integers,
 * so that the seconds add up exactly). */
static void usage_sum(json_object *into, json_object *day)
{
	json_object *jobs, *secs, *v;

	if (json_object_object_get_ex(day, "jobs", &jobs)) {
		json_object *ij;
		json_object_object_get_ex(into, "jobs", &ij);
		json_object_object_foreach(jobs, route, outc)
		{
			json_object *r;
			if (!json_object_object_get_ex(ij, route, &r)) {
				r = json_object_new_object();
				json_object_object_add(ij, route, r);
			}
			json_object_object_foreach(outc, o, n)
			{
				json_object *c;
				int64_t have = json_object_object_get_ex(r, o, &c)
						       ? json_object_get_int64(c)
						       : 0;
				json_object_object_add(r, o,
						       json_object_new_int64(have +
									     json_object_get_int64(n)));
			}
		}
	}
	if (json_object_object_get_ex(day, "seconds", &secs)) {
		json_object *is;
		json_object_object_get_ex(into, "seconds", &is);
		json_object_object_foreach(secs, k, s)
		{
			json_object *c;
			int64_t have = json_object_object_get_ex(is, k, &c) ? json_object_get_int64(c)
									   : 0;
			json_object_object_add(
				is, k,
				json_object_new_int64(have +
						      (int64_t)(json_object_get_double(s) * 1000 + 0.5)));
		}
	}
	for (int i = 0; i < 2; i++) {
		const char *k = i ? "cache_hits" : "output_bytes";
		json_object *c;
		int64_t have = json_object_object_get_ex(into, k, &c) ? json_object_get_int64(c) : 0;
		if (json_object_object_get_ex(day, k, &v))
			json_object_object_add(into, k,
					       json_object_new_int64(have + json_object_get_int64(v)));
	}
}

/* --since: YYYY-MM-DD, or Nd (the last N days, today included). */
static int since_day(const char *arg, char out[16])
{
	int y, mo, d, n;
	char c;

	if (sscanf(arg, "%4d-%2d-%2d%c", &y, &mo, &d, &c) == 3 && mo >= 1 && mo <= 12 && d >= 1 &&
	    d <= 31 && strlen(arg) == 10) {
		snprintf(out, 16, "%s", arg);
		return 0;
	}
	if (sscanf(arg, "%dd%c", &n, &c) == 1 && n >= 1 && n <= 100000) {
		time_t t = time(NULL) - (time_t)(n - 1) * 86400;
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(out, 16, "%Y-%m-%d", &tm);
		return 0;
	}
	return -EINVAL;
}

static int usage_attest(const char *mnt)
{
	char path[PATH_MAX + 64], last[NAME_MAX + 1] = "";
	struct dirent *de;
	DIR *d;
	int fd;

	snprintf(path, sizeof(path), "%s/ledger/attest", mnt);
	if ((fd = open(path, O_WRONLY | O_CLOEXEC)) < 0 ||
	    write(fd, "attest\n", 7) != 7) {
		int err = errno;
		if (err == EALREADY)
			fprintf(stderr, "%s: nothing to attest: no time has passed since the last "
					"attestation\n", prog);
		else
			fprintf(stderr, "%s: cannot attest through '%s': %s%s\n", prog, path,
				strerror(err),
				err == EACCES ? " (the store's owner or root attests)" : "");
		if (fd >= 0)
			close(fd);
		return CLIENT_EXIT_ERROR;
	}
	close(fd);
	/* ledger/ lists attestations in chain order: the last is the new one. */
	snprintf(path, sizeof(path), "%s/ledger", mnt);
	if (!(d = opendir(path))) {
		fprintf(stderr, "%s: cannot list '%s': %s\n", prog, path, strerror(errno));
		return CLIENT_EXIT_ERROR;
	}
	while ((de = readdir(d)) != NULL) {
		size_t n = strlen(de->d_name);
		if (n > 5 && strcmp(de->d_name + n - 5, ".json") == 0)
			snprintf(last, sizeof(last), "%s", de->d_name);
	}
	closedir(d);
	printf("%s/ledger/%s\n", mnt, last);
	return CLIENT_EXIT_COMPLETE;
}

static void usage_table(json_object *root)
{
	static const char *const outcomes[] = {"complete", "error", "cancelled"};

	printf("%-8s %-40s %9s %6s %9s\n", "UID", "ROUTE", "COMPLETE", "ERROR", "CANCELLED");
	json_object_object_foreach(root, uid, u)
	{
		json_object *t, *jobs;
		if (!json_object_object_get_ex(u, "total", &t) ||
		    !json_object_object_get_ex(t, "jobs", &jobs))
			continue;
		json_object_object_foreach(jobs, route, r)
		{
			int64_t n[3] = {0};
			for (int i = 0; i < 3; i++) {
				json_object *c;
				if (json_object_object_get_ex(r, outcomes[i], &c))
					n[i] = json_object_get_int64(c);
			}
			printf("%-8s %-40s %9lld %6lld %9lld\n", uid, route, (long long)n[0],
			       (long long)n[1], (long long)n[2]);
		}
	}
	printf("\n%-8s %-40s %12s\n", "UID", "DEVICE", "SECONDS");
	json_object_object_foreach(root, uid2, u2)
	{
		json_object *t, *secs;
		if (!json_object_object_get_ex(u2, "total", &t) ||
		    !json_object_object_get_ex(t, "seconds", &secs))
			continue;
		json_object_object_foreach(secs, kind, s)
		printf("%-8s %-40s %12s\n", uid2, kind, json_object_get_string(s));
	}
	printf("\n%-8s %16s %12s\n", "UID", "OUTPUT_BYTES", "CACHE_HITS");
	json_object_object_foreach(root, uid3, u3)
	{
		json_object *t, *b, *c;
		if (!json_object_object_get_ex(u3, "total", &t))
			continue;
		json_object_object_get_ex(t, "output_bytes", &b);
		json_object_object_get_ex(t, "cache_hits", &c);
		printf("%-8s %16lld %12lld\n", uid3, (long long)json_object_get_int64(b),
		       (long long)json_object_get_int64(c));
	}
}

int client_usage(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"since", required_argument, NULL, 's'}, {"uid", required_argument, NULL, 'u'},
	    {"json", no_argument, NULL, 'j'},	     {"attest", no_argument, NULL, 'a'},
	    {"mount", required_argument, NULL, 'm'}, {NULL, 0, NULL, 0},
	};
	const char *mountopt = NULL, *uid = NULL, *since = NULL;
	char mnt[PATH_MAX], path[PATH_MAX + 16], from[16] = "", *text;
	bool as_json = false, attest = false;
	json_object *root, *out;
	size_t len;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 's':
			since = optarg;
			break;
		case 'u':
			uid = optarg;
			break;
		case 'j':
			as_json = true;
			break;
		case 'a':
			attest = true;
			break;
		case 'm':
			mountopt = optarg;
			break;
		default:
			goto usage;
		}
	}
	if (optind != argc)
		goto usage;
	if (since && since_day(since, from) != 0) {
		fprintf(stderr, "%s: --since takes a date (YYYY-MM-DD) or a number of days (7d), "
				"not '%s'\n",
			prog, since);
		return CLIENT_EXIT_USAGE;
	}
	if (find_mount(mountopt, mnt, sizeof(mnt)) != 0)
		return CLIENT_EXIT_USAGE;
	if (attest)
		return usage_attest(mnt);
	snprintf(path, sizeof(path), "%s/usage", mnt);
	if (file_read_small(path, 64u << 20, &text, &len) != 0) {
		fprintf(stderr, "%s: cannot read '%s': %s\n", prog, path, store_lasterr());
		return CLIENT_EXIT_ERROR;
	}
	root = json_tokener_parse(text);
	free(text);
	if (!root || !json_object_is_type(root, json_type_object)) {
		fprintf(stderr, "%s: '%s' is not the JSON object it should be\n", prog, path);
		json_object_put(root);
		return CLIENT_EXIT_ERROR;
	}
	/* The uids asked for, with their totals over the days asked for. */
	out = json_object_new_object();
	json_object_object_foreach(root, u, ud)
	{
		json_object *days, *keep, *total;
		if (uid && strcmp(uid, u) != 0)
			continue;
		if (!from[0]) {
			json_object_object_add(out, u, json_object_get(ud));
			continue;
		}
		keep = json_object_new_object();
		total = ledger_summary_new();
		if (json_object_object_get_ex(ud, "days", &days)) {
			json_object_object_foreach(days, day, s)
			{
				if (strcmp(day, from) < 0)
					continue;
				json_object_object_add(keep, day, json_object_get(s));
				usage_sum(total, s);
			}
		}
		ledger_summary_seconds(total);
		if (json_object_object_length(keep) == 0) {
			json_object_put(keep);
			json_object_put(total);
			continue;
		}
		json_object *nu = json_object_new_object();
		json_object_object_add(nu, "total", total);
		json_object_object_add(nu, "days", keep);
		json_object_object_add(out, u, nu);
	}
	if (as_json)
		printf("%s\n", json_object_to_json_string_ext(out, JSON_C_TO_STRING_PRETTY |
								       JSON_C_TO_STRING_NOSLASHESCAPE));
	else
		usage_table(out);
	json_object_put(out);
	json_object_put(root);
	return CLIENT_EXIT_COMPLETE;
usage:
	fprintf(stderr,
		"usage: %s usage [--since YYYY-MM-DD|Nd] [--uid U] [--json] [--attest] "
		"[--mount DIR]\n",
		prog);
	return CLIENT_EXIT_USAGE;
}
