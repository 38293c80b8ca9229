/*
 * backend_comfyui.c - a ComfyUI server (SPEC §8 `comfyui`, PROTOCOLS.md
 * "ComfyUI") as a remote backend: a workflow in ComfyUI's API format from
 * the models file, with request fields bound to node inputs, run as one
 * prompt per job.
 *
 * DESIGN
 *
 * The route's schema is the user's request, not the graph: each field the
 * schema names is bound (`bindings`: "prompt": "6.inputs.text") to one
 * widget input of one node, checked at mount against the workflow (the
 * node exists, the input is not a link from another node's output) and
 * against the schema (every property bound, every binding a property).
 * At run time the workflow is copied and the request's values are set.
 *
 * A run is a series of steps (backend.h) on the engine's HTTP loop:
 *
 *   START     the durable handle says where the job is: nothing (a new
 *             prompt), a prompt id whose submission was never answered
 *             (FIND it), or a prompt the server has (follow it).
 *   SUBMIT    the prompt id is chosen here (a UUID) and made durable
 *             ({"prompt_id", "sent": false}) before POST /prompt
 *             {"prompt", "client_id", "prompt_id"}: current servers take
 *             the client's id, so a submission whose answer is lost can be
 *             found again by it. An older server names its own id in the
 *             answer; that one is recorded. 400 with `node_errors` is
 *             `backend_rejected` naming the node, its class and the
 *             server's words.
 *   HISTORY   GET /history/{id}: `{}` until the prompt ends, then its
 *             `outputs` and `status`. Polled (200 ms, growing to 2 s).
 *   QUEUE     while the history is empty, GET /queue at most every 5 s
 *             (its answer holds every queued prompt, so not at every poll):
 *             the prompt running, or its place among those pending (the
 *             job's `position`). A prompt neither queued, running nor in
 *             the history (read again after the queue, for one that ended
 *             in between) is lost: the server restarted. The handle is
 *             cleared and the attempt fails as `backend_unavailable`, so
 *             the next attempt submits it again. A submission never
 *             answered and not found is `interrupted` instead: an older
 *             server may have it under an id of its own, and work is
 *             never sent twice.
 *   FILES     the files the output node (`output_node`, or every node's
 *             files of type "output" when none is named) lists in
 *             `images`, `gifs`, `videos`, `audio`, ... are fetched from
 *             GET /view?filename=&subfolder=&type= and stored (service.h);
 *             the history entry's `outputs` and `status` are kept as
 *             result.json, each file with "file": "cas:<hex>".
 *   CANCEL    POST /queue {"delete": [id]} (a queued prompt), then
 *             POST /api/jobs/{id}/cancel (a running one, on servers that
 *             have it). Never POST /interrupt: on most servers it stops
 *             whatever runs, another job's prompt too. A server without
 *             the per-prompt cancel runs the prompt to its end; its
 *             output is not taken.
 *
 * Progress: ComfyUI reports it only on its websocket (/ws?clientId=),
 * sending each prompt's `progress` to the client it was queued with. The
 * route has one client id (from the store and the route: the same at
 * every mount) and one watcher thread (struct comfy_ws) holding one
 * socket while prompts are in flight; a step reads its prompt's fraction
 * at each poll. Completion never comes from there, so a socket that fails
 * costs progress only (said once in the job's log).
 * Inputs: a cas: value in a bound field (or in a list or object there) is
 * uploaded first (POST /upload/image, type "input", named by its hash,
 * overwrite: the same name is the same bytes, so an upload repeated after
 * a restart changes nothing) and replaced by the name the server gives it,
 * which is what LoadImage (and video loaders) take.
 *
 * Threads (backend.h): configure and release on the mounting thread;
 * check on FUSE handler threads, reading the route's state only; steps,
 * cancel and run_free on the engine's remote threads, one call at a time
 * per run (struct comfy_run is the run's alone).
 *
 * Settings (models file): base_url (default http://127.0.0.1:8188),
 * workflow (a file, relative to the models file, or the object inline),
 * bindings, output_node, request_timeout_s (one history or queue request).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <sodium.h>

#include "backend.h"
#include "engine_i.h"
#include "http.h"
#include "route.h"
#include "index.h"
#include "service.h"
#include "ws.h"

extern const struct backend backend_comfyui;

#define COMFY_WORKFLOW_MAX (8u << 20) /* bytes of a workflow file */
#define COMFY_BINDINGS_MAX 64
#define COMFY_NODE_MAX 64	      /* bytes of a node id, of an input name */
#define COMFY_ANSWER_MAX (32u << 20)  /* a history entry or the queue */
#define COMFY_QUEUE_EVERY_MS 5000
#define COMFY_ID_MAX 64
/* A cas: input is uploaded (POST /upload/image), up to ComfyUI's default
 * --max-upload-size. */
#define COMFY_INPUT_MAX (100u << 20)
#define COMFY_NAME_MAX 300 /* "subfolder/name" of an uploaded input */
#define COMFY_WATCH_MAX 1024	     /* prompts whose progress is followed */
#define COMFY_WS_MSG_MAX (64u << 10) /* a progress message is ~200 bytes */
#define COMFY_WS_RETRY_MAX_MS 30000

/* A prompt whose progress the watcher follows. */
struct comfy_watch {
	char id[COMFY_ID_MAX]; /* "" : a free slot */
	double frac;	       /* value/max of its latest `progress`; -1: none */
};

/*
 * The progress watcher of one route: one thread with one WebSocket to the
 * server's /ws?clientId=<client>, open while prompts are in flight.
 * ComfyUI sends a prompt's `progress` messages ({"type": "progress",
 * "data": {"value", "max", "prompt_id", "node"}}) to the socket of the
 * client_id it was queued with, which is this route's, so one socket
 * serves all of the route's jobs. Steps read a prompt's fraction at each
 * poll; completion never comes from here.
 *
 * Lock: mu guards tried, started, stop, w[], n, up, why, client and url (set
 * once, before the thread starts); deny and wake are set before the
 * thread starts and only read after.
 */
struct comfy_ws {
	pthread_mutex_t mu;
	pthread_cond_t cv; /* a first watch, or stop */
	pthread_t th;
	bool tried, started, stop;
	int wake; /* eventfd, written once at stop: cuts any wait short */
	struct comfy_watch w[COMFY_WATCH_MAX];
	size_t n;		/* slots in use */
	bool up;		/* the socket is open */
	char why[160];		/* why it is not, "" : nothing tried yet */
	struct http_deny *deny; /* the thread's copy of deny_net= */
	char url[600];
	char client[48];
};

struct comfy_binding {
	char field[COMFY_NODE_MAX];
	char node[COMFY_NODE_MAX];
	char input[COMFY_NODE_MAX];
};

struct comfy_conf {
	struct svc_conf svc;   /* base_url, request_timeout_s */
	json_object *workflow; /* {"<node id>": {"class_type", "inputs"}, ...} */
	struct comfy_binding b[COMFY_BINDINGS_MAX];
	size_t nb;
	char output_node[COMFY_NODE_MAX]; /* "": every node's "output" files */
	struct comfy_ws *ws;			  /* the progress watcher (its own lock) */
};

enum comfy_phase { C_UPLOAD, C_SUBMIT, C_HISTORY, C_QUEUE, C_RECHECK, C_FILES, C_DELETE, C_CANCEL };

