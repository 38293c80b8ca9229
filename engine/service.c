/*
 * service.c - what the remote backends share (service.h).
 */
#include "service.h"

#include <errno.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine_i.h"
#include "http.h"
#include "route.h"

json_object *svc_parse(const char *text, size_t len)
{
	json_tokener *tok;
	json_object *o = NULL;

	if (!text || len == 0 || len > INT32_MAX || !(tok = json_tokener_new_ex(32)))
		return NULL;
	o = json_tokener_parse_ex(tok, text, (int)len);
	if (o && (json_tokener_get_error(tok) != json_tokener_success ||
		  !json_object_is_type(o, json_type_object))) {
		json_object_put(o);
		o = NULL;
	}
	json_tokener_free(tok);
	return o;
}

const char *svc_str(json_object *o, const char *k)
{
	json_object *v;

	return o && json_object_object_get_ex(o, k, &v) && json_object_is_type(v, json_type_string)
		       ? json_object_get_string(v)
		       : NULL;
}

bool svc_url_ok(const char *u, size_t len)
{
	return len < SVC_URL_MAX &&
	       (strncmp(u, "https://", 8) == 0 || strncmp(u, "http://", 7) == 0) &&
	       !strpbrk(u, " \t\r\n\"");
}

bool svc_type_fits(const char *given, const char *want)
{
	size_t n = strcspn(given, "; ");

	if (n == 0 || (n == 24 && strncasecmp(given, "application/octet-stream", 24) == 0) ||
	    (n == 19 && strncasecmp(given, "binary/octet-stream", 19) == 0))
		return true;
	return strlen(want) == n && strncasecmp(given, want, n) == 0;
}

const char *svc_sniff(const uint8_t *p, size_t n)
{
	if (n >= 8 && memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0)
		return "image/png";
	if (n >= 3 && memcmp(p, "\xff\xd8\xff", 3) == 0)
		return "image/jpeg";
	if (n >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0)
		return "image/webp";
	if (n >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WAVE", 4) == 0)
		return "audio/wav";
	if (n >= 6 && (memcmp(p, "GIF87a", 6) == 0 || memcmp(p, "GIF89a", 6) == 0))
		return "image/gif";
	if (n >= 12 && memcmp(p + 4, "ftyp", 4) == 0)
		return memcmp(p + 8, "qt  ", 4) == 0 ? "video/quicktime" : "video/mp4";
	if (n >= 4 && memcmp(p, "\x1a\x45\xdf\xa3", 4) == 0)
		return "video/webm";
	if (n >= 10 && memcmp(p, "YUV4MPEG2 ", 10) == 0)
		return "video/x-yuv4mpeg";
	if (n >= 4 && memcmp(p, "fLaC", 4) == 0)
		return "audio/flac";
	if (n >= 4 && memcmp(p, "OggS", 4) == 0)
		return "audio/ogg";
	if ((n >= 3 && memcmp(p, "ID3", 3) == 0) || (n >= 2 && p[0] == 0xff && (p[1] & 0xe0) == 0xe0))
		return "audio/mpeg";
	return NULL;
}

/* Whether svc_sniff can tell type: then a file of it must sniff as it. */
static bool sniffable(const char *type)
{
	static const char *const known[] = {"image/png", "image/jpeg", "image/webp", "image/gif",
					    "video/mp4", "video/webm", "audio/wav", "audio/flac",
					    "audio/ogg", "audio/mpeg", "video/x-yuv4mpeg"};

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strcasecmp(type, known[i]) == 0)
			return true;
	return false;
}

bool svc_magic_fits(const char *want, const uint8_t *head, size_t n)
{
	const char *got = svc_sniff(head, n);

	return !sniffable(want) || (got && strcasecmp(got, want) == 0);
}

double svc_log_fraction(const char *s)
{
	double got = -1;

	for (const char *p = s; *p; p++) {
		char *end;
		if (*p < '0' || *p > '9' || (p > s && p[-1] >= '0' && p[-1] <= '9') ||
		    (p > s && p[-1] == '.'))
			continue;
		double a = strtod(p, &end);
		if (end > p && *end == '%' && a >= 0 && a <= 100) {
			got = a / 100;
		} else if (end > p && *end == '/' && end[1] >= '0' && end[1] <= '9') {
			char *e2;
			double b = strtod(end + 1, &e2);
			if (b > 0 && a >= 0 && a <= b && a == (long)a && b == (long)b)
				got = a / b;
		}
	}
	return got;
}

