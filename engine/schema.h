/*
 * schema.h - request validation against a JSON Schema subset, and the
 * normalization of SPEC §2 (defaults filled, a seed chosen, keys sorted,
 * secrets masked).
 *
 * The subset (SPEC §9): type, properties, required, default, minimum,
 * maximum, multipleOf (integers), enum, maxLength (code points), maxItems,
 * additionalProperties (true, false or a schema), items.
 */
#ifndef RENDERFS_SCHEMA_H
#define RENDERFS_SCHEMA_H

#include <json-c/json.h>
#include <stddef.h>

/*
 * Check that schema is itself within the subset. On error, err names the
 * keyword and the path within the schema. Returns 0 or -EINVAL.
 */
int schema_check(json_object *schema, char *err, size_t errlen);

/*
 * Validate req against schema and build its normalized form: a new object
 * (the caller's, json_object_put()) with defaults filled in, "seed" set to a
 * random integer when the schema has one and the request does not, keys
 * sorted at every level, and values of fields whose name contains "key",
 * "token", "secret" or "password" replaced by "***". Strings containing
 * NUL are refused. Returns 0, or -EINVAL with err naming the field and
 * the rule it breaks ("'width' must be an integer from 64 to 4096"),
 * or -ENOMEM.
 */
int schema_normalize(json_object *schema, json_object *req, json_object **out, char *err,
		     size_t errlen);

/* Whether a field name is a secret's (see schema_normalize). */
int schema_is_secret(const char *name);

/* Format a refusal into err and return -EINVAL (for request checkers). */
int schema_fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