struct comfy_run {
	enum comfy_phase phase;
	struct svc_run sr; /* the result and its files (no key) */
	char id[COMFY_ID_MAX];
	bool sent;	   /* the server has the prompt (it said so, or was found to) */
	struct svc_poll poll;
	uint64_t queue_ms; /* when the queue was last read (0: never) */
	long position;	   /* prompts ahead of it; -1: running or unknown */
	int watch;	   /* its slot in the watcher, -1: none */
	/* The job's cas: inputs and the names the server gave them. */
	struct job_input in[INDEX_INPUTS_MAX];
	char in_name[INDEX_INPUTS_MAX][COMFY_NAME_MAX];
	size_t nin, up_at;
	double frac;	   /* the progress last reported */
	bool said_ws;	   /* the log says why there is no progress */
};

static const struct backend_setting comfy_takes[] = {
    {"base_url", json_type_string},
    {"workflow", json_type_null}, /* a file name or the object: checked below */
    {"bindings", json_type_object},
    {"output_node", json_type_string},
    {"request_timeout_s", json_type_int},
};

/* ---- the progress watcher ---- */

/* One message from the socket: a prompt's progress. */
static void ws_take(struct comfy_ws *w, const char *msg, size_t len)
{
	json_object *o = svc_parse(msg, len), *d, *v, *m;
	const char *type = svc_str(o, "type"), *id;

	if (type && strcmp(type, "progress") == 0 && json_object_object_get_ex(o, "data", &d) &&
	    (id = svc_str(d, "prompt_id")) != NULL && json_object_object_get_ex(d, "value", &v) &&
	    json_object_object_get_ex(d, "max", &m) && json_object_get_double(m) > 0) {
		double f = json_object_get_double(v) / json_object_get_double(m);
		if (f >= 0 && f <= 1) {
			pthread_mutex_lock(&w->mu);
			for (size_t i = 0; i < COMFY_WATCH_MAX; i++)
				if (strcmp(w->w[i].id, id) == 0) {
					w->w[i].frac = f;
					break;
				}
			pthread_mutex_unlock(&w->mu);
		}
	}
	json_object_put(o);
}

static void *ws_main(void *arg)
{
	struct comfy_ws *w = arg;
	struct ws_conn *c = malloc(sizeof(*c));
	char *msg = malloc(COMFY_WS_MSG_MAX), err[160];
	uint64_t retry_ms = 1000;
	size_t len;
	int rc;

	pthread_mutex_lock(&w->mu);
	if (!c || !msg) {
		snprintf(w->why, sizeof(w->why), "out of memory");
		goto out;
	}
	c->fd = -1;
	while (!w->stop) {
		if (w->n == 0) {
			/* Nothing to follow: no socket held open for nothing. */
			if (c->fd >= 0) {
				pthread_mutex_unlock(&w->mu);
				ws_close(c);
				pthread_mutex_lock(&w->mu);
				w->up = false;
				continue;
			}
			pthread_cond_wait(&w->cv, &w->mu);
			continue;
		}
		pthread_mutex_unlock(&w->mu);
		if (c->fd < 0) {
			rc = ws_open(c, w->url, w->deny, w->wake, 5000, err, sizeof(err));
			pthread_mutex_lock(&w->mu);
			if (rc == 0) {
				w->up = true;
				w->why[0] = '\0';
				retry_ms = 1000;
				continue;
			}
			if (rc == -EINTR)
				continue;
			snprintf(w->why, sizeof(w->why), "%s", err);
		} else {
			rc = ws_read(c, msg, COMFY_WS_MSG_MAX, &len, w->wake, 1000);
			if (rc == 1)
				ws_take(w, msg, len);
			pthread_mutex_lock(&w->mu);
			if (rc >= 0 || rc == -EINTR)
				continue;
			snprintf(w->why, sizeof(w->why), "the server's WebSocket closed: %s",
				 strerror(-rc));
			w->up = false;
			pthread_mutex_unlock(&w->mu);
			ws_close(c);
			pthread_mutex_lock(&w->mu);
		}
		/* Try again later; stop cuts the wait short. */
		pthread_mutex_unlock(&w->mu);
		struct pollfd pf = {.fd = w->wake, .events = POLLIN};
		poll(&pf, 1, (int)retry_ms);
		retry_ms = retry_ms * 2 < COMFY_WS_RETRY_MAX_MS ? retry_ms * 2 : COMFY_WS_RETRY_MAX_MS;
		pthread_mutex_lock(&w->mu);
	}
out:
	pthread_mutex_unlock(&w->mu);
	if (c)
		ws_close(c);
	free(c);
	free(msg);
	return NULL;
}

static void ws_init(struct comfy_ws *w)
{
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	w->wake = -1;
}

/*
 * The route's client_id (out: sizeof(w->client)): the same for a store and
 * a route at every mount, so that the progress of a prompt queued before
 * a restart still reaches the socket of the mount that follows it.
 */
static void client_locked(struct run *r, struct comfy_ws *w, const char *base)
{
	if (!w->client[0]) {
		const char *dir = store_dir(engine_store(r->e));
		uint8_t h[8];
		char hex[17];
		crypto_generichash_state st;
		crypto_generichash_init(&st, NULL, 0, sizeof(h));
		crypto_generichash_update(&st, (const uint8_t *)dir, strlen(dir) + 1);
		crypto_generichash_update(&st, (const uint8_t *)r->route->path,
					  strlen(r->route->path));
		crypto_generichash_final(&st, h, sizeof(h));
		sodium_bin2hex(hex, sizeof(hex), h, sizeof(h));
		snprintf(w->client, sizeof(w->client), "renderfs-%s", hex);
		snprintf(w->url, sizeof(w->url), "%s/ws?clientId=%s", base, w->client);
	}
}

static void ws_client(struct run *r, struct comfy_ws *w, const char *base, char *out)
{
	pthread_mutex_lock(&w->mu);
	client_locked(r, w, base);
	memcpy(out, w->client, sizeof(w->client));
	pthread_mutex_unlock(&w->mu);
}

/* Stop the thread, if it was started (the mounting thread, after the
 * engine stopped). */
static void ws_stop(struct comfy_ws *w)
{
	uint64_t one = 1;

	pthread_mutex_lock(&w->mu);
	w->stop = true;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	if (w->wake >= 0 && write(w->wake, &one, sizeof(one)) < 0) {
		/* An eventfd write fails only on overflow: it is readable then. */
	}
	if (w->started)
		pthread_join(w->th, NULL);
	if (w->wake >= 0)
		close(w->wake);
	http_deny_free(w->deny);
	pthread_cond_destroy(&w->cv);
	pthread_mutex_destroy(&w->mu);
}

/* Follow prompt id's progress: its slot, or -1 (none free, or no thread:
 * the run goes on without progress). A remote thread, within a step. */
static int ws_watch(struct run *r, struct comfy_ws *w, const char *base, const char *id)
{
	int slot = -1;

	pthread_mutex_lock(&w->mu);
	client_locked(r, w, base);
	if (!w->tried && !w->stop) {
		char err[128];
		w->tried = true; /* once, whatever happens */
		w->started = http_deny_parse(run_deny_net(r), &w->deny, err, sizeof(err)) == 0 &&
			     (w->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) >= 0 &&
			     pthread_create(&w->th, NULL, ws_main, w) == 0;
		if (!w->started)
			snprintf(w->why, sizeof(w->why), "cannot start the progress watcher: %s",
				 strerror(errno));
		else
			pthread_setname_np(w->th, "rfs-comfy-ws");
	}
	if (w->started && w->n < COMFY_WATCH_MAX)
		for (size_t i = 0; i < COMFY_WATCH_MAX; i++)
			if (!w->w[i].id[0]) {
				snprintf(w->w[i].id, sizeof(w->w[i].id), "%s", id);
				w->w[i].frac = -1;
				if (w->n++ == 0)
					pthread_cond_signal(&w->cv);
				slot = (int)i;
				break;
			}
	pthread_mutex_unlock(&w->mu);
	return slot;
}