int svc_fail(struct run *r, const struct http_response *h, const char *service,
	     const char *what)
{
	json_object *o = h->len ? svc_parse(h->body, h->len) : NULL;
	json_object *d;
	const char *detail = NULL;
	char buf[300] = "";

	if (o && json_object_object_get_ex(o, "detail", &d)) {
		if (json_object_is_type(d, json_type_string)) {
			detail = json_object_get_string(d);
		} else if (json_object_is_type(d, json_type_array) &&
			   json_object_array_length(d) > 0) {
			json_object *e0 = json_object_array_get_idx(d, 0), *loc;
			const char *msg = svc_str(e0, "msg");
			const char *field = NULL;
			if (e0 && json_object_object_get_ex(e0, "loc", &loc) &&
			    json_object_is_type(loc, json_type_array) &&
			    json_object_array_length(loc) > 0)
				field = json_object_get_string(json_object_array_get_idx(
				    loc, json_object_array_length(loc) - 1));
			snprintf(buf, sizeof(buf), "%s%s%s", field ? field : "", field ? ": " : "",
				 msg ? msg : "invalid");
			detail = buf;
		}
	} else if (o && json_object_object_get_ex(o, "error", &d)) {
		/* OpenAI and LocalAI: {"error": {"message", ...}}; sd-server:
		 * {"error": "text"}. */
		if (json_object_is_type(d, json_type_string))
			detail = json_object_get_string(d);
		else if ((detail = svc_str(d, "message")) && svc_str(d, "param")) {
			snprintf(buf, sizeof(buf), "%s: %s", svc_str(d, "param"), detail);
			detail = buf;
		}
	} else if (o) {
		detail = svc_str(o, "title");
	}
	r->retry_after_ms = h->retry_after_ms;
	if (detail && *detail && h->status)
		run_fail(r, -EIO, h->error_code, "%s: %s answered HTTP %ld: %.300s", what, service,
			 h->status, detail);
	else
		run_fail(r, -EIO, h->error_code, "%s: %s", what, h->message);
	json_object_put(o);
	return -EIO;
}

/* ---- a route's settings, its key, a submission's fate ---- */

void svc_conf_clear(struct svc_conf *c)
{
	if (c->key) {
		explicit_bzero(c->key, strlen(c->key));
		free(c->key);
	}
	memset(c, 0, sizeof(*c));
}

int svc_conf_parse(struct svc_conf *c, json_object *settings, const char *base_default,
		   const char *env_default, char *err, size_t errlen)
{
	json_object *v;

	memset(c, 0, sizeof(*c));
	snprintf(c->base, sizeof(c->base), "%s", base_default);
	snprintf(c->key_env, sizeof(c->key_env), "%s", env_default);
	c->req_ms = 30000;
	if (settings && json_object_object_get_ex(settings, "request_timeout_s", &v)) {
		int64_t t = json_object_get_int64(v);
		if (t < 1 || t > 3600) {
			snprintf(err, errlen, "'request_timeout_s' must be from 1 to 3600 seconds");
			return -EINVAL;
		}
		c->req_ms = (uint64_t)t * 1000;
	}
	if (settings && json_object_object_get_ex(settings, "base_url", &v)) {
		const char *u = json_object_get_string(v);
		size_t n = (size_t)json_object_get_string_len(v);
		if (!svc_url_ok(u, n) || n >= sizeof(c->base)) {
			snprintf(err, errlen,
				 "'base_url' must be an http:// or https:// URL of at most %zu bytes",
				 sizeof(c->base) - 1);
			return -EINVAL;
		}
		while (n && u[n - 1] == '/')
			n--;
		snprintf(c->base, sizeof(c->base), "%.*s", (int)n, u);
	}
	if (settings && json_object_object_get_ex(settings, "key_env", &v)) {
		if (json_object_get_string_len(v) == 0 ||
		    (size_t)json_object_get_string_len(v) >= sizeof(c->key_env)) {
			snprintf(err, errlen, "'key_env' must name an environment variable");
			return -EINVAL;
		}
		snprintf(c->key_env, sizeof(c->key_env), "%s", json_object_get_string(v));
	}
	if (settings && json_object_object_get_ex(settings, "key", &v)) {
		if (json_object_get_string_len(v) == 0 || json_object_get_string_len(v) > 512 ||
		    strpbrk(json_object_get_string(v), "\r\n")) {
			snprintf(err, errlen, "'key' must be an API key on one line, at most 512 bytes");
			return -EINVAL;
		}
		if (!(c->key = strdup(json_object_get_string(v))))
			return -ENOMEM;
	}
	return 0;
}

