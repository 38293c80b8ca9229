/*
 * jobview.c - what a job looks like from outside: status.json and
 * manifest.json, built from the job's record (and its stored request), so
 * that the files under the mount and, later, webhooks say the same thing,
 * and a finished job's manifest does not change with the configuration.
 *
 * Threads: any (reads the index in its own transactions).
 */
#include "jobview.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "blake3.h"
#include "err.h"
#include "route.h"
#include "sign.h"
#include "store.h"

int dup_text(char **out, size_t *len, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vasprintf(out, fmt, ap);
	va_end(ap);
	if (n < 0) {
		*out = NULL;
		return -ENOMEM;
	}
	*len = (size_t)n;
	return 0;
}

int jobview_json_text(json_object *o, char **out, size_t *len)
{
	const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
								  JSON_C_TO_STRING_SPACED |
								  JSON_C_TO_STRING_NOSLASHESCAPE);
	int rc = s ? dup_text(out, len, "%s\n", s) : -ENOMEM;

	json_object_put(o);
	return rc;
}

static json_object *time_or_null(uint64_t ms)
{
	char ts[32];

	if (!ms)
		return NULL;
	engine_time_format(ms, ts);
	return json_object_new_string(ts);
}

void jobview_progress_text(uint16_t t, char *buf, size_t len)
{
	if (t >= 1000) {
		snprintf(buf, len, "1");
		return;
	}
	if (t == 0) {
		snprintf(buf, len, "0");
		return;
	}
	snprintf(buf, len, "0.%03u", t);
	for (size_t n = strlen(buf); buf[n - 1] == '0'; n--)
		buf[n - 1] = '\0';
}

/* What a remote service said of the job (index `remote`), or NULL. */
static json_object *remote_info(struct engine *e, const struct job *j)
{
	void *text = NULL;
	size_t len = 0;
	json_object *o = NULL;
	json_tokener *tok;

	if (index_job_remote_get(store_index(engine_store(e)), j->id, &text, &len) != 0)
		return NULL;
	if ((tok = json_tokener_new_ex(4)) != NULL) {
		o = json_tokener_parse_ex(tok, text, (int)len);
		json_tokener_free(tok);
	}
	free(text);
	if (o && !json_object_is_type(o, json_type_object)) {
		json_object_put(o);
		o = NULL;
	}
	return o;
}

int jobview_position(struct engine *e, const struct job *j, uint64_t *pos)
{
	if (j->status == JOB_RUNNING) {
		/* Its place in a remote service's queue, while it has one. */
		json_object *o = remote_info(e, j), *v;
		int rc = STORE_E_STATE;
		if (o && json_object_object_get_ex(o, "position", &v) &&
		    json_object_is_type(v, json_type_int) && json_object_get_int64(v) >= 0) {
			*pos = (uint64_t)json_object_get_int64(v);
			rc = 0;
		}
		json_object_put(o);
		return rc;
	}
	if (j->status != JOB_QUEUED || (j->flags & JOB_F_DELAYED))
		return STORE_E_STATE; /* a delayed retry is in no queue yet */
	return index_queue_position(store_index(engine_store(e)), j->id, pos);
}

/* The "output" object of status.json and manifest.json. */
static json_object *output_json(const struct job *j)
{
	json_object *output = json_object_new_object();
	char name[96], hex[65];

	b3_to_hex(j->output_hash, hex);
	snprintf(name, sizeof(name), "output.%s", route_media_ext(j->media_type));
	json_object_object_add(output, "blake3", json_object_new_string(hex));
	json_object_object_add(output, "media_type", json_object_new_string(j->media_type));
	json_object_object_add(output, "name", json_object_new_string(name));
	json_object_object_add(output, "size", json_object_new_int64((int64_t)j->output_size));
	return output;
}

/* Every output in order (SPEC §3: output.<ext>, output.1.<ext>, ...). */
static json_object *outputs_json(struct engine *e, const struct job *j)
{
	json_object *arr = json_object_new_array();
	struct job_output *x = NULL;
	size_t n = 0;

	if (!arr)
		return NULL;
	json_object_array_add(arr, output_json(j));
	if ((j->flags & JOB_F_EXTRAS) && (x = calloc(INDEX_EXTRAS_MAX, sizeof(*x))) &&
	    index_job_extras(store_index(engine_store(e)), j->id, x, INDEX_EXTRAS_MAX, &n) == 0) {
		for (size_t i = 0; i < n; i++) {
			json_object *o = json_object_new_object();
			char name[96], hex[65];
			b3_to_hex(x[i].hash, hex);
			snprintf(name, sizeof(name), "output.%zu.%s", i + 1,
				 route_media_ext(x[i].media_type));
			json_object_object_add(o, "blake3", json_object_new_string(hex));
			json_object_object_add(o, "media_type",
					       json_object_new_string(x[i].media_type));
			json_object_object_add(o, "name", json_object_new_string(name));
			json_object_object_add(o, "size", json_object_new_int64((int64_t)x[i].size));
			json_object_array_add(arr, o);
		}
	}
	free(x);
	return arr;
}