static void ws_unwatch(struct comfy_ws *w, int slot)
{
	if (slot < 0)
		return;
	pthread_mutex_lock(&w->mu);
	w->w[slot].id[0] = '\0';
	w->n--;
	pthread_mutex_unlock(&w->mu);
}

/* At a poll: the prompt's progress, if the watcher heard of it. */
static void ws_progress(struct run *r, struct comfy_ws *w, int slot, double *last, bool *said)
{
	double f = -1;
	bool up;
	char why[sizeof(w->why)];

	if (slot < 0)
		return;
	pthread_mutex_lock(&w->mu);
	f = w->w[slot].frac;
	up = w->up;
	snprintf(why, sizeof(why), "%s", w->why);
	pthread_mutex_unlock(&w->mu);
	if (!up && why[0] && !*said) {
		*said = true;
		run_log(r, "comfyui: no progress from the server (%s); the job still ends when "
			   "the prompt does",
			why);
	}
	if (f > *last) {
		*last = f;
		run_progress(r, f < 0.99 ? f : 0.99); /* 1: when stored */
	}
}

static void comfy_release(void *state)
{
	struct comfy_conf *c = state;

	if (!c)
		return;
	if (c->ws) {
		ws_stop(c->ws);
		free(c->ws);
	}
	svc_conf_clear(&c->svc);
	json_object_put(c->workflow);
	free(c);
}

/* Free c; err says what was wrong. -EINVAL. */
static int conf_drop(struct comfy_conf *c)
{
	comfy_release(c);
	return -EINVAL;
}