int svc_run_key(struct run *r, struct svc_run *sr, const struct svc_conf *c, const char *service,
		const char *scheme)
{
	const char *key = NULL;
	int rc = run_credential(r, "key", &sr->job_key);

	sr->files.service = service;
	if (rc == 0)
		key = (const char *)sr->job_key;
	else if (rc != STORE_E_NOTFOUND)
		return run_fail(r, rc, "store", "cannot open the job's credentials: %s",
				store_lasterr());
	if (!key || !*key)
		key = c->key;
	if (!key || !*key)
		key = getenv(c->key_env);
	if (!key || !*key || strlen(key) > 512 || strpbrk(key, "\r\n"))
		return 0; /* none a header can carry */
	sr->key = sr->files.key = key;
	snprintf(sr->auth, sizeof(sr->auth), "Authorization: %s %s", scheme, key);
	return 0;
}

void svc_run_clear(struct svc_run *sr)
{
	svc_files_free(&sr->files);
	explicit_bzero(sr->auth, sizeof(sr->auth));
	store_unsealed_free(sr->job_key);
	sr->job_key = NULL;
	sr->key = NULL;
}

char *svc_handle_text(json_object *o)
{
	const char *t;
	char *text = NULL;

	if (!o)
		return NULL;
	if ((t = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
						       JSON_C_TO_STRING_NOSLASHESCAPE)) != NULL)
		text = strdup(t);
	json_object_put(o);
	return text;
}

int svc_handle_put(struct run *r, json_object *o)
{
	char *text = svc_handle_text(o);
	int rc = text ? run_handle_put(r, text, strlen(text)) : -ENOMEM;

	free(text);
	return rc;
}

int svc_handle_submitting(struct run *r)
{
	static const char text[] = "{\"state\":\"submitting\"}";

	return run_handle_put(r, text, sizeof(text) - 1);
}

int svc_handle_get(struct run *r, json_object **out)
{
	void *data = NULL;
	size_t len = 0;
	const char *state;
	int rc = run_handle_get(r, &data, &len);

	*out = NULL;
	if (rc == STORE_E_NOTFOUND || (rc == 0 && len == 0)) {
		free(data);
		return 0;
	}
	if (rc)
		return rc;
	*out = svc_parse(data, len);
	free(data);
	if (!*out)
		return -EBADMSG;
	if ((state = svc_str(*out, "state")) && strcmp(state, "submitting") == 0) {
		json_object_put(*out);
		*out = NULL;
		return -EALREADY;
	}
	return 1;
}

int svc_submit_failed(struct run *r, const struct http_response *h, const char *service,
		      const char *what)
{
	if (h->status == 0 && h->maybe_sent)
		return run_fail(r, -EIO, "interrupted",
				"%s got no answer (%s); whether %s has it is unknown, so it is "
				"not sent again (ctl retry sends it anew)",
				what, h->message, service);
	if (run_handle_put(r, "", 0) != 0)
		return run_fail(r, -EIO, "store", "cannot record the job: %s", store_lasterr());
	return svc_fail(r, h, service, what);
}

/* ---- polling ---- */

#define POLL_FIRST_MS 200
#define POLL_MAX_MS 2000

static uint64_t mono_ms(void)
{
	return mono_ns() / 1000000;
}

uint64_t svc_poll_start(struct svc_poll *p, uint64_t now)
{
	p->ms = POLL_FIRST_MS;
	p->at = now + p->ms;
	p->fails = 0;
	return p->ms;
}

uint64_t svc_poll_begin(struct svc_poll *p)
{
	return svc_poll_start(p, mono_ms());
}

uint64_t svc_poll_after(struct svc_poll *p, uint64_t now)
{
	if (!p->ms) /* a run that came to polling another way (zeroed) */
		return svc_poll_start(p, now);
	p->fails = 0;
	/* The next time on the schedule that is still ahead: a slow answer
	 * (a loaded service or daemon) does not push every later poll out,
	 * and a time that went by while the last poll was in flight is not
	 * made up for. */
	do {
		p->ms = p->ms * 5 / 4 < POLL_MAX_MS ? p->ms * 5 / 4 : POLL_MAX_MS;
		p->at += p->ms;
	} while (p->at <= now && p->ms < POLL_MAX_MS);
	if (p->at <= now) /* every 2 s from here: skip the times gone at once */
		p->at += ((now - p->at) / POLL_MAX_MS + 1) * POLL_MAX_MS;
	return p->at - now;
}

