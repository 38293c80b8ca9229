/*
 * engine.c - the engine's life cycle, submission and job control.
 *
 * DESIGN
 * Everything about a job lives in the store's index; the engine keeps
 * only what is bounded by the configuration: worker slots, one token
 * bucket per recently seen uid, remote runs in flight (bounded by each
 * route's concurrency), and latency histograms. Workers block on `work`
 * until a submission, retry or requeue signals it (with a one-second
 * timed wait as a safety net for jobs recovered at start) and claim from
 * the index, whose queue order is the scheduling order (priority, fair
 * share across uids, age).
 *
 * Groups: 0 is the CPU group, 1 the remote group of index formats before
 * 8 (its jobs move to their routes' groups at open), 2 + n CUDA device n,
 * and from GROUP_ROUTE0 on one group per remote route (index rgroups), so
 * that a route held back by its concurrency or its circuit breaker holds
 * back nothing else. CPU workers also drain GPU groups that have no
 * workers now (a job queued for a device that is gone still runs).
 *
 * Locks: engine_p.h.
 */
#include "engine.h"

#include "backend.h"
#include "errors.h"

#include <errno.h>
#include <math.h>

#include <sodium.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"
#include "schema.h"
#include "synth.h"

#include "engine_p.h"
#include "ledger.h"
#include "webhook.h"


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

static void deletions_poke(struct engine *e);
static void *deleter_main(void *arg);
static struct pending_delete *deletions_try(struct engine *e, struct pending_delete *list,
					    bool last);

void engine_notify(struct engine *e, const uint8_t id[JOB_ID_LEN], const char *route,
		   enum engine_event ev)
{
	if (e->observer)
		e->observer(e->observer_arg, id, route, ev, NULL);
	if (ev == EV_STATUS && atomic_load(&e->ndels))
		deletions_poke(e);
}

void engine_abstime(uint64_t ms, struct timespec *ts)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += (time_t)(ms / 1000);
	ts->tv_nsec += (long)(ms % 1000) * 1000000;
	if (ts->tv_nsec >= 1000000000) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000;
	}
}

void engine_wake(struct engine *e)
{
	pthread_mutex_lock(&e->mu);
	pthread_cond_broadcast(&e->work);
	pthread_mutex_unlock(&e->mu);
	remote_wake(e);
}

/* next_due = the earlier of itself and t (0: none; t 0 changes nothing). */
void engine_lower_next_due(struct engine *e, uint64_t t)
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

uint8_t engine_route_group(struct engine *e, const struct route *r)
{
	if (r->backend->remote)
		return remote_group(e, r);
	if (r->cpu_only)
		return GROUP_CPU;
	/* Spread over the GPU groups that have workers; else the CPU. */
	for (int g = 0; g < e->ngpus; g++)
		if (e->total[GROUP_GPU0 + g])
			return (uint8_t)(GROUP_GPU0 + g);
	return GROUP_CPU;
}

/*
 * The request's inputs from the store (SPEC §3): every string that is
 * exactly "cas:" and 64 lowercase hex digits names a blob, which must be
 * one the caller may read (anyone's on a shared mount; on a `private` one
 * only a blob of the caller's own jobs, with the same message as for no
 * blob at all: nothing tells of another user's), and of a size the
 * backend takes. Recorded in c (s->inputs) and referenced by the job.
 */