static int conf_fail(struct comfy_conf *c, char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int conf_fail(struct comfy_conf *c, char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	comfy_release(c);
	return -EINVAL;
}

/* The workflow file at path (relative: beside the models file): a JSON
 * object, or NULL with err set. */
static json_object *workflow_read(const struct route *rt, const char *path, char *err,
				  size_t errlen)
{
	char *full = NULL, *text = NULL;
	json_object *o = NULL;
	json_tokener *tok = NULL;
	size_t len = 0;
	FILE *f = NULL;

	if (path[0] != '/' && rt->origin && strchr(rt->origin, '/')) {
		const char *slash = strrchr(rt->origin, '/');
		if (asprintf(&full, "%.*s/%s", (int)(slash - rt->origin), rt->origin, path) < 0)
			full = NULL;
	} else {
		full = strdup(path);
	}
	if (!full) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	if (!(f = fopen(full, "re"))) {
		snprintf(err, errlen, "'workflow': cannot open '%s': %s", full, strerror(errno));
		goto out;
	}
	if (!(text = malloc(COMFY_WORKFLOW_MAX + 1))) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	len = fread(text, 1, COMFY_WORKFLOW_MAX + 1, f);
	if (ferror(f)) {
		snprintf(err, errlen, "'workflow': cannot read '%s'", full);
		goto out;
	}
	if (len > COMFY_WORKFLOW_MAX) {
		snprintf(err, errlen, "'workflow': '%s' is over %u bytes", full,
			 COMFY_WORKFLOW_MAX);
		goto out;
	}
	if (!(tok = json_tokener_new_ex(64))) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	o = json_tokener_parse_ex(tok, text, (int)len);
	if (!o || json_tokener_get_error(tok) != json_tokener_success ||
	    !json_object_is_type(o, json_type_object)) {
		json_object_put(o);
		o = NULL;
		snprintf(err, errlen, "'workflow': '%s' is not a JSON object", full);
	}
out:
	if (tok)
		json_tokener_free(tok);
	if (f)
		fclose(f);
	free(text);
	free(full);
	return o;
}

/* Whether w is a workflow in API format: every node an object with a
 * class_type and an inputs object. err names what is wrong. */
static bool workflow_ok(json_object *w, char *err, size_t errlen)
{
	json_object *v;

	if (json_object_object_get_ex(w, "nodes", &v) && json_object_is_type(v, json_type_array)) {
		snprintf(err, errlen, "'workflow' is in ComfyUI's UI format (\"nodes\", \"links\"); "
				      "export it in API format (\"Export (API)\" in ComfyUI)");
		return false;
	}
	if (json_object_object_length(w) == 0) {
		snprintf(err, errlen, "'workflow' has no nodes");
		return false;
	}
	json_object_object_foreach(w, id, node)
	{
		json_object *ct, *in;
		if (strlen(id) >= COMFY_NODE_MAX || !json_object_is_type(node, json_type_object) ||
		    !json_object_object_get_ex(node, "class_type", &ct) ||
		    !json_object_is_type(ct, json_type_string) ||
		    !json_object_object_get_ex(node, "inputs", &in) ||
		    !json_object_is_type(in, json_type_object)) {
			snprintf(err, errlen,
				 "'workflow': node '%.60s' is not a node in API format (an object "
				 "with \"class_type\" and \"inputs\")",
				 id);
			return false;
		}
	}
	return true;
}

/* A binding "<node id>.inputs.<name>" into b, checked against w. */
static int binding_parse(json_object *w, const char *field, json_object *v,
			 struct comfy_binding *b, char *err, size_t errlen)
{
	const char *s = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : "";
	const char *mid = strstr(s, ".inputs.");
	json_object *node, *in, *cur;
	size_t nlen;

	if (strlen(field) >= sizeof(b->field) || !mid || mid == s ||
	    (nlen = (size_t)(mid - s)) >= sizeof(b->node) ||
	    strlen(mid + 8) >= sizeof(b->input) || !mid[8] || strchr(mid + 8, '.')) {
		snprintf(err, errlen,
			 "'bindings.%.60s' must be a string \"<node id>.inputs.<name>\"", field);
		return -EINVAL;
	}
	snprintf(b->field, sizeof(b->field), "%s", field);
	snprintf(b->node, sizeof(b->node), "%.*s", (int)nlen, s);
	snprintf(b->input, sizeof(b->input), "%s", mid + 8);
	if (!json_object_object_get_ex(w, b->node, &node)) {
		snprintf(err, errlen, "'bindings.%s': the workflow has no node '%s'", field,
			 b->node);
		return -EINVAL;
	}
	json_object_object_get_ex(node, "inputs", &in);
	if (json_object_object_get_ex(in, b->input, &cur) &&
	    json_object_is_type(cur, json_type_array)) {
		snprintf(err, errlen,
			 "'bindings.%s': %s.inputs.%s is a link from another node's output, not a "
			 "value a request can set",
			 field, b->node, b->input);
		return -EINVAL;
	}
	return 0;
}

static int comfy_configure(struct route *rt, json_object *settings, void **state, char *err,
			   size_t errlen)
{
	struct comfy_conf *c;
	json_object *v, *props = NULL;
	int rc = backend_settings_check(&backend_comfyui, settings, comfy_takes,
					sizeof(comfy_takes) / sizeof(comfy_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	if (!(c->ws = calloc(1, sizeof(*c->ws)))) {
		free(c);
		return -ENOMEM;
	}
	ws_init(c->ws);
	if ((rc = svc_conf_parse(&c->svc, settings, "http://127.0.0.1:8188", "", err, errlen)) !=
	    0) {
		comfy_release(c);
		return rc;
	}
	if (!settings || !json_object_object_get_ex(settings, "workflow", &v))
		return conf_fail(c, err, errlen,
				 "the comfyui backend needs 'workflow' (a file in API format, or "
				 "the object inline)");
	if (json_object_is_type(v, json_type_string)) {
		if (!(c->workflow = workflow_read(rt, json_object_get_string(v), err, errlen)))
			return conf_drop(c);
	} else if (json_object_is_type(v, json_type_object)) {
		c->workflow = json_object_get(v);
	} else {
		return conf_fail(c, err, errlen,
				 "'workflow' must be a file name or the workflow object");
	}
	if (!workflow_ok(c->workflow, err, errlen))
		return conf_drop(c);
	if (json_object_object_get_ex(settings, "output_node", &v)) {
		const char *n = json_object_get_string(v);
		if (!*n || strlen(n) >= sizeof(c->output_node) ||
		    !json_object_object_get_ex(c->workflow, n, NULL))
			return conf_fail(c, err, errlen, "'output_node': the workflow has no node '%.60s'",
					 n);
		snprintf(c->output_node, sizeof(c->output_node), "%s", n);
	}
	if (json_object_object_get_ex(settings, "bindings", &v)) {
		json_object_object_foreach(v, field, path)
		{
			if (c->nb == COMFY_BINDINGS_MAX)
				return conf_fail(c, err, errlen, "'bindings': at most %d",
						 COMFY_BINDINGS_MAX);
			if (binding_parse(c->workflow, field, path, &c->b[c->nb], err, errlen))
				return conf_drop(c);
			c->nb++;
		}
	}
	/* The schema is the request: each of its fields bound, each binding
	 * one of its fields, so that no field is silently dropped. */
	if (rt->schema)
		json_object_object_get_ex(rt->schema, "properties", &props);
	if (props) {
		json_object_object_foreach(props, name, unused)
		{
			size_t i = 0;
			(void)unused;
			while (i < c->nb && strcmp(c->b[i].field, name) != 0)
				i++;
			if (i == c->nb)
				return conf_fail(c, err, errlen,
						 "'bindings': the schema's field '%.60s' is bound to no "
						 "node input",
						 name);
		}
	}
	for (size_t i = 0; i < c->nb; i++)
		if (!props || !json_object_object_get_ex(props, c->b[i].field, NULL))
			return conf_fail(c, err, errlen,
					 "'bindings.%s': the route's schema has no field '%s'",
					 c->b[i].field, c->b[i].field);
	snprintf(rt->target, sizeof(rt->target), "%s", c->svc.base);
	*state = c;
	return 0;
}

/* A request field no binding takes is refused at submit (a schema with
 * additionalProperties would let it through to be dropped). */
static int comfy_check(const struct route *rt, const char *request, size_t len, char *err,
		       size_t errlen)
{
	const struct comfy_conf *c = rt->backend_state;
	json_object *req = svc_parse(request, len);
	int rc = 0;

	if (!req)
		return 0; /* the schema said what it is */
	json_object_object_foreach(req, k, unused)
	{
		size_t i = 0;
		(void)unused;
		while (i < c->nb && strcmp(c->b[i].field, k) != 0)
			i++;
		if (i == c->nb) {
			snprintf(err, errlen, "%.60s: the route's workflow takes no such field", k);
			rc = -EINVAL;
			break;
		}
	}
	json_object_put(req);
	return rc;
}

/* ---- the handle: {"prompt_id", "sent"} ---- */

static bool id_ok(const char *s)
{
	if (!s || !*s || strlen(s) >= COMFY_ID_MAX)
		return false;
	for (; *s; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') ||
		      (*s >= 'A' && *s <= 'Z') || *s == '-' || *s == '_'))
			return false;
	return true;
}

static int handle_put(struct run *r, struct comfy_run *p)
{
	json_object *o = json_object_new_object();

	if (o) {
		json_object_object_add(o, "prompt_id", json_object_new_string(p->id));
		json_object_object_add(o, "sent", json_object_new_boolean(p->sent));
	}
	return svc_handle_put(r, o);
}

/* 1: a prompt (p->id, p->sent), 0: none, -EBADMSG: damaged, <0: error. */
static int handle_get(struct run *r, struct comfy_run *p)
{
	json_object *o, *v;
	const char *id;
	int rc = svc_handle_get(r, &o);

	if (rc == -EALREADY)
		return -EBADMSG; /* not this backend's */
	if (rc != 1)
		return rc;
	id = svc_str(o, "prompt_id");
	if (!id_ok(id) || !json_object_object_get_ex(o, "sent", &v) ||
	    !json_object_is_type(v, json_type_boolean)) {
		json_object_put(o);
		return -EBADMSG;
	}
	snprintf(p->id, sizeof(p->id), "%s", id);
	p->sent = json_object_get_boolean(v);
	json_object_put(o);
	return 1;
}

/* ---- requests ---- */

static int request(struct run *r, const char *method, const char *url, const char *body,
		   uint64_t timeout_ms, size_t max_body)
{
	const char *hdrs[] = {"Content-Type: application/json", "Accept: application/json"};
	struct http_request rq = {
	    .method = method,
	    .url = url,
	    .headers = hdrs,
	    .nheaders = 2,
	    .body = body,
	    .body_len = body ? strlen(body) : 0,
	    .timeout_ms = timeout_ms,
	    .max_body = max_body,
	};

	return run_http(r, &rq);
}

static int get_history(struct run *r, struct comfy_run *p, enum comfy_phase phase)
{
	const struct comfy_conf *c = r->route->backend_state;
	char url[sizeof(c->svc.base) + 32 + COMFY_ID_MAX];

	snprintf(url, sizeof(url), "%s/history/%s", c->svc.base, p->id);
	p->phase = phase;
	return request(r, "GET", url, NULL, c->svc.req_ms, COMFY_ANSWER_MAX);
}

static int get_queue(struct run *r, struct comfy_run *p)
{
	const struct comfy_conf *c = r->route->backend_state;
	char url[sizeof(c->svc.base) + 16];

	snprintf(url, sizeof(url), "%s/queue", c->svc.base);
	p->phase = C_QUEUE;
	return request(r, "GET", url, NULL, c->svc.req_ms, COMFY_ANSWER_MAX);
}

/* A fresh prompt id: a UUID (version 4), as ComfyUI makes its own. */
static void new_id(char out[COMFY_ID_MAX])
{
	uint8_t u[16];
	char hex[33];

	randombytes_buf(u, sizeof(u));
	u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);
	u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
	sodium_bin2hex(hex, sizeof(hex), u, sizeof(u));
	snprintf(out, COMFY_ID_MAX, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12,
		 hex + 16, hex + 20);
}

/* a[i] when a is an array that long, else NULL: json-c's array calls
 * assume an array, and a service's JSON is not trusted to hold one. */
static json_object *item(json_object *a, size_t i)
{
	return json_object_is_type(a, json_type_array) && i < json_object_array_length(a)
		       ? json_object_array_get_idx(a, i)
		       : NULL;
}

/* v (a bound value, *v replaced when it is a string) with each cas:
 * input replaced by the name the server gave its upload. */
static int uploaded_names(struct comfy_run *p, json_object **v)
{
	uint8_t h[INDEX_HASH_LEN];

	if (json_object_is_type(*v, json_type_string)) {
		const char *s = json_object_get_string(*v);
		if (json_object_get_string_len(*v) != 68 || strncmp(s, "cas:", 4) != 0 ||
		    b3_from_hex(s + 4, h) != 0)
			return 0;
		for (size_t i = 0; i < p->nin; i++)
			if (memcmp(p->in[i].hash, h, INDEX_HASH_LEN) == 0) {
				json_object *n = json_object_new_string(p->in_name[i]);
				if (!n)
					return -ENOMEM;
				*v = n; /* the request still holds the old one */
				return 1;
			}
		return 0;
	}
	if (json_object_is_type(*v, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(*v); i++) {
			json_object *x = json_object_array_get_idx(*v, i);
			int rc = uploaded_names(p, &x);
			if (rc < 0)
				return rc;
			if (rc == 1)
				json_object_array_put_idx(*v, i, x);
		}
	} else if (json_object_is_type(*v, json_type_object)) {
		json_object_object_foreach(*v, k, x)
		{
			json_object *y = x;
			int rc = uploaded_names(p, &y);
			if (rc < 0)
				return rc;
			if (rc == 1)
				json_object_object_add(*v, k, y);
		}
	}
	return 0;
}

/* The body of POST /prompt: the workflow with the request's values set.
 * NULL with the failure set. */
static char *prompt_body(struct run *r, struct comfy_run *p, int *rc)
{
	const struct comfy_conf *c = r->route->backend_state;
	json_object *req = svc_parse(r->request, r->request_len), *w = NULL, *body = NULL;
	json_object *extra = NULL;
	char client[sizeof(c->ws->client)], id[JOB_ID_STR_LEN + 1];
	char *text = NULL;

	if (!req) {
		*rc = run_fail(r, -EINVAL, "invalid_request", "the request is not a JSON object");
		return NULL;
	}
	if (json_object_deep_copy(c->workflow, &w, NULL) != 0 || !w)
		goto nomem;
	for (size_t i = 0; i < c->nb; i++) {
		json_object *v, *node, *in;
		if (!json_object_object_get_ex(req, c->b[i].field, &v))
			continue;
		int named = uploaded_names(p, &v);
		if (named < 0)
			goto nomem;
		json_object_object_get_ex(w, c->b[i].node, &node);
		json_object_object_get_ex(node, "inputs", &in);
		json_object_object_add(in, c->b[i].input, named == 1 ? v : json_object_get(v));
	}
	ulid_format(r->job.id, id);
	ws_client(r, c->ws, c->svc.base, client);
	if (!(body = json_object_new_object()) || !(extra = json_object_new_object()))
		goto nomem;
	json_object_object_add(body, "prompt", w);
	w = NULL;
	json_object_object_add(body, "client_id", json_object_new_string(client));
	json_object_object_add(body, "prompt_id", json_object_new_string(p->id));
	/* Kept with the prompt in the server's queue and history: which job
	 * it is, for whoever looks there. */
	json_object_object_add(extra, "renderfs_job", json_object_new_string(id));
	json_object_object_add(body, "extra_data", extra);
	extra = NULL;
	const char *s = json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN |
								 JSON_C_TO_STRING_NOSLASHESCAPE);
	if (!s || !(text = strdup(s)))
		goto nomem;
	json_object_put(body);
	json_object_put(req);
	return text;
nomem:
	json_object_put(w);
	json_object_put(extra);
	json_object_put(body);
	json_object_put(req);
	*rc = run_fail(r, -ENOMEM, "store", "out of memory");
	return NULL;
}