int svc_poll_next(struct run *r, struct svc_poll *p)
{
	return run_after(r, svc_poll_after(p, mono_ms()));
}

int svc_poll_again(struct run *r, struct svc_poll *p, const struct http_response *h)
{
	uint64_t ms;

	if (++p->fails >= SVC_POLL_FAILS)
		return 0;
	if (!p->ms)
		p->ms = POLL_FIRST_MS;
	ms = h && h->retry_after_ms > p->ms ? h->retry_after_ms : p->ms * 2;
	p->at = mono_ms() + ms; /* the schedule goes on from there */
	return run_after(r, ms);
}

/* ---- the files of a result ---- */

int svc_files_add(struct svc_files *fs, json_object *holder, const char *key, size_t idx,
		  enum svc_file_kind kind, const char *content_type)
{
	struct svc_file *f;

	if (fs->n >= SVC_FILES_MAX)
		return -E2BIG;
	if (fs->n == fs->cap) {
		size_t cap = fs->cap ? fs->cap * 2 : 2;
		struct svc_file *nf;
		uint8_t(*nh)[32];
		if (cap > SVC_FILES_MAX)
			cap = SVC_FILES_MAX;
		if (!(nf = realloc(fs->f, cap * sizeof(*nf)))) {
			fs->nomem = true;
			return -ENOMEM;
		}
		fs->f = nf;
		if (!(nh = realloc(fs->hashes, cap * sizeof(*nh)))) {
			fs->nomem = true;
			return -ENOMEM;
		}
		fs->hashes = nh;
		fs->cap = cap;
	}
	f = &fs->f[fs->n++];
	f->holder = holder;
	snprintf(f->key, sizeof(f->key), "%s", key ? key : "");
	f->idx = idx;
	f->kind = kind;
	snprintf(f->content_type, sizeof(f->content_type), "%s", content_type ? content_type : "");
	return 0;
}

static json_object *value_of(const struct svc_file *f)
{
	json_object *v = NULL;

	if (f->key[0])
		json_object_object_get_ex(f->holder, f->key, &v);
	else
		v = json_object_array_get_idx(f->holder, f->idx);
	return v;
}

static void set_value(struct svc_file *f, const char *s)
{
	json_object *v = json_object_new_string(s);

	if (!v)
		return;
	if (f->key[0])
		json_object_object_add(f->holder, f->key, v);
	else if (json_object_array_put_idx(f->holder, f->idx, v) != 0)
		json_object_put(v);
}

/* The media type file i is committed as: the route's for the first; for
 * the others what the result says, else the download, else its magic. */
static void file_type(const struct run *r, const struct svc_file *f, size_t i,
		      const char *downloaded, const char *sniffed, char *out, size_t len)
{
	const char *t = r->route->media_type;

	if (i > 0 && f->content_type[0] && !svc_type_fits(f->content_type, ""))
		t = f->content_type;
	else if (i > 0 && downloaded && downloaded[0] && !svc_type_fits(downloaded, ""))
		t = downloaded;
	else if (i > 0 && sniffed)
		t = sniffed;
	snprintf(out, len, "%.*s", (int)strcspn(t, "; "), t);
}

/* Check a stored file's kind (the first: the route's by what its
 * download or data: URI says, and by its magic); it becomes output i (the
 * first is committed last, when it announces them all). */
static int file_done(struct run *r, struct svc_files *fs, struct store_sink *sink,
		     const char *downloaded, const uint8_t *head, size_t headlen)
{
	size_t i = fs->at;
	const char *sniffed = svc_sniff(head, headlen);
	const char *want = r->route->media_type;
	char type[128];
	int rc;

	if (i == 0 && downloaded && !svc_type_fits(downloaded, want)) {
		store_sink_abort(sink);
		return run_fail(r, -EIO, "output_invalid",
				"%s's output file is %.100s, not %s as the route says", fs->service,
				downloaded, want);
	}
	if (i == 0 && sniffable(want) && (!sniffed || strcasecmp(sniffed, want) != 0)) {
		store_sink_abort(sink);
		return run_fail(r, -EIO, "output_invalid",
				"%s's output file is %s, not %s as the route says", fs->service,
				sniffed ? sniffed : "of no known media type", want);
	}
	if (i == 0) {
		fs->first = sink;
	} else {
		file_type(r, &fs->f[i], i, downloaded, sniffed, type, sizeof(type));
		if ((rc = run_commit_extra(r, (unsigned)i, sink, type, fs->hashes[i])) != 0)
			return rc;
	}
	fs->at++;
	return 0;
}

