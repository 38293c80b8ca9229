/*
 * route.c - the built-in routes and the models file.
 *
 * DESIGN
 * Built-in routes are JSON text compiled in, parsed through the same code
 * as a models file, so the defaults cannot drift from what a models file
 * could say. A models file entry replaces the built-in route of the same
 * path field by field (an entry naming only "timeout_s" keeps the rest).
 *
 * MODELS FILE (SPEC §9):
 *   {"routes": {"video/wan/default/t2v": {"backend": "fal",
 *     "model": "fal-ai/wan-t2v", "key_env": "FAL_KEY", "media_type": "video/mp4",
 *     "deterministic": false, "timeout_s": 600, "max_attempts": 3,
 *     "concurrency": 64, "breaker": 5, "breaker_s": 30, "max_output": 4294967296,
 *     "schema": {...}}}}
 */
#include "route.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "schema.h"

static const char builtin[] =
	"{\"routes\": {"
	"\"image/synth/default/t2i\": {\"backend\": \"synth\", \"media_type\": \"image/png\","
	" \"deterministic\": true, \"timeout_s\": 600, \"schema\": {\"type\": \"object\","
	" \"additionalProperties\": false, \"required\": [\"prompt\"], \"properties\": {"
	" \"prompt\": {\"type\": \"string\", \"maxLength\": 2000},"
	" \"negative_prompt\": {\"type\": \"string\", \"maxLength\": 2000},"
	" \"width\": {\"type\": \"integer\", \"minimum\": 64, \"maximum\": 4096, \"multipleOf\": 8,"
	" \"default\": 512},"
	" \"height\": {\"type\": \"integer\", \"minimum\": 64, \"maximum\": 4096, \"multipleOf\": 8,"
	" \"default\": 512},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 4294967295},"
	" \"format\": {\"type\": \"string\", \"enum\": [\"png\"], \"default\": \"png\"}}}},"
	"\"video/synth/default/t2v\": {\"backend\": \"synth\", \"media_type\": \"video/mp4\","
	" \"deterministic\": true, \"timeout_s\": 3600, \"schema\": {\"type\": \"object\","
	" \"additionalProperties\": false, \"required\": [\"prompt\"], \"properties\": {"
	" \"prompt\": {\"type\": \"string\", \"maxLength\": 2000},"
	" \"negative_prompt\": {\"type\": \"string\", \"maxLength\": 2000},"
	" \"width\": {\"type\": \"integer\", \"minimum\": 64, \"maximum\": 1920, \"multipleOf\": 8,"
	" \"default\": 640},"
	" \"height\": {\"type\": \"integer\", \"minimum\": 64, \"maximum\": 1080, \"multipleOf\": 8,"
	" \"default\": 360},"
	" \"num_frames\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 1000, \"default\": 48},"
	" \"fps\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 60, \"default\": 24},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 4294967295},"
	" \"format\": {\"type\": \"string\", \"enum\": [\"mp4\", \"y4m\"], \"default\": \"mp4\"}}}},"
	"\"video/wan/default/t2v\": {\"backend\": \"fal\", \"model\": \"fal-ai/wan-t2v\","
	" \"key_env\": \"FAL_KEY\", \"media_type\": \"video/mp4\", \"deterministic\": false,"
	" \"timeout_s\": 1800, \"schema\": {\"type\": \"object\", \"additionalProperties\": false,"
	" \"required\": [\"prompt\"], \"properties\": {"
	" \"prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"negative_prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"num_frames\": {\"type\": \"integer\", \"minimum\": 81, \"maximum\": 100, \"default\": 81},"
	" \"frames_per_second\": {\"type\": \"integer\", \"minimum\": 5, \"maximum\": 24,"
	" \"default\": 16},"
	" \"resolution\": {\"type\": \"string\", \"enum\": [\"480p\", \"580p\", \"720p\"],"
	" \"default\": \"480p\"},"
	" \"aspect_ratio\": {\"type\": \"string\", \"enum\": [\"16:9\", \"9:16\", \"1:1\"],"
	" \"default\": \"16:9\"},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 4294967295}}}},"
	/* fal-ai/qwen-image and fal-ai/mmaudio-v2: their inputs as fal's
	 * model pages give them (PROTOCOLS.md), so that a bad request fails
	 * at write(), not at the service. */
	"\"image/qwen/default/t2i\": {\"backend\": \"fal\", \"model\": \"fal-ai/qwen-image\","
	" \"key_env\": \"FAL_KEY\", \"media_type\": \"image/png\", \"deterministic\": false,"
	" \"timeout_s\": 600, \"schema\": {\"type\": \"object\", \"additionalProperties\": false,"
	" \"required\": [\"prompt\"], \"properties\": {"
	" \"prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"negative_prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"image_size\": {\"type\": \"string\", \"enum\": [\"square_hd\", \"square\","
	" \"portrait_4_3\", \"portrait_16_9\", \"landscape_4_3\", \"landscape_16_9\"],"
	" \"default\": \"landscape_4_3\"},"
	" \"num_inference_steps\": {\"type\": \"integer\", \"minimum\": 2, \"maximum\": 250,"
	" \"default\": 30},"
	" \"guidance_scale\": {\"type\": \"number\", \"minimum\": 0, \"maximum\": 20},"
	" \"num_images\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 4, \"default\": 1},"
	" \"output_format\": {\"type\": \"string\", \"enum\": [\"png\"], \"default\": \"png\"},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 4294967295}}}},"
	"\"audio/mmaudio/default/v2a\": {\"backend\": \"fal\", \"model\": \"fal-ai/mmaudio-v2\","
	" \"key_env\": \"FAL_KEY\", \"media_type\": \"video/mp4\", \"deterministic\": false,"
	" \"timeout_s\": 900, \"schema\": {\"type\": \"object\", \"additionalProperties\": false,"
	" \"required\": [\"video_url\", \"prompt\"], \"properties\": {"
	" \"video_url\": {\"type\": \"string\", \"maxLength\": 4096},"
	" \"prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"negative_prompt\": {\"type\": \"string\", \"maxLength\": 5000},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 65535},"
	" \"num_steps\": {\"type\": \"integer\", \"minimum\": 4, \"maximum\": 50, \"default\": 25},"
	" \"duration\": {\"type\": \"number\", \"minimum\": 1, \"maximum\": 30, \"default\": 8},"
	" \"cfg_strength\": {\"type\": \"number\", \"minimum\": 0, \"maximum\": 20},"
	" \"mask_away_clip\": {\"type\": \"boolean\", \"default\": false}}}}"
	"}}";

