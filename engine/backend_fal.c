/*
 * backend_fal.c - fal's queue API (SPEC §8) as a backend.
 *
 * NOT BUILT YET: the queue protocol (submit, status, result, cancel). The
 * settings are checked at mount; a job ends with backend_not_configured
 * and a message that says what is missing (a key) or that this version
 * cannot run it, never silently.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "engine_i.h"
#include "route.h"

extern const struct backend backend_fal;

struct fal_conf {
	char key_env[128]; /* where the key is, without "key" */
	bool have_key;	   /* "key" given in the models file */
};

static const struct backend_setting fal_takes[] = {
	{"base_url", json_type_string},
	{"key", json_type_string},
	{"key_env", json_type_string},
};

static int fal_configure(const struct route *rt, json_object *settings, void **state,
			 char *err, size_t errlen)
{
	struct fal_conf *c;
	json_object *v;
	int rc = backend_settings_check(&backend_fal, settings, fal_takes,
					sizeof(fal_takes) / sizeof(fal_takes[0]), err, errlen);

	if (rc)
		return rc;
	if (!rt->model_id[0]) {
		snprintf(err, errlen, "'model' is required for the fal backend (e.g. fal-ai/wan-t2v)");
		return -EINVAL;
	}
	if (!(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	snprintf(c->key_env, sizeof(c->key_env), "FAL_KEY");
	if (settings && json_object_object_get_ex(settings, "key_env", &v)) {
		if (json_object_get_string_len(v) == 0 ||
		    (size_t)json_object_get_string_len(v) >= sizeof(c->key_env)) {
			free(c);
			snprintf(err, errlen, "'key_env' must name an environment variable");
			return -EINVAL;
		}
		snprintf(c->key_env, sizeof(c->key_env), "%s", json_object_get_string(v));
	}
	c->have_key = settings && json_object_object_get_ex(settings, "key", NULL);
	*state = c;
	return 0;
}

static int fal_run(struct run *r)
{
	const struct fal_conf *c = r->route->backend_state;
	const char *env = c->key_env;
	bool have_key = c->have_key;

	if (!have_key) {
		const char *k = getenv(env);
		have_key = k && *k;
	}
	if (!have_key)
		return run_fail(r, -ENOTCONN, "backend_not_configured",
				"route %s needs the fal backend with an API key: set %s in the "
				"daemon's environment or \"key\" for this route in a models file "
				"(models=FILE)",
				r->route->path, env);
	return run_fail(r, -ENOTSUP, "backend_not_configured",
			"route %s uses the fal backend (model %s), which this version of "
			"renderfs cannot run yet; use image/synth/default/t2i or "
			"video/synth/default/t2v",
			r->route->path, r->route->model_id[0] ? r->route->model_id : "unset");
}

const struct backend backend_fal = {
	.name = "fal",
	.remote = true,
	.configure = fal_configure,
	.run = fal_run,
	.release = free,
};
