/*
 * run.c - running a job: the runner context backends use (engine_i.h),
 * the start and end every run shares (engine_run_begin, engine_run_end),
 * the worker threads that claim and run local jobs, and the janitor that
 * deletes finished jobs past retain=.
 *
 * Threads: workers and the janitor are this file's; engine_run_begin and
 * engine_run_end also run on remote threads (remote.c). See engine_p.h
 * for the locks.
 */
#include "backend.h"
#include "engine_p.h"
#include "errors.h"
#include "http.h"
#include "route.h"
#include "kernels.h"

#include <sodium.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* ---- the runner context ---- */

/* The log line of message msg at ts (with prefix), into out (of
 * LINE_MAX bytes, without newline): its length. One line per event: a
 * message never splits the log. */
#define LOG_LINE_CAP (ENGINE_ERR_MAX + 64)
static size_t log_line(char *out, const char *ts, const char *prefix, const char *msg)
{
	int k = snprintf(out, LOG_LINE_CAP, "%s %s%s", ts, prefix, msg);
	size_t n = k < 0 ? 0 : (size_t)k < LOG_LINE_CAP ? (size_t)k : LOG_LINE_CAP - 1;

	for (size_t i = 0; i < n; i++)
		if (out[i] == '\n' || out[i] == '\r')
			out[i] = ' ';
	return n;
}

/* fmt's message into msg, and the log line of it now into line: its length. */
static size_t log_vformat(char msg[ENGINE_ERR_MAX], char line[LOG_LINE_CAP], const char *fmt,
			  va_list ap)
{
	char ts[32];

	engine_time_format(now_ms(), ts);
	vsnprintf(msg, ENGINE_ERR_MAX, fmt, ap);
	return log_line(line, ts, "", msg);
}

/* ---- a remote step's writes, gathered (engine_i.h: batching) ---- */

static int pend_add(struct run *r, const char *text, size_t len)
{
	if (r->pend_len + len > r->pend_cap) {
		size_t cap = r->pend_cap ? r->pend_cap : 512;
		char *p;
		while (cap < r->pend_len + len)
			cap *= 2;
		if (!(p = realloc(r->pend, cap)))
			return -ENOMEM;
		r->pend = p;
		r->pend_cap = cap;
	}
	memcpy(r->pend + r->pend_len, text, len);
	r->pend_len += len;
	return 0;
}

static bool pending(const struct run *r)
{
	return r->pend_len || r->pend_has_progress || r->pend_start || r->pend_remote ||
	       r->pend_handle;
}

/* The handle a step put, kept until the step's writes are made. */
static int pend_handle_set(struct run *r, const void *data, size_t len)
{
	void *copy;

	if (len > INDEX_HANDLE_MAX)
		return store_seterr(-EFBIG, "a job's handle record of %zu bytes is over %d", len,
				    INDEX_HANDLE_MAX);
	if (!(copy = malloc(len ? len : 1)))
		return -ENOMEM;
	memcpy(copy, data, len);
	free(r->pend_handle);
	r->pend_handle = copy;
	r->pend_hlen = len;
	return 0;
}

/* The events of a write, once it is durable, in the order a watcher
 * needs them (the notifier keeps it too): lines, progress, the output,
 * the state. */
static void write_events(struct engine *e, const uint8_t id[JOB_ID_LEN], const char *route,
			 bool lines, bool progress, bool output, bool status)
{
	if (lines)
		engine_notify(e, id, route, EV_LOG);
	if (progress)
		engine_notify(e, id, route, EV_PROGRESS);
	if (output)
		engine_notify(e, id, route, EV_OUTPUT);
	if (status)
		engine_notify(e, id, route, EV_STATUS);
}

static void say_unrecorded(const uint8_t id[JOB_ID_LEN], bool handle, const char *why)
{
	char text[JOB_ID_STR_LEN + 1];

	ulid_format(id, text);
	fprintf(stderr, "renderfs: job %s: cannot record %s: %s\n", text,
		handle ? "where its remote work is (a restart will not follow it)"
		       : "its log and progress",
		why);
}

/*
 * A write nobody waits for (index_*_async): the events it makes once it is
 * durable, and what it was, for the message if it fails. Its own: the
 * run may be gone by then.
 */
struct queued_write {
	struct engine *e;
	uint8_t id[JOB_ID_LEN];
	char route[INDEX_ROUTE_MAX + 1];
	bool lines, progress, output, status;
	bool end, handle; /* the run's end; a step's writes with a handle */
};

static struct queued_write *queued_write_new(struct run *r, bool lines, bool progress,
					     bool output, bool status)
{
	struct queued_write *q = calloc(1, sizeof(*q));

	if (!q)
		return NULL;
	q->e = r->e;
	memcpy(q->id, r->job.id, JOB_ID_LEN);
	snprintf(q->route, sizeof(q->route), "%s", r->job.route);
	q->lines = lines;
	q->progress = progress;
	q->output = output;
	q->status = status;
	return q;
}

/* The done of a queued write: on the committing thread. */
static void written(void *arg, int rc, const char *err)
{
	struct queued_write *q = arg;
	char id[JOB_ID_STR_LEN + 1];

	if (rc && q->end) {
		/* As finish's: the job stays running until recovery. */
		ulid_format(q->id, id);
		fprintf(stderr, "renderfs: cannot finish job %s: %s\n", id, err);
	} else if (rc) {
		say_unrecorded(q->id, q->handle, err);
	} else {
		write_events(q->e, q->id, q->route, q->lines, q->progress, q->output, q->status);
	}
	free(q);
}

/*
 * What was gathered, in one write (wait: durable when this returns; else
 * queued, durable soon after and before any later write of the run); the
 * events once it is durable. Cleared whatever the result.
 */
