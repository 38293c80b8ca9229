/*
 * backend.h - what a backend is (SPEC §8), and the registry of them.
 *
 * A backend is one file (backend_<name>.c) defining one struct backend,
 * and one line in the registry (backend.c). The engine knows backends only
 * through this interface:
 *
 *   configure  at mount, once per route: check the route's own settings
 *              (the models file's keys that are not route fields) and keep
 *              what run() needs in *state. An unknown key, or one of the
 *              wrong type, fails the mount; the message names the field
 *              (the caller adds the file and the route). A remote backend
 *              sets rt->target (base URL and model): routes with the same
 *              target share one circuit breaker.
 *   check      at submit, after the schema: refuse a request the backend
 *              could never run, so that a job never fails on what it could
 *              have refused (NULL: nothing beyond the schema).
 *   run        local backends, in a worker: the job's work (engine_i.h:
 *              struct run), start to end.
 *   step       remote backends instead of run: a run is a series of steps,
 *              and between them it holds no thread. A step does what can
 *              be done now, then either returns RUN_WAIT after arranging
 *              exactly one next call (run_http: when the answer is in;
 *              run_after: after a while), or ends the run like run().
 *              The first step has r->bstate NULL; a later one finds what
 *              the earlier left there and the answer in r->http.
 *   cancel     remote, optional: the run must stop (cancelled, or past its
 *              deadline); stop the work at the service. Called first with
 *              r->http NULL; it may start a request (run_http, RUN_WAIT)
 *              and is then called again with its answer, and may start
 *              another, one at a time, until it returns. Not called at shutdown: the work goes on at the
 *              service and a later mount follows it (run_handle_get).
 *   run_free   remote: free r->bstate when the run is over (NULL: free()).
 *   release    at unmount: free what configure kept (NULL: nothing).
 *
 * Threads: configure and release run on the mounting thread before the
 * engine starts and after it stops; check on FUSE handler threads; run on
 * workers; step, cancel and run_free on the engine's remote threads, one
 * call at a time per run. check, run and step may share the route's state
 * read-only.
 */
#ifndef RENDERFS_BACKEND_H
#define RENDERFS_BACKEND_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

struct route;
struct run;

struct backend {
	const char *name; /* as a models file's "backend" says it */
	bool remote;	  /* a service does the work: the remote worker group */
	/* The envelope "credentials" names it takes (NULL-terminated; NULL:
	 * none), given to it through run_credential (SPEC §7). */
	const char *const *credentials;
	/* Bytes of one cas: input it can take (0: inputs refused; UINT64_MAX:
	 * no bound of its own). A larger one is refused at submit. */
	uint64_t max_input;
	int (*configure)(struct route *rt, json_object *settings, void **state, char *err,
			 size_t errlen);
	int (*check)(const struct route *rt, const char *request, size_t len, char *err,
		     size_t errlen);
	int (*run)(struct run *r);
	int (*step)(struct run *r);
	int (*cancel)(struct run *r);
	void (*run_free)(struct run *r);
	void (*release)(void *state);
};

/* The backend of that name, or NULL. */
const struct backend *backend_find(const char *name);
/* The registered names, ", "-separated, for messages. */
const char *backend_names(void);

/* A setting a backend takes: its name and JSON type (json_type_null: of
 * more than one type, which the backend checks itself). */
struct backend_setting {
	const char *name;
	json_type type;
};

/*
 * Check settings (NULL: none) against the n settings backend b takes:
 * 0, or -EINVAL with err naming the first unknown or mistyped field.
 */
int backend_settings_check(const struct backend *b, json_object *settings,
			   const struct backend_setting *takes, size_t n, char *err, size_t errlen);

#endif
