/*
 * backend_openai.c - OpenAI's image generation API and the local servers
 * that speak it (stable-diffusion.cpp's sd-server, LocalAI) as a remote
 * backend `openai-images` (SPEC §8, PROTOCOLS.md "OpenAI images").
 *
 * One request does the work: POST {base}/v1/images/generations with the
 * normalized request (plus the route's `model` and `response_format`), its
 * answer {"data": [{"b64_json"} | {"url"}, ...]} names the images; base64
 * ones are decoded into the store, URLs downloaded (service.h); `n` > 1
 * gives several outputs. The service keeps no job to follow: the durable
 * handle says "submitting" while the request is out, so that a daemon
 * that died during it does not send it again (`interrupted`), and a
 * request whose answer was lost on the way is not sent again either;
 * then "answered", with the answer when it is URLs (a later attempt, after
 * a download failed, downloads them again rather than paying twice).
 * Cancelling closes the connection (the API has no cancel).
 *
 * Settings (models file): base_url (default https://api.openai.com),
 * model, response_format ("b64_json", "url" or "none": not sent; default
 * b64_json, none for gpt-image models, which always answer base64),
 * key or key_env (default OPENAI_API_KEY; a local server needs none: then
 * no Authorization header is sent).
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

extern const struct backend backend_openai;

/* A whole answer is held while its base64 images are decoded: at most
 * this much per image (and max_output, if smaller). */
#define OAI_IMAGE_MAX (64ull << 20)
#define OAI_ANSWER_MAX (512ull << 20)
#define OAI_DEFAULT_BASE "https://api.openai.com"

struct oai_conf {
	struct svc_conf svc;	  /* base_url, key, key_env */
	char response_format[16]; /* "" : not sent */
};

struct oai_run {
	struct svc_run sr; /* key (none for a local server), the result and its files */
	bool sent;
};

static const struct backend_setting oai_takes[] = {
    {"base_url", json_type_string},
    {"response_format", json_type_string},
    {"key", json_type_string},
    {"key_env", json_type_string},
};

static void oai_release(void *state)
{
	struct oai_conf *c = state;

	if (c)
		svc_conf_clear(&c->svc);
	free(c);
}

