/*
 * backend.c - the registry of backends, and what their configure() share.
 *
 * Adding a backend: one file defining `const struct backend backend_<name>`
 * and one line in registry[] below (and its declaration beside it).
 */
#include "backend.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

extern const struct backend backend_synth;
extern const struct backend backend_fal;
extern const struct backend backend_replicate;
extern const struct backend backend_openai;
extern const struct backend backend_exec;
extern const struct backend backend_comfyui;

static const struct backend *const registry[] = {
	&backend_synth,
	&backend_fal,
	&backend_replicate,
	&backend_openai,
	&backend_exec,
	&backend_comfyui,
};
#define NREG (sizeof(registry) / sizeof(registry[0]))

const struct backend *backend_find(const char *name)
{
	for (size_t i = 0; i < NREG; i++)
		if (strcmp(registry[i]->name, name) == 0)
			return registry[i];
	return NULL;
}

const char *backend_names(void)
{
	static char names[256]; /* filled once, on the mounting thread */

	if (!names[0])
		for (size_t i = 0, n = 0; i < NREG && n < sizeof(names); i++)
			n += (size_t)snprintf(names + n, sizeof(names) - n, "%s%s", i ? ", " : "",
					      registry[i]->name);
	return names;
}

static const char *type_name(json_type t)
{
	switch (t) {
	case json_type_string:
		return "a string";
	case json_type_boolean:
		return "true or false";
	case json_type_int:
		return "an integer";
	case json_type_object:
		return "an object";
	case json_type_array:
		return "an array";
	default:
		return "a number";
	}
}

int backend_settings_check(const struct backend *b, json_object *settings,
			   const struct backend_setting *takes, size_t n, char *err, size_t errlen)
{
	if (!settings)
		return 0;
	json_object_object_foreach(settings, k, v)
	{
		size_t i = 0;

		while (i < n && strcmp(takes[i].name, k) != 0)
			i++;
		if (i == n) {
			size_t len = (size_t)snprintf(err, errlen, "unknown setting '%s' for the %s backend",
						      k, b->name);
			for (size_t j = 0; j < n && len < errlen; j++)
				len += (size_t)snprintf(err + len, errlen - len, "%s%s",
							j ? ", " : " (it takes ", takes[j].name);
			if (len < errlen)
				snprintf(err + len, errlen - len, "%s", n ? ")" : " (it takes none)");
			return -EINVAL;
		}
		if (takes[i].type != json_type_null && !json_object_is_type(v, takes[i].type)) {
			snprintf(err, errlen, "'%s' must be %s", k, type_name(takes[i].type));
			return -EINVAL;
		}
	}
	return 0;
}
