/*
 * engine.c - submission, the worker pool, job control and metrics.
 *
 * DESIGN
 * Everything about a job lives in the store's index; the engine keeps
 * only what is bounded by the configuration: worker slots, one token
 * bucket per recently seen uid, counters per route and status, and
 * latency histograms. Workers block on `work` until a submission, retry
 * or requeue signals it (with a one-second timed wait as a safety net for
 * jobs recovered at start) and claim from the index, whose queue order is
 * the scheduling order (priority, fair share across uids, age).
 *
 * Groups: 0 is the CPU group, 1 the remote group, 2 + n CUDA device n.
 * CPU workers also drain GPU groups that have no workers now (a job
 * queued for a device that is gone still runs).
 *
 * LOCKING (in this order; no index call is made with rate_mu held):
 *   state_mu  serializes job-state changes that race with a claim (claim,
 *             cancel, retry, delete) so that status counters stay exact.
 *   mu        guards stop, the worker slots' job ids and busy counts,
 *             and `work` waits.
 *   rate_mu   guards buckets[].
 *   stats_mu  guards the histograms and the counters beside them (job counts
 *             per route and status live in the index).
 *   A worker slot's `stop` is atomic: set under mu, read by its runner.
 */
#include "engine.h"

#include "backend.h"
#include "errors.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "engine_i.h"
#include "kernels.h"
#include "schema.h"
#include "synth.h"

#define GROUP_CPU 0
#define GROUP_REMOTE 1
#define GROUP_GPU0 2
#define MAX_GPUS 16
#define REMOTE_WORKERS 8
#define RATE_SLOTS 1024
#define NBUCKETS 16

static const double bucket_le[NBUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
					   2.5,	  5,	10,    30,   60,  120,	300, 600};

struct histogram {
	uint64_t buckets[NBUCKETS + 1]; /* the last: +Inf */
	double sum;
	uint64_t count;
};

struct worker {
	struct engine *e;
	pthread_t tid;
	uint8_t group;
	int gpu;
	bool started;
	/* Protected by e->mu: */
	bool busy;
	uint8_t job[JOB_ID_LEN];
	atomic_int stop; /* enum stop_reason for the job it runs */
};

struct bucket {
	uint32_t uid;
	bool used;
	double tokens;
	uint64_t last_ms;
};

struct engine {
	struct store *st;
	struct index *ix;
	struct engine_options opt;
	struct route_table routes;
	unsigned cpus;
	int ngpus;
	engine_observer_fn observer;
	void *observer_arg;

	pthread_mutex_t state_mu;

	pthread_mutex_t mu;
	pthread_cond_t work;
	bool stop;
	/* When the first delayed retry is due (ms; 0: none). Any thread may
	 * lower it (a retry delayed); workers promote what is due and reset
	 * it to the next time. */
	_Atomic uint64_t next_due;
	struct worker *workers;
	size_t nworkers;
	unsigned busy[GROUP_GPU0 + MAX_GPUS], total[GROUP_GPU0 + MAX_GPUS];
	pthread_t janitor;
	bool janitor_started;

	pthread_mutex_t rate_mu;
	struct bucket buckets[RATE_SLOTS];

	pthread_mutex_t stats_mu;
	struct histogram h_wait, h_run, h_e2e;
	uint64_t submitted, rejected, memo_hits, retries;
};

void engine_options_default(struct engine_options *o)
{
	memset(o, 0, sizeof(*o));
	o->workers = -1;
	o->gpus_all = true;
	o->queue_max = 1000000;
	o->user_queue_max = 100000;
	o->rate = 1000;
	o->burst = 10000;
	o->max_request = 16 << 20;
	o->max_attempts = 3;
}

void engine_time_format(uint64_t ms, char out[32])
{
	time_t s = (time_t)(ms / 1000);
	struct tm tm;

	gmtime_r(&s, &tm);
	size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out + n, 32 - n, ".%03uZ", (unsigned)(ms % 1000));
}

const struct route_table *engine_routes(struct engine *e)
{
	return &e->routes;
}

const struct engine_options *engine_options(struct engine *e)
{
	return &e->opt;
}

struct store *engine_store(struct engine *e)
{
	return e->st;
}

void engine_set_observer(struct engine *e, engine_observer_fn fn, void *arg)
{
	e->observer = fn;
	e->observer_arg = arg;
}

static void notify(struct engine *e, const uint8_t id[JOB_ID_LEN], const char *route,
		   enum engine_event ev)
{
	if (e->observer)
		e->observer(e->observer_arg, id, route, ev, NULL);
}

static void wake_workers(struct engine *e)
{
	pthread_mutex_lock(&e->mu);
	pthread_cond_broadcast(&e->work);
	pthread_mutex_unlock(&e->mu);
}

/* next_due = the earlier of itself and t (0: none; t 0 changes nothing). */
static void lower_next_due(struct engine *e, uint64_t t)
{
	uint64_t cur = atomic_load(&e->next_due);

	while (t && (cur == 0 || t < cur) && !atomic_compare_exchange_weak(&e->next_due, &cur, t))
		;
}