const char *route_media_ext(const char *media_type)
{
	static const char *const map[][2] = {
		{"image/png", "png"},	{"video/mp4", "mp4"},	  {"video/x-yuv4mpeg", "y4m"},
		{"image/jpeg", "jpg"},	{"image/webp", "webp"},	  {"video/webm", "webm"},
		{"audio/wav", "wav"},	{"model/gltf-binary", "glb"},
	};

	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strcmp(media_type, map[i][0]) == 0)
			return map[i][1];
	return "bin";
}

static int fail(char *err, size_t errlen, const char *file, const char *route, const char *msg)
{
	snprintf(err, errlen, "%s: route '%s': %s", file, route, msg);
	return -EINVAL;
}

/* A route path: four components matching the job-name rule. */
static int route_path_ok(const char *p)
{
	int parts = 0;

	for (const char *c = p; *c;) {
		size_t n = strcspn(c, "/");
		if (n == 0 || n > 64 || c[0] == '.' || c[0] == '-')
			return 0;
		for (size_t i = 0; i < n; i++)
			if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
				    c[i]))
				return 0;
		parts++;
		c += n;
		if (*c == '/' && *++c == '\0')
			return 0;
	}
	return parts == 4 && strlen(p) <= ROUTE_PATH_MAX;
}

static int apply(struct route *r, json_object *e, const char *file, char *err, size_t errlen)
{
	char msg[512];

	if (!json_object_is_type(e, json_type_object))
		return fail(err, errlen, file, r->path, "the entry must be an object");
	r->origin = file;
	json_object_object_foreach(e, k, v)
	{
		if (strcmp(k, "backend") == 0) {
			const struct backend *b = json_object_is_type(v, json_type_string)
							  ? backend_find(json_object_get_string(v))
							  : NULL;
			if (!b) {
				snprintf(msg, sizeof(msg), "'backend' must be one of %s",
					 backend_names());
				return fail(err, errlen, file, r->path, msg);
			}
			if (b != r->backend) {
				/* Another backend: the old one's settings mean nothing. */
				json_object_put(r->settings);
				r->settings = NULL;
			}
			r->backend = b;
		} else if (strcmp(k, "media_type") == 0 || strcmp(k, "model") == 0) {
			bool media = strcmp(k, "media_type") == 0;
			char *dst = media ? r->media_type : r->model_id;
			size_t cap = media ? sizeof(r->media_type) : sizeof(r->model_id);
			if (!json_object_is_type(v, json_type_string) ||
			    (size_t)json_object_get_string_len(v) >= cap ||
			    json_object_get_string_len(v) == 0) {
				snprintf(msg, sizeof(msg), "'%s' must be a string of 1 to %zu bytes", k,
					 cap - 1);
				return fail(err, errlen, file, r->path, msg);
			}
			snprintf(dst, cap, "%s", json_object_get_string(v));
		} else if (strcmp(k, "deterministic") == 0) {
			if (!json_object_is_type(v, json_type_boolean))
				return fail(err, errlen, file, r->path,
					    "'deterministic' must be true or false");
			r->deterministic = json_object_get_boolean(v);
		} else if (strcmp(k, "timeout_s") == 0 || strcmp(k, "max_attempts") == 0) {
			int64_t x = json_object_get_int64(v);
			if (!json_object_is_type(v, json_type_int) || x < 1 || x > 1000000) {
				snprintf(msg, sizeof(msg), "'%s' must be an integer from 1 to 1000000",
					 k);
				return fail(err, errlen, file, r->path, msg);
			}
			if (k[0] == 't')
				r->timeout_ms = (uint64_t)x * 1000;
			else
				r->max_attempts = (uint32_t)x;
		} else if (strcmp(k, "concurrency") == 0 || strcmp(k, "breaker") == 0 ||
			   strcmp(k, "breaker_s") == 0) {
			int64_t x = json_object_get_int64(v);
			if (!json_object_is_type(v, json_type_int) || x < 1 || x > 100000) {
				snprintf(msg, sizeof(msg), "'%s' must be an integer from 1 to 100000",
					 k);
				return fail(err, errlen, file, r->path, msg);
			}
			if (k[0] == 'c')
				r->concurrency = (uint32_t)x;
			else if (strcmp(k, "breaker") == 0)
				r->breaker = (uint32_t)x;
			else
				r->breaker_s = (uint32_t)x;
		} else if (strcmp(k, "max_output") == 0) {
			int64_t x = json_object_get_int64(v);
			if (!json_object_is_type(v, json_type_int) || x < 1 ||
			    x > (int64_t)(1ull << 40)) {
				snprintf(msg, sizeof(msg),
					 "'max_output' must be a number of bytes from 1 to 2^40");
				return fail(err, errlen, file, r->path, msg);
			}
			r->max_output = (uint64_t)x;
		} else if (strcmp(k, "schema") == 0) {
			char serr[256];
			if (schema_check(v, serr, sizeof(serr)) != 0) {
				snprintf(msg, sizeof(msg), "'schema': %s", serr);
				return fail(err, errlen, file, r->path, msg);
			}
			json_object_put(r->schema);
			r->schema = json_object_get(v);
		} else {
			/* The backend's own settings (base_url, key, key_env, ...):
			 * its configure() checks them once the table is built. */
			if (!r->settings && !(r->settings = json_object_new_object()))
				return -ENOMEM;
			json_object_object_add(r->settings, k, json_object_get(v));
		}
	}
	return 0;
}