static int submit(struct run *r, struct comfy_run *p);

/* Upload the next cas: input (POST /upload/image, multipart: the file,
 * type=input, overwrite=true: its name is its hash, so the same name is
 * the same bytes), or submit when all are there. */
static int upload_next(struct run *r, struct comfy_run *p)
{
	const struct comfy_conf *c = r->route->backend_state;
	char url[sizeof(c->svc.base) + 32], media[64], hex[2 * INDEX_HASH_LEN + 1], ctype[128];
	char boundary[40], head[512], tail[512];
	const char *hdrs[] = {ctype, "Accept: application/json"};
	uint8_t *data = NULL, rnd[12];
	size_t len = 0, hn, tn;
	char *body;
	int rc;

	if (p->up_at == p->nin)
		return submit(r, p);
	if ((rc = run_input_read(r, &p->in[p->up_at], &data, &len, media, sizeof(media))) != 0)
		return rc;
	b3_to_hex(p->in[p->up_at].hash, hex);
	randombytes_buf(rnd, sizeof(rnd));
	snprintf(boundary, sizeof(boundary), "renderfs");
	sodium_bin2hex(boundary + 8, sizeof(boundary) - 8, rnd, sizeof(rnd));
	snprintf(ctype, sizeof(ctype), "Content-Type: multipart/form-data; boundary=%s", boundary);
	hn = (size_t)snprintf(head, sizeof(head),
			      "--%s\r\nContent-Disposition: form-data; name=\"image\"; "
			      "filename=\"renderfs-%.32s.%s\"\r\nContent-Type: %s\r\n\r\n",
			      boundary, hex, route_media_ext(media), media);
	tn = (size_t)snprintf(tail, sizeof(tail),
			      "\r\n--%s\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\n"
			      "input\r\n--%s\r\nContent-Disposition: form-data; "
			      "name=\"overwrite\"\r\n\r\ntrue\r\n--%s--\r\n",
			      boundary, boundary, boundary);
	if (!(body = malloc(hn + len + tn))) {
		free(data);
		return run_fail(r, -ENOMEM, "store", "out of memory");
	}
	memcpy(body, head, hn);
	memcpy(body + hn, data, len);
	memcpy(body + hn + len, tail, tn);
	free(data);
	snprintf(url, sizeof(url), "%s/upload/image", c->svc.base);
	struct http_request rq = {
	    .method = "POST",
	    .url = url,
	    .headers = hdrs,
	    .nheaders = 2,
	    .body = body,
	    .body_len = hn + len + tn,
	    .timeout_ms = 120000,
	    .max_body = 1u << 16,
	};
	p->phase = C_UPLOAD;
	rc = run_http(r, &rq); /* copies the body */
	free(body);
	return rc;
}

/* The server's name for the upload: {"name", "subfolder", "type"}. */
static int on_uploaded(struct run *r, struct comfy_run *p, const struct http_response *h)
{
	json_object *o;
	const char *name, *sub;

	if (h->error_code)
		return svc_fail(r, h, "ComfyUI", "an input's upload");
	o = svc_parse(h->body, h->len);
	name = svc_str(o, "name");
	sub = svc_str(o, "subfolder");
	if (!name || !*name || strchr(name, '/') || strstr(name, "..") ||
	    (sub && (strstr(sub, "..") || sub[0] == '/')) ||
	    snprintf(p->in_name[p->up_at], sizeof(p->in_name[0]), "%s%s%s",
		     sub && *sub ? sub : "", sub && *sub ? "/" : "", name) >=
		(int)sizeof(p->in_name[0])) {
		json_object_put(o);
		return run_fail(r, -EBADMSG, "backend_failed",
				"ComfyUI took input '%s' but named it in no usable way",
				p->in[p->up_at].field);
	}
	json_object_put(o);
	run_log(r, "comfyui: input '%s' uploaded as %s", p->in[p->up_at].field,
		p->in_name[p->up_at]);
	p->up_at++;
	return upload_next(r, p);
}

static int submit(struct run *r, struct comfy_run *p)
{
	const struct comfy_conf *c = r->route->backend_state;
	char url[sizeof(c->svc.base) + 16], *body;
	int rc;

	new_id(p->id);
	p->sent = false;
	if (!(body = prompt_body(r, p, &rc)))
		return rc;
	if ((rc = handle_put(r, p)) != 0) {
		free(body);
		return run_fail(r, rc, "store", "cannot record the prompt's id: %s",
				store_lasterr());
	}
	snprintf(url, sizeof(url), "%s/prompt", c->svc.base);
	p->phase = C_SUBMIT;
	rc = request(r, "POST", url, body, 60000, 1u << 20);
	free(body);
	return rc;
}

