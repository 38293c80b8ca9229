/*
 * backend_replicate.c - Replicate's predictions API (SPEC §8, PROTOCOLS.md
 * "Replicate predictions") as a remote backend.
 *
 * A run is a series of steps (backend.h) on the engine's HTTP loop:
 *
 *   START     the durable handle says where the job is: nothing (create),
 *             "submitting" (a creation whose answer never came: it may
 *             exist at Replicate, so it is not sent again: `interrupted`),
 *             or a prediction id with its URLs (follow it: a restart).
 *   CREATE    POST {base}/models/{owner}/{name}/predictions, or
 *             {base}/predictions with the route's `version`, body
 *             {"input": <normalized request>}, `Cancel-After` from the
 *             job's deadline. The id and urls.get/urls.cancel are durable
 *             before anything else happens.
 *   POLL      GET urls.get (200 ms, growing to 2 s): `starting`,
 *             `processing` (new lines of `logs`, one growing string, are
 *             appended to the job's log once each: the bytes seen are in
 *             the handle; progress from a step counter in the latest
 *             line), and the four final ones: `succeeded`, `failed`,
 *             `canceled`, `aborted`. A busy or garbled answer is asked
 *             again up to 5 times before the attempt fails (and the next
 *             attempt follows the same prediction).
 *   FILES     every URL (or data: URI) in `output` (a URL, a list of
 *             them, or an object holding them) is stored (service.h);
 *             the prediction, without its input and logs, is kept as
 *             result.json; `metrics.predict_time` is logged and kept.
 *
 * Settings (models file): model (owner/name) or version, base_url, key or
 * key_env (default REPLICATE_API_TOKEN), request_timeout_s (one get: 30 s;
 * one that takes longer is asked again). The key goes in the
 * Authorization header only; every message is redacted of it (http.c).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "engine_i.h"
#include "http.h"
#include "route.h"
#include "service.h"

extern const struct backend backend_replicate;

#define REP_LOG_LINE_MAX 400
#define REP_LOG_BATCH 16 /* lines logged in one write */
/* A cas: input goes inline as a data: URI; Replicate takes files that
 * way up to about 1 MB and asks for an upload beyond it (its docs). */
#define REP_INPUT_MAX (1u << 20)

struct rep_conf {
	struct svc_conf svc; /* base_url, key, key_env, request_timeout_s */
	char version[128];   /* "" : the model's latest, by model id */
};

enum rep_phase { R_CREATE, R_POLL, R_FILES, R_CANCEL };

struct rep_run {
	enum rep_phase phase;
	struct svc_run sr; /* key, Authorization, the result and its files */
	char id[128];
	char get_url[SVC_URL_MAX], cancel_url[SVC_URL_MAX];
	uint64_t logs_seen; /* bytes of `logs` already in the job's log */
	struct svc_poll poll;
	char last_status[16];
};

static const struct backend_setting rep_takes[] = {
    {"base_url", json_type_string},
    {"version", json_type_string},
    {"key", json_type_string},
    {"key_env", json_type_string},
    {"request_timeout_s", json_type_int},
};

static void rep_release(void *state)
{
	struct rep_conf *c = state;

	if (c)
		svc_conf_clear(&c->svc);
	free(c);
}

static bool id_ok(const char *s, size_t cap)
{
	return s && *s && strlen(s) < cap && !strpbrk(s, "/?#% \t\r\n\"");
}