static int flush(struct run *r, bool wait)
{
	struct index_update u = {
	    .lines = r->pend,
	    .len = r->pend_len,
	    .progress = r->pend_has_progress ? r->pend_progress : -1,
	    .backend = r->pend_start ? r->route->backend->name : NULL,
	    .model = r->pend_start ? r->route->model_id : NULL,
	    .handle = r->pend_handle,
	    .hlen = r->pend_hlen,
	    .remote = r->pend_remote,
	    .rlen = r->pend_remote ? strlen(r->pend_remote) : 0,
	};
	bool lines = r->pend_len, progress = r->pend_has_progress, moved = r->pend_moved;
	struct queued_write *q = NULL;
	int rc;

	if (wait) {
		rc = index_job_update(r->e->ix, r->job.id, &u);
	} else if (!(q = queued_write_new(r, lines, progress, false, moved))) {
		rc = store_seterr(-ENOMEM, "out of memory");
	} else {
		q->handle = r->pend_handle;
		if ((rc = index_job_update_async(r->e->ix, r->job.id, &u, written, q)) != 0)
			free(q);
	}
	r->pend_len = 0;
	r->pend_has_progress = r->pend_start = r->pend_moved = false;
	if (rc == 0 && r->pend_remote) {
		/* The run's record from now on (run_remote_set reads it, not
		 * the index, which may not have it yet). */
		free(r->remote_last);
		r->remote_last = r->pend_remote;
	} else {
		free(r->pend_remote);
	}
	r->pend_remote = NULL;
	free(r->pend_handle);
	r->pend_handle = NULL;
	if (rc)
		return rc;
	if (progress)
		r->progress = u.progress;
	r->unsettled = !wait;
	if (wait)
		write_events(r->e, r->job.id, r->job.route, lines, progress, false, moved);
	return 0;
}

int run_flush(struct run *r)
{
	int rc = 0;

	if (pending(r))
		rc = flush(r, true);
	else if (r->unsettled && (rc = index_writes_settle(r->e->ix)) == 0)
		r->unsettled = false;
	return rc;
}

void run_batch_begin(struct run *r)
{
	r->batching = true;
}

void run_batch_end(struct run *r)
{
	bool handle = r->pend_handle;

	r->batching = false;
	/* Nothing waits for it: the run's next write, or its next request
	 * that acts (run_http), comes after it. */
	if (pending(r) && flush(r, false) != 0)
		say_unrecorded(r->job.id, handle, store_lasterr());
	if (r->pend_cap > 4096) { /* a burst of lines: give the room back */
		free(r->pend);
		r->pend = NULL;
		r->pend_cap = 0;
	}
}

/* A timestamped log line; with backend, the attempt's first, recording
 * what runs the job in the same write. */
static int run_vlog(struct run *r, const struct backend *backend, const char *fmt, va_list ap)
{
	char msg[ENGINE_ERR_MAX], line[LOG_LINE_CAP];
	size_t n = log_vformat(msg, line, fmt, ap);
	int rc;

	if (r->batching) {
		line[n++] = '\n'; /* log_line leaves room for it */
		if ((rc = pend_add(r, line, n)) == 0 && backend)
			r->pend_start = true;
		return rc;
	}
	rc = index_job_log_start(r->e->ix, r->job.id, line, n, backend ? backend->name : NULL,
				 r->route ? r->route->model_id : NULL);
	if (rc == 0)
		engine_notify(r->e, r->job.id, r->job.route, EV_LOG);
	return rc;
}

int run_log_handle(struct run *r, const char *prefix, const char *const *msgs, size_t n,
		   const void *handle, size_t hlen)
{
	char *buf = malloc(n * (LOG_LINE_CAP + 1) + 1), ts[32];
	size_t len = 0;
	int rc;

	if (!buf)
		return -ENOMEM;
	engine_time_format(now_ms(), ts);
	for (size_t i = 0; i < n; i++) {
		len += log_line(buf + len, ts, prefix, msgs[i]);
		buf[len++] = '\n';
	}
	if (r->batching) {
		/* With the rest of the step's writes (engine_i.h). */
		rc = pend_add(r, buf, len);
		free(buf);
		return rc || !handle ? rc : pend_handle_set(r, handle, hlen);
	}
	rc = index_job_log_handle(r->e->ix, r->job.id, buf, len, handle, hlen);
	free(buf);
	if (rc == 0 && n)
		engine_notify(r->e, r->job.id, r->job.route, EV_LOG);
	return rc;
}

int run_log_lines(struct run *r, const char *prefix, const char *const *msgs, size_t n)
{
	return run_log_handle(r, prefix, msgs, n, NULL, 0);
}

void run_log(struct run *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	run_vlog(r, NULL, fmt, ap);
	va_end(ap);
}

/* The attempt's first line; what runs the job goes in its record with it
 * (manifest.json says so later, whatever the models file says then). */