static int load_text(struct route_table *t, const char *text, size_t len, const char *file,
		     uint32_t max_attempts, char *err, size_t errlen)
{
	json_tokener *tok = json_tokener_new_ex(32);
	json_object *root, *routes;
	int rc = 0;

	if (!tok)
		return -ENOMEM;
	root = json_tokener_parse_ex(tok, text, (int)len);
	if (!root || json_tokener_get_error(tok) != json_tokener_success) {
		snprintf(err, errlen, "%s: not valid JSON: %s", file,
			 json_tokener_error_desc(json_tokener_get_error(tok)));
		rc = -EINVAL;
		goto out;
	}
	if (!json_object_object_get_ex(root, "routes", &routes) ||
	    !json_object_is_type(routes, json_type_object)) {
		snprintf(err, errlen, "%s: needs an object \"routes\" mapping route paths to entries",
			 file);
		rc = -EINVAL;
		goto out;
	}
	json_object_object_foreach(routes, path, entry)
	{
		struct route *r = (struct route *)route_find(t, path);

		if (!route_path_ok(path)) {
			rc = fail(err, errlen, file, path,
				  "a route is modality/family/model/task, each part [A-Za-z0-9._-]");
			goto out;
		}
		if (!r) {
			struct route *nr = realloc(t->routes, (t->n + 1) * sizeof(*nr));
			if (!nr) {
				rc = -ENOMEM;
				goto out;
			}
			t->routes = nr;
			r = &nr[t->n++];
			memset(r, 0, sizeof(*r));
			snprintf(r->path, sizeof(r->path), "%s", path);
			r->max_attempts = max_attempts;
			r->timeout_ms = 3600 * 1000;
			r->concurrency = ROUTE_CONCURRENCY_DEFAULT;
			r->breaker = ROUTE_BREAKER_DEFAULT;
			r->breaker_s = ROUTE_BREAKER_S_DEFAULT;
			r->max_output = ROUTE_MAX_OUTPUT_DEFAULT;
			r->backend = NULL;
		}
		if ((rc = apply(r, entry, file, err, errlen)) != 0)
			goto out;
		if (!r->backend) {
			rc = fail(err, errlen, file, path, "'backend' is required for a new route");
			goto out;
		}
		if (!r->media_type[0]) {
			rc = fail(err, errlen, file, path, "'media_type' is required for a new route");
			goto out;
		}
		if (!r->schema) {
			rc = fail(err, errlen, file, path, "'schema' is required for a new route");
			goto out;
		}
	}
out:
	if (root)
		json_object_put(root);
	json_tokener_free(tok);
	return rc;
}