static int find_inputs(struct engine *e, const struct route *r, struct engine_submission *s,
		       uint32_t uid, json_object *o, const char *path, struct job_create *c)
{
	char sub[INDEX_FIELD_MAX + 32];
	int rc;

	if (json_object_is_type(o, json_type_object)) {
		json_object_object_foreach(o, k, v)
		{
			snprintf(sub, sizeof(sub), "%s%s%s", path, *path ? "." : "", k);
			if ((rc = find_inputs(e, r, s, uid, v, sub, c)) != 0)
				return rc;
		}
	} else if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++) {
			snprintf(sub, sizeof(sub), "%s[%zu]", path, i);
			if ((rc = find_inputs(e, r, s, uid, json_object_array_get_idx(o, i), sub,
					      c)) != 0)
				return rc;
		}
	} else if (json_object_is_type(o, json_type_string) &&
		   json_object_get_string_len(o) == 4 + 64 &&
		   strncmp(json_object_get_string(o), "cas:", 4) == 0) {
		const char *hex = json_object_get_string(o) + 4;
		struct job_input *in;
		struct blob_info bi;

		for (int i = 0; i < 64; i++)
			if (!strchr("0123456789abcdef", hex[i]))
				return 0; /* not a blob name: a string like any */
		if (c->ninputs >= INDEX_INPUTS_MAX)
			return sub_fail(s, -EINVAL, "a request may name at most %d blobs (cas:)",
					INDEX_INPUTS_MAX);
		if (strlen(path) >= INDEX_FIELD_MAX)
			return sub_fail(s, -EINVAL, "'%.64s...': the field's path is too long",
					path);
		if (!c->inputs && !(c->inputs = calloc(INDEX_INPUTS_MAX, sizeof(*in))))
			return sub_fail(s, -ENOMEM, "out of memory");
		in = (struct job_input *)&c->inputs[c->ninputs];
		snprintf(in->field, sizeof(in->field), "%s", path);
		b3_from_hex(hex, in->hash);
		memset(&bi, 0, sizeof(bi));
		rc = index_blob_get(e->ix, in->hash, &bi);
		if (rc == 0 && e->opt.private_ && uid != 0)
			rc = index_blob_used_by(e->ix, in->hash, uid);
		if (rc == STORE_E_NOTFOUND)
			return sub_fail(s, -EINVAL, "'%s': no blob cas:%.64s in this store that you "
					"can read", path, hex);
		if (rc)
			return sub_fail(s, -EIO, "'%s': cannot look the blob up: %s", path,
					store_lasterr());
		if (r->backend->max_input == 0)
			return sub_fail(s, -EINVAL, "'%s': the %s backend takes no input from the "
					"store (cas:)", path, r->backend->name);
		if (bi.size > r->backend->max_input)
			return sub_fail(s, -EFBIG,
					"input_too_large: '%s' is %llu bytes; the %s backend takes "
					"inputs of at most %llu",
					path, (unsigned long long)bi.size, r->backend->name,
					(unsigned long long)r->backend->max_input);
		in->size = bi.size;
		c->ninputs++;
	}
	return 0;
}

/*
 * The envelope's "credentials" (SPEC §7): names the route's backend takes,
 * string values; sealed into c->sealed (the caller frees it). The text
 * never goes anywhere else; messages name fields, never values.
 */
#define CREDENTIAL_MAX 4096
static int seal_credentials(struct engine *e, const struct route *r,
			    struct engine_submission *s, json_object *val, struct job_create *c)
{
	const char *const *takes = r->backend->credentials;
	const char *text;
	uint8_t *sealed = NULL;
	size_t len = 0;
	int rc;

	if (!json_object_is_type(val, json_type_object))
		return sub_fail(s, -EINVAL, "'credentials' must be an object of strings");
	if (!takes)
		return sub_fail(s, -EINVAL, "'credentials': the %s backend of %s takes none",
				r->backend->name, r->path);
	json_object_object_foreach(val, k, v)
	{
		bool known = false;
		for (size_t i = 0; takes[i] && !known; i++)
			known = strcmp(takes[i], k) == 0;
		if (!known)
			return sub_fail(s, -EINVAL,
					"'credentials.%.64s': the %s backend takes no such credential",
					k, r->backend->name);
		if (!json_object_is_type(v, json_type_string) || json_object_get_string_len(v) == 0 ||
		    json_object_get_string_len(v) > CREDENTIAL_MAX ||
		    strpbrk(json_object_get_string(v), "\r\n"))
			return sub_fail(s, -EINVAL,
					"'credentials.%s' must be a string of 1 to %d bytes on one line",
					k, CREDENTIAL_MAX);
	}
	text = json_object_to_json_string_ext(val, JSON_C_TO_STRING_PLAIN);
	if (!text)
		return sub_fail(s, -ENOMEM, "out of memory");
	rc = store_seal(e->st, text, strlen(text), &sealed, &len);
	if (rc)
		return sub_fail(s, rc == -ENOMEM ? -ENOMEM : -EIO, "cannot seal the credentials: %s",
				store_lasterr());
	c->sealed = sealed;
	c->sealed_len = len;
	return 0;
}

/*
 * A named job without a seed gets one derived from its owner, route and
 * name instead of a random one (schema_normalize's), so that the same
 * named request sent again (a retry after a lost answer) is the same
 * request, not a different one its name refuses. 0 or -ENOMEM.
 */