static int oai_configure(struct route *rt, json_object *settings, void **state, char *err,
			 size_t errlen)
{
	struct oai_conf *c;
	json_object *v;
	int rc = backend_settings_check(&backend_openai, settings, oai_takes,
					sizeof(oai_takes) / sizeof(oai_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	if ((rc = svc_conf_parse(&c->svc, settings, OAI_DEFAULT_BASE, "OPENAI_API_KEY", err,
				 errlen)) != 0) {
		oai_release(c);
		return rc;
	}
	/* "http://host/v1" and "http://host" both name the server. */
	size_t n = strlen(c->svc.base);
	if (n >= 3 && strcmp(c->svc.base + n - 3, "/v1") == 0)
		c->svc.base[n - 3] = '\0';
	snprintf(c->response_format, sizeof(c->response_format), "%s",
		 strncmp(rt->model_id, "gpt-image", 9) == 0 ? "" : "b64_json");
	if (strpbrk(rt->model_id, "\"\\")) {
		oai_release(c);
		snprintf(err, errlen, "'model' must be a model name");
		return -EINVAL;
	}
	if (settings && json_object_object_get_ex(settings, "response_format", &v)) {
		const char *f = json_object_get_string(v);
		if (strcmp(f, "b64_json") != 0 && strcmp(f, "url") != 0 && strcmp(f, "none") != 0) {
			oai_release(c);
			snprintf(err, errlen, "'response_format' must be \"b64_json\", \"url\" or "
					      "\"none\" (not sent)");
			return -EINVAL;
		}
		snprintf(c->response_format, sizeof(c->response_format), "%s",
			 strcmp(f, "none") == 0 ? "" : f);
	}
	snprintf(rt->target, sizeof(rt->target), "%s/v1/images/generations%s%s", c->svc.base,
		 rt->model_id[0] ? "#" : "", rt->model_id);
	*state = c;
	return 0;
}

/* The bytes of an answer holding n images of at most each bytes in
 * base64, and its JSON around them: OAI_ANSWER_MAX at most. */
static size_t answer_max(size_t n, uint64_t each)
{
	uint64_t m = n * (each / 3 * 4 + 4) + (1u << 20);

	return (size_t)(m < OAI_ANSWER_MAX ? m : OAI_ANSWER_MAX);
}

/* The images the request asks for (its `n`, default 1). */
static size_t images_asked(json_object *req)
{
	json_object *n;

	if (json_object_object_get_ex(req, "n", &n) && json_object_is_type(n, json_type_int) &&
	    json_object_get_int64(n) > 1)
		return json_object_get_int64(n) < SVC_FILES_MAX ? (size_t)json_object_get_int64(n)
								: SVC_FILES_MAX;
	return 1;
}

static int oai_check(const struct route *rt, const char *request, size_t len, char *err,
		     size_t errlen)
{
	json_object *req = svc_parse(request, len), *n;
	int rc = 0;

	if (req && json_object_object_get_ex(req, "n", &n) &&
	    json_object_is_type(n, json_type_int) && json_object_get_int64(n) > SVC_FILES_MAX) {
		snprintf(err, errlen, "n: at most %d images per job", SVC_FILES_MAX);
		rc = -EINVAL;
	}
	(void)rt;
	json_object_put(req);
	return rc;
}

/* The images of an answer (res, owned now) become the job's outputs. */
static int take_answer(struct run *r, struct oai_run *o, json_object *res)
{
	json_object *data;

	o->sr.files.result = res;
	if (!json_object_object_get_ex(res, "data", &data) ||
	    !json_object_is_type(data, json_type_array))
		return run_fail(r, -EIO, "output_invalid",
				"the image service's answer has no \"data\" list");
	for (size_t i = 0; i < json_object_array_length(data); i++) {
		json_object *d = json_object_array_get_idx(data, i);
		if (svc_str(d, "b64_json"))
			svc_files_add(&o->sr.files, d, "b64_json", 0, SVC_FILE_BASE64, NULL);
		else if (svc_str(d, "url"))
			svc_files_add(&o->sr.files, d, "url", 0, SVC_FILE_URL, NULL);
	}
	return svc_files_start(r, &o->sr.files);
}

/*
 * The images are made (and paid for): the handle says so before they are
 * stored, with the answer itself when it fits (URLs: a later attempt
 * downloads them again instead of asking for new images); an answer too
 * large to keep (base64) leaves "answered" alone, so that a later attempt
 * does not ask again either.
 */
static int on_answer(struct run *r, struct oai_run *o, const struct http_response *h)
{
	json_object *res, *keep;
	const char *text;
	int rc;

	if (h->error_code)
		return svc_submit_failed(r, h, "the image service", "the image request");
	res = svc_parse(h->body, h->len);
	keep = json_object_new_object();
	if (!keep) {
		json_object_put(res);
		return run_fail(r, -ENOMEM, "store", "out of memory");
	}
	json_object_object_add(keep, "state", json_object_new_string("answered"));
	if (res && h->len < INDEX_HANDLE_MAX && !strstr(h->body, "\"b64_json\""))
		json_object_object_add(keep, "answer", json_object_get(res));
	text = json_object_to_json_string_ext(keep, JSON_C_TO_STRING_PLAIN |
							JSON_C_TO_STRING_NOSLASHESCAPE);
	if (text && strlen(text) > INDEX_HANDLE_MAX) {
		json_object_object_del(keep, "answer");
		text = json_object_to_json_string_ext(keep, JSON_C_TO_STRING_PLAIN);
	}
	rc = text ? run_handle_put(r, text, strlen(text)) : -ENOMEM;
	json_object_put(keep);
	if (rc != 0) {
		json_object_put(res);
		return run_fail(r, -EIO, "store", "cannot record the job: %s", store_lasterr());
	}
	if (!res)
		return run_fail(r, -EBADMSG, "output_invalid",
				"the image service's answer is not a JSON object");
	run_log(r, "openai-images: the service answered");
	return take_answer(r, o, res);
}

/* What an earlier attempt left: 0 (nothing), 1 (o's answer taken: the
 * run goes on from it), or the failure. */
static int resume(struct run *r, struct oai_run *o, int *step_rc)
{
	json_object *h, *answer;
	const char *state;
	int rc = svc_handle_get(r, &h);

	if (rc == 0)
		return 0;
	if (rc < 0 && rc != -EALREADY && rc != -EBADMSG) {
		*step_rc = run_fail(r, rc, "store", "cannot read the job's handle: %s",
				    store_lasterr());
		return 1;
	}
	state = rc == 1 ? svc_str(h, "state") : NULL;
	if (state && strcmp(state, "answered") == 0 &&
	    json_object_object_get_ex(h, "answer", &answer) &&
	    json_object_is_type(answer, json_type_object)) {
		run_log(r, "openai-images: storing the images an earlier attempt was given");
		json_object_get(answer);
		json_object_put(h);
		*step_rc = take_answer(r, o, answer);
		return 1;
	}
	*step_rc = state && strcmp(state, "answered") == 0
		       ? run_fail(r, -EIO, "interrupted",
				  "the service made the images in an earlier attempt, which could not "
				  "store them; they are not asked for again (ctl retry asks anew)")
		       : run_fail(r, -EIO, "interrupted",
				  "an image request was out when the daemon stopped; whether the "
				  "service made (and billed) the images is unknown, so it is not "
				  "sent again (ctl retry sends it anew)");
	json_object_put(h);
	return 1;
}

static int oai_start(struct run *r)
{
	const struct oai_conf *c = r->route->backend_state;
	struct oai_run *o;
	json_object *req = NULL;
	char url[600];
	const char *body;
	int rc;

	if (!(o = calloc(1, sizeof(*o))))
		return run_fail(r, -ENOMEM, "store", "out of memory");
	r->bstate = o;
	if ((rc = svc_run_key(r, &o->sr, &c->svc, "the image service", "Bearer")) != 0)
		return rc;
	if (!o->sr.key && strcmp(c->svc.base, OAI_DEFAULT_BASE) == 0)
		return run_fail(r, -ENOTCONN, "backend_not_configured",
				"route %s needs the openai-images backend with an API key: set %s "
				"in the daemon's environment, \"key\" for this route in a models "
				"file (models=FILE), or the job's own in its envelope",
				r->route->path, c->svc.key_env);
	if (resume(r, o, &rc))
		return rc;
	if (!(req = svc_parse(r->request, r->request_len)))
		return run_fail(r, -EINVAL, "invalid_request", "the request is not a JSON object");
	if (r->route->model_id[0] && !json_object_object_get_ex(req, "model", NULL))
		json_object_object_add(req, "model", json_object_new_string(r->route->model_id));
	if (c->response_format[0] && !json_object_object_get_ex(req, "response_format", NULL))
		json_object_object_add(req, "response_format",
				       json_object_new_string(c->response_format));
	if (!(body = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN))) {
		json_object_put(req);
		return run_fail(r, -ENOMEM, "store", "out of memory");
	}
	if ((rc = svc_handle_submitting(r)) != 0) {
		json_object_put(req);
		return run_fail(r, rc, "store", "cannot record the request: %s", store_lasterr());
	}
	{
		const char *hdrs[] = {"Content-Type: application/json", "Accept: application/json",
				      o->sr.auth};
		const char *secrets[] = {o->sr.key ? o->sr.key : ""};
		uint64_t each = r->route->max_output < OAI_IMAGE_MAX ? r->route->max_output
								     : OAI_IMAGE_MAX;
		uint64_t left = r->deadline_ms > now_ms() ? r->deadline_ms - now_ms() : 1000;
		struct http_request rq = {
		    .method = "POST",
		    .url = url,
		    .headers = hdrs,
		    .nheaders = o->sr.key ? 3 : 2,
		    .body = body,
		    .body_len = strlen(body),
		    .timeout_ms = left, /* the images are made while we wait */
		    .max_body = answer_max(images_asked(req), each),
		    .secrets = secrets,
		    .nsecrets = 1,
		};
		snprintf(url, sizeof(url), "%s/v1/images/generations", c->svc.base);
		run_log(r, "openai-images: asking %s for %zu image%s", url, images_asked(req),
			images_asked(req) == 1 ? "" : "s");
		o->sent = true;
		rc = run_http(r, &rq);
	}
	json_object_put(req);
	return rc;
}

static int oai_step(struct run *r)
{
	struct oai_run *o = r->bstate;

	if (!o)
		return oai_start(r);
	if (!r->http)
		return run_fail(r, -EIO, "backend_failed", "nothing to wait for");
	if (o->sent) {
		o->sent = false;
		return on_answer(r, o, r->http);
	}
	return svc_files_answer(r, &o->sr.files, r->http);
}

static void oai_run_free(struct run *r)
{
	struct oai_run *o = r->bstate;

	if (!o)
		return;
	svc_run_clear(&o->sr);
	free(o);
}

static const char *const oai_credentials[] = {"key", NULL};

const struct backend backend_openai = {
    .name = "openai-images",
    .remote = true,
    .credentials = oai_credentials,
    .max_input = 0, /* generations take no file */
    .configure = oai_configure,
    .check = oai_check,
    .step = oai_step,
    .cancel = NULL,
    .run_free = oai_run_free,
    .release = oai_release,
};
