/*
 * errors.c - the error catalog (errors.h). Adding a code: one line here and
 * one row in the README's table (tests/unit/test_schema.c compares them).
 */
#include "errors.h"

#include <string.h>

static const struct error_def catalog[] = {
	{"invalid_request", false, "the backend refused the request as it is"},
	{"input_not_found", false, "a cas: input is not in the store"},
	{"input_too_large", false, "an input is over the backend's limit"},
	{"backend_not_configured", false, "the route's backend lacks a setting or a key, or the "
					  "route is no longer configured"},
	{"backend_auth", false, "the service refused the credentials"},
	{"backend_rejected", false, "the service refused the request (4xx but 408 and 429)"},
	{"backend_unavailable", true, "the service could not be reached or was busy (connection, "
				      "DNS, TLS, 408, 429, 5xx, timeouts)"},
	{"backend_failed", false, "the service ran the job and it failed"},
	{"output_invalid", false, "the output is missing, empty, too large or not the media type"},
	{"timeout", false, "the job ran past its deadline"},
	{"interrupted", false, "the daemon stopped during every attempt, or while a "
				"service had not yet answered a submission (never sent twice)"},
	{"cancelled_remotely", false, "the service cancelled the job"},
	{"store", true, "the store could not take the output (a full disk, say)"},
	{"render_failed", false, "the built-in renderer failed"},
};

const struct error_def *error_find(const char *code)
{
	for (size_t i = 0; i < sizeof(catalog) / sizeof(catalog[0]); i++)
		if (strcmp(catalog[i].code, code) == 0)
			return &catalog[i];
	return NULL;
}

const struct error_def *error_catalog(size_t *n)
{
	*n = sizeof(catalog) / sizeof(catalog[0]);
	return catalog;
}