int jobview_status_json(struct engine *e, const struct job *j, char **out, size_t *len)
{
	json_object *o = json_object_new_object(), *err = NULL, *output = NULL;
	char id[JOB_ID_STR_LEN + 1], prog[16], wait[512] = "";
	uint64_t pos;

	if (!o)
		return -ENOMEM;
	ulid_format(j->id, id);
	jobview_progress_text(j->progress, prog, sizeof(prog));
	if (j->status == JOB_ERROR) {
		err = json_object_new_object();
		json_object_object_add(err, "code", json_object_new_string(j->error_code));
		json_object_object_add(err, "message", json_object_new_string(j->error_message));
	}
	if (j->flags & (JOB_F_HAS_OUTPUT | JOB_F_OUTPUT_RELEASED))
		output = output_json(j);
	json_object_object_add(o, "attempts", json_object_new_int64(j->attempts));
	json_object_object_add(o, "cached", json_object_new_boolean(j->flags & JOB_F_CACHED));
	json_object_object_add(o, "completed_at", time_or_null(j->completed_ms));
	json_object_object_add(o, "created_at", time_or_null(j->created_ms));
	json_object_object_add(o, "device", j->device[0] ? json_object_new_string(j->device) : NULL);
	json_object_object_add(o, "error", err);
	json_object_object_add(o, "id", json_object_new_string(id));
	if (j->name[0])
		json_object_object_add(o, "name", json_object_new_string(j->name));
	json_object_object_add(o, "output", output);
	json_object_object_add(o, "outputs", output ? outputs_json(e, j) : NULL);
	json_object_object_add(o, "owner", json_object_new_int64(j->uid));
	json_object_object_add(o, "position", jobview_position(e, j, &pos) == 0
						     ? json_object_new_int64((int64_t)pos)
						     : NULL);
	json_object_object_add(o, "priority", json_object_new_string(job_priority_name(j->priority)));
	json_object_object_add(o, "progress", json_object_new_double_s(j->progress / 1000.0, prog));
	json_object_object_add(o, "retry_at",
			       time_or_null(j->status == JOB_QUEUED && (j->flags & JOB_F_DELAYED)
						    ? j->round
						    : 0));
	json_object_object_add(o, "route", json_object_new_string(j->route));
	{
		/* What its attempts used, as the usage ledger counts it. */
		json_object *u = json_object_new_object();
		char secs[32];
		snprintf(secs, sizeof(secs), "%llu.%03u", (unsigned long long)(j->run_ms / 1000),
			 (unsigned)(j->run_ms % 1000));
		json_object_object_add(u, "seconds",
				       json_object_new_double_s((double)j->run_ms / 1000, secs));
		json_object_object_add(u, "device",
				       j->ran_on && j->ran_on[0] ? json_object_new_string(j->ran_on)
								 : NULL);
		json_object_object_add(o, "usage", u);
	}
	json_object_object_add(o, "started_at", time_or_null(j->started_ms));
	json_object_object_add(o, "status", json_object_new_string(job_status_name(j->status)));
	if (j->status == JOB_QUEUED)
		engine_waiting_for(e, j->route, wait, sizeof(wait));
	json_object_object_add(o, "waiting_for", wait[0] ? json_object_new_string(wait) : NULL);
	return jobview_json_text(o, out, len);
}

