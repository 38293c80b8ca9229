/*
 * backend_fal.c - fal's queue API (SPEC §8, PROTOCOLS.md "fal.ai queue") as
 * a remote backend: submit, follow the status (queue position, logs),
 * fetch the result, download its file into the store; cancel at fal.
 *
 * A run is a series of steps (backend.h) on the engine's HTTP loop:
 *
 *   START     the durable handle says where the job is: nothing (submit),
 *             "submitting" (a submission whose answer never came: it may
 *             be at fal, so it is not sent again: the job ends
 *             `interrupted`), or a request id (follow it: a restart).
 *   SUBMIT    POST {base}/{model} with the normalized request. Before it
 *             the handle says "submitting"; after a 2xx the request id and
 *             the URLs fal gave are durable before anything else happens.
 *             An answer that is not 2xx, or no connection at all, means
 *             nothing was queued: the handle is cleared and the catalog
 *             decides whether to retry.
 *   STATUS    GET status_url?logs=1 every poll (200 ms, growing to 2 s):
 *             IN_QUEUE (a changed queue_position is logged), IN_PROGRESS
 *             (new log lines appended, each once: the count seen is in the
 *             handle), COMPLETED. A busy status endpoint is asked again up
 *             to 5 times before the attempt fails (and the next attempt
 *             follows the same request).
 *   RESULT    GET response_url: the output object; every file in it (an
 *             object with a "url": images[], video, audio, ...) is an
 *             output, in the service's order.
 *   DOWNLOAD  each file into the store (service.h: streamed, hashed,
 *             bounded by max_output, its media type checked), then the
 *             result as result.json with the URLs as cas:<hex>.
 *
 * Settings (models file): model (required), base_url, key or key_env,
 * request_timeout_s (one status or result request: 30 s; one that takes
 * longer is asked again, as a busy answer is).
 * The key goes in the Authorization header only; every message is
 * redacted of it (http.c).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "backend.h"
#include "engine_i.h"
#include "http.h"
#include "route.h"
#include "service.h"

extern const struct backend backend_fal;

#define FAL_URL_MAX SVC_URL_MAX
#define FAL_LOG_BATCH 256 /* service log lines logged in one write */
/* A cas: input goes inline (base64 in the request): bounded so that one
 * request stays a request; larger ones are refused at submit. */
#define FAL_INPUT_MAX (10u << 20)

enum fal_phase { F_SUBMIT, F_STATUS, F_RESULT, F_DOWNLOAD, F_CANCEL };

struct fal_run {
	enum fal_phase phase;
	struct svc_run sr; /* key, Authorization, the result and its files */
	char request_id[128];
	char status_url[FAL_URL_MAX], response_url[FAL_URL_MAX], cancel_url[FAL_URL_MAX];
	unsigned logs_seen;
	long position;
	struct svc_poll poll;
};

static const struct backend_setting fal_takes[] = {
    {"base_url", json_type_string},
    {"key", json_type_string},
    {"key_env", json_type_string},
    {"request_timeout_s", json_type_int},
};

static void fal_release(void *state)
{
	if (state)
		svc_conf_clear(state);
	free(state);
}

static int fal_configure(struct route *rt, json_object *settings, void **state, char *err,
                         size_t errlen)
{
	struct svc_conf *c;
	int rc = backend_settings_check(&backend_fal, settings, fal_takes,
	                                sizeof(fal_takes) / sizeof(fal_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!rt->model_id[0]) {
		snprintf(err, errlen,
		         "'model' is required for the fal backend (e.g. fal-ai/wan-t2v)");
		return -EINVAL;
	}
	if (rt->model_id[0] == '/' || strstr(rt->model_id, "..") || strpbrk(rt->model_id, "?#% ")) {
		snprintf(err, errlen, "'model' must be a fal model id such as fal-ai/wan-t2v");
		return -EINVAL;
	}
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	if ((rc = svc_conf_parse(c, settings, "https://queue.fal.run", "FAL_KEY", err, errlen)) !=
	    0) {
		fal_release(c);
		return rc;
	}
	snprintf(rt->target, sizeof(rt->target), "%s/%s", c->base, rt->model_id);
	*state = c;
	return 0;
}

/* ---- the handle: where the job is at fal ---- */

/* The handle: where the request is at fal, and how many of its log lines
 * are in the job's log (NULL: submitting). */
static json_object *handle_json(const struct fal_run *f)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "request_id", json_object_new_string(f->request_id));
	json_object_object_add(o, "status_url", json_object_new_string(f->status_url));
	json_object_object_add(o, "response_url", json_object_new_string(f->response_url));
	json_object_object_add(o, "cancel_url", json_object_new_string(f->cancel_url));
	json_object_object_add(o, "logs", json_object_new_int64(f->logs_seen));
	return o;
}