static int named_seed(const struct route *r, json_object *input, uint32_t uid, const char *name)
{
	json_object *props, *ps;
	crypto_generichash_state st;
	uint8_t h[4];

	if (!json_object_is_type(input, json_type_object) ||
	    json_object_object_get_ex(input, "seed", NULL) || !r->schema ||
	    !json_object_object_get_ex(r->schema, "properties", &props) ||
	    !json_object_object_get_ex(props, "seed", &ps) ||
	    json_object_object_get_ex(ps, "default", NULL))
		return 0;
	crypto_generichash_init(&st, NULL, 0, sizeof(h));
	crypto_generichash_update(&st, (const uint8_t *)&uid, sizeof(uid));
	crypto_generichash_update(&st, (const uint8_t *)r->path, strlen(r->path) + 1);
	crypto_generichash_update(&st, (const uint8_t *)name, strlen(name));
	crypto_generichash_final(&st, h, sizeof(h));
	return json_object_object_add(input, "seed",
				      json_object_new_int64((int64_t)((uint32_t)h[0] << 24 |
								      (uint32_t)h[1] << 16 |
								      (uint32_t)h[2] << 8 | h[3])))
		       ? -ENOMEM
		       : 0;
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
	c->group = engine_route_group(e, r);
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
			} else if (strcmp(k, "credentials") == 0) {
				if ((rc = seal_credentials(e, r, s, val, c)) != 0)
					return rc;
			} else if (strcmp(k, "webhook") == 0) {
				if (!json_object_is_type(val, json_type_string))
					return sub_fail(s, -EINVAL, "'webhook' must be a URL string");
				if (engine_webhook_url_check(json_object_get_string(val), err,
							     sizeof(err)) != 0)
					return sub_fail(s, -EINVAL, "%s", err);
				c->webhook = json_object_get_string(val);
			} else if (strcmp(k, "webhook_events") == 0) {
				size_t n = json_object_is_type(val, json_type_array)
						   ? json_object_array_length(val)
						   : 0;
				c->webhook_events = 0;
				for (size_t i = 0; i < n; i++) {
					json_object *ev = json_object_array_get_idx(val, i);
					if (!json_object_is_type(ev, json_type_string) ||
					    hook_events_parse(json_object_get_string(ev),
							      &c->webhook_events) != 0)
						n = 0;
				}
				if (!n || !c->webhook_events)
					return sub_fail(s, -EINVAL,
							"'webhook_events' must be a non-empty list of "
							"\"start\", \"progress\", \"output\", "
							"\"completed\"");
			} else {
				return sub_fail(s, -EINVAL,
						"unknown envelope option '%s' (input, name, priority, "
						"timeout_s, credentials, webhook, webhook_events)",
						k);
			}
		}
		if (c->webhook_events && !c->webhook)
			return sub_fail(s, -EINVAL, "'webhook_events' without a 'webhook' URL");
		if (c->webhook && !c->webhook_events)
			c->webhook_events = 1u << HOOK_COMPLETED; /* SPEC §13's default */
		if (!json_object_is_type(input, json_type_object))
			return sub_fail(s, -EINVAL, "'input' must be a JSON object");
		if (c->name && named_seed(r, input, uid, c->name) != 0)
			return sub_fail(s, -ENOMEM, "out of memory");
	}
	rc = schema_normalize(r->schema, input, &norm, err, sizeof(err));
	if (rc)
		return sub_fail(s, rc, "%s", rc == -ENOMEM ? "out of memory" : err);
	c->inputs = NULL;
	c->ninputs = 0;
	if ((rc = find_inputs(e, r, s, uid, norm, "", c)) != 0) {
		json_object_put(norm);
		return rc;
	}
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
			engine_notify(e, ids[k], r->path, EV_CREATED);
		}
	}
	pthread_mutex_lock(&e->stats_mu);
	for (size_t i = 0; i < n; i++)
		if (subs[i].rc == 0)
			e->submitted++;
	pthread_mutex_unlock(&e->stats_mu);
	if (m)
		engine_wake(e);
