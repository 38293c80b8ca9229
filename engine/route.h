/*
 * route.h - the routes a mount serves: the built-in defaults of SPEC §8,
 * overridden or extended by a models file (SPEC §9).
 *
 * A route table is built once at mount time and read-only afterwards, so
 * any thread may read it without locks.
 */
#ifndef RENDERFS_ROUTE_H
#define RENDERFS_ROUTE_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ROUTE_PATH_MAX 255

struct backend;

struct route {
	char path[ROUTE_PATH_MAX + 1]; /* modality/family/model/task */
	const struct backend *backend; /* backend.h */
	void *backend_state;	    /* what its configure() kept */
	const char *origin;	    /* the file that last set the route, for messages */
	char media_type[64];	    /* of outputs, e.g. "video/mp4" */
	bool deterministic;	    /* same normalized request, same bytes */
	uint64_t timeout_ms;	    /* default run deadline */
	uint32_t max_attempts;	    /* runs before a transient failure is final */
	json_object *schema;	    /* JSON Schema of requests (schema.h subset) */
	char *schema_text;	    /* schema, pretty-printed, newline-terminated */
	json_object *settings;	    /* the backend's own settings, or NULL */
	char model_id[128];	    /* remote model name (fal: "fal-ai/wan-t2v") */
	uint32_t concurrency;	    /* jobs in flight at most (remote; 0: default 64) */
	uint32_t breaker;	    /* consecutive service failures that open its breaker */
	uint32_t breaker_s;	    /* first open period, doubling up to 10 minutes */
	uint64_t max_output;	    /* bytes of one output at most */
	bool cpu_only;		    /* local: never on a GPU worker (configure sets it) */
	/* The backend instance (a remote backend's configure sets it: base
	 * URL and model); routes with the same target share one circuit
	 * breaker. "" for local backends. */
	char target[768];
};

#define ROUTE_CONCURRENCY_DEFAULT 64
#define ROUTE_BREAKER_DEFAULT 5
#define ROUTE_BREAKER_S_DEFAULT 30
#define ROUTE_MAX_OUTPUT_DEFAULT (4ull << 30)

struct route_table {
	struct route *routes;
	size_t n;
	char *models_json; /* the models.json text served at the root */
	size_t models_len;
};

/*
 * Build the table: built-in routes, then the models file at path (NULL:
 * none), then each route's backend configures it. max_attempts is the
 * mount's default. Errors name the file, the route and the field in err.
 * Returns 0, -EINVAL or -errno.
 */
int route_table_load(struct route_table *t, const char *models_path, uint32_t max_attempts,
		     char *err, size_t errlen);
void route_table_release(struct route_table *t);

const struct route *route_find(const struct route_table *t, const char *path);

/* Output file extension for a media type: "png", "mp4", "y4m", or "bin". */
const char *route_media_ext(const char *media_type);

#endif