/* 1: resume (f filled), 0: nothing, -EALREADY: a submission of unknown
 * fate, -EBADMSG: a damaged handle, <0: error. */
static int handle_get(struct run *r, struct fal_run *f)
{
	json_object *o, *v;
	const char *id, *su, *ru, *cu;
	int rc = svc_handle_get(r, &o);

	if (rc != 1)
		return rc;
	id = svc_str(o, "request_id");
	su = svc_str(o, "status_url");
	ru = svc_str(o, "response_url");
	cu = svc_str(o, "cancel_url");
	if (!id || !su || !ru || !cu || strlen(id) >= sizeof(f->request_id) ||
	    !svc_url_ok(su, strlen(su)) || !svc_url_ok(ru, strlen(ru)) || !svc_url_ok(cu, strlen(cu))) {
		json_object_put(o);
		return -EBADMSG;
	}
	snprintf(f->request_id, sizeof(f->request_id), "%s", id);
	snprintf(f->status_url, sizeof(f->status_url), "%s", su);
	snprintf(f->response_url, sizeof(f->response_url), "%s", ru);
	snprintf(f->cancel_url, sizeof(f->cancel_url), "%s", cu);
	if (json_object_object_get_ex(o, "logs", &v) && json_object_is_type(v, json_type_int))
		f->logs_seen = (unsigned)json_object_get_int64(v);
	json_object_put(o);
	return 1;
}

/* ---- requests ---- */

static int request(struct run *r, struct fal_run *f, const char *method, const char *url,
                   const char *body, uint64_t timeout_ms)
{
	char limit[64];
	const char *hdrs[] = {f->sr.auth, "Content-Type: application/json",
	                      "Accept: application/json", limit};
	const char *secrets[] = {f->sr.key};
	bool submit = strcmp(method, "POST") == 0;
	/* fal stops the work itself at the job's deadline (PROTOCOLS.md). */
	uint64_t left_s = r->deadline_ms > now_ms() ? (r->deadline_ms - now_ms()) / 1000 : 1;
	snprintf(limit, sizeof(limit), "X-Fal-Request-Timeout: %llu",
	         (unsigned long long)(left_s ? left_s : 1));
	struct http_request rq = {
	    .method = method,
	    .url = url,
	    .headers = hdrs,
	    .nheaders = submit ? 4 : 3,
	    .body = body,
	    .body_len = body ? strlen(body) : 0,
	    .timeout_ms = timeout_ms,
	    .secrets = secrets,
	    .nsecrets = 1,
	    .want_header = "X-Fal-Request-Timeout-Type",
	};

	return run_http(r, &rq);
}

/* fal stopped the request at the job's deadline (X-Fal-Request-Timeout):
 * a 504 that says so is the job's timeout, not a busy service. */
static bool stopped_at_deadline(const struct http_response *h)
{
	return h->status == 504 && strcasecmp(h->header, "user") == 0;
}

static int deadline_fail(struct run *r, const struct fal_run *f)
{
	return run_fail(r, -ETIMEDOUT, "timeout",
			"fal stopped request %s at the job's deadline (X-Fal-Request-Timeout)",
			f->request_id[0] ? f->request_id : "(not yet queued)");
}

static int poll_status(struct run *r, struct fal_run *f)
{
	char url[FAL_URL_MAX + 16];

	snprintf(url, sizeof(url), "%s%slogs=1", f->status_url,
	         strchr(f->status_url, '?') ? "&" : "?");
	f->phase = F_STATUS;
	return request(r, f, "GET", url, NULL,
		       ((const struct svc_conf *)r->route->backend_state)->req_ms);
}

/* Every file object (one with a string "url") of the output, in the
 * service's order (images[], video, audio, ...), SVC_FILES_MAX at most. */