static int rep_configure(struct route *rt, json_object *settings, void **state, char *err,
			 size_t errlen)
{
	struct rep_conf *c;
	json_object *v;
	const char *slash;
	int rc = backend_settings_check(&backend_replicate, settings, rep_takes,
					sizeof(rep_takes) / sizeof(rep_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	if ((rc = svc_conf_parse(&c->svc, settings, "https://api.replicate.com/v1",
				 "REPLICATE_API_TOKEN", err, errlen)) != 0) {
		rep_release(c);
		return rc;
	}
	if (settings && json_object_object_get_ex(settings, "version", &v)) {
		if (!id_ok(json_object_get_string(v), sizeof(c->version))) {
			rep_release(c);
			snprintf(err, errlen, "'version' must be a Replicate model version id");
			return -EINVAL;
		}
		snprintf(c->version, sizeof(c->version), "%s", json_object_get_string(v));
	}
	slash = strchr(rt->model_id, '/');
	if (rt->model_id[0] &&
	    (!slash || slash == rt->model_id || !slash[1] || strchr(slash + 1, '/') ||
	     strpbrk(rt->model_id, "?#% ") || strstr(rt->model_id, ".."))) {
		rep_release(c);
		snprintf(err, errlen, "'model' must be a Replicate model as owner/name");
		return -EINVAL;
	}
	if (!rt->model_id[0] && !c->version[0]) {
		rep_release(c);
		snprintf(err, errlen, "the replicate backend needs 'model' (owner/name) or "
				      "'version'");
		return -EINVAL;
	}
	if (c->version[0])
		snprintf(rt->target, sizeof(rt->target), "%s/predictions#%s", c->svc.base, c->version);
	else
		snprintf(rt->target, sizeof(rt->target), "%s/models/%s", c->svc.base, rt->model_id);
	*state = c;
	return 0;
}

/* ---- the handle ---- */

/* The handle: the prediction and how many bytes of its logs are in the
 * job's log. */
static json_object *handle_json(const struct rep_run *p)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "id", json_object_new_string(p->id));
	json_object_object_add(o, "get", json_object_new_string(p->get_url));
	json_object_object_add(o, "cancel", json_object_new_string(p->cancel_url));
	json_object_object_add(o, "logs", json_object_new_int64((int64_t)p->logs_seen));
	return o;
}

/* 1: resume, 0: nothing, -EALREADY: a creation of unknown fate,
 * -EBADMSG: a damaged handle, <0: error. */
static int handle_get(struct run *r, struct rep_run *p)
{
	json_object *o, *v;
	const char *id, *g, *c;
	int rc = svc_handle_get(r, &o);

	if (rc != 1)
		return rc;
	id = svc_str(o, "id");
	g = svc_str(o, "get");
	c = svc_str(o, "cancel");
	if (!id_ok(id, sizeof(p->id)) || !g || !c || !svc_url_ok(g, strlen(g)) ||
	    !svc_url_ok(c, strlen(c))) {
		json_object_put(o);
		return -EBADMSG;
	}
	snprintf(p->id, sizeof(p->id), "%s", id);
	snprintf(p->get_url, sizeof(p->get_url), "%s", g);
	snprintf(p->cancel_url, sizeof(p->cancel_url), "%s", c);
	if (json_object_object_get_ex(o, "logs", &v) && json_object_is_type(v, json_type_int) &&
	    json_object_get_int64(v) >= 0)
		p->logs_seen = (uint64_t)json_object_get_int64(v);
	json_object_put(o);
	return 1;
}

/* ---- requests ---- */

static int request(struct run *r, struct rep_run *p, const char *method, const char *url,
		   const char *body, uint64_t timeout_ms)
{
	char after[64];
	const char *hdrs[] = {p->sr.auth, "Content-Type: application/json",
			      "Accept: application/json", after};
	const char *secrets[] = {p->sr.key};
	bool create = p->phase == R_CREATE;
	/* Replicate stops the work itself at the job's deadline (at least
	 * 5 s: its minimum). */
	uint64_t left_s = r->deadline_ms > now_ms() ? (r->deadline_ms - now_ms()) / 1000 : 0;
	snprintf(after, sizeof(after), "Cancel-After: %llus",
		 (unsigned long long)(left_s < 5 ? 5 : left_s));
	struct http_request rq = {
	    .method = method,
	    .url = url,
	    .headers = hdrs,
	    .nheaders = create ? 4 : 3,
	    .body = body,
	    .body_len = body ? strlen(body) : 0,
	    .timeout_ms = timeout_ms,
	    .max_body = 4u << 20, /* a prediction carries its logs */
	    .secrets = secrets,
	    .nsecrets = 1,
	};

	return run_http(r, &rq);
}

static int poll(struct run *r, struct rep_run *p)
{
	p->phase = R_POLL;
	return request(r, p, "GET", p->get_url, NULL,
		       ((const struct rep_conf *)r->route->backend_state)->svc.req_ms);
}