static int run_log_start(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int run_log_start(struct run *r, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = run_vlog(r, r->route->backend, fmt, ap);
	va_end(ap);
	return rc;
}

void run_progress(struct run *r, double fraction)
{
	uint64_t now = now_ms();
	uint16_t t;

	if (fraction < 0)
		fraction = 0;
	if (fraction > 1)
		fraction = 1;
	t = (uint16_t)lround(fraction * 1000);
	/* At most ten durable writes a second; the final value always. */
	if (t < 1000 && now - r->last_progress_ms < 100)
		return;
	r->last_progress_ms = now;
	if (r->batching) {
		r->pend_has_progress = true;
		r->pend_progress = t;
		return;
	}
	if (index_job_progress(r->e->ix, r->job.id, t) == 0) {
		r->progress = t;
		engine_notify(r->e, r->job.id, r->job.route, EV_PROGRESS);
	}
}

enum stop_reason run_stopping(struct run *r)
{
	int s = atomic_load(r->stop);

	if (s != STOP_NONE)
		return (enum stop_reason)s;
	if (r->deadline_ms && now_ms() >= r->deadline_ms) {
		atomic_store(r->stop, STOP_TIMEOUT);
		return STOP_TIMEOUT;
	}
	return STOP_NONE;
}

static void kind_of_device(const char *device, char *buf, size_t len);

/* A queued reference to a remote run's output failed (the run may be
 * gone: its end says the rest). */
static void output_unrecorded(const uint8_t job[JOB_ID_LEN], const char *err)
{
	char id[JOB_ID_STR_LEN + 1];

	ulid_format(job, id);
	fprintf(stderr, "renderfs: job %s: cannot record its output: %s\n", id, err);
}

int run_commit_output(struct run *r, struct store_sink *sink, const char *media_type,
		      const char *device)
{
	bool remote = r->route->backend->remote;
	/* A remote run's end is written right after: the reference goes
	 * with it, the thread waiting for one commit, not two. */
	int rc = remote ? store_job_commit_output_queued(r->e->st, r->job.id, sink, media_type,
							 device, r->output_hash, output_unrecorded)
			: store_job_commit_output(r->e->st, r->job.id, sink, media_type, device,
						  r->output_hash);

	if (rc)
		return run_fail(r, rc, "store", "cannot store the output: %s",
				store_lasterr());
	if (remote) {
		r->output_queued = true; /* announced once the end is written */
		return 0;
	}
	if (device)
		kind_of_device(device, r->used_on, sizeof(r->used_on));
	engine_notify(r->e, r->job.id, r->job.route, EV_OUTPUT);
	return 0;
}

int run_commit_extra(struct run *r, unsigned n, struct store_sink *sink, const char *media_type,
		     uint8_t hash_out[32])
{
	int rc = store_job_commit_extra(r->e->st, r->job.id, n, sink, media_type, hash_out);

	if (rc)
		return run_fail(r, rc, "store", "cannot store output %u: %s", n, store_lasterr());
	return 0;
}

int run_result(struct run *r, const char *json, size_t len)
{
	char *copy;

	if (len > INDEX_RESULT_MAX)
		return run_fail(r, -EFBIG, "output_invalid",
				"cannot keep the result: a result of %zu bytes is over %d", len,
				INDEX_RESULT_MAX);
	if (!(copy = malloc(len ? len : 1)))
		return run_fail(r, -ENOMEM, "store", "out of memory");
	memcpy(copy, json, len);
	free(r->result);
	r->result = copy;
	r->result_len = len;
	return 0;
}

int run_handle_put(struct run *r, const void *data, size_t len)
{
	if (r->batching) /* with the rest of the step's writes */
		return pend_handle_set(r, data, len);
	return index_job_handle_put(r->e->ix, r->job.id, data, len);
}

int run_handle_get(struct run *r, void **out, size_t *len)
{
	if (r->pend_handle) { /* put by this step, not written yet */
		if (!(*out = malloc(r->pend_hlen ? r->pend_hlen : 1)))
			return -ENOMEM;
		memcpy(*out, r->pend_handle, r->pend_hlen);
		*len = r->pend_hlen;
		return 0;
	}
	return index_job_handle_get(r->e->ix, r->job.id, out, len);
}

const char *run_deny_net(const struct run *r)
{
	return r->e->opt.deny_net ? r->e->opt.deny_net : HTTP_DENY_DEFAULT;
}

int run_remote_set(struct run *r, const char *request_id, const char *model_version,
		   long position)
{
	void *old = NULL;
	size_t len = 0;
	json_object *o = NULL, *v;
	const char *text;
	bool changed = false, moved = false;
	int rc;

	if (r->pend_remote || r->remote_last) {
		/* The step's own, not written yet, or the run's last (which
		 * may not be durable yet). */
		if (!(old = strdup(r->pend_remote ? r->pend_remote : r->remote_last)))
			return -ENOMEM;
		len = strlen(old);
		rc = 0;
	} else {
		rc = index_job_remote_get(r->e->ix, r->job.id, &old, &len);
	}

	if (rc == 0) {
		json_tokener *tok = json_tokener_new_ex(4);
		if (tok) {
			o = json_tokener_parse_ex(tok, old, (int)len);
			json_tokener_free(tok);
		}
	} else if (rc != STORE_E_NOTFOUND) {
		return rc;
	}
	free(old);
	if (!o || !json_object_is_type(o, json_type_object)) {
		json_object_put(o);
		if (!(o = json_object_new_object()))
			return -ENOMEM;
		changed = true;
	}
	if (request_id &&
	    (!json_object_object_get_ex(o, "request_id", &v) ||
	     strcmp(json_object_get_string(v), request_id) != 0)) {
		json_object_object_add(o, "request_id", json_object_new_string(request_id));
		changed = true;
	}
	if (model_version &&
	    (!json_object_object_get_ex(o, "model_version", &v) ||
	     strcmp(json_object_get_string(v), model_version) != 0)) {
		json_object_object_add(o, "model_version", json_object_new_string(model_version));
		changed = true;
	}
	if (position != RUN_REMOTE_SAME) {
		int64_t cur = json_object_object_get_ex(o, "position", &v) ? json_object_get_int64(v)
									 : -1;
		if (position < 0 && json_object_object_get_ex(o, "position", NULL)) {
			json_object_object_del(o, "position");
			changed = moved = true;
		} else if (position >= 0 && cur != position) {
			json_object_object_add(o, "position", json_object_new_int64(position));
			changed = moved = true;
		}
	}
	rc = 0;
	if (changed) {
		text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
		if (!text) {
			rc = -ENOMEM;
		} else if (r->batching) {
			char *copy = strdup(text);
			if (!copy) {
				rc = -ENOMEM;
			} else {
				free(r->pend_remote);
				r->pend_remote = copy;
				r->pend_moved |= moved;
				moved = false; /* announced once written */
			}
		} else if ((rc = index_job_remote_put(r->e->ix, r->job.id, text, strlen(text))) ==
			   0) {
			/* Durable after every queued write: the index has it. */
			free(r->remote_last);
			r->remote_last = NULL;
		}
	}
	json_object_put(o);
	if (rc == 0 && moved)
		engine_notify(r->e, r->job.id, r->job.route, EV_STATUS);
	return rc;
}

/* data:<media type>;base64,<content> of a verified blob, malloc'ed. */
static char *data_uri(struct run *r, const struct job_input *in)
{
	struct blob_info bi;
	uint64_t size = 0;
	unsigned char *raw = NULL;
	char *uri = NULL;
	size_t b64, off = 0;
	int fd = -1;

	if (index_blob_get(r->e->ix, in->hash, &bi) != 0 ||
	    store_blob_open(r->e->st, in->hash, &fd, &size) != 0 || size != in->size)
		goto out;
	if (!(raw = malloc(size ? size : 1)))
		goto out;
	while (off < size) {
		ssize_t n = pread(fd, raw + off, size - off, (off_t)off);
		if (n <= 0)
			goto out;
		off += (size_t)n;
	}
	b64 = sodium_base64_ENCODED_LEN(size, sodium_base64_VARIANT_ORIGINAL);
	size_t head = strlen(bi.media_type) + 16;
	if (!(uri = malloc(head + b64)))
		goto out;
	int h = snprintf(uri, head, "data:%s;base64,",
			 bi.media_type[0] ? bi.media_type : "application/octet-stream");
	sodium_bin2base64(uri + h, b64, raw, size, sodium_base64_VARIANT_ORIGINAL);
out:
	if (fd >= 0)
		close(fd);
	free(raw);
	return uri;
}

int run_inputs(struct run *r, struct job_input *in, size_t cap, size_t *n)
{
	int rc = index_job_inputs(r->e->ix, r->job.id, in, cap, n);

	return rc ? run_fail(r, rc, "store", "cannot read the job's inputs: %s", store_lasterr())
		  : 0;
}

int run_input_read(struct run *r, const struct job_input *in, uint8_t **data, size_t *len,
		   char *media, size_t mlen)
{
	struct blob_info bi;
	uint64_t size = 0, off = 0;
	uint8_t *raw = NULL;
	char hex[2 * INDEX_HASH_LEN + 1];
	int fd = -1, rc;

	*data = NULL;
	b3_to_hex(in->hash, hex);
	if ((rc = index_blob_get(r->e->ix, in->hash, &bi)) != 0 ||
	    (rc = store_blob_open(r->e->st, in->hash, &fd, &size)) != 0)
		return run_fail(r, rc, "input_not_found", "'%s': cannot read blob cas:%s: %s",
				in->field, hex, store_lasterr());
	if (size > SIZE_MAX - 1 || !(raw = malloc(size ? size : 1))) {
		close(fd);
		return run_fail(r, -ENOMEM, "store", "out of memory for input cas:%s", hex);
	}
	while (off < size) {
		ssize_t k = pread(fd, raw + off, size - off, (off_t)off);
		if (k <= 0) {
			close(fd);
			free(raw);
			return run_fail(r, -EIO, "input_not_found", "'%s': cannot read blob cas:%s",
					in->field, hex);
		}
		off += (uint64_t)k;
	}
	close(fd);
	snprintf(media, mlen, "%s", bi.media_type[0] ? bi.media_type : "application/octet-stream");
	*data = raw;
	*len = (size_t)size;
	return 0;
}

/* What replaces an input in the request a backend is given. */
struct input_repl {
	/* The replacement string for input in[k] (malloc'ed), or NULL with
	 * the failure set (run_fail). */
	char *(*make)(struct run *r, const struct job_input *in, size_t k, void *arg);
	void *arg;
	const struct job_input *in;
	size_t n;
};

/*
 * The string that replaces v, when v is "cas:<hex>" naming one of the
 * inputs: 0 with *repl set (NULL: v stays), or a failure set with
 * run_fail.
 */
static int replace_one(struct run *r, json_object *v, const struct input_repl *ir,
		       json_object **repl)
{
	uint8_t h[INDEX_HASH_LEN];

	*repl = NULL;
	if (!json_object_is_type(v, json_type_string) || json_object_get_string_len(v) != 68 ||
	    strncmp(json_object_get_string(v), "cas:", 4) != 0 ||
	    b3_from_hex(json_object_get_string(v) + 4, h) != 0)
		return 0;
	for (size_t i = 0; i < ir->n; i++) {
		char *s;
		if (memcmp(ir->in[i].hash, h, INDEX_HASH_LEN) != 0)
			continue;
		if (!(s = ir->make(r, &ir->in[i], i, ir->arg)))
			return -EIO;
		*repl = json_object_new_string(s);
		free(s);
		return *repl ? 0 : run_fail(r, -ENOMEM, "store", "out of memory");
	}
	return 0;
}

static int replace_walk(struct run *r, json_object *o, const struct input_repl *ir)
{
	json_object *repl;

	if (json_object_is_type(o, json_type_object)) {
		json_object_object_foreach(o, k, v)
		{
			if (replace_one(r, v, ir, &repl) != 0 || replace_walk(r, v, ir) != 0)
				return -EIO;
			if (repl)
				json_object_object_add(o, k, repl);
		}
	} else if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++) {
			json_object *v = json_object_array_get_idx(o, i);
			if (replace_one(r, v, ir, &repl) != 0 || replace_walk(r, v, ir) != 0)
				return -EIO;
			if (repl)
				json_object_array_put_idx(o, i, repl);
		}
	}
	return 0;
}