out:
	for (size_t k = 0; texts && k < n; k++)
		free(texts[k]);
	for (size_t k = 0; c && k < n; k++) {
		free((void *)c[k].sealed);
		free((void *)c[k].inputs);
	}
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
	pthread_mutex_init(&e->del_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->del_cv, &ca);
	pthread_condattr_destroy(&ca);

	e->total[GROUP_CPU] = (unsigned)e->opt.workers;
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
	if ((rc = remote_open(e, err, errlen)) != 0 || (rc = webhooks_open(e, err, errlen)) != 0 ||
	    (rc = ledger_open(e)) != 0 || (rc = replica_open(e, err, errlen)) != 0) {
		engine_close(e);
		return rc;
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
		if (pthread_create(&e->workers[i].tid, NULL, engine_worker_main, &e->workers[i]) != 0) {
			engine_stop(e);
			return -EAGAIN;
		}
		e->workers[i].started = true;
		/* Names for top -H, ps -L and debuggers (15 bytes at most). */
		char name[32];
		if (e->workers[i].group == GROUP_CPU)
			snprintf(name, sizeof(name), "rfs-cpu%u", (unsigned)(i % 10000));
		else
			snprintf(name, sizeof(name), "rfs-gpu%u-%u",
				 (unsigned)(e->workers[i].group - GROUP_GPU0) % 100,
				 (unsigned)(i % 1000));
		name[15] = '\0'; /* the kernel's limit */
		pthread_setname_np(e->workers[i].tid, name);
	}
	if (e->opt.workers && remote_start(e) != 0) {
		engine_stop(e);
		return -EAGAIN;
	}
	if (webhooks_start(e) != 0 || ledger_start(e) != 0 || replica_start(e) != 0) {
		engine_stop(e);
		return -EAGAIN;
	}
	if (pthread_create(&e->deleter, NULL, deleter_main, e) != 0) {
		engine_stop(e);
		return -EAGAIN;
	}
	e->deleter_started = true;
	pthread_setname_np(e->deleter, "rfs-delete");
	if (e->opt.retain_ms) {
		if (pthread_create(&e->janitor, NULL, engine_janitor_main, e) != 0) {
			engine_stop(e);
			return -EAGAIN;
		}
		e->janitor_started = true;
		pthread_setname_np(e->janitor, "rfs-janitor");
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
	remote_stop(e);
	webhooks_stop(e);
	ledger_stop(e);
	replica_stop(e);
	for (size_t i = 0; i < e->nworkers; i++)
		if (e->workers[i].started) {
			pthread_join(e->workers[i].tid, NULL);
			e->workers[i].started = false;
		}
	if (e->janitor_started) {
		pthread_join(e->janitor, NULL);
		e->janitor_started = false;
	}
	/* The runs are over: the deletions still waiting are answered. */
	pthread_mutex_lock(&e->del_mu);
	e->del_stop = true;
	pthread_cond_signal(&e->del_cv);
	pthread_mutex_unlock(&e->del_mu);
	if (e->deleter_started) {
		pthread_join(e->deleter, NULL);
		e->deleter_started = false;
	}
	struct pending_delete *list = e->dels;
	e->dels = NULL;
	deletions_try(e, list, true);
}

void engine_close(struct engine *e)
{
	if (!e)
		return;
	engine_stop(e);
	remote_close(e);
	webhooks_close(e);
	ledger_close(e);
	replica_close(e);
	route_table_release(&e->routes);
	free(e->workers);
	pthread_mutex_destroy(&e->state_mu);
	pthread_mutex_destroy(&e->mu);
	pthread_cond_destroy(&e->work);
	pthread_mutex_destroy(&e->rate_mu);
	pthread_mutex_destroy(&e->stats_mu);
	pthread_mutex_destroy(&e->del_mu);
	pthread_cond_destroy(&e->del_cv);
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
	pthread_mutex_unlock(&e->mu);
	return remote_signal(e, id, why) || found;
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
			engine_notify(e, id, j.route, EV_STATUS);
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
			engine_notify(e, id, j.route, EV_STATUS);
		}
		job_release(&j);
	}
	pthread_mutex_unlock(&e->state_mu);
	if (rc == 0)
		engine_wake(e);
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

/* Under state_mu: delete job j (read just now) unless a run holds it
 * (-EBUSY). */
static int delete_unheld(struct engine *e, const struct job *j, bool by_rmdir)
{
	int rc;

	if (j->status == JOB_RUNNING)
		return -EBUSY;
	if ((rc = store_job_delete(e->st, j->id)) == 0 && e->observer)
		e->observer(e->observer_arg, j->id, j->route, by_rmdir ? EV_RMDIR : EV_DELETED, j);
	return rc;
}