static int on_created(struct run *r, struct rep_run *p, const struct http_response *h)
{
	const struct rep_conf *c = r->route->backend_state;
	json_object *o = svc_parse(h->body, h->len), *urls = NULL;
	const char *id = svc_str(o, "id"), *g = NULL, *cu = NULL;
	int rc;

	if (!id_ok(id, sizeof(p->id))) {
		json_object_put(o);
		return run_fail(r, -EBADMSG, "backend_failed",
				"Replicate created the prediction but its answer has no usable id");
	}
	snprintf(p->id, sizeof(p->id), "%s", id);
	if (json_object_object_get_ex(o, "urls", &urls)) {
		g = svc_str(urls, "get");
		cu = svc_str(urls, "cancel");
	}
	if (g && svc_url_ok(g, strlen(g)))
		snprintf(p->get_url, sizeof(p->get_url), "%s", g);
	else
		snprintf(p->get_url, sizeof(p->get_url), "%s/predictions/%s", c->svc.base, p->id);
	if (cu && svc_url_ok(cu, strlen(cu)))
		snprintf(p->cancel_url, sizeof(p->cancel_url), "%s", cu);
	else
		snprintf(p->cancel_url, sizeof(p->cancel_url), "%s/predictions/%s/cancel", c->svc.base,
			 p->id);
	json_object_put(o);
	if ((rc = svc_handle_put(r, handle_json(p))) != 0)
		return run_fail(r, rc, "store",
				"Replicate prediction %s was created but cannot be recorded: %s",
				p->id, store_lasterr());
	run_log(r, "replicate: created prediction %s", p->id);
	run_remote_set(r, p->id, NULL, RUN_REMOTE_SAME);
	p->phase = R_POLL;
	return run_after(r, svc_poll_begin(&p->poll));
}

/* New lines of `logs` (one growing string): each complete line once; at a
 * final state (all) the unfinished last one too. Progress from the latest
 * line's step counter (tqdm redraws a line with \r: its last form). */
static void take_logs(struct run *r, struct rep_run *p, const char *logs, bool all)
{
	size_t len = strlen(logs), at = p->logs_seen;
	double frac = -1;

	if (at > len)
		at = len; /* the service's logs shrank: nothing is said twice */
	for (;;) {
		/* A batch of lines and the count of bytes taken in one write:
		 * each line once, across a crash too. */
		char bufs[REP_LOG_BATCH][REP_LOG_LINE_MAX + 1];
		const char *msgs[REP_LOG_BATCH];
		size_t k = 0, from = p->logs_seen;
		while (at < len && k < REP_LOG_BATCH) {
			const char *nl = memchr(logs + at, '\n', len - at);
			size_t end = nl ? (size_t)(nl - logs) : len;
			if (!nl && !all)
				break;
			const char *line = logs + at;
			size_t n = end - at;
			for (size_t c = n; c > 0; c--)
				if (line[c - 1] == '\r') {
					line += c;
					n -= c;
					break;
				}
			if (n > 0) {
				snprintf(bufs[k], sizeof(bufs[k]), "%.*s",
					 (int)(n < REP_LOG_LINE_MAX ? n : REP_LOG_LINE_MAX), line);
				double f = svc_log_fraction(bufs[k]);
				if (f >= 0)
					frac = f;
				msgs[k] = bufs[k];
				k++;
			}
			at = nl ? end + 1 : end;
		}
		if (at == from)
			break;
		p->logs_seen = at;
		char *text = svc_handle_text(handle_json(p));
		if (!text || run_log_handle(r, "replicate: ", msgs, k, text, strlen(text)) != 0) {
			p->logs_seen = from; /* not recorded: taken again next poll */
			free(text);
			break;
		}
		free(text);
	}
	if (frac >= 0)
		run_progress(r, frac < 0.999 ? frac : 0.999); /* 1: when stored */
}

/* Every file of `output`: a URL (or data: URI) string, in arrays and
 * objects, in order. */
static void collect_files(struct rep_run *p, json_object *holder, const char *key, size_t idx,
			  json_object *v, int depth)
{
	if (depth > 8 || p->sr.files.n >= SVC_FILES_MAX || !v)
		return;
	if (json_object_is_type(v, json_type_string)) {
		const char *s = json_object_get_string(v);
		if (strncmp(s, "https://", 8) == 0 || strncmp(s, "http://", 7) == 0 ||
		    strncmp(s, "data:", 5) == 0)
			svc_files_add(&p->sr.files, holder, key, idx, SVC_FILE_URL, NULL);
	} else if (json_object_is_type(v, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(v); i++)
			collect_files(p, v, NULL, i, json_object_array_get_idx(v, i), depth + 1);
	} else if (json_object_is_type(v, json_type_object)) {
		json_object_object_foreach(v, k, x)
		{
			if (strlen(k) < sizeof(p->sr.files.f[0].key))
				collect_files(p, v, k, 0, x, depth + 1);
		}
	}
}