/* ---- counters ---- */

/* Counted in the index with every status change (index_route_counts). */
uint64_t engine_route_jobs(struct engine *e, const char *route)
{
	uint64_t c[INDEX_STATUSES], n = 0;

	if (index_route_counts(e->ix, route, c) != 0)
		return 0;
	for (int s = 0; s < INDEX_STATUSES; s++)
		n += c[s];
	return n;
}

static void observe(struct histogram *h, double seconds)
{
	int i = 0;

	while (i < NBUCKETS && seconds > bucket_le[i])
		i++;
	h->buckets[i]++;
	h->sum += seconds;
	h->count++;
}

/* ---- submission ---- */

static bool name_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 64 || !strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", s[0]))
		return false;
	return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == n;
}

/*
 * Names a job may not take: those of the route directory's own files, and
 * those that read as a job id (a route directory lists jobs by name or id,
 * so either would hide another entry).
 */
static bool name_reserved(const char *s)
{
	uint8_t id[JOB_ID_LEN];

	return strcmp(s, "new") == 0 || strcmp(s, "schema.json") == 0 || ulid_parse(s, id) == 0;
}

static int sub_fail(struct engine_submission *s, int rc, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int sub_fail(struct engine_submission *s, int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(s->err, sizeof(s->err), fmt, ap);
	va_end(ap);
	s->rc = rc;
	return rc;
}

static uint8_t route_group(struct engine *e, const struct route *r)
{
	if (r->backend->remote)
		return GROUP_REMOTE;
	/* Spread over the GPU groups that have workers; else the CPU. */
	for (int g = 0; g < e->ngpus; g++)
		if (e->total[GROUP_GPU0 + g])
			return (uint8_t)(GROUP_GPU0 + g);
	return GROUP_CPU;
}

/*
 * Envelope, schema and normalization for one object; fills c (whose
 * request text the caller frees). Returns 0 or the submission's rc.
 */
static int prepare(struct engine *e, const struct route *r, struct engine_submission *s,
		   uint32_t uid, uint32_t gid, struct job_create *c, char **text)
{
	json_object *obj = s->obj, *input = obj, *norm = NULL;
	char err[ENGINE_ERR_MAX];
	const char *t;
	int rc;

	memset(c, 0, sizeof(*c));
	c->route = r->path;
	c->uid = uid;
	c->gid = gid;
	c->priority = JOB_PRIO_NORMAL;
	c->group = route_group(e, r);
	if (!json_object_is_type(obj, json_type_object))
		return sub_fail(s, -EINVAL, "a request must be a JSON object");
	if (json_object_object_get_ex(obj, "input", NULL)) {
		json_object_object_get_ex(obj, "input", &input);
		json_object_object_foreach(obj, k, val)
		{
			if (strcmp(k, "input") == 0)
				continue;
			if (strcmp(k, "name") == 0) {
				if (!json_object_is_type(val, json_type_string) ||
				    !name_ok(json_object_get_string(val)))
					return sub_fail(s, -EINVAL,
							"'name' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}");
				if (name_reserved(json_object_get_string(val)))
					return sub_fail(s, -EINVAL,
							"'name': '%s' is reserved (the route directory's "
							"own files, or a name that reads as a job id)",
							json_object_get_string(val));
				c->name = json_object_get_string(val);
			} else if (strcmp(k, "priority") == 0) {
				if (!json_object_is_type(val, json_type_string) ||
				    job_priority_parse(json_object_get_string(val), &c->priority))
					return sub_fail(s, -EINVAL,
							"'priority' must be one of \"low\", \"normal\", \"high\"");
			} else if (strcmp(k, "timeout_s") == 0) {
				errno = 0;
				int64_t x = json_object_get_int64(val);
				if (!json_object_is_type(val, json_type_int) || errno || x < 1 ||
				    x > 7 * 86400)
					return sub_fail(s, -EINVAL,
							"'timeout_s' must be an integer from 1 to 604800");
				c->timeout_ms = (uint64_t)x * 1000;
			} else if (strcmp(k, "webhook") == 0 || strcmp(k, "webhook_events") == 0) {
				return sub_fail(s, -EINVAL,
						"'%s': webhook delivery is not available in this "
						"version of renderfs",
						k);
			} else {
				return sub_fail(s, -EINVAL,
						"unknown envelope option '%s' (input, name, priority, "
						"timeout_s)",
						k);
			}
		}
		if (!json_object_is_type(input, json_type_object))
			return sub_fail(s, -EINVAL, "'input' must be a JSON object");
	}
	rc = schema_normalize(r->schema, input, &norm, err, sizeof(err));
	if (rc)
		return sub_fail(s, rc, "%s", rc == -ENOMEM ? "out of memory" : err);
	t = json_object_to_json_string_ext(norm, JSON_C_TO_STRING_PLAIN |
							 JSON_C_TO_STRING_NOSLASHESCAPE);
	if (!t || !(*text = strdup(t))) {
		json_object_put(norm);
		return sub_fail(s, -ENOMEM, "out of memory");
	}
	json_object_put(norm);
	c->request = *text;
	c->request_len = strlen(*text);
	/* The backend's own checks too, so that a job never fails on a
	 * request it could have refused here. */
	if (r->backend->check &&
	    (rc = r->backend->check(r, c->request, c->request_len, err, sizeof(err))) != 0)
		return sub_fail(s, rc, "%s", err);
	return 0;
}

/* Take one token from uid's bucket; false when the rate is exceeded. */
static bool rate_take(struct engine *e, uint32_t uid, uint64_t now)
{
	struct bucket *b = NULL, *oldest = NULL;
	bool ok;

	if (e->opt.rate == 0)
		return true;
	pthread_mutex_lock(&e->rate_mu);
	for (size_t i = 0, h = (uid * 2654435761u) % RATE_SLOTS; i < 8; i++) {
		struct bucket *c = &e->buckets[(h + i) % RATE_SLOTS];
		if (c->used && c->uid == uid) {
			b = c;
			break;
		}
		if (!oldest || !c->used || (oldest->used && c->last_ms < oldest->last_ms))
			oldest = c;
	}
	if (!b) {
		/* A full bucket for a uid not seen recently (or evicted). */
		b = oldest;
		b->used = true;
		b->uid = uid;
		b->tokens = e->opt.burst;
		b->last_ms = now;
	}
	b->tokens += (double)(now - b->last_ms) * e->opt.rate / 1000.0;
	if (b->tokens > e->opt.burst)
		b->tokens = e->opt.burst;
	b->last_ms = now;
	ok = b->tokens >= 1.0;
	if (ok)
		b->tokens -= 1.0;
	pthread_mutex_unlock(&e->rate_mu);
	return ok;
}

int engine_submit(struct engine *e, const char *route, uint32_t uid, uint32_t gid,
		  struct engine_submission *subs, size_t n)
{
	const struct route *r = route_find(&e->routes, route);
	struct job_create *c = calloc(n ? n : 1, sizeof(*c));
	uint8_t(*ids)[JOB_ID_LEN] = calloc(n ? n : 1, JOB_ID_LEN);
	char **texts = calloc(n ? n : 1, sizeof(char *));
	size_t *map = calloc(n ? n : 1, sizeof(size_t));
	bool *existed = calloc(n ? n : 1, sizeof(bool));
	int *rcs = calloc(n ? n : 1, sizeof(int));
	size_t m = 0;
	uint64_t queued = 0, mine = 0, now = now_ms();
	int rc = 0;

	if (!c || !ids || !texts || !map || !existed || !rcs) {
		rc = -ENOMEM;
		goto out;
	}
	if (!r) {
		rc = -ENOENT;
		goto out;
	}
	if (n && ((rc = index_queue_total(e->ix, &queued)) != 0 ||
		  (rc = index_user_queued(e->ix, uid, &mine)) != 0))
		goto out;
	for (size_t i = 0; i < n; i++) {
		struct engine_submission *s = &subs[i];

		s->rc = 0;
		s->err[0] = '\0';
		s->id[0] = '\0';
		s->existed = false;
		if (prepare(e, r, s, uid, gid, &c[m], &texts[m]) != 0)
			goto refused;
		if (queued + m >= e->opt.queue_max) {
			sub_fail(s, -EAGAIN, "the queue is full (%llu jobs, queue_max=%llu)",
				 (unsigned long long)(queued + m),
				 (unsigned long long)e->opt.queue_max);
			goto refused;
		}
		if (mine + m >= e->opt.user_queue_max) {
			sub_fail(s, -EAGAIN,
				 "uid %u has %llu queued jobs (user_queue_max=%llu); wait for some "
				 "to finish",
				 uid, (unsigned long long)(mine + m),
				 (unsigned long long)e->opt.user_queue_max);
			goto refused;
		}
		if (!rate_take(e, uid, now)) {
			sub_fail(s, -EAGAIN,
				 "uid %u submits faster than rate=%u per second (burst=%u); slow "
				 "down",
				 uid, e->opt.rate, e->opt.burst);
			goto refused;
		}
		map[m++] = i;
		continue;
refused:
		/* The first refusal ends the batch (engine.h). */
		for (size_t k = i + 1; k < n; k++)
			sub_fail(&subs[k], -ECANCELED, "not tried");
		break;
	}
	if (m && (rc = index_job_create_batch(e->ix, m, c, ids, existed, rcs)) != 0) {
		/* Nothing was stored: the first is refused, the rest not tried.
		 * The commit ran on another thread: its message is not ours. */
		sub_fail(&subs[map[0]], -store_errno(rc), "cannot store the job: %s",
			 rc == -ENOSPC ? "no space left on device" : store_strerror(rc));
		for (size_t k = 1; k < m; k++)
			sub_fail(&subs[map[k]], -ECANCELED, "not tried");
		rc = 0;
		m = 0;
	}
	for (size_t k = 0; k < m; k++) {
		struct engine_submission *s = &subs[map[k]];

		if (rcs[k] == STORE_E_EXISTS) {
			sub_fail(s, -EEXIST, "name '%s' is taken by a different request on %s",
				 c[k].name, r->path);
			continue;
		}
		if (rcs[k] == -ECANCELED) {
			sub_fail(s, -ECANCELED, "not tried");
			continue;
		}
		if (rcs[k]) {
			sub_fail(s, -store_errno(rcs[k]), "cannot store the job: %s",
				 store_strerror(rcs[k]));
			continue;
		}
		/* A named job goes by its name. */
		if (c[k].name && c[k].name[0])
			snprintf(s->id, sizeof(s->id), "%s", c[k].name);
		else
			ulid_format(ids[k], s->id);
		s->existed = existed[k];
		if (!existed[k]) {
			notify(e, ids[k], r->path, EV_CREATED);
		}
	}
	pthread_mutex_lock(&e->stats_mu);
	for (size_t i = 0; i < n; i++)
		if (subs[i].rc == 0)
			e->submitted++;
	pthread_mutex_unlock(&e->stats_mu);
	if (m)
		wake_workers(e);
out:
	for (size_t k = 0; texts && k < n; k++)
		free(texts[k]);
	free(texts);
	free(c);
	free(ids);
	free(map);
	free(existed);
	free(rcs);
	return rc;
}

void engine_count_rejected(struct engine *e, uint64_t n)
{
	pthread_mutex_lock(&e->stats_mu);
	e->rejected += n;
	pthread_mutex_unlock(&e->stats_mu);
}

/* ---- the runner context ---- */

/* A timestamped log line; with backend, the attempt's first, recording
 * what runs the job in the same write. */
static int run_vlog(struct run *r, const struct backend *backend, const char *fmt, va_list ap)
{
	char line[ENGINE_ERR_MAX + 64], ts[32];
	int n, rc;

	engine_time_format(now_ms(), ts);
	n = snprintf(line, sizeof(line), "%s ", ts);
	vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
	/* One line per event: a message never splits the log. */
	for (char *p = line; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	rc = index_job_log_start(r->e->ix, r->job.id, line, strlen(line),
				 backend ? backend->name : NULL, r->route ? r->route->model_id : NULL);
	if (rc == 0)
		notify(r->e, r->job.id, r->job.route, EV_LOG);
	return rc;
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
	if (index_job_progress(r->e->ix, r->job.id, t) == 0)
		notify(r->e, r->job.id, r->job.route, EV_PROGRESS);
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

int run_commit_output(struct run *r, struct store_sink *sink, const char *media_type,
		      const char *device)
{
	int rc = store_job_commit_output(r->e->st, r->job.id, sink, media_type, device, NULL);

	if (rc)
		return run_fail(r, rc, "store", "cannot store the output: %s",
				store_lasterr());
	notify(r->e, r->job.id, r->job.route, EV_OUTPUT);
	return 0;
}

int run_handle_put(struct run *r, const void *data, size_t len)
{
	return index_job_handle_put(r->e->ix, r->job.id, data, len);
}

int run_handle_get(struct run *r, void **out, size_t *len)
{
	return index_job_handle_get(r->e->ix, r->job.id, out, len);
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
	    (!r->e->opt.memo_per_owner || o.uid == r->job.uid) &&
	    index_job_attach_output(r->e->ix, r->job.id, o.output_hash, o.output_size,
				    o.media_type, o.device, true) == 0) {
		ulid_format(other, oid);
		run_log(r, "same request as job %s: its output is reused (cached)", oid);
		pthread_mutex_lock(&r->e->stats_mu);
		r->e->memo_hits++;
		pthread_mutex_unlock(&r->e->stats_mu);
		notify(r->e, r->job.id, r->job.route, EV_OUTPUT);
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

static void finish(struct engine *e, struct run *r, enum job_status st, const char *code,
		   const char *msg)
{
	struct job j;
	int rc = index_job_finish(e->ix, r->job.id, st, code, msg);

	if (rc) {
		/* The index refused: the job stays running until recovery puts
		 * it back in the queue; say so loudly. */
		fprintf(stderr, "renderfs: cannot finish job: %s\n", store_lasterr());
		return;
	}
	if (index_job_get(e->ix, r->job.id, &j) == 0) {
		pthread_mutex_lock(&e->stats_mu);
		observe(&e->h_wait, (double)(j.started_ms - j.created_ms) / 1000);
		observe(&e->h_run, (double)(j.completed_ms - j.started_ms) / 1000);
		observe(&e->h_e2e, (double)(j.completed_ms - j.created_ms) / 1000);
		pthread_mutex_unlock(&e->stats_mu);
		job_release(&j);
	}
	notify(e, r->job.id, r->job.route, EV_STATUS);
}

static void run_job(struct worker *w, struct job *job)
{
	struct engine *e = w->e;
	struct run r;
	uint8_t digest[INDEX_HASH_LEN];
	char *req = NULL;
	size_t reqlen = 0;
	int rc;

	memset(&r, 0, sizeof(r));
	r.e = e;
	r.job = *job;
	r.stop = &w->stop;
	r.gpu = w->gpu;
	r.threads = e->cpus;
	r.route = route_find(&e->routes, job->route);
	notify(e, job->id, job->route, EV_STATUS);
	if (!r.route) {
		run_log(&r, "route %s is not configured on this mount", job->route);
		finish(e, &r, JOB_ERROR, "backend_not_configured",
		       "the route is no longer configured (models file)");
		return;
	}
	r.deadline_ms = job->started_ms + (job->timeout_ms ? job->timeout_ms : r.route->timeout_ms);
	if ((rc = run_log_start(&r, "started attempt %u on %s (%s backend)", job->attempts,
				w->gpu >= 0			? "gpu"
				: w->group == GROUP_REMOTE	? "remote"
								: "cpu",
				r.route->backend->name)) != 0 ||
	    (rc = index_job_request(e->ix, job->id, &req, &reqlen)) != 0) {
		run_log(&r, "cannot read or record the job: %s", store_lasterr());
		finish(e, &r, JOB_ERROR, "store", store_lasterr());
		return;
	}
	index_request_digest(job->route, req, reqlen,
			     e->opt.memo_per_owner ? job->uid : INDEX_ANY_OWNER, digest);
	if (serve_cached(&r, digest)) {
		free(req);
		finish(e, &r, JOB_COMPLETE, NULL, NULL);
		return;
	}
	r.request = req;
	r.request_len = reqlen;
	rc = r.route->backend->run(&r);
	free(req);
	if (rc == 0) {
		run_log(&r, "complete");
		finish(e, &r, JOB_COMPLETE, NULL, NULL);
		if (r.route->deterministic)
			index_digest_put(e->ix, digest, job->id);
		return;
	}
	switch (run_stopping(&r)) {
	case STOP_CANCEL:
		run_log(&r, "cancelled");
		finish(e, &r, JOB_CANCELLED, NULL, NULL);
		return;
	case STOP_TIMEOUT:
		snprintf(r.error_message, sizeof(r.error_message),
			 "the job ran past its deadline of %llu s",
			 (unsigned long long)((r.deadline_ms - job->started_ms) / 1000));
		run_log(&r, "error: %s", r.error_message);
		finish(e, &r, JOB_ERROR, "timeout", r.error_message);
		return;
	case STOP_SHUTDOWN:
		run_log(&r, "interrupted by shutdown; back in the queue");
		if (index_job_requeue(e->ix, job->id) == 0) {
			notify(e, job->id, job->route, EV_STATUS);
		}
		return;
	case STOP_NONE:
		break;
	}
	if (r.transient && job->attempts < r.route->max_attempts) {
		/* Back to the queue, claimable after the backoff: no worker
		 * waits for it (index_job_requeue_at). */
		uint64_t ms = backoff_ms(job->attempts), due = now_ms() + ms;
		run_log(&r, "attempt %u failed (%s: %s); retrying in %llu ms", job->attempts,
			r.error_code, r.error_message, (unsigned long long)ms);
		if (index_job_requeue_at(e->ix, job->id, due) != 0) {
			run_log(&r, "error: cannot requeue: %s", store_lasterr());
			finish(e, &r, JOB_ERROR, "store", store_lasterr());
			return;
		}
		lower_next_due(e, due);
		pthread_mutex_lock(&e->stats_mu);
		e->retries++;
		pthread_mutex_unlock(&e->stats_mu);
		notify(e, job->id, job->route, EV_STATUS);
		wake_workers(e); /* a sleeping worker times its wait by next_due */
		return;
	}
	run_log(&r, "error: %s: %s", r.error_code, r.error_message);
	finish(e, &r, JOB_ERROR, r.error_code, r.error_message);
}

/* Move the delayed retries that are due into the queue (any worker). */
static void promote_due(struct engine *e)
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
	lower_next_due(e, next); /* a retry delayed meanwhile may be earlier */
	wake_workers(e);
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

static void *worker_main(void *arg)
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
		promote_due(e);
		pthread_mutex_lock(&e->state_mu);
		for (size_t i = 0; i < ng && rc == STORE_E_NOTFOUND; i++)
			rc = index_job_claim(e->ix, groups[i], &job);
		if (rc == 0) {
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
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += (time_t)(wait_ms / 1000);
		ts.tv_nsec += (long)(wait_ms % 1000) * 1000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
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
static void *janitor_main(void *arg)
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
					engine_delete(e, ids[i], false);
			}
			memcpy(after, ids[n - 1], JOB_ID_LEN);
			have_after = true;
		}
		/* Every 10 s, or sooner for short retention (a quarter of it). */
		uint64_t every = e->opt.retain_ms / 4 < 10000 ? e->opt.retain_ms / 4 : 10000;
		if (every < 250)
			every = 250;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += (time_t)(every / 1000);
		ts.tv_nsec += (long)(every % 1000) * 1000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
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

/* ---- life cycle ---- */

int engine_open(struct store *st, const struct engine_options *opt, struct engine **out,
		char *err, size_t errlen)
{
	struct engine *e = calloc(1, sizeof(*e));
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	size_t nw = 0;
	int rc;

	if (!e)
		return -ENOMEM;
	e->st = st;
	e->ix = store_index(st);
	e->opt = *opt;
	e->cpus = ncpu > 0 ? (unsigned)ncpu : 1;
	if (e->opt.workers < 0)
		e->opt.workers = (int)e->cpus;
	rc = route_table_load(&e->routes, opt->models, opt->max_attempts, err, errlen);
	if (rc) {
		free(e);
		return rc;
	}
	e->ngpus = k_cuda_device_count();
	if (e->ngpus > MAX_GPUS)
		e->ngpus = MAX_GPUS;
	pthread_mutex_init(&e->state_mu, NULL);
	pthread_mutex_init(&e->mu, NULL);
	pthread_cond_init(&e->work, NULL);
	pthread_mutex_init(&e->rate_mu, NULL);
	pthread_mutex_init(&e->stats_mu, NULL);

	e->total[GROUP_CPU] = (unsigned)e->opt.workers;
	e->total[GROUP_REMOTE] = e->opt.workers ? REMOTE_WORKERS : 0;
	for (int g = 0; g < e->ngpus; g++)
		if (e->opt.workers &&
		    (e->opt.gpus_all || (g < 64 && (e->opt.gpu_mask >> g) & 1)))
			e->total[GROUP_GPU0 + g] = 1;
	for (int g = 0; g < GROUP_GPU0 + MAX_GPUS; g++)
		nw += e->total[g];
	e->workers = calloc(nw ? nw : 1, sizeof(*e->workers));
	if (!e->workers) {
		engine_close(e);
		return -ENOMEM;
	}
	for (int g = 0; g < GROUP_GPU0 + MAX_GPUS; g++)
		for (unsigned i = 0; i < e->total[g]; i++) {
			struct worker *w = &e->workers[e->nworkers++];
			w->e = e;
			w->group = (uint8_t)g;
			w->gpu = g >= GROUP_GPU0 ? g - GROUP_GPU0 : -1;
		}
	*out = e;
	return 0;
}

int engine_start(struct engine *e)
{
	uint64_t next = 0;

	/* Retries delayed before a restart keep their times. */
	if (index_delayed_next(e->ix, &next) == 0)
		atomic_store(&e->next_due, next);
	for (size_t i = 0; i < e->nworkers; i++) {
		if (pthread_create(&e->workers[i].tid, NULL, worker_main, &e->workers[i]) != 0) {
			engine_stop(e);
			return -EAGAIN;
		}
		e->workers[i].started = true;
	}
	if (e->opt.retain_ms) {
		if (pthread_create(&e->janitor, NULL, janitor_main, e) != 0) {
			engine_stop(e);
			return -EAGAIN;
		}
		e->janitor_started = true;
	}
	return 0;
}

void engine_stop(struct engine *e)
{
	pthread_mutex_lock(&e->mu);
	e->stop = true;
	for (size_t i = 0; i < e->nworkers; i++)
		if (e->workers[i].busy)
			atomic_store(&e->workers[i].stop, STOP_SHUTDOWN);
	pthread_cond_broadcast(&e->work);
	pthread_mutex_unlock(&e->mu);
	for (size_t i = 0; i < e->nworkers; i++)
		if (e->workers[i].started) {
			pthread_join(e->workers[i].tid, NULL);
			e->workers[i].started = false;
		}
	if (e->janitor_started) {
		pthread_join(e->janitor, NULL);
		e->janitor_started = false;
	}
}

void engine_close(struct engine *e)
{
	if (!e)
		return;
	engine_stop(e);
	route_table_release(&e->routes);
	free(e->workers);
	pthread_mutex_destroy(&e->state_mu);
	pthread_mutex_destroy(&e->mu);
	pthread_cond_destroy(&e->work);
	pthread_mutex_destroy(&e->rate_mu);
	pthread_mutex_destroy(&e->stats_mu);
	free(e);
}

/* ---- control ---- */

/* Tell the worker running id, if any, to stop; true if one was found. */
static bool signal_worker(struct engine *e, const uint8_t id[JOB_ID_LEN], enum stop_reason why)
{
	bool found = false;

	pthread_mutex_lock(&e->mu);
	for (size_t i = 0; i < e->nworkers; i++)
		if (e->workers[i].busy && memcmp(e->workers[i].job, id, JOB_ID_LEN) == 0) {
			atomic_store(&e->workers[i].stop, why);
			found = true;
		}
	pthread_cond_broadcast(&e->work); /* ends a retry backoff nap */
	pthread_mutex_unlock(&e->mu);
	return found;
}

int engine_cancel(struct engine *e, const uint8_t id[JOB_ID_LEN])
{
	struct job j;
	int rc;

	pthread_mutex_lock(&e->state_mu);
	rc = index_job_get(e->ix, id, &j);
	if (rc == 0) {
		rc = index_job_cancel(e->ix, id);
		if (rc == 0 && j.status == JOB_QUEUED) {
			notify(e, id, j.route, EV_STATUS);
		} else if (rc == 0) {
			signal_worker(e, id, STOP_CANCEL);
		}
		job_release(&j);
	}
	pthread_mutex_unlock(&e->state_mu);
	return rc;
}

int engine_retry(struct engine *e, const uint8_t id[JOB_ID_LEN])
{
	struct job j;
	int rc;

	pthread_mutex_lock(&e->state_mu);
	rc = index_job_get(e->ix, id, &j);
	if (rc == 0) {
		rc = index_job_retry(e->ix, id);
		if (rc == 0) {
			notify(e, id, j.route, EV_STATUS);
		}
		job_release(&j);
	}
	pthread_mutex_unlock(&e->state_mu);
	if (rc == 0)
		wake_workers(e);
	return rc;
}

int engine_set_priority(struct engine *e, const uint8_t id[JOB_ID_LEN], enum job_priority p)
{
	int rc;

	pthread_mutex_lock(&e->state_mu);
	rc = index_job_set_priority(e->ix, id, p);
	pthread_mutex_unlock(&e->state_mu);
	return rc;
}

int engine_delete(struct engine *e, const uint8_t id[JOB_ID_LEN], bool by_rmdir)
{
	struct job j;
	int rc;

	/* A running job is cancelled first and deleted once its worker has
	 * let go of it (within a second: runners check often). */
	for (int tries = 0;; tries++) {
		pthread_mutex_lock(&e->state_mu);
		if ((rc = index_job_get(e->ix, id, &j)) != 0) {
			pthread_mutex_unlock(&e->state_mu);
			return rc;
		}
		if (j.status != JOB_RUNNING) {
			rc = store_job_delete(e->st, id);
			if (rc == 0) {
				if (e->observer)
					e->observer(e->observer_arg, id, j.route,
						    by_rmdir ? EV_RMDIR : EV_DELETED, &j);
			}
			pthread_mutex_unlock(&e->state_mu);
			job_release(&j);
			return rc;
		}
		if (tries == 0)
			index_job_cancel(e->ix, id);
		signal_worker(e, id, STOP_CANCEL);
		pthread_mutex_unlock(&e->state_mu);
		job_release(&j);
		if (tries >= 100)
			return store_seterr(-EBUSY, "the job is still running; try again");
		usleep(20000);
	}
}

/* ---- metrics ---- */

struct textbuf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void tb_printf(struct textbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(struct textbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->oom)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->oom = true;
			return;
		}
		if ((size_t)n < b->cap - b->len)
			break;
		size_t cap = (b->cap + (size_t)n + 1) * 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->oom = true;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
	b->len += (size_t)n;
}

static void histo(struct textbuf *b, const char *name, const char *help,
		  const struct histogram *h)
{
	uint64_t cum = 0;

	tb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	for (int i = 0; i < NBUCKETS; i++) {
		cum += h->buckets[i];
		tb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, bucket_le[i],
			  (unsigned long long)cum);
	}
	cum += h->buckets[NBUCKETS];
	tb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
		  (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->count);
}

int engine_stats_text(struct engine *e, char **out, size_t *len)
{
	static const char *const gname[GROUP_GPU0] = {"cpu", "remote"};
	struct textbuf b = {malloc(4096), 0, 4096, false};
	struct store_stats ss;
	struct index_stats is;
	struct histogram hw, hr, he;
	uint64_t submitted, rejected, retries, memo;

	if (!b.p)
		return -ENOMEM;
	pthread_mutex_lock(&e->stats_mu);
	hw = e->h_wait;
	hr = e->h_run;
	he = e->h_e2e;
	submitted = e->submitted;
	rejected = e->rejected;
	retries = e->retries;
	memo = e->memo_hits;
	pthread_mutex_unlock(&e->stats_mu);

	tb_printf(&b, "# HELP renderfs_jobs Jobs in the store by route and status.\n"
		      "# TYPE renderfs_jobs gauge\n");
	for (size_t i = 0; i < e->routes.n; i++) {
		uint64_t c[INDEX_STATUSES];
		if (index_route_counts(e->ix, e->routes.routes[i].path, c) != 0)
			memset(c, 0, sizeof(c));
		for (int s = 0; s < INDEX_STATUSES; s++)
			tb_printf(&b, "renderfs_jobs{route=\"%s\",status=\"%s\"} %llu\n",
				  e->routes.routes[i].path, job_status_name((enum job_status)s),
				  (unsigned long long)c[s]);
	}
	tb_printf(&b, "# HELP renderfs_queue_depth Queued jobs per worker group.\n"
		      "# TYPE renderfs_queue_depth gauge\n");
	for (int g = 0; g < GROUP_GPU0 + MAX_GPUS; g++) {
		uint64_t n = 0;
		if (g >= GROUP_GPU0 + e->ngpus)
			break;
		index_queue_depth(e->ix, (uint8_t)g, &n);
		if (g < GROUP_GPU0)
			tb_printf(&b, "renderfs_queue_depth{group=\"%s\"} %llu\n", gname[g],
				  (unsigned long long)n);
		else
			tb_printf(&b, "renderfs_queue_depth{group=\"gpu%d\"} %llu\n", g - GROUP_GPU0,
				  (unsigned long long)n);
	}
	tb_printf(&b, "# HELP renderfs_workers Worker threads per group.\n"
		      "# TYPE renderfs_workers gauge\n");
	pthread_mutex_lock(&e->mu);
	unsigned busy[GROUP_GPU0 + MAX_GPUS], total[GROUP_GPU0 + MAX_GPUS];
	memcpy(busy, e->busy, sizeof(busy));
	memcpy(total, e->total, sizeof(total));
	pthread_mutex_unlock(&e->mu);
	for (int g = 0; g < GROUP_GPU0 + e->ngpus; g++) {
		char name[16];
		if (g < GROUP_GPU0)
			snprintf(name, sizeof(name), "%s", gname[g]);
		else
			snprintf(name, sizeof(name), "gpu%d", g - GROUP_GPU0);
		tb_printf(&b, "renderfs_workers{group=\"%s\"} %u\n", name, total[g]);
		tb_printf(&b, "renderfs_workers_busy{group=\"%s\"} %u\n", name, busy[g]);
	}
	histo(&b, "renderfs_job_queue_wait_seconds", "Time from submission to start.", &hw);
	histo(&b, "renderfs_job_run_seconds", "Time from start to a final state.", &hr);
	histo(&b, "renderfs_job_latency_seconds", "Time from submission to a final state.", &he);
	store_get_stats(e->st, &ss);
	if (index_stats(e->ix, &is) != 0)
		memset(&is, 0, sizeof(is));
	tb_printf(&b,
		  "# HELP renderfs_submissions_total Request objects accepted through new.\n"
		  "# TYPE renderfs_submissions_total counter\n"
		  "renderfs_submissions_total %llu\n"
		  "# HELP renderfs_submissions_rejected_total Request objects refused.\n"
		  "# TYPE renderfs_submissions_rejected_total counter\n"
		  "renderfs_submissions_rejected_total %llu\n"
		  "# HELP renderfs_job_retries_total Automatic retries after transient failures.\n"
		  "# TYPE renderfs_job_retries_total counter\n"
		  "renderfs_job_retries_total %llu\n"
		  "# HELP renderfs_memo_hits_total Jobs completed from an earlier identical job.\n"
		  "# TYPE renderfs_memo_hits_total counter\n"
		  "renderfs_memo_hits_total %llu\n"
		  "# HELP renderfs_blobs Blobs in the store.\n"
		  "# TYPE renderfs_blobs gauge\n"
		  "renderfs_blobs %llu\n"
		  "# HELP renderfs_blob_bytes_written_total Bytes of outputs committed.\n"
		  "# TYPE renderfs_blob_bytes_written_total counter\n"
		  "renderfs_blob_bytes_written_total %llu\n"
		  "# HELP renderfs_blobs_written_total New blob files.\n"
		  "# TYPE renderfs_blobs_written_total counter\n"
		  "renderfs_blobs_written_total %llu\n"
		  "# HELP renderfs_dedup_hits_total Outputs whose content was already stored.\n"
		  "# TYPE renderfs_dedup_hits_total counter\n"
		  "renderfs_dedup_hits_total %llu\n"
		  "# HELP renderfs_integrity_failures_total Blob reads refused because the content "
		  "no longer matches its hash.\n"
		  "# TYPE renderfs_integrity_failures_total counter\n"
		  "renderfs_integrity_failures_total %llu\n"
		  "# HELP renderfs_index_commits_total Durable index commits (one sync each).\n"
		  "# TYPE renderfs_index_commits_total counter\n"
		  "renderfs_index_commits_total %llu\n",
		  (unsigned long long)submitted, (unsigned long long)rejected,
		  (unsigned long long)retries, (unsigned long long)memo, (unsigned long long)is.blobs,
		  (unsigned long long)ss.bytes_written, (unsigned long long)ss.blobs_written,
		  (unsigned long long)ss.dedup_hits, (unsigned long long)ss.integrity_failures,
		  (unsigned long long)is.commits);
	if (b.oom) {
		free(b.p);
		return -ENOMEM;
	}
	*out = b.p;
	*len = b.len;
	return 0;
}
