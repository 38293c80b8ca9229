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
 *              (the caller adds the file and the route).
 *   check      at submit, after the schema: refuse a request the backend
 *              could never run, so that a job never fails on what it could
 *              have refused (NULL: nothing beyond the schema).
 *   run        in a worker: the job's work (engine_i.h: struct run).
 *   release    at unmount: free what configure kept (NULL: nothing).
 *
 * Threads: configure and release run on the mounting thread before the
 * engine starts and after it stops; check on FUSE handler threads; run on
 * workers. check and run may share the route's state read-only.
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
	int (*configure)(const struct route *rt, json_object *settings, void **state, char *err,
			 size_t errlen);
	int (*check)(const struct route *rt, const char *request, size_t len, char *err,
		     size_t errlen);
	int (*run)(struct run *r);
	void (*release)(void *state);
};

/* The backend of that name, or NULL. */
const struct backend *backend_find(const char *name);
/* The registered names, ", "-separated, for messages. */
const char *backend_names(void);

/* A setting a backend takes: its name and JSON type. */
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