static int render_texts(struct route_table *t)
{
	json_object *all = json_object_new_object(), *routes = json_object_new_array();

	if (!all || !routes)
		goto nomem;
	json_object_object_add(all, "routes", routes);
	for (size_t i = 0; i < t->n; i++) {
		struct route *r = &t->routes[i];
		json_object *o = json_object_new_object();
		const char *s;

		s = json_object_to_json_string_ext(r->schema, JSON_C_TO_STRING_PRETTY |
								      JSON_C_TO_STRING_SPACED |
								      JSON_C_TO_STRING_NOSLASHESCAPE);
		if (!o || !s || asprintf(&r->schema_text, "%s\n", s) < 0) {
			json_object_put(o);
			goto nomem;
		}
		json_object_object_add(o, "route", json_object_new_string(r->path));
		json_object_object_add(o, "backend", json_object_new_string(r->backend->name));
		if (r->model_id[0])
			json_object_object_add(o, "model", json_object_new_string(r->model_id));
		json_object_object_add(o, "media_type", json_object_new_string(r->media_type));
		json_object_object_add(o, "deterministic",
				       json_object_new_boolean(r->deterministic));
		json_object_object_add(o, "timeout_s",
				       json_object_new_int64((int64_t)(r->timeout_ms / 1000)));
		json_object_object_add(o, "max_attempts", json_object_new_int64(r->max_attempts));
		if (r->backend->remote) {
			json_object_object_add(o, "concurrency",
					       json_object_new_int64(r->concurrency));
			json_object_object_add(o, "breaker", json_object_new_int64(r->breaker));
			json_object_object_add(o, "breaker_s", json_object_new_int64(r->breaker_s));
		}
		json_object_object_add(o, "max_output", json_object_new_int64((int64_t)r->max_output));
		json_object_object_add(o, "schema", json_object_get(r->schema));
		json_object_array_add(routes, o);
	}
	const char *text = json_object_to_json_string_ext(
		all, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
	if (!text || asprintf(&t->models_json, "%s\n", text) < 0)
		goto nomem;
	t->models_len = strlen(t->models_json);
	json_object_put(all);
	return 0;
nomem:
	json_object_put(all);
	return -ENOMEM;
}

static int cmp_route(const void *a, const void *b)
{
	return strcmp(((const struct route *)a)->path, ((const struct route *)b)->path);
}

static const char builtin_file[] = "built-in routes";

int route_table_load(struct route_table *t, const char *models_path, uint32_t max_attempts,
		     char *err, size_t errlen)
{
	int rc;

	memset(t, 0, sizeof(*t));
	rc = load_text(t, builtin, sizeof(builtin) - 1, builtin_file, max_attempts, err, errlen);
	if (rc == 0 && models_path) {
		FILE *f = fopen(models_path, "re");
		char *text = NULL;
		size_t cap = 0;
		ssize_t len;

		if (!f) {
			rc = -errno;
			snprintf(err, errlen, "cannot open models file '%s': %s", models_path,
				 strerror(errno));
		} else {
			len = getdelim(&text, &cap, '\0', f);
			if (len < 0 && ferror(f)) {
				rc = -EIO;
				snprintf(err, errlen, "cannot read models file '%s'", models_path);
			} else {
				rc = load_text(t, text ? text : "", len > 0 ? (size_t)len : 0,
					       models_path, max_attempts, err, errlen);
			}
			free(text);
			fclose(f);
		}
	}
	for (size_t i = 0; rc == 0 && i < t->n; i++) {
		struct route *r = &t->routes[i];
		char msg[512];

		rc = r->backend->configure(r, r->settings, &r->backend_state, msg, sizeof(msg));
		if (rc == -EINVAL)
			fail(err, errlen, r->origin, r->path, msg);
		else if (rc)
			snprintf(err, errlen, "route '%s': %s", r->path, strerror(-rc));
	}
	if (rc == 0) {
		qsort(t->routes, t->n, sizeof(*t->routes), cmp_route);
		rc = render_texts(t);
	}
	if (rc)
		route_table_release(t);
	return rc;
}

void route_table_release(struct route_table *t)
{
	for (size_t i = 0; i < t->n; i++) {
		const struct backend *b = t->routes[i].backend;
		if (b && b->release && t->routes[i].backend_state)
			b->release(t->routes[i].backend_state);
		json_object_put(t->routes[i].schema);
		json_object_put(t->routes[i].settings);
		free(t->routes[i].schema_text);
	}
	free(t->routes);
	free(t->models_json);
	memset(t, 0, sizeof(*t));
}

const struct route *route_find(const struct route_table *t, const char *path)
{
	for (size_t i = 0; i < t->n; i++)
		if (strcmp(t->routes[i].path, path) == 0)
			return &t->routes[i];
	return NULL;
}