/* The request with its inputs replaced by make's strings, into *out. */
static int replace_inputs(struct run *r, struct input_repl *ir, char **out)
{
	struct job_input in[INDEX_INPUTS_MAX];
	size_t n = 0;
	json_object *o;
	const char *t;
	int rc = index_job_inputs(r->e->ix, r->job.id, in, INDEX_INPUTS_MAX, &n);

	*out = NULL;
	if (rc)
		return run_fail(r, rc, "store", "cannot read the job's inputs: %s", store_lasterr());
	if (n == 0) {
		if (!(*out = strdup(r->request)))
			return run_fail(r, -ENOMEM, "store", "out of memory");
		return 0;
	}
	if (!(o = json_tokener_parse(r->request)))
		return run_fail(r, -EIO, "store", "the stored request does not parse");
	ir->in = in;
	ir->n = n;
	if ((rc = replace_walk(r, o, ir)) == 0) {
		t = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
							      JSON_C_TO_STRING_NOSLASHESCAPE);
		if (!t || !(*out = strdup(t)))
			rc = run_fail(r, -ENOMEM, "store", "out of memory");
	}
	json_object_put(o);
	return rc;
}

static char *make_data_uri(struct run *r, const struct job_input *in, size_t k, void *arg)
{
	char *uri = data_uri(r, in);
	char hex[2 * INDEX_HASH_LEN + 1];

	(void)k, (void)arg;
	if (!uri) {
		b3_to_hex(in->hash, hex);
		run_fail(r, -EIO, "input_not_found", "'%s': cannot read blob cas:%s: %s", in->field,
			 hex, store_lasterr());
	}
	return uri;
}