static void collect_files(struct fal_run *f, json_object *o, int depth)
{
	if (depth > 8 || f->sr.files.n >= SVC_FILES_MAX)
		return;
	if (json_object_is_type(o, json_type_object)) {
		if (svc_str(o, "url")) {
			svc_files_add(&f->sr.files, o, "url", 0, SVC_FILE_URL, svc_str(o, "content_type"));
			return;
		}
		json_object_object_foreach(o, k, v)
		{
			(void)k;
			collect_files(f, v, depth + 1);
		}
	} else if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++)
			collect_files(f, json_object_array_get_idx(o, i), depth + 1);
	}
}

static int on_submitted(struct run *r, struct fal_run *f, const struct http_response *h)
{
	json_object *o = svc_parse(h->body, h->len);
	const char *id = o ? svc_str(o, "request_id") : NULL;
	const char *su, *ru, *cu;
	char model[128];
	int rc;

	if (!id || !*id || strlen(id) >= sizeof(f->request_id) || strpbrk(id, "/?#% \r\n")) {
		json_object_put(o);
		/* Accepted, but unusable: it is not sent again. */
		return run_fail(r, -EBADMSG, "backend_failed",
		                "fal accepted the request but its answer has no usable request_id");
	}
	snprintf(f->request_id, sizeof(f->request_id), "%s", id);
	/* The URLs fal gives; else built the way fal-js does: the first two
	 * segments of the model id (PROTOCOLS.md). */
	snprintf(model, sizeof(model), "%s", r->route->model_id);
	char *slash = strchr(model, '/');
	if (slash && (slash = strchr(slash + 1, '/')))
		*slash = '\0';
	const struct svc_conf *c = r->route->backend_state;
	su = svc_str(o, "status_url");
	ru = svc_str(o, "response_url");
	cu = svc_str(o, "cancel_url");
	if (su && svc_url_ok(su, strlen(su)))
		snprintf(f->status_url, sizeof(f->status_url), "%s", su);
	else
		snprintf(f->status_url, sizeof(f->status_url), "%s/%s/requests/%s/status", c->base,
		         model, f->request_id);
	if (ru && svc_url_ok(ru, strlen(ru)))
		snprintf(f->response_url, sizeof(f->response_url), "%s", ru);
	else
		snprintf(f->response_url, sizeof(f->response_url), "%s/%s/requests/%s", c->base,
		         model, f->request_id);
	if (cu && svc_url_ok(cu, strlen(cu)))
		snprintf(f->cancel_url, sizeof(f->cancel_url), "%s", cu);
	else
		snprintf(f->cancel_url, sizeof(f->cancel_url), "%s/%s/requests/%s/cancel", c->base,
		         model, f->request_id);
	json_object_put(o);
	if ((rc = svc_handle_put(r, handle_json(f))) != 0)
		/* Paid work we cannot find again after a restart: say so. */
		return run_fail(r, rc, "store",
		                "fal request %s was queued but cannot be recorded: %s",
		                f->request_id, store_lasterr());
	run_log(r, "fal: queued as request %s", f->request_id);
	run_remote_set(r, f->request_id, NULL, RUN_REMOTE_SAME);
	f->phase = F_STATUS;
	return run_after(r, svc_poll_begin(&f->poll));
}