/* A file whose bytes are in the result: base64, or a data: URI. */
static int store_inline(struct run *r, struct svc_files *fs, struct svc_file *f,
			const char *v)
{
	const char *b64 = v;
	char said[128] = "";
	size_t len = strlen(v), got = 0;
	struct store_sink *sink = NULL;
	uint8_t *bin;
	int rc;

	if (f->kind == SVC_FILE_URL) { /* data:<type>[;param...];base64,<data> */
		const char *comma = strchr(v, ',');
		if (!comma || comma - v < 12 || memcmp(comma - 7, ";base64", 7) != 0)
			return run_fail(r, -EIO, "output_invalid",
					"%s's output file %zu is a data: URI that is not base64",
					fs->service, fs->at + 1);
		snprintf(said, sizeof(said), "%.*s", (int)strcspn(v + 5, ";,"), v + 5);
		b64 = comma + 1;
		len = strlen(b64);
	}
	if (len / 4 * 3 > r->route->max_output + 3)
		return run_fail(r, -EIO, "output_invalid",
				"%s's output file %zu is over the route's max_output (%llu bytes)",
				fs->service, fs->at + 1, (unsigned long long)r->route->max_output);
	if (!(bin = malloc(len / 4 * 3 + 3)))
		return run_fail(r, -ENOMEM, "store", "out of memory");
	if (sodium_base642bin(bin, len / 4 * 3 + 3, b64, len, "\r\n", &got, NULL,
			      sodium_base64_VARIANT_ORIGINAL) != 0 ||
	    got == 0) {
		free(bin);
		return run_fail(r, -EIO, "output_invalid",
				"%s's output file %zu is not valid base64 (or empty)", fs->service,
				fs->at + 1);
	}
	if (got > r->route->max_output) {
		free(bin);
		return run_fail(r, -EIO, "output_invalid",
				"%s's output file %zu is over the route's max_output (%llu bytes)",
				fs->service, fs->at + 1, (unsigned long long)r->route->max_output);
	}
	if ((rc = store_sink_open(engine_store(r->e), &sink)) != 0 ||
	    (rc = store_sink_write(sink, bin, got)) != 0) {
		free(bin);
		if (sink)
			store_sink_abort(sink);
		return run_fail(r, rc, "store", "cannot store the output: %s", store_lasterr());
	}
	rc = file_done(r, fs, sink, said, bin, got < 16 ? got : 16);
	free(bin);
	return rc;
}

static int sink_write(void *arg, const void *data, size_t len, char *err, size_t errlen)
{
	struct svc_files *fs = arg;
	int rc;

	if (fs->headlen < sizeof(fs->head)) {
		size_t k = len < sizeof(fs->head) - fs->headlen ? len : sizeof(fs->head) - fs->headlen;
		memcpy(fs->head + fs->headlen, data, k);
		fs->headlen += k;
	}
	if ((rc = store_sink_write(fs->sink, data, len)) != 0)
		snprintf(err, errlen, "cannot store the download: %s", store_lasterr());
	return rc;
}

static int download(struct run *r, struct svc_files *fs, const char *url)
{
	const char *secrets[] = {fs->key ? fs->key : ""};
	uint64_t left = r->deadline_ms > now_ms() ? r->deadline_ms - now_ms() : 1000;
	struct http_request rq = {
	    .method = "GET",
	    .url = url,
	    .timeout_ms = left, /* file URLs are a CDN's: no key goes there */
	    .max_body = (size_t)r->route->max_output,
	    .secrets = secrets,
	    .nsecrets = 1,
	    .sink = sink_write,
	    .sink_arg = fs,
	};
	int rc;

	fs->headlen = 0;
	if ((rc = store_sink_open(engine_store(r->e), &fs->sink)) != 0)
		return run_fail(r, rc, "store", "cannot store the output: %s", store_lasterr());
	return run_http(r, &rq);
}

