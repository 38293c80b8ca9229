/*
 * service.h - what the remote backends (backend_fal.c, backend_replicate.c,
 * backend_openai.c) share: reading a service's JSON, its error answers and
 * its log lines, and turning a result that names files into the job's
 * outputs (SPEC §3).
 *
 * The files of a result: a backend finds the values in the result that are
 * files (a URL to download, or the bytes inline: base64 or a data: URI) and
 * adds each with svc_files_add, in the service's order; svc_files_start
 * then stores them one after the other, each streamed into a store sink,
 * hashed as it arrives and bounded by the route's max_output, the first's
 * media type checked against the route's (what the service says of it,
 * what the download says, and for inline bytes their magic); they become
 * output.<ext>, output.1.<ext>, ...; at the end each value in the result
 * is replaced by cas:<hex> and the result is kept as result.json.
 *
 * Threads: the engine's remote threads, within a run's step (backend.h).
 */
#ifndef RENDERFS_SERVICE_H
#define RENDERFS_SERVICE_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

struct run;
struct http_response;

/* URLs a service gives (status, result and file URLs): bounded, http(s). */
#define SVC_URL_MAX 1024
#define SVC_FILE_URL_MAX (2 * SVC_URL_MAX)

/* A service's JSON: bounded depth, an object, or NULL. */
json_object *svc_parse(const char *text, size_t len);
/* o[k] when it is a string, else NULL. */
const char *svc_str(json_object *o, const char *k);
/* Whether u (len bytes) is an http(s) URL under SVC_URL_MAX with nothing
 * that would break a header or a message. */
bool svc_url_ok(const char *u, size_t len);
/* Whether a media type someone gave (maybe with parameters) fits want:
 * the same, or one that says nothing precise (octet-stream, none). */
bool svc_type_fits(const char *given, const char *want);
/* The media type of a file's first bytes (PNG, JPEG, WebP, GIF, MP4/MOV,
 * WAV, MP3, FLAC, Ogg, WebM/Matroska), or NULL. */
const char *svc_sniff(const uint8_t *p, size_t n);
/* Whether a file of media type want may begin with head: true unless
 * svc_sniff knows want and head is not of it. */
bool svc_magic_fits(const char *want, const uint8_t *head, size_t n);
/* The fraction a log line reports, or -1: the last "N/M" or "P%" in it. */
double svc_log_fraction(const char *s);
/*
 * A failed answer: fail r with its catalog code (http.c) and the service's
 * own words where the body has them: fal's and Replicate's `detail` (a
 * string, or FastAPI's list of {loc, msg}), OpenAI's `error.message`,
 * sd-server's `error` string, a `title`. Keeps Retry-After. -EIO.
 */
int svc_fail(struct run *r, const struct http_response *h, const char *service,
	     const char *what);

/* ---- a route's settings, its key, a submission's fate ---- */

/* What every remote route's settings may say (each backend's list of
 * settings says which it takes). */
struct svc_conf {
	char base[512];	   /* base_url, without a trailing slash */
	char key_env[128]; /* key_env: the variable that holds the key */
	char *key;	   /* key from the models file, or NULL */
	uint64_t req_ms;   /* request_timeout_s: one status request, at most */
};

struct backend;
/* Fill c from settings (checked by backend_settings_check before) with
 * the defaults given: 0, or -EINVAL with err naming the field (c is then
 * cleared). */
int svc_conf_parse(struct svc_conf *c, json_object *settings, const char *base_default,
		   const char *env_default, char *err, size_t errlen);
/* Wipe and free the key. */
void svc_conf_clear(struct svc_conf *c);

/*
 * The run's durable handle (engine_i.h) as JSON: svc_handle_text gives o's
 * text (malloc'ed, or NULL; o is consumed and may be NULL: no memory),
 * svc_handle_put puts it (with the rest of the step's writes: a log line
 * that says so goes in the same write), svc_handle_submitting puts
 * {"state": "submitting"} before a submission whose answer alone says
 * whether the service has it. svc_handle_get: 0 (none), 1 (*out: the object),
 * -EALREADY (a submission of unknown fate), -EBADMSG (not a JSON object),
 * or the store's error.
 */
char *svc_handle_text(json_object *o);
int svc_handle_put(struct run *r, json_object *o);
int svc_handle_submitting(struct run *r);
int svc_handle_get(struct run *r, json_object **out);
/*
 * A submission that failed: with no answer after it may have been sent,
 * whether the service has it is unknown, so the job ends `interrupted`
 * (never sent twice); otherwise nothing was accepted: the handle is
 * cleared (a later attempt may submit) and the answer's code decides.
 * Returns the failure.
 */
int svc_submit_failed(struct run *r, const struct http_response *h, const char *service,
		      const char *what);