static int on_status(struct run *r, struct fal_run *f, const struct http_response *h)
{
	json_object *o, *v;
	const char *st;
	int rc;

	if (h->error_code) {
		if (stopped_at_deadline(h))
			return deadline_fail(r, f);
		if (strcmp(h->error_code, "backend_unavailable") == 0 &&
		    (rc = svc_poll_again(r, &f->poll, h)) != 0) {
			run_log(r, "fal: status not available (%s); asking again", h->message);
			return rc;
		}
		return svc_fail(r, h, "fal", "fal status");
	}
	if (!(o = svc_parse(h->body, h->len)) || !(st = svc_str(o, "status"))) {
		/* A garbled answer (a proxy's error page, say) is asked again,
		 * as a busy one is; then the attempt fails, to be retried. */
		json_object_put(o);
		if ((rc = svc_poll_again(r, &f->poll, NULL)) != 0) {
			run_log(r, "fal: the status answer for request %s is not a status object; "
			           "asking again", f->request_id);
			return rc;
		}
		return run_fail(r, -EBADMSG, "backend_unavailable",
		                "fal's status answers for request %s are not status objects",
		                f->request_id);
	}
	if (json_object_object_get_ex(o, "logs", &v) && json_object_is_type(v, json_type_array)) {
		/* The new lines and the count of them in one write: each
		 * line once, across a crash too (a burst: the rest next poll). */
		size_t n = json_object_array_length(v);
		const char *last = NULL;
		while (f->logs_seen < n) {
			const char *msgs[FAL_LOG_BATCH];
			size_t k = 0;
			unsigned from = f->logs_seen, upto = from;
			char *text;
			for (; upto < n && k < FAL_LOG_BATCH; upto++) {
				const char *msg =
				    svc_str(json_object_array_get_idx(v, upto), "message");
				if (msg)
					msgs[k++] = last = msg;
			}
			f->logs_seen = upto;
			if (!(text = svc_handle_text(handle_json(f))) ||
			    run_log_handle(r, "fal: ", msgs, k, text, strlen(text)) != 0) {
				f->logs_seen = from; /* not recorded: logged next poll */
				free(text);
				break;
			}
			free(text);
		}
		double frac = last ? svc_log_fraction(last) : -1;
		if (frac >= 0)
			run_progress(r, frac < 0.999 ? frac : 0.999); /* 1: when stored */
	}
	if (strcmp(st, "IN_QUEUE") == 0) {
		if (json_object_object_get_ex(o, "queue_position", &v) &&
		    json_object_is_type(v, json_type_int) && json_object_get_int64(v) >= 0 &&
		    json_object_get_int64(v) != f->position) {
			f->position = (long)json_object_get_int64(v);
			run_log(r, "fal: in its queue at position %ld", f->position);
			run_remote_set(r, NULL, NULL, f->position);
		}
	} else if (f->position >= 0) {
		f->position = -1; /* out of fal's queue */
		run_remote_set(r, NULL, NULL, -1);
	}
	if (strcmp(st, "IN_QUEUE") == 0) {
		/* polled again below */
	} else if (strcmp(st, "COMPLETED") == 0) {
		json_object *m;
		if (json_object_object_get_ex(o, "metrics", &m) &&
		    json_object_object_get_ex(m, "inference_time", &m) &&
		    (json_object_is_type(m, json_type_double) ||
		     json_object_is_type(m, json_type_int))) {
			run_log(r, "fal: request %s took %.3f s of inference_time", f->request_id,
				json_object_get_double(m));
			run_reported(r, json_object_get_double(m));
		}
		json_object_put(o);
		f->phase = F_RESULT;
		return request(r, f, "GET", f->response_url, NULL,
			       ((const struct svc_conf *)r->route->backend_state)->req_ms);
	} else if (strcmp(st, "FAILED") == 0 || strcmp(st, "ERROR") == 0) {
		const char *why = svc_str(o, "error");
		run_fail(r, -EIO, "backend_failed", "fal request %s failed: %.300s", f->request_id,
		         why ? why : st);
		json_object_put(o);
		return -EIO;
	} else if (strcmp(st, "CANCELED") == 0 || strcmp(st, "CANCELLED") == 0) {
		json_object_put(o);
		return run_fail(r, -EIO, "cancelled_remotely", "fal cancelled request %s",
		                f->request_id);
	}
	json_object_put(o);
	return svc_poll_next(r, &f->poll);
}

static int on_result(struct run *r, struct fal_run *f, const struct http_response *h)
{
	json_object *o;

	if (h->error_code && stopped_at_deadline(h))
		return deadline_fail(r, f);
	if (h->error_code) {
		/* A COMPLETED request that failed answers with an error and a
		 * `detail` (PROTOCOLS.md): the service ran it and it failed. */
		svc_fail(r, h, "fal", "fal result");
		if (strcmp(h->error_code, "backend_rejected") == 0) {
			char msg[ENGINE_ERR_MAX];
			snprintf(msg, sizeof(msg), "%s", r->error_message);
			return run_fail(r, -EIO, "backend_failed", "%s", msg);
		}
		return -EIO;
	}
	if (!(o = svc_parse(h->body, h->len)))
		return run_fail(r, -EBADMSG, "output_invalid",
		                "fal's result for request %s is not a JSON object", f->request_id);
	f->sr.files.result = o;
	collect_files(f, o, 0);
	run_log(r, "fal: request %s completed; downloading %zu file%s", f->request_id,
	        f->sr.files.n, f->sr.files.n == 1 ? "" : "s");
	f->phase = F_DOWNLOAD;
	return svc_files_start(r, &f->sr.files);
}