int jobview_manifest_json(struct engine *e, const struct job *j, char **out, size_t *len)
{
	json_object *o = json_object_new_object(), *output, *req = NULL, *seed = NULL;
	char id[JOB_ID_STR_LEN + 1], hex[65], keyid[SIGN_KEYID_LEN + 1];
	uint8_t rh[32];
	struct sign_pubkey pk;
	const struct route *r = route_find(engine_routes(e), j->route);
	struct store *st = engine_store(e);
	char *text = NULL;
	size_t tlen = 0;
	int rc;

	if (!o)
		return -ENOMEM;
	if ((rc = index_job_request(store_index(st), j->id, &text, &tlen)) != 0) {
		json_object_put(o);
		return rc;
	}
	/* The hash of request.json as served (with its newline). */
	{
		struct b3_hasher h;
		b3_hasher_init(&h);
		b3_hasher_update(&h, text, tlen);
		b3_hasher_update(&h, "\n", 1);
		b3_hasher_finalize(&h, rh, sizeof(rh));
	}
	req = json_tokener_parse(text);
	free(text);
	if (req && json_object_object_get_ex(req, "seed", &seed))
		json_object_get(seed);
	json_object_put(req);
	ulid_format(j->id, id);
	store_pubkey(st, &pk);
	sign_keyid(pk.keynum, keyid);
	output = output_json(j);
	/* As recorded when it ran (jobs run before index format 6 recorded
	 * nothing: their route's backend now). */
	json_object_object_add(o, "backend",
			       json_object_new_string(j->backend && j->backend[0] ? j->backend
						      : r			    ? r->backend->name
										    : "unknown"));
	if (j->model && j->model[0])
		json_object_object_add(o, "model", json_object_new_string(j->model));
	{
		/* What the service said: its request id, the model version. */
		json_object *ri = remote_info(e, j), *v;
		if (ri && json_object_object_get_ex(ri, "model_version", &v))
			json_object_object_add(o, "model_version", json_object_get(v));
		if (ri && json_object_object_get_ex(ri, "request_id", &v))
			json_object_object_add(o, "remote_request_id", json_object_get(v));
		json_object_put(ri);
	}
	json_object_object_add(o, "cached", json_object_new_boolean(j->flags & JOB_F_CACHED));
	json_object_object_add(o, "completed_at", time_or_null(j->completed_ms));
	json_object_object_add(o, "created_at", time_or_null(j->created_ms));
	json_object_object_add(o, "device", json_object_new_string(j->device));
	json_object_object_add(o, "engine", json_object_new_string(ENGINE_VERSION));
	{
		/* The blobs its request named (SPEC §3): the chain of a pipeline. */
		struct job_input in[INDEX_INPUTS_MAX];
		size_t n = 0;
		if (index_job_inputs(store_index(st), j->id, in, INDEX_INPUTS_MAX, &n) == 0 && n) {
			json_object *arr = json_object_new_array();
			for (size_t i = 0; i < n; i++) {
				json_object *x = json_object_new_object();
				char h[65];
				b3_to_hex(in[i].hash, h);
				json_object_object_add(x, "blake3", json_object_new_string(h));
				json_object_object_add(x, "field", json_object_new_string(in[i].field));
				static const uint8_t none[JOB_ID_LEN];
				if (memcmp(in[i].made_by, none, JOB_ID_LEN) != 0) {
					/* The job whose output it was: the next link. */
					char mid[JOB_ID_STR_LEN + 1];
					ulid_format(in[i].made_by, mid);
					json_object_object_add(x, "job", json_object_new_string(mid));
				}
				json_object_object_add(x, "size",
						       json_object_new_int64((int64_t)in[i].size));
				json_object_array_add(arr, x);
			}
			json_object_object_add(o, "inputs", arr);
		}
	}
	json_object_object_add(o, "job", json_object_new_string(id));
	json_object_object_add(o, "key_id", json_object_new_string(keyid));
	json_object_object_add(o, "output", output);
	if (j->flags & JOB_F_EXTRAS)
		json_object_object_add(o, "outputs", outputs_json(e, j));
	b3_to_hex(rh, hex);
	json_object_object_add(o, "request_blake3", json_object_new_string(hex));
	json_object_object_add(o, "route", json_object_new_string(j->route));
	json_object_object_add(o, "seed", seed);
	json_object_object_add(o, "started_at", time_or_null(j->started_ms));
	return jobview_json_text(o, out, len);
}

void jobview_manifest_trusted(const struct job *j, const char *m, size_t mlen, char *buf,
			     size_t len)
{
	char id[JOB_ID_STR_LEN + 1], hex[65];
	uint8_t h[32];

	ulid_format(j->id, id);
	b3_hash(m, mlen, h);
	b3_to_hex(h, hex);
	snprintf(buf, len, "renderfs job=%s route=%s manifest blake3=%s size=%zu", id, j->route,
		 hex, mlen);
}