/* ---- answers ---- */

/* 400 from POST /prompt: {"error": {"type", "message", "details"},
 * "node_errors": {"<id>": {"errors": [{"message", "details"}],
 * "class_type"}}}: backend_rejected naming the first node at fault. */
static int rejected(struct run *r, const struct http_response *h)
{
	json_object *o = svc_parse(h->body, h->len), *ne = NULL, *e = NULL;
	const char *what = NULL;

	if (run_handle_put(r, "", 0) != 0) /* nothing was queued */
		return run_fail(r, -EIO, "store", "cannot record the job: %s", store_lasterr());
	if (o && json_object_object_get_ex(o, "error", &e))
		what = json_object_is_type(e, json_type_string) ? json_object_get_string(e)
								 : svc_str(e, "message");
	if (o && json_object_object_get_ex(o, "node_errors", &ne) &&
	    json_object_is_type(ne, json_type_object)) {
		json_object_object_foreach(ne, node, v)
		{
			json_object *errs = NULL, *e0;
			const char *msg = NULL, *details = NULL, *cls = svc_str(v, "class_type");
			if (json_object_object_get_ex(v, "errors", &errs) &&
			    json_object_is_type(errs, json_type_array) &&
			    (e0 = json_object_array_get_idx(errs, 0)) != NULL) {
				msg = svc_str(e0, "message");
				details = svc_str(e0, "details");
			}
			run_fail(r, -EINVAL, "backend_rejected",
				 "ComfyUI refused the workflow: node %.60s (%.80s): %.200s%s%.200s",
				 node, cls ? cls : "?", msg ? msg : "invalid",
				 details && *details ? ": " : "", details ? details : "");
			json_object_put(o);
			return -EINVAL;
		}
	}
	run_fail(r, -EINVAL, "backend_rejected", "ComfyUI refused the workflow: %.300s",
		 what ? what : h->message);
	json_object_put(o);
	return -EINVAL;
}

static int on_submitted(struct run *r, struct comfy_run *p, const struct http_response *h)
{
	const struct comfy_conf *c = r->route->backend_state;
	json_object *o, *ne;
	const char *id;
	int rc;

	if (h->error_code) {
		if (h->status == 0 && h->maybe_sent) {
			/* The server may have it, under our id if it takes ids:
			 * look for it before anything else. */
			run_log(r, "comfyui: no answer to the submission of prompt %s (%s); looking "
				   "for it at the server",
				p->id, h->message);
			return get_history(r, p, C_HISTORY);
		}
		if (h->status == 400)
			return rejected(r, h);
		return svc_submit_failed(r, h, "ComfyUI", "the prompt's submission");
	}
	o = svc_parse(h->body, h->len);
	id = svc_str(o, "prompt_id");
	if (!id_ok(id)) {
		json_object_put(o);
		return run_fail(r, -EBADMSG, "interrupted",
				"ComfyUI queued the prompt but its answer has no usable prompt_id; "
				"it is not submitted again (ctl retry submits it anew)");
	}
	if (strcmp(id, p->id) != 0) {
		run_log(r, "comfyui: the server named the prompt %s itself", id);
		snprintf(p->id, sizeof(p->id), "%s", id);
	}
	p->sent = true;
	if ((rc = handle_put(r, p)) != 0) {
		json_object_put(o);
		return run_fail(r, rc, "store",
				"ComfyUI queued prompt %s but it cannot be recorded: %s", p->id,
				store_lasterr());
	}
	if (json_object_object_get_ex(o, "node_errors", &ne) &&
	    json_object_is_type(ne, json_type_object) && json_object_object_length(ne) > 0)
		run_log(r, "comfyui: the server queued prompt %s but reports errors in %d node%s "
			   "whose outputs it will not make",
			p->id, json_object_object_length(ne),
			json_object_object_length(ne) == 1 ? "" : "s");
	json_object_put(o);
	run_log(r, "comfyui: queued prompt %s", p->id);
	run_remote_set(r, p->id, NULL, RUN_REMOTE_SAME);
	p->watch = ws_watch(r, c->ws, c->svc.base, p->id);
	return run_after(r, svc_poll_begin(&p->poll));
}

/* Compare node ids as ComfyUI numbers them ("3" before "10"). */
static int node_cmp(const void *a, const void *b)
{
	const char *x = *(const char *const *)a, *y = *(const char *const *)b;
	size_t lx = strspn(x, "0123456789"), ly = strspn(y, "0123456789");

	if (lx && ly && !x[lx] && !y[ly] && lx != ly)
		return lx < ly ? -1 : 1;
	return strcmp(x, y);
}