static int fal_step(struct run *r)
{
	struct fal_run *f = r->bstate;
	const struct http_response *h = r->http;
	int rc;

	if (!f) {
		const struct svc_conf *c = r->route->backend_state;

		if (!(f = calloc(1, sizeof(*f))))
			return run_fail(r, -ENOMEM, "store", "out of memory");
		r->bstate = f;
		f->position = -1;
		if ((rc = svc_run_key(r, &f->sr, c, "fal", "Key")) != 0)
			return rc;
		if (!f->sr.key)
			return run_fail(r, -ENOTCONN, "backend_not_configured",
			                "route %s needs the fal backend with an API key: set %s in "
			                "the daemon's environment, \"key\" for this route in a "
			                "models file (models=FILE), or the job's own in its "
			                "envelope ({\"input\": ..., \"credentials\": {\"key\": "
			                "...}})",
			                r->route->path, c->key_env);
		rc = handle_get(r, f);
		if (rc == -EALREADY)
			return run_fail(
			    r, -EIO, "interrupted",
			    "a submission to fal was under way when the daemon stopped; "
			    "whether fal queued it is unknown, so it is not sent again "
			    "(ctl retry sends it anew)");
		if (rc < 0 && rc != -EBADMSG)
			return run_fail(r, rc, "store", "cannot read the job's handle: %s",
			                store_lasterr());
		if (rc == 1) {
			run_log(r, "fal: following request %s (queued before a restart)",
			        f->request_id);
			svc_poll_begin(&f->poll);
			return poll_status(r, f);
		}
		if (rc == -EBADMSG)
			return run_fail(r, -EIO, "interrupted",
			                "the job's record of its fal request is damaged; it is not "
			                "sent again (ctl retry sends it anew)");
		char url[FAL_URL_MAX + 160], *body = NULL;
		/* Inputs from the store go inline, as data: URIs (fal takes
		 * them for any file field, PROTOCOLS.md). */
		if ((rc = run_request_inline_inputs(r, &body)) != 0)
			return rc;
		if ((rc = svc_handle_submitting(r)) != 0) {
			free(body);
			return run_fail(r, rc, "store", "cannot record the submission: %s",
			                store_lasterr());
		}
		snprintf(url, sizeof(url), "%s/%s", c->base, r->route->model_id);
		f->phase = F_SUBMIT;
		rc = request(r, f, "POST", url, body, 60000);
		free(body);
		return rc;
	}
	if (!h)
		return f->phase == F_STATUS
		           ? poll_status(r, f)
		           : run_fail(r, -EIO, "backend_failed", "nothing to wait for");
	switch (f->phase) {
	case F_SUBMIT:
		if (h->error_code && stopped_at_deadline(h)) {
			run_handle_put(r, "", 0);
			return deadline_fail(r, f);
		}
		if (h->error_code)
			return svc_submit_failed(r, h, "fal", "the submission to fal");
		return on_submitted(r, f, h);
	case F_STATUS:
		return on_status(r, f, h);
	case F_RESULT:
		return on_result(r, f, h);
	case F_DOWNLOAD:
		return svc_files_answer(r, &f->sr.files, h);
	case F_CANCEL:
		break;
	}
	return run_fail(r, -EIO, "backend_failed", "the fal run is in no known phase");
}

static int fal_cancel(struct run *r)
{
	struct fal_run *f = r->bstate;

	if (!f || !f->request_id[0])
		return 0; /* nothing queued at fal (or its fate unknown: said) */
	if (!r->http) {
		f->phase = F_CANCEL;
		return request(r, f, "PUT", f->cancel_url, NULL, 10000);
	}
	if (r->http->error_code) {
		run_log(r, "fal: cancelling request %s failed: %s", f->request_id,
		        r->http->message);
	} else {
		json_object *o = svc_parse(r->http->body, r->http->len);
		const char *st = o ? svc_str(o, "status") : NULL;
		run_log(r, "fal: cancel of request %s: %.64s", f->request_id, st ? st : "sent");
		json_object_put(o);
	}
	return 0;
}

static void fal_run_free(struct run *r)
{
	struct fal_run *f = r->bstate;

	if (!f)
		return;
	svc_run_clear(&f->sr);
	free(f);
}

static const char *const fal_credentials[] = {"key", NULL};

const struct backend backend_fal = {
    .name = "fal",
    .remote = true,
    .credentials = fal_credentials,
    .max_input = FAL_INPUT_MAX,
    .configure = fal_configure,
    .step = fal_step,
    .cancel = fal_cancel,
    .run_free = fal_run_free,
    .release = fal_release,
};
