/*
 * errors.h - the catalog of job error codes (SPEC §8): every `error.code`
 * a job can end with, and whether a failure with it is retried (with
 * backoff, up to the route's max_attempts). The README's table is this
 * one; a backend names a code and the catalog decides.
 */
#ifndef RENDERFS_ERRORS_H
#define RENDERFS_ERRORS_H

#include <stdbool.h>
#include <stddef.h>

struct error_def {
	const char *code;
	bool retried;
	const char *meaning;
};

/* The catalog entry of code, or NULL for a code not in it. */
const struct error_def *error_find(const char *code);
/* All entries (for the README test and stats). */
const struct error_def *error_catalog(size_t *n);

#endif