/* Append to out (cap bytes) s percent-encoded for a query. */
static bool query_put(char *out, size_t cap, size_t *at, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		bool plain = (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') ||
			     (ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '_' || ch == '.' ||
			     ch == '~';
		if (*at + (plain ? 1 : 3) >= cap)
			return false;
		if (plain) {
			out[(*at)++] = (char)ch;
		} else {
			out[(*at)++] = '%';
			out[(*at)++] = hex[ch >> 4];
			out[(*at)++] = hex[ch & 15];
		}
	}
	out[*at] = '\0';
	return true;
}

/* Append "&name=value" (value NULL or "": nothing). */
static bool query_param(char *out, size_t cap, size_t *at, const char *name, const char *value)
{
	int n;

	if (!value || !*value)
		return true;
	n = snprintf(out + *at, cap - *at, "&%s=", name);
	if (n < 0 || (size_t)n >= cap - *at)
		return false;
	*at += (size_t)n;
	return query_put(out, cap, at, value);
}

/* The files of one node's output: each {filename, subfolder, type} in
 * its lists gets "file": its /view URL and is added. */
static int node_files(struct run *r, struct comfy_run *p, const char *node, json_object *out,
		      bool any_type)
{
	const struct comfy_conf *c = r->route->backend_state;

	json_object_object_foreach(out, list, files)
	{
		if (!json_object_is_type(files, json_type_array))
			continue;
		for (size_t i = 0; i < json_object_array_length(files); i++) {
			json_object *f = json_object_array_get_idx(files, i);
			const char *name = svc_str(f, "filename"), *sub = svc_str(f, "subfolder");
			const char *type = svc_str(f, "type");
			char url[SVC_FILE_URL_MAX];
			size_t at;
			if (!name)
				continue; /* not a file (text, flags) */
			if (!any_type && type && strcmp(type, "output") != 0)
				continue; /* previews */
			if (!*name || strchr(name, '/') || strstr(name, ".."))
				return run_fail(r, -EIO, "output_invalid",
						"ComfyUI's node %.60s names a file '%.100s' that is "
						"not a plain file name",
						node, name);
			at = (size_t)snprintf(url, sizeof(url), "%s/view?filename=", c->svc.base);
			if (at >= sizeof(url) || !query_put(url, sizeof(url), &at, name) ||
			    !query_param(url, sizeof(url), &at, "subfolder", sub) ||
			    !query_param(url, sizeof(url), &at, "type", type))
				return run_fail(r, -EIO, "output_invalid",
						"ComfyUI's node %.60s names a file whose URL would be "
						"over %d bytes",
						node, SVC_FILE_URL_MAX - 1);
			json_object_object_add(f, "file", json_object_new_string(url));
			if (svc_files_add(&p->sr.files, f, "file", 0, SVC_FILE_URL, NULL) != 0)
				return run_fail(r, -E2BIG, "output_invalid",
						"ComfyUI's prompt %s made more than %d files", p->id,
						SVC_FILES_MAX);
			(void)list;
		}
	}
	return 0;
}

/* The prompt ended with its history entry e (owned now). */
static int on_ended(struct run *r, struct comfy_run *p, json_object *e)
{
	const struct comfy_conf *c = r->route->backend_state;
	json_object *st = NULL, *outs = NULL, *msgs = NULL, *res;
	const char *how = NULL;
	int rc;

	if (json_object_object_get_ex(e, "status", &st))
		how = svc_str(st, "status_str");
	if (how && strcmp(how, "error") == 0) {
		/* messages: [["execution_error", {node_id, node_type,
		 * exception_type, exception_message}], ...] */
		json_object_object_get_ex(st, "messages", &msgs);
		json_object *m;
		for (size_t i = 0; (m = item(msgs, i)) != NULL; i++) {
			const char *kind = json_object_is_type(item(m, 0), json_type_string)
					       ? json_object_get_string(item(m, 0))
					       : NULL;
			json_object *d = item(m, 1);
			if (!kind || !json_object_is_type(d, json_type_object))
				continue;
			if (strcmp(kind, "execution_interrupted") == 0) {
				run_fail(r, -EIO, "cancelled_remotely",
					 "ComfyUI interrupted prompt %s at node %.60s (%.80s)", p->id,
					 svc_str(d, "node_id") ? svc_str(d, "node_id") : "?",
					 svc_str(d, "node_type") ? svc_str(d, "node_type") : "?");
				json_object_put(e);
				return -EIO;
			}
			if (strcmp(kind, "execution_error") == 0) {
				run_fail(r, -EIO, "backend_failed",
					 "ComfyUI prompt %s failed at node %.60s (%.80s): %.80s: %.300s",
					 p->id, svc_str(d, "node_id") ? svc_str(d, "node_id") : "?",
					 svc_str(d, "node_type") ? svc_str(d, "node_type") : "?",
					 svc_str(d, "exception_type") ? svc_str(d, "exception_type")
								      : "error",
					 svc_str(d, "exception_message")
					     ? svc_str(d, "exception_message")
					     : "no message");
				json_object_put(e);
				return -EIO;
			}
		}
		json_object_put(e);
		return run_fail(r, -EIO, "backend_failed", "ComfyUI prompt %s failed (no reason given)",
				p->id);
	}
	if (how && strcmp(how, "success") != 0) {
		run_fail(r, -EIO, "backend_failed", "ComfyUI prompt %s ended as '%.40s'", p->id, how);
		json_object_put(e);
		return -EIO;
	}
	/* result.json: what ComfyUI says of the prompt, less the workflow. */
	if (!(res = json_object_new_object())) {
		json_object_put(e);
		return run_fail(r, -ENOMEM, "store", "out of memory");
	}
	json_object_object_add(res, "prompt_id", json_object_new_string(p->id));
	if (json_object_object_get_ex(e, "outputs", &outs) &&
	    json_object_is_type(outs, json_type_object))
		json_object_object_add(res, "outputs", json_object_get(outs));
	if (st)
		json_object_object_add(res, "status", json_object_get(st));
	json_object_put(e);
	p->sr.files.result = res;
	if (!outs || !json_object_is_type(outs, json_type_object))
		return run_fail(r, -EIO, "output_invalid", "ComfyUI's prompt %s has no outputs",
				p->id);
	if (c->output_node[0]) {
		json_object *o;
		if (!json_object_object_get_ex(outs, c->output_node, &o) ||
		    !json_object_is_type(o, json_type_object))
			return run_fail(r, -EIO, "output_invalid",
					"ComfyUI's prompt %s has no output from node %s", p->id,
					c->output_node);
		if ((rc = node_files(r, p, c->output_node, o, true)) != 0)
			return rc;
	} else {
		const char *ids[256];
		size_t n = 0;
		json_object_object_foreach(outs, id, unused)
		{
			(void)unused;
			if (n < sizeof(ids) / sizeof(ids[0]))
				ids[n++] = id;
		}
		qsort(ids, n, sizeof(ids[0]), node_cmp);
		for (size_t i = 0; i < n; i++) {
			json_object *o;
			json_object_object_get_ex(outs, ids[i], &o);
			if (json_object_is_type(o, json_type_object) &&
			    (rc = node_files(r, p, ids[i], o, false)) != 0)
				return rc;
		}
	}
	if (p->sr.files.n == 0)
		return run_fail(r, -EIO, "output_invalid",
				"ComfyUI's prompt %s made no file%s%s", p->id,
				c->output_node[0] ? " at node " : "", c->output_node);
	run_remote_set(r, NULL, NULL, -1);
	run_log(r, "comfyui: prompt %s done; storing %zu file%s", p->id, p->sr.files.n,
		p->sr.files.n == 1 ? "" : "s");
	p->phase = C_FILES;
	return svc_files_start(r, &p->sr.files);
}

/* The server has the prompt after all (a submission never answered). */
static int found(struct run *r, struct comfy_run *p)
{
	const struct comfy_conf *c = r->route->backend_state;
	int rc;

	if (p->sent)
		return 0;
	p->sent = true;
	if ((rc = handle_put(r, p)) != 0)
		return run_fail(r, rc, "store", "cannot record prompt %s: %s", p->id,
				store_lasterr());
	run_log(r, "comfyui: the server has prompt %s; following it", p->id);
	run_remote_set(r, p->id, NULL, RUN_REMOTE_SAME);
	p->watch = ws_watch(r, c->ws, c->svc.base, p->id);
	return 0;
}

/* The prompt is nowhere at the server. */
static int lost(struct run *r, struct comfy_run *p)
{
	if (!p->sent)
		return run_fail(r, -EIO, "interrupted",
				"prompt %s was being submitted to ComfyUI when its answer was lost, "
				"and the server does not know it by that id (an older server names "
				"prompts itself); it is not submitted again (ctl retry submits it "
				"anew)",
				p->id);
	if (run_handle_put(r, "", 0) != 0)
		return run_fail(r, -EIO, "store", "cannot record the job: %s", store_lasterr());
	return run_fail(r, -EIO, "backend_unavailable",
			"ComfyUI no longer has prompt %s (not queued, not running, not in its "
			"history: the server restarted?); the next attempt submits it again",
			p->id);
}

/* An answer that is no use (h: busy or failed; NULL: not JSON). */
static int unusable(struct run *r, struct comfy_run *p, const struct http_response *h,
		    const char *what)
{
	int rc;

	if ((!h || strcmp(h->error_code, "backend_unavailable") == 0) &&
	    (rc = svc_poll_again(r, &p->poll, h)) != 0) {
		run_log(r, "comfyui: %s for prompt %s: %s; asking again", what, p->id,
			h ? h->message : "not a JSON object");
		return rc;
	}
	if (h)
		return svc_fail(r, h, "ComfyUI", what);
	return run_fail(r, -EBADMSG, "backend_unavailable",
			"ComfyUI's answers to %s for prompt %s are not JSON objects", what, p->id);
}

static int on_history(struct run *r, struct comfy_run *p, const struct http_response *h)
{
	const struct comfy_conf *c = r->route->backend_state;
	json_object *o, *e;
	int rc;

	if (h->error_code)
		return unusable(r, p, h, "history");
	if (!(o = svc_parse(h->body, h->len)))
		return unusable(r, p, NULL, "history");
	if (json_object_object_get_ex(o, p->id, &e) && json_object_is_type(e, json_type_object)) {
		json_object_get(e);
		json_object_put(o);
		if ((rc = found(r, p)) != 0) {
			json_object_put(e);
			return rc;
		}
		return on_ended(r, p, e);
	}
	json_object_put(o);
	if (p->phase == C_RECHECK)
		return lost(r, p);
	ws_progress(r, c->ws, p->watch, &p->frac, &p->said_ws);
	if (!p->sent || !p->queue_ms || now_ms() - p->queue_ms >= COMFY_QUEUE_EVERY_MS)
		return get_queue(r, p);
	return svc_poll_next(r, &p->poll);
}

/* Where the prompt is in the queue's list (queue_running or
 * queue_pending: [[number, prompt_id, ...], ...]): its number, or -1. */
static bool queue_find(json_object *list, const char *id, double *number)
{
	json_object *it;
	for (size_t i = 0; (it = item(list, i)) != NULL; i++) {
		const char *pid = json_object_get_string(item(it, 1));
		if (pid && json_object_is_type(item(it, 1), json_type_string) &&
		    strcmp(pid, id) == 0) {
			*number = json_object_get_double(item(it, 0));
			return true;
		}
	}
	return false;
}

static int on_queue(struct run *r, struct comfy_run *p, const struct http_response *h)
{
	const struct comfy_conf *c = r->route->backend_state;
	json_object *o, *run = NULL, *pend = NULL;
	double number;
	int rc;

	if (h->error_code)
		return unusable(r, p, h, "queue");
	if (!(o = svc_parse(h->body, h->len)))
		return unusable(r, p, NULL, "queue");
	json_object_object_get_ex(o, "queue_running", &run);
	json_object_object_get_ex(o, "queue_pending", &pend);
	if (!json_object_is_type(run, json_type_array) ||
	    !json_object_is_type(pend, json_type_array)) {
		json_object_put(o);
		return unusable(r, p, NULL, "queue");
	}
	p->queue_ms = now_ms();
	if (queue_find(run, p->id, &number)) {
		if (p->position != -1) {
			run_log(r, "comfyui: prompt %s is running", p->id);
			run_remote_set(r, NULL, NULL, -1);
		}
		p->position = -1;
	} else if (queue_find(pend, p->id, &number)) {
		/* Ahead of it: what runs, and what is pending with a lower number. */
		long ahead = (long)json_object_array_length(run);
		for (size_t i = 0; i < json_object_array_length(pend); i++) {
			json_object *n = item(item(pend, i), 0);
			if (json_object_get_double(n) < number)
				ahead++;
		}
		if (ahead != p->position) {
			p->position = ahead;
			run_log(r, "comfyui: prompt %s is queued with %ld ahead of it", p->id, ahead);
			run_remote_set(r, NULL, NULL, ahead);
		}
	} else {
		json_object_put(o);
		/* It may have ended since the history was read. */
		return get_history(r, p, C_RECHECK);
	}
	json_object_put(o);
	if ((rc = found(r, p)) != 0)
		return rc;
	ws_progress(r, c->ws, p->watch, &p->frac, &p->said_ws);
	return svc_poll_next(r, &p->poll);
}

static int comfy_start(struct run *r)
{
	const struct comfy_conf *c = r->route->backend_state;
	struct comfy_run *p;
	int rc;

	if (!(p = calloc(1, sizeof(*p))))
		return run_fail(r, -ENOMEM, "store", "out of memory");
	r->bstate = p;
	p->position = -2; /* nothing said yet */
	p->watch = -1;
	p->sr.files.service = "ComfyUI";
	rc = handle_get(r, p);
	if (rc == -EBADMSG)
		return run_fail(r, -EIO, "interrupted",
				"the job's record of its ComfyUI prompt is damaged; it is not "
				"submitted again (ctl retry submits it anew)");
	if (rc < 0)
		return run_fail(r, rc, "store", "cannot read the job's handle: %s",
				store_lasterr());
	if (rc == 0) {
		if ((rc = run_inputs(r, p->in, INDEX_INPUTS_MAX, &p->nin)) != 0)
			return rc;
		return upload_next(r, p);
	}
	svc_poll_begin(&p->poll);
	if (p->sent) {
		run_log(r, "comfyui: following prompt %s (queued before a restart)", p->id);
		p->watch = ws_watch(r, c->ws, c->svc.base, p->id);
	} else {
		run_log(r, "comfyui: prompt %s was being submitted when the daemon stopped; "
			   "looking for it at the server",
			p->id);
	}
	return get_history(r, p, C_HISTORY);
}

static int comfy_step(struct run *r)
{
	struct comfy_run *p = r->bstate;
	const struct http_response *h = r->http;

	if (!p)
		return comfy_start(r);
	if (!h) /* a poll's time (svc_poll_*, run_after) */
		return p->phase != C_FILES && p->phase != C_UPLOAD ? get_history(r, p, C_HISTORY)
					   : run_fail(r, -EIO, "backend_failed", "nothing to wait for");
	switch (p->phase) {
	case C_UPLOAD:
		return on_uploaded(r, p, h);
	case C_SUBMIT:
		return on_submitted(r, p, h);
	case C_HISTORY:
	case C_RECHECK:
		return on_history(r, p, h);
	case C_QUEUE:
		return on_queue(r, p, h);
	case C_FILES:
		return svc_files_answer(r, &p->sr.files, h);
	case C_DELETE:
	case C_CANCEL:
		break;
	}
	return run_fail(r, -EIO, "backend_failed", "the ComfyUI run is in no known phase");
}

/* Cancel: delete it from the queue, then cancel it by id if it runs. */
static int comfy_cancel(struct run *r)
{
	const struct comfy_conf *c = r->route->backend_state;
	struct comfy_run *p = r->bstate;
	char url[sizeof(c->svc.base) + 32 + COMFY_ID_MAX], body[COMFY_ID_MAX + 32];
	const struct http_response *h = r->http;

	if (!p || !p->id[0])
		return 0;
	if (!h) {
		snprintf(url, sizeof(url), "%s/queue", c->svc.base);
		snprintf(body, sizeof(body), "{\"delete\":[\"%s\"]}", p->id);
		p->phase = C_DELETE;
		return request(r, "POST", url, body, 10000, 0);
	}
	if (p->phase == C_DELETE) {
		if (h->error_code)
			run_log(r, "comfyui: removing prompt %s from the queue failed: %s", p->id,
				h->message);
		snprintf(url, sizeof(url), "%s/api/jobs/%s/cancel", c->svc.base, p->id);
		p->phase = C_CANCEL;
		return request(r, "POST", url, "{}", 10000, 0);
	}
	if (!h->error_code)
		run_log(r, "comfyui: prompt %s removed from the queue and cancelled", p->id);
	else if (h->status == 404 || h->status == 405)
		run_log(r, "comfyui: prompt %s removed from the queue; this server cannot cancel "
			   "one running prompt (no /api/jobs/{id}/cancel), so if it runs it runs "
			   "to its end (its global /interrupt would stop other jobs' prompts)",
			p->id);
	else
		run_log(r, "comfyui: cancelling prompt %s failed: %s", p->id, h->message);
	return 0;
}

static void comfy_run_free(struct run *r)
{
	const struct comfy_conf *c = r->route->backend_state;
	struct comfy_run *p = r->bstate;

	if (!p)
		return;
	ws_unwatch(c->ws, p->watch);
	svc_run_clear(&p->sr);
	free(p);
}

const struct backend backend_comfyui = {
    .name = "comfyui",
    .remote = true,
    .max_input = COMFY_INPUT_MAX,
    .configure = comfy_configure,
    .check = comfy_check,
    .step = comfy_step,
    .cancel = comfy_cancel,
    .run_free = comfy_run_free,
    .release = comfy_release,
};