int engine_delete(struct engine *e, const uint8_t id[JOB_ID_LEN], bool by_rmdir,
		  engine_done_fn done, void *arg)
{
	struct pending_delete *d;
	struct job j;
	int rc;

	pthread_mutex_lock(&e->state_mu);
	if ((rc = index_job_get(e->ix, id, &j)) != 0) {
		pthread_mutex_unlock(&e->state_mu);
		return rc;
	}
	if ((rc = delete_unheld(e, &j, by_rmdir)) == -EBUSY) {
		index_job_cancel(e->ix, id);
		signal_worker(e, id, STOP_CANCEL);
		if (!done) {
			rc = store_seterr(-EBUSY, "the job is still running; try again");
		} else if (!(d = calloc(1, sizeof(*d)))) {
			rc = -ENOMEM;
		} else {
			memcpy(d->id, id, JOB_ID_LEN);
			d->by_rmdir = by_rmdir;
			d->until_ms = mono_ns() / 1000000 + ENGINE_DELETE_WAIT_MS;
			d->done = done;
			d->arg = arg;
			/* Looked at once at least: a run that ended before
			 * this was queued made its event already. */
			pthread_mutex_lock(&e->del_mu);
			if (e->del_stop) { /* stopping: nobody would answer it */
				free(d);
				rc = store_seterr(-EBUSY, "the job is still running; try again");
			} else {
				d->next = e->dels;
				e->dels = d;
				atomic_fetch_add(&e->ndels, 1);
				e->del_poked = true;
				pthread_cond_signal(&e->del_cv);
				rc = ENGINE_LATER;
			}
			pthread_mutex_unlock(&e->del_mu);
		}
	}
	pthread_mutex_unlock(&e->state_mu);
	job_release(&j);
	return rc;
}

/*
 * The waiting deletions in list, each tried once: answered if its job is
 * gone, no longer held (deleted now), or held past its time (-EBUSY), or
 * at all with last (the engine stopping: only a job in a final state is
 * deleted then; one that went back to the queue is kept, -EBUSY, so that
 * the next start still cancels its remote work). Returns the ones left.
 */
static struct pending_delete *deletions_try(struct engine *e, struct pending_delete *list,
					    bool last)
{
	struct pending_delete *keep = NULL, *next;
	uint64_t now = mono_ns() / 1000000;

	for (struct pending_delete *d = list; d; d = next) {
		struct job j;
		int rc;

		next = d->next;
		pthread_mutex_lock(&e->state_mu);
		if ((rc = index_job_get(e->ix, d->id, &j)) == 0) {
			rc = last && j.status < JOB_COMPLETE ? -EBUSY
							      : delete_unheld(e, &j, d->by_rmdir);
			job_release(&j);
		}
		pthread_mutex_unlock(&e->state_mu);
		if (rc == -EBUSY && !last && now < d->until_ms) {
			d->next = keep;
			keep = d;
			continue;
		}
		atomic_fetch_sub(&e->ndels, 1);
		d->done(d->arg, rc);
		free(d);
	}
	return keep;
}

/* rfs-delete: tries the waiting deletions when a run ends (poked) and
 * when the first of them is due. */
static void *deleter_main(void *arg)
{
	struct engine *e = arg;

	pthread_mutex_lock(&e->del_mu);
	while (!e->del_stop) {
		uint64_t first = UINT64_MAX, now = mono_ns() / 1000000;

		for (struct pending_delete *d = e->dels; d; d = d->next)
			if (d->until_ms < first)
				first = d->until_ms;
		if (!e->del_poked && first > now) {
			if (first == UINT64_MAX) {
				pthread_cond_wait(&e->del_cv, &e->del_mu);
			} else {
				struct timespec ts;
				clock_gettime(CLOCK_MONOTONIC, &ts);
				ts.tv_sec += (time_t)((first - now) / 1000);
				ts.tv_nsec += (long)((first - now) % 1000) * 1000000;
				if (ts.tv_nsec >= 1000000000) {
					ts.tv_sec++;
					ts.tv_nsec -= 1000000000;
				}
				pthread_cond_timedwait(&e->del_cv, &e->del_mu, &ts);
			}
			continue;
		}
		struct pending_delete *list = e->dels, *keep, *tail;
		e->dels = NULL;
		e->del_poked = false;
		pthread_mutex_unlock(&e->del_mu);
		keep = deletions_try(e, list, false);
		pthread_mutex_lock(&e->del_mu);
		if (keep) {
			for (tail = keep; tail->next; tail = tail->next)
				;
			tail->next = e->dels;
			e->dels = keep;
		}
	}
	pthread_mutex_unlock(&e->del_mu);
	return NULL;
}

/* A job's state changed: a deletion waiting for its run may go now. */
static void deletions_poke(struct engine *e)
{
	pthread_mutex_lock(&e->del_mu);
	e->del_poked = true;
	pthread_cond_signal(&e->del_cv);
	pthread_mutex_unlock(&e->del_mu);
}