/* result.json: the result with each file's value as cas:<hex>. */
static int keep_result(struct run *r, struct svc_files *fs)
{
	static const char digits[] = "0123456789abcdef";
	const char *text;

	for (size_t i = 0; i < fs->n; i++) {
		char cas[70] = "cas:";
		for (int k = 0; k < 32; k++) {
			cas[4 + 2 * k] = digits[fs->hashes[i][k] >> 4];
			cas[4 + 2 * k + 1] = digits[fs->hashes[i][k] & 15];
		}
		cas[68] = '\0';
		set_value(&fs->f[i], cas);
	}
	text = json_object_to_json_string_ext(fs->result, JSON_C_TO_STRING_PRETTY |
							      JSON_C_TO_STRING_SPACED |
							      JSON_C_TO_STRING_NOSLASHESCAPE);
	if (!text)
		return run_fail(r, -ENOMEM, "store", "out of memory");
	return run_result(r, text, strlen(text));
}

/* Store the files from fs->at on, until one must be downloaded. */
static int go_on(struct run *r, struct svc_files *fs)
{
	struct store_sink *sink;
	int rc;

	while (fs->at < fs->n) {
		struct svc_file *f = &fs->f[fs->at];
		const char *v = json_object_get_string(value_of(f));

		if (f->kind == SVC_FILE_BASE64 || strncmp(v, "data:", 5) == 0) {
			if ((rc = store_inline(r, fs, f, v)) != 0)
				return rc;
			continue;
		}
		if (fs->at > 0)
			run_progress(r, 0.999);
		return download(r, fs, v);
	}
	sink = fs->first;
	fs->first = NULL;
	/* Progress 1 comes with the job's completion, in the same write. */
	if ((rc = run_commit_output(r, sink, r->route->media_type, fs->service)) != 0)
		return rc;
	memcpy(fs->hashes[0], r->output_hash, 32);
	return keep_result(r, fs);
}

int svc_files_start(struct run *r, struct svc_files *fs)
{
	if (fs->nomem)
		return run_fail(r, -ENOMEM, "store", "out of memory");
	if (fs->n == 0)
		return run_fail(r, -EIO, "output_invalid", "%s's result names no file", fs->service);
	for (size_t i = 0; i < fs->n; i++) {
		json_object *v = value_of(&fs->f[i]);
		const char *s = json_object_is_type(v, json_type_string) ? json_object_get_string(v)
									 : NULL;
		if (!s)
			return run_fail(r, -EIO, "output_invalid",
					"%s's result names a file that is not a string",
					fs->service);
		if (fs->f[i].kind == SVC_FILE_URL && strncmp(s, "data:", 5) != 0 &&
		    (strlen(s) >= SVC_FILE_URL_MAX ||
		     (strncmp(s, "https://", 8) != 0 && strncmp(s, "http://", 7) != 0)))
			return run_fail(r, -EIO, "output_invalid",
					"%s's result names a file that is not an http(s) URL of at "
					"most %d bytes",
					fs->service, SVC_FILE_URL_MAX - 1);
	}
	if (fs->f[0].content_type[0] &&
	    !svc_type_fits(fs->f[0].content_type, r->route->media_type))
		return run_fail(r, -EIO, "output_invalid",
				"%s's result is %.100s, not %s as the route says", fs->service,
				fs->f[0].content_type, r->route->media_type);
	fs->at = 0;
	return go_on(r, fs);
}

int svc_files_answer(struct run *r, struct svc_files *fs, const struct http_response *h)
{
	struct store_sink *sink = fs->sink;
	int rc;

	fs->sink = NULL;
	if (h->error_code) {
		store_sink_abort(sink);
		return svc_fail(r, h, fs->service, "output download");
	}
	if (h->streamed == 0) {
		store_sink_abort(sink);
		return run_fail(r, -EIO, "output_invalid", "%s's output file %zu is empty",
				fs->service, fs->at + 1);
	}
	if ((rc = file_done(r, fs, sink, h->content_type, fs->head, fs->headlen)) != 0)
		return rc;
	return go_on(r, fs);
}

void svc_files_free(struct svc_files *fs)
{
	if (fs->sink)
		store_sink_abort(fs->sink);
	if (fs->first)
		store_sink_abort(fs->first);
	json_object_put(fs->result);
	free(fs->f);
	free(fs->hashes);
	memset(fs, 0, sizeof(*fs));
}