static int on_succeeded(struct run *r, struct rep_run *p, json_object *o)
{
	json_object *out = NULL, *m;
	const char *version = svc_str(o, "version");

	if (version && id_ok(version, 128))
		run_remote_set(r, NULL, version, RUN_REMOTE_SAME);
	if (json_object_object_get_ex(o, "metrics", &m) &&
	    json_object_object_get_ex(m, "predict_time", &m) &&
	    (json_object_is_type(m, json_type_double) || json_object_is_type(m, json_type_int))) {
		run_log(r, "replicate: prediction %s took %.3f s of predict_time", p->id,
			json_object_get_double(m));
		run_reported(r, json_object_get_double(m));
	}
	/* result.json: what Replicate said of the prediction, less its input
	 * (inline files) and its logs (in the job's log). */
	json_object_object_del(o, "input");
	json_object_object_del(o, "logs");
	p->sr.files.result = o;
	json_object_object_get_ex(o, "output", &out);
	collect_files(p, o, "output", 0, out, 0);
	run_log(r, "replicate: prediction %s succeeded; storing %zu file%s", p->id, p->sr.files.n,
		p->sr.files.n == 1 ? "" : "s");
	p->phase = R_FILES;
	return svc_files_start(r, &p->sr.files);
}

static int on_poll(struct run *r, struct rep_run *p, const struct http_response *h)
{
	json_object *o;
	const char *st, *logs;
	bool final;
	int rc;

	if (h->error_code) {
		if (strcmp(h->error_code, "backend_unavailable") == 0 &&
		    (rc = svc_poll_again(r, &p->poll, h)) != 0) {
			run_log(r, "replicate: prediction not available (%s); asking again",
				h->message);
			return rc;
		}
		return svc_fail(r, h, "Replicate", "replicate prediction");
	}
	if (!(o = svc_parse(h->body, h->len)) || !(st = svc_str(o, "status"))) {
		json_object_put(o);
		if ((rc = svc_poll_again(r, &p->poll, NULL)) != 0) {
			run_log(r, "replicate: the answer for prediction %s is not a prediction; "
				   "asking again", p->id);
			return rc;
		}
		return run_fail(r, -EBADMSG, "backend_unavailable",
				"Replicate's answers for prediction %s are not predictions", p->id);
	}
	final = strcmp(st, "succeeded") == 0 || strcmp(st, "failed") == 0 ||
		strcmp(st, "canceled") == 0 || strcmp(st, "aborted") == 0;
	if ((logs = svc_str(o, "logs")) != NULL)
		take_logs(r, p, logs, final);
	if (strcmp(st, p->last_status) != 0) {
		snprintf(p->last_status, sizeof(p->last_status), "%.15s", st);
		if (!final)
			run_log(r, "replicate: prediction %s is %.15s", p->id, st);
	}
	if (strcmp(st, "succeeded") == 0)
		return on_succeeded(r, p, o); /* o is the result's now */
	if (strcmp(st, "failed") == 0) {
		json_object *e = NULL;
		const char *why = json_object_object_get_ex(o, "error", &e) && e
					  ? json_object_get_string(e)
					  : "no reason given";
		run_fail(r, -EIO, "backend_failed", "Replicate prediction %s failed: %.300s", p->id,
			 why);
		json_object_put(o);
		return -EIO;
	}
	if (strcmp(st, "canceled") == 0 || strcmp(st, "aborted") == 0) {
		run_fail(r, -EIO, "cancelled_remotely", "Replicate %s prediction %s%s",
			 strcmp(st, "aborted") == 0 ? "aborted" : "cancelled", p->id,
			 strcmp(st, "aborted") == 0 ? " before it ran" : "");
		json_object_put(o);
		return -EIO;
	}
	json_object_put(o);
	return svc_poll_next(r, &p->poll);
}

/* The body of a creation: {"input": request[, "version": v]}. */
static char *create_body(struct run *r, const struct rep_conf *c, int *rc)
{
	char *req = NULL, *body = NULL;
	size_t n;

	if ((*rc = run_request_inline_inputs(r, &req)) != 0)
		return NULL;
	n = strlen(req) + strlen(c->version) + 64;
	if (!(body = malloc(n))) {
		free(req);
		*rc = run_fail(r, -ENOMEM, "store", "out of memory");
		return NULL;
	}
	if (c->version[0])
		snprintf(body, n, "{\"version\":\"%s\",\"input\":%s}", c->version, req);
	else
		snprintf(body, n, "{\"input\":%s}", req);
	free(req);
	return body;
}