/* ---- polling a service for the state of its work ---- */

/*
 * Every 200 ms at first, growing by 5/4 up to 2 s (a 2 s job is seen done
 * at 2.25 s, after 6 polls). The times are counted from the first poll's
 * start, not from each answer: a slow answer does not delay the polls
 * after it, and a time that passed while a poll was in flight is skipped,
 * not made up for. An answer that is busy or not a state is
 * asked again (after twice the interval, or its Retry-After), and
 * SVC_POLL_FAILS such answers in a row fail the attempt.
 */
#define SVC_POLL_FAILS 5
struct svc_poll {
	uint64_t ms; /* the interval that led to `at` */
	uint64_t at; /* CLOCK_MONOTONIC ms of the next poll on the schedule */
	unsigned fails;
};
/* Start polling: the first poll's delay. */
uint64_t svc_poll_begin(struct svc_poll *p);
/* The same two on a given clock (CLOCK_MONOTONIC ms), for tests:
 * svc_poll_after is the next poll's delay after a usable answer. */
uint64_t svc_poll_start(struct svc_poll *p, uint64_t now);
uint64_t svc_poll_after(struct svc_poll *p, uint64_t now);
/* A usable answer, the work not done: the next poll, later. RUN_WAIT. */
int svc_poll_next(struct run *r, struct svc_poll *p);
/* An unusable answer (h: busy, with its Retry-After; NULL: not a state):
 * RUN_WAIT with the next poll arranged, or 0 when it was one too many
 * (the caller fails the attempt). */
int svc_poll_again(struct run *r, struct svc_poll *p, const struct http_response *h);

/* ---- the files of a result ---- */

#define SVC_FILES_MAX (1 + INDEX_EXTRAS_MAX) /* output.<ext>, output.1.<ext>, ... */

enum svc_file_kind {
	SVC_FILE_URL,	 /* an http(s) URL to download (or a data: URI) */
	SVC_FILE_BASE64, /* the bytes, base64 (OpenAI's b64_json) */
};

struct svc_file {
	json_object *holder; /* the object or array holding the value */
	char key[32];	     /* holder[key]; "" : holder[idx] */
	size_t idx;
	enum svc_file_kind kind;
	char content_type[128]; /* what the result says of it ("": nothing) */
};

struct svc_files {
	const char *service;	 /* for messages: "fal", "replicate", ... */
	const char *key;	 /* a secret that must not appear in messages */
	json_object *result;	 /* owned: kept as result.json at the end */
	/* The files and their hashes once stored, cap of each allocated:
	 * none until a result names some (a thousand runs polling hold
	 * none). nomem: one could not be added (svc_files_start fails). */
	struct svc_file *f;
	uint8_t (*hashes)[32];
	size_t n, at, cap;
	bool nomem;
	struct store_sink *sink;  /* the download under way */
	struct store_sink *first; /* the first file's, committed last */
	uint8_t head[16];	  /* its first bytes, for svc_sniff */
	size_t headlen;
};

/* Add the file whose value is holder[key] (key NULL: holder[idx]) and that
 * the result says is content_type (NULL: nothing). Past SVC_FILES_MAX the
 * file is not added: -E2BIG; without memory -ENOMEM (and the files are
 * refused at svc_files_start). */
int svc_files_add(struct svc_files *fs, json_object *holder, const char *key, size_t idx,
		  enum svc_file_kind kind, const char *content_type);
/*
 * Store the files, from the first: returns RUN_WAIT while a download is
 * under way (then call svc_files_answer with its answer), 0 when all are
 * committed and result.json kept, or a failure set with run_fail.
 */
int svc_files_start(struct run *r, struct svc_files *fs);
int svc_files_answer(struct run *r, struct svc_files *fs, const struct http_response *h);
/* Free what fs holds (sinks not committed are aborted). */
void svc_files_free(struct svc_files *fs);

/* ---- what every remote run holds ---- */

/* Held in each remote backend's run state (its `sr`). */
struct svc_run {
	const char *key;      /* the key in use, or NULL (none: a local server) */
	uint8_t *job_key;     /* the job's own (envelope credentials), unsealed */
	char auth[600];	      /* "Authorization: <scheme> <key>", "" without a key */
	struct svc_files files; /* the result and its files */
};
/*
 * The key the run uses (SPEC §7): the job's own, else the route's, else
 * the variable's; and its Authorization header with scheme ("Key",
 * "Bearer"). service names the service in messages about the files. 0
 * (sr->key NULL when there is no key), or a failure set with run_fail.
 */
int svc_run_key(struct run *r, struct svc_run *sr, const struct svc_conf *c, const char *service,
		const char *scheme);
/* Free and wipe what sr holds (sinks not committed are aborted). */
void svc_run_clear(struct svc_run *sr);

#endif