int run_request_inline_inputs(struct run *r, char **out)
{
	struct input_repl ir = {make_data_uri, NULL, NULL, 0};

	return replace_inputs(r, &ir, out);
}

struct file_dir {
	int fd;
	const char *path;
};

/* input-<k>.<ext> in the directory, a verified copy of the blob (once per
 * input: a blob named twice is copied once); its path. */
static char *make_input_file(struct run *r, const struct job_input *in, size_t k, void *arg)
{
	struct file_dir *d = arg;
	struct blob_info bi;
	char name[64], hex[2 * INDEX_HASH_LEN + 1], buf[1 << 16], *path = NULL;
	uint64_t size = 0, off = 0;
	int src = -1, dst = -1, rc;

	b3_to_hex(in->hash, hex);
	if ((rc = index_blob_get(r->e->ix, in->hash, &bi)) != 0 ||
	    (rc = store_blob_open(r->e->st, in->hash, &src, &size)) != 0) {
		run_fail(r, rc ? rc : -EIO, "input_not_found", "'%s': cannot read blob cas:%s: %s",
			 in->field, hex, store_lasterr());
		return NULL;
	}
	snprintf(name, sizeof(name), "input-%zu.%s", k, route_media_ext(bi.media_type));
	dst = openat(d->fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0444);
	if (dst < 0 && errno == EEXIST) { /* the same blob, named again */
		close(src);
		if (asprintf(&path, "%s/%s", d->path, name) < 0)
			path = NULL;
		return path ? path : (run_fail(r, -ENOMEM, "store", "out of memory"), NULL);
	}
	if (dst < 0) {
		run_fail(r, -errno, "store", "cannot write input %s: %s", name, strerror(errno));
		close(src);
		return NULL;
	}
	while (off < size) {
		ssize_t n = pread(src, buf, sizeof(buf), (off_t)off);
		if (n <= 0 || write(dst, buf, (size_t)n) != n) {
			run_fail(r, -EIO, "store", "cannot copy input cas:%s into %s: %s", hex, name,
				 n < 0 ? strerror(errno) : "short read or write");
			close(src);
			close(dst);
			return NULL;
		}
		off += (uint64_t)n;
	}
	close(src);
	close(dst);
	if (asprintf(&path, "%s/%s", d->path, name) < 0) {
		run_fail(r, -ENOMEM, "store", "out of memory");
		return NULL;
	}
	return path;
}

int run_request_input_files(struct run *r, int dirfd, const char *dir, char **out)
{
	struct file_dir d = {dirfd, dir};
	struct input_repl ir = {make_input_file, &d, NULL, 0};

	return replace_inputs(r, &ir, out);
}

int run_credential(struct run *r, const char *name, uint8_t **out)
{
	void *sealed = NULL;
	size_t len = 0, plen = 0;
	uint8_t *plain = NULL;
	json_object *o = NULL, *v;
	json_tokener *tok;
	int rc = index_job_creds_get(r->e->ix, r->job.id, &sealed, &len);

	*out = NULL;
	if (rc)
		return rc;
	rc = store_unseal(r->e->st, sealed, len, &plain, &plen);
	free(sealed);
	if (rc)
		return rc;
	if ((tok = json_tokener_new_ex(4)) != NULL) {
		o = json_tokener_parse_ex(tok, (const char *)plain, (int)plen);
		json_tokener_free(tok);
	}
	rc = STORE_E_NOTFOUND;
	if (o && json_object_object_get_ex(o, name, &v) && json_object_is_type(v, json_type_string)) {
		size_t n = (size_t)json_object_get_string_len(v);
		uint8_t *p = sodium_malloc(n + 1);
		if (p) {
			memcpy(p, json_object_get_string(v), n + 1);
			*out = p;
			rc = 0;
		} else {
			rc = -ENOMEM;
		}
	}
	/* json-c's copy of the text: wiped before it is freed. */
	if (o) {
		json_object_object_foreach(o, k, val)
		{
			(void)k;
			if (json_object_is_type(val, json_type_string))
				sodium_memzero((void *)json_object_get_string(val),
					       (size_t)json_object_get_string_len(val));
		}
	}
	json_object_put(o);
	store_unsealed_free(plain);
	return rc;
}

int run_fail(struct run *r, int rc, const char *code, const char *fmt, ...)
{
	const struct error_def *d = error_find(code);
	va_list ap;

	if (!d) { /* a backend's mistake: said, and not retried */
		fprintf(stderr, "renderfs: error code '%s' is not in the catalog\n", code);
		d = error_find("backend_failed");
	}
	snprintf(r->error_code, sizeof(r->error_code), "%s", d->code);
	va_start(ap, fmt);
	vsnprintf(r->error_message, sizeof(r->error_message), fmt, ap);
	va_end(ap);
	r->transient = d->retried;
	return rc ? rc : -EIO;
}

/* ---- workers ---- */

/* An earlier job's outputs after the first and its result, for a job
 * served from it; false if they cannot all be had. */
static bool copy_extras(struct run *r, const struct job *o)
{
	struct job_output *x;
	size_t n = 0;
	char *text = NULL;
	size_t len = 0;
	bool ok = true;

	if (o->flags & JOB_F_EXTRAS) {
		if (!(x = calloc(INDEX_EXTRAS_MAX, sizeof(*x))))
			return false;
		ok = index_job_extras(r->e->ix, o->id, x, INDEX_EXTRAS_MAX, &n) == 0;
		for (size_t i = 0; ok && i < n; i++)
			ok = index_job_attach_extra(r->e->ix, r->job.id, (unsigned)i + 1, x[i].hash,
						    x[i].size, x[i].media_type) == 0;
		free(x);
	}
	if (ok && (o->flags & JOB_F_RESULT)) {
		ok = index_job_result_get(r->e->ix, o->id, &text, &len) == 0 &&
		     index_job_result_put(r->e->ix, r->job.id, text, len) == 0;
		free(text);
	}
	return ok;
}