static int rep_start(struct run *r)
{
	const struct rep_conf *c = r->route->backend_state;
	struct rep_run *p;
	char url[SVC_URL_MAX + 200], *body;
	int rc;

	if (!(p = calloc(1, sizeof(*p))))
		return run_fail(r, -ENOMEM, "store", "out of memory");
	r->bstate = p;
	if ((rc = svc_run_key(r, &p->sr, &c->svc, "Replicate", "Bearer")) != 0)
		return rc;
	if (!p->sr.key)
		return run_fail(r, -ENOTCONN, "backend_not_configured",
				"route %s needs the replicate backend with an API token: set %s in "
				"the daemon's environment, \"key\" for this route in a models file "
				"(models=FILE), or the job's own in its envelope ({\"input\": ..., "
				"\"credentials\": {\"key\": ...}})",
				r->route->path, c->svc.key_env);
	rc = handle_get(r, p);
	if (rc == -EALREADY)
		return run_fail(r, -EIO, "interrupted",
				"a prediction was being created at Replicate when the daemon "
				"stopped; whether it exists is unknown, so it is not created again "
				"(ctl retry creates it anew)");
	if (rc == -EBADMSG)
		return run_fail(r, -EIO, "interrupted",
				"the job's record of its Replicate prediction is damaged; it is not "
				"created again (ctl retry creates it anew)");
	if (rc < 0)
		return run_fail(r, rc, "store", "cannot read the job's handle: %s",
				store_lasterr());
	if (rc == 1) {
		run_log(r, "replicate: following prediction %s (created before a restart)", p->id);
		svc_poll_begin(&p->poll);
		return poll(r, p);
	}
	if (!(body = create_body(r, c, &rc)))
		return rc;
	if ((rc = svc_handle_submitting(r)) != 0) {
		free(body);
		return run_fail(r, rc, "store", "cannot record the creation: %s", store_lasterr());
	}
	if (c->version[0])
		snprintf(url, sizeof(url), "%s/predictions", c->svc.base);
	else
		snprintf(url, sizeof(url), "%s/models/%s/predictions", c->svc.base, r->route->model_id);
	p->phase = R_CREATE;
	rc = request(r, p, "POST", url, body, 60000);
	free(body);
	return rc;
}

static int rep_step(struct run *r)
{
	struct rep_run *p = r->bstate;
	const struct http_response *h = r->http;

	if (!p)
		return rep_start(r);
	if (!h)
		return p->phase == R_POLL ? poll(r, p)
					  : run_fail(r, -EIO, "backend_failed", "nothing to wait for");
	switch (p->phase) {
	case R_CREATE:
		if (h->error_code)
			return svc_submit_failed(r, h, "Replicate", "the prediction's creation");
		return on_created(r, p, h);
	case R_POLL:
		return on_poll(r, p, h);
	case R_FILES:
		return svc_files_answer(r, &p->sr.files, h);
	case R_CANCEL:
		break;
	}
	return run_fail(r, -EIO, "backend_failed", "the Replicate run is in no known phase");
}

static int rep_cancel(struct run *r)
{
	struct rep_run *p = r->bstate;

	if (!p || !p->id[0])
		return 0;
	if (!r->http) {
		p->phase = R_CANCEL;
		return request(r, p, "POST", p->cancel_url, NULL, 10000);
	}
	if (r->http->error_code)
		run_log(r, "replicate: cancelling prediction %s failed: %s", p->id,
			r->http->message);
	else
		run_log(r, "replicate: cancel of prediction %s sent", p->id);
	return 0;
}

static void rep_run_free(struct run *r)
{
	struct rep_run *p = r->bstate;

	if (!p)
		return;
	svc_run_clear(&p->sr);
	free(p);
}

static const char *const rep_credentials[] = {"key", NULL};

const struct backend backend_replicate = {
    .name = "replicate",
    .remote = true,
    .credentials = rep_credentials,
    .max_input = REP_INPUT_MAX,
    .configure = rep_configure,
    .step = rep_step,
    .cancel = rep_cancel,
    .run_free = rep_run_free,
    .release = rep_release,
};