/* Memoization: an earlier complete job with the same normalized request. */
static bool serve_cached(struct run *r, const uint8_t digest[INDEX_HASH_LEN])
{
	uint8_t other[JOB_ID_LEN];
	char oid[JOB_ID_STR_LEN + 1];
	struct job o;
	bool ok = false;

	if (!r->route->deterministic ||
	    index_digest_lookup(r->e->ix, digest, other) != 0)
		return false;
	if (index_job_get(r->e->ix, other, &o) != 0)
		return false;
	if (o.status == JOB_COMPLETE && (o.flags & JOB_F_HAS_OUTPUT) &&
	    (!r->e->opt.memo_per_owner || o.uid == r->job.uid) && copy_extras(r, &o) &&
	    index_job_attach_output(r->e->ix, r->job.id, o.output_hash, o.output_size,
				    o.media_type, o.device, true) == 0) {
		ulid_format(other, oid);
		run_log(r, "same request as job %s: its output is reused (cached)", oid);
		pthread_mutex_lock(&r->e->stats_mu);
		r->e->memo_hits++;
		pthread_mutex_unlock(&r->e->stats_mu);
		engine_notify(r->e, r->job.id, r->job.route, EV_OUTPUT);
		ok = true;
	}
	job_release(&o);
	return ok;
}

static uint64_t backoff_ms(uint32_t attempt)
{
	uint64_t base = 1000ull << (attempt < 6 ? attempt : 6);
	uint32_t jitter;

	if (getrandom(&jitter, sizeof(jitter), 0) != sizeof(jitter))
		jitter = 0;
	return base / 2 + jitter % (base / 2 + 1);
}

void run_reported(struct run *r, double seconds)
{
	if (seconds >= 0 && seconds < 1e9) {
		r->reported = true;
		r->reported_ms = (uint64_t)(seconds * 1000 + 0.5);
	}
}

/* A device string (run_commit_output's) as a ledger device kind. */
static void kind_of_device(const char *device, char *buf, size_t len)
{
	const char *sp;
	int n;

	if (strncmp(device, "cuda:", 5) == 0 && (sp = strchr(device, ' ')) && sp[1])
		snprintf(buf, len, "gpu:%s", sp + 1); /* "cuda:0 NVIDIA H200" */
	else if (sscanf(device, "gpu %d", &n) == 1 && k_cuda_device_model(n, buf + 4, len - 4) == 0)
		memcpy(buf, "gpu:", 4);
	else if (strncmp(device, "gpu ", 4) == 0)
		snprintf(buf, len, "gpu:%s", device + 4);
	else
		snprintf(buf, len, "cpu");
}

/* What the attempt used (index.h struct job_usage): the device kind that
 * ran it, and the service's measure where it gave one. */
static void attempt_usage(struct run *r, struct job_usage *u, char *kind, size_t len)
{
	kind[0] = '\0';
	u->kind = kind;
	u->reported_ms = r->reported ? (int64_t)r->reported_ms : -1;
	if (r->cached) {
		u->reported_ms = 0; /* nothing ran */
	} else if (!r->route) {
		/* not run: the route is gone */
	} else if (r->route->backend->remote) {
		snprintf(kind, len, "remote:%s", r->route->backend->name);
	} else if (r->used_on[0]) {
		snprintf(kind, len, "%s", r->used_on);
	} else if (r->gpu >= 0) {
		char dev[32];
		snprintf(dev, sizeof(dev), "gpu %d", r->gpu);
		kind_of_device(dev, kind, len);
	} else {
		snprintf(kind, len, "cpu");
	}
}

/* The latency histograms, at a run's end. */
static void observe_end(struct engine *e, const struct job *job)
{
	uint64_t now = now_ms();

	pthread_mutex_lock(&e->stats_mu);
	engine_observe(&e->h_wait, (double)(job->started_ms - job->created_ms) / 1000);
	engine_observe(&e->h_run, (double)(now - job->started_ms) / 1000);
	engine_observe(&e->h_e2e, (double)(now - job->created_ms) / 1000);
	pthread_mutex_unlock(&e->stats_mu);
}

/* The run ends in st, with its last log line (fmt, NULL: none) in the
 * same write. A remote run's end is queued, not waited for (its thread
 * goes on to other runs; the events follow once it is durable): nothing
 * of the run reads it back, and the run's writes before it are committed
 * before it or with it (engine_i.h, batching). */
static void finish(struct engine *e, struct run *r, enum job_status st, const char *code,
		   const char *msg, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static void finish(struct engine *e, struct run *r, enum job_status st, const char *code,
		   const char *msg, const char *fmt, ...)
{
	struct job_usage u;
	char kind[160], text[ENGINE_ERR_MAX], line[LOG_LINE_CAP];
	size_t n = 0;
	va_list ap;
	/* Completion sets progress to 1 in the same write: watchers of
	 * `progress` hear of it unless the run had stored 1 itself. */
	bool progress = st == JOB_COMPLETE && r->progress != 1000, output = r->output_queued;
	const char *result = st == JOB_COMPLETE ? r->result : NULL; /* with the completion */
	struct queued_write *q = NULL;
	int rc = -1;

	if (fmt) {
		va_start(ap, fmt);
		n = log_vformat(text, line, fmt, ap);
		va_end(ap);
	}
	run_batch_end(r); /* what the last step gathered comes first */
	attempt_usage(r, &u, kind, sizeof(kind));
	r->output_queued = false;
	if (r->route && r->route->backend->remote &&
	    (q = queued_write_new(r, fmt, progress, output, true))) {
		q->end = true;
		if ((rc = index_job_finish_logged_async(e->ix, r->job.id, st, code, msg, &u,
							fmt ? line : NULL, n, result,
							r->result_len, written, q)) != 0) {
			free(q); /* not queued: written below, waited for */
			q = NULL;
		}
	}
	if (!q)
		rc = index_job_finish_logged(e->ix, r->job.id, st, code, msg, &u,
					     fmt ? line : NULL, n, result, r->result_len);
	free(r->result);
	r->result = NULL;
	if (rc) {
		/* The index refused: the job stays running until recovery puts
		 * it back in the queue; say so loudly. */
		fprintf(stderr, "renderfs: cannot finish job: %s\n", store_lasterr());
		if (fmt)
			run_log(r, "%s", text);
		return;
	}
	observe_end(e, &r->job);
	if (!q) /* else they follow the queued end (written) */
		write_events(e, r->job.id, r->job.route, fmt, progress, output, true);
}

bool engine_run_begin(struct run *r, const char *where, uint8_t digest[INDEX_HASH_LEN])
{
	struct engine *e = r->e;
	const struct job *job = &r->job;
	char *req = NULL;
	size_t reqlen = 0;
	int rc;

	r->threads = e->cpus;
	r->route = route_find(&e->routes, job->route);
	engine_notify(e, job->id, job->route, EV_STATUS);
	if (!r->route) {
		finish(e, r, JOB_ERROR, "backend_not_configured",
		       "the route is no longer configured (models file)",
		       "route %s is not configured on this mount", job->route);
		return false;
	}
	r->deadline_ms =
		job->started_ms + (job->timeout_ms ? job->timeout_ms : r->route->timeout_ms);
	if ((rc = run_log_start(r, "started attempt %u on %s (%s backend)", job->attempts, where,
				r->route->backend->name)) != 0 ||
	    (rc = index_job_request(e->ix, job->id, &req, &reqlen)) != 0) {
		char why[ENGINE_ERR_MAX];

		snprintf(why, sizeof(why), "%s", store_lasterr());
		finish(e, r, JOB_ERROR, "store", why, "cannot read or record the job: %s", why);
		return false;
	}
	index_request_digest(job->route, req, reqlen,
			     e->opt.memo_per_owner ? job->uid : INDEX_ANY_OWNER, digest);
	if (serve_cached(r, digest)) {
		free(req);
		r->cached = true;
		finish(e, r, JOB_COMPLETE, NULL, NULL, NULL);
		return false;
	}
	r->request = req;
	r->request_len = reqlen;
	return true;
}

/* The run goes back to the queue (due: claimable from then on, 0: now),
 * with its last log line in the same write. 0 or the index's error (the
 * line is then logged alone). */
static int requeue(struct run *r, uint64_t due, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int requeue(struct run *r, uint64_t due, const char *fmt, ...)
{
	struct engine *e = r->e;
	struct job_usage u;
	char kind[160], text[ENGINE_ERR_MAX], line[LOG_LINE_CAP];
	size_t n;
	va_list ap;
	int rc;

	va_start(ap, fmt);
	n = log_vformat(text, line, fmt, ap);
	va_end(ap);
	run_batch_end(r); /* what the last step gathered comes first */
	attempt_usage(r, &u, kind, sizeof(kind));
	free(r->result); /* the next attempt makes its own */
	r->result = NULL;
	rc = index_job_requeue_logged(e->ix, r->job.id, due, &u, line, n);
	if (rc) {
		char why[ENGINE_ERR_MAX];

		snprintf(why, sizeof(why), "%s", store_lasterr());
		run_log(r, "%s", text);
		return store_seterr(rc, "%s", why); /* the caller's to report */
	}
	engine_notify(e, r->job.id, r->job.route, EV_LOG);
	if (r->output_queued) /* attached before the attempt failed */
		engine_notify(e, r->job.id, r->job.route, EV_OUTPUT);
	r->output_queued = false;
	engine_notify(e, r->job.id, r->job.route, EV_STATUS);
	return 0;
}

void engine_run_end(struct run *r, int rc, const uint8_t digest[INDEX_HASH_LEN])
{
	struct engine *e = r->e;
	const struct job *job = &r->job;

	free((char *)r->request);
	r->request = NULL;
	if (rc == 0) {
		finish(e, r, JOB_COMPLETE, NULL, NULL, "complete");
		if (r->route->deterministic)
			index_digest_put(e->ix, digest, job->id);
		return;
	}
	switch (run_stopping(r)) {
	case STOP_CANCEL:
		finish(e, r, JOB_CANCELLED, NULL, NULL, "cancelled");
		return;
	case STOP_TIMEOUT:
		snprintf(r->error_message, sizeof(r->error_message),
			 "the job ran past its deadline of %llu s",
			 (unsigned long long)((r->deadline_ms - job->started_ms) / 1000));
		finish(e, r, JOB_ERROR, "timeout", r->error_message, "error: %s",
		       r->error_message);
		return;
	case STOP_SHUTDOWN:
		requeue(r, 0, "interrupted by shutdown; back in the queue");
		return;
	case STOP_NONE:
		break;
	}
	if (r->transient && job->attempts < r->route->max_attempts) {
		/* Back to the queue, claimable after the backoff (or when the
		 * service says, Retry-After): no thread waits for it. */
		uint64_t ms = backoff_ms(job->attempts), due;
		if (r->retry_after_ms > ms)
			ms = r->retry_after_ms;
		due = now_ms() + ms;
		if (requeue(r, due, "attempt %u failed (%s: %s); retrying in %llu ms",
			    job->attempts, r->error_code, r->error_message,
			    (unsigned long long)ms) != 0) {
			char why[ENGINE_ERR_MAX];

			snprintf(why, sizeof(why), "%s", store_lasterr());
			finish(e, r, JOB_ERROR, "store", why, "error: cannot requeue: %s", why);
			return;
		}
		engine_lower_next_due(e, due);
		pthread_mutex_lock(&e->stats_mu);
		e->retries++;
		pthread_mutex_unlock(&e->stats_mu);
		engine_wake(e); /* a sleeping worker times its wait by next_due */
		return;
	}
	finish(e, r, JOB_ERROR, r->error_code, r->error_message, "error: %s: %s", r->error_code,
	       r->error_message);
}

static void run_job(struct worker *w, struct job *job)
{
	struct run r;
	uint8_t digest[INDEX_HASH_LEN];

	memset(&r, 0, sizeof(r));
	r.e = w->e;
	r.job = *job;
	r.stop = &w->stop;
	r.gpu = w->gpu;
	if (engine_run_begin(&r, w->gpu >= 0 ? "gpu" : "cpu", digest))
		engine_run_end(&r, r.route->backend->run(&r), digest);
}

/* Move the delayed retries that are due into the queue (any worker). */
void engine_promote_due(struct engine *e)
{
	uint64_t due = atomic_load(&e->next_due), next;

	if (!due || due > now_ms())
		return;
	/* Claim the promotion: others see 0 and go on claiming. */
	if (!atomic_compare_exchange_strong(&e->next_due, &due, 0))
		return;
	if (index_promote_due(e->ix, now_ms(), &next) != 0) {
		fprintf(stderr, "renderfs: cannot move due retries into the queue: %s\n",
			store_lasterr());
		next = now_ms() + 1000; /* try again in a second */
	}
	engine_lower_next_due(e, next); /* a retry delayed meanwhile may be earlier */
	engine_wake(e);
}

/* The groups a worker takes jobs from, in order. */
static size_t worker_groups(struct worker *w, uint8_t *groups)
{
	struct engine *e = w->e;
	size_t n = 0;

	groups[n++] = w->group;
	if (w->group == GROUP_CPU)
		for (int g = 0; g < MAX_GPUS; g++)
			if (e->total[GROUP_GPU0 + g] == 0)
				groups[n++] = (uint8_t)(GROUP_GPU0 + g);
	return n;
}

void *engine_worker_main(void *arg)
{
	struct worker *w = arg;
	struct engine *e = w->e;
	uint8_t groups[1 + MAX_GPUS];
	size_t ng = worker_groups(w, groups);

	for (;;) {
		struct job job;
		int rc = STORE_E_NOTFOUND;

		pthread_mutex_lock(&e->mu);
		bool stop = e->stop;
		pthread_mutex_unlock(&e->mu);
		if (stop)
			break;
		engine_promote_due(e);
		pthread_mutex_lock(&e->state_mu);
		for (size_t i = 0; i < ng && rc == STORE_E_NOTFOUND; i++)
			rc = index_job_claim(e->ix, groups[i], &job);
		if (rc == 0) {
			const struct route *rt = route_find(&e->routes, job.route);
			if (rt && rt->backend->step) {
				/* Queued before its route became remote: the remote
				 * threads run it (or, with no room, it goes back). */
				pthread_mutex_unlock(&e->state_mu);
				if (!remote_adopt(e, &job)) {
					index_job_return(e->ix, job.id);
					job_release(&job);
				}
				continue;
			}
			pthread_mutex_lock(&e->mu);
			w->busy = true;
			memcpy(w->job, job.id, JOB_ID_LEN);
			atomic_store(&w->stop, e->stop ? STOP_SHUTDOWN : STOP_NONE);
			e->busy[w->group]++;
			pthread_mutex_unlock(&e->mu);
		}
		pthread_mutex_unlock(&e->state_mu);
		if (rc == 0) {
			run_job(w, &job);
			job_release(&job);
			pthread_mutex_lock(&e->mu);
			w->busy = false;
			e->busy[w->group]--;
			pthread_mutex_unlock(&e->mu);
			continue;
		}
		if (rc != STORE_E_NOTFOUND)
			fprintf(stderr, "renderfs: cannot claim a job: %s\n", store_lasterr());
		/* Nothing to do: wait for a submission, the first delayed retry
		 * or a second, whichever comes first. */
		struct timespec ts;
		uint64_t due = atomic_load(&e->next_due), now = now_ms(), wait_ms = 1000;
		if (due && due <= now)
			continue;
		if (due && due - now < wait_ms)
			wait_ms = due - now;
		engine_abstime(wait_ms, &ts);
		pthread_mutex_lock(&e->mu);
		if (!e->stop)
			pthread_cond_timedwait(&e->work, &e->mu, &ts);
		pthread_mutex_unlock(&e->mu);
	}
	return NULL;
}

/* Finished jobs older than retain= are deleted, oldest first. Ids are
 * ULIDs, so id order is age order and the scan stops at the first young
 * job. */
void *engine_janitor_main(void *arg)
{
	struct engine *e = arg;

	for (;;) {
		uint8_t ids[256][JOB_ID_LEN], after[JOB_ID_LEN];
		bool have_after = false, young = false;
		struct timespec ts;

		while (!young) {
			size_t n = 0;
			uint64_t cutoff = now_ms() - e->opt.retain_ms;

			if (index_list_all(e->ix, have_after ? after : NULL, 256, ids, &n) != 0 || n == 0)
				break;
			for (size_t i = 0; i < n && !young; i++) {
				struct job j;
				if (ulid_time_ms(ids[i]) >= cutoff) {
					young = true;
					break;
				}
				if (index_job_get(e->ix, ids[i], &j) != 0)
					continue;
				bool done = j.status >= JOB_COMPLETE && j.completed_ms < cutoff;
				job_release(&j);
				if (done)
					engine_delete(e, ids[i], false, NULL, NULL);
			}
			memcpy(after, ids[n - 1], JOB_ID_LEN);
			have_after = true;
		}
		/* Every 10 s, or sooner for short retention (a quarter of it). */
		uint64_t every = e->opt.retain_ms / 4 < 10000 ? e->opt.retain_ms / 4 : 10000;
		if (every < 250)
			every = 250;
		engine_abstime(every, &ts);
		pthread_mutex_lock(&e->mu);
		if (!e->stop)
			pthread_cond_timedwait(&e->work, &e->mu, &ts);
		bool stop = e->stop;
		pthread_mutex_unlock(&e->mu);
		if (stop)
			break;
	}
	return NULL;
}
