/*
 * schema.c - the JSON Schema subset of SPEC §9 and request normalization.
 *
 * DESIGN
 * Validation and normalization are one recursive walk: each value is
 * checked against its schema and copied into a fresh object, so the
 * normalized request never shares structure with the caller's input and
 * key order comes from sorting, not from what the client sent. Messages
 * name the field by its path ('width', 'loras[2].scale') and state the
 * rule, so the shell that wrote the request can print something useful.
 */
#include "schema.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#define PATH_MAX_LEN 256

int schema_fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return -EINVAL;
}

/*
 * SPEC §7 says a field is a secret's when its name "contains" key, token,
 * secret or password. Read as substrings that masks fields models take
 * (`keyframes`, `keywords`, `max_tokens`), and the backend then gets
 * "***" for them. So the name is split into words (at '_', '-', '.', ' ',
 * digits and lower-to-upper case changes: api_key, apiKey, X-API-KEY) and
 * a word that is, or ends with, one of those (key, apikey, authtoken,
 * clientsecret, passwd, keys, secrets, passwords) makes it a secret; a
 * word that only starts with one (keyframes) or counts them (tokens)
 * does not.
 */
int schema_is_secret(const char *name)
{
	static const char *const ends[] = {"key",  "keys",   "token",	  "secret",
					   "secrets", "password", "passwords", "passwd"};
	char word[64];
	size_t n = 0;

	for (const char *p = name;; p++) {
		bool split = !*p || *p == '_' || *p == '-' || *p == '.' || *p == ' ' ||
			     (*p >= '0' && *p <= '9') ||
			     (p > name && *p >= 'A' && *p <= 'Z' && p[-1] >= 'a' && p[-1] <= 'z');
		if (split && n > 0) {
			word[n] = '\0';
			for (size_t i = 0; i < sizeof(ends) / sizeof(ends[0]); i++) {
				size_t k = strlen(ends[i]);
				if (n >= k && strcasecmp(word + n - k, ends[i]) == 0)
					return 1;
			}
			n = 0;
		}
		if (!*p)
			return 0;
		if (!(*p == '_' || *p == '-' || *p == '.' || *p == ' ' || (*p >= '0' && *p <= '9'))) {
			if (n + 1 < sizeof(word))
				word[n++] = *p;
			else
				return 1; /* a word this long: be safe */
		}
	}
}

static const char *type_of(json_object *v)
{
	switch (json_object_get_type(v)) {
	case json_type_null:
		return "null";
	case json_type_boolean:
		return "boolean";
	case json_type_double:
		return "number";
	case json_type_int:
		return "integer";
	case json_type_object:
		return "object";
	case json_type_array:
		return "array";
	case json_type_string:
		return "string";
	}
	return "unknown";
}

static int type_matches(const char *want, json_object *v)
{
	const char *have = type_of(v);

	if (strcmp(want, have) == 0)
		return 1;
	/* An integer is a number; 2.0 is not an integer here (json-c keeps
	 * the distinction the client wrote). */
	return strcmp(want, "number") == 0 && strcmp(have, "integer") == 0;
}

static size_t utf8_length(const char *s, size_t n)
{
	size_t count = 0;

	for (size_t i = 0; i < n; i++)
		if (((unsigned char)s[i] & 0xC0) != 0x80)
			count++;
	return count;
}

static int get_number(json_object *v, double *out)
{
	if (!json_object_is_type(v, json_type_int) && !json_object_is_type(v, json_type_double))
		return -1;
	*out = json_object_get_double(v);
	return 0;
}

/* "'width' must be an integer from 64 to 4096" and its variants. */
static int range_fail(const char *path, json_object *schema, char *err, size_t errlen)
{
	json_object *t, *mn, *mx, *mul;
	const char *type = json_object_object_get_ex(schema, "type", &t)
				   ? json_object_get_string(t)
				   : "number";
	const char *article = strcmp(type, "integer") == 0 ? "an" : "a";
	bool has_min = json_object_object_get_ex(schema, "minimum", &mn);
	bool has_max = json_object_object_get_ex(schema, "maximum", &mx);
	char extra[64] = "";

	if (json_object_object_get_ex(schema, "multipleOf", &mul))
		snprintf(extra, sizeof(extra), ", a multiple of %s", json_object_get_string(mul));
	if (has_min && has_max)
		return schema_fail(err, errlen, "'%s' must be %s %s from %s to %s%s", path, article, type,
			    json_object_get_string(mn), json_object_get_string(mx), extra);
	if (has_min)
		return schema_fail(err, errlen, "'%s' must be %s %s of at least %s%s", path, article, type,
			    json_object_get_string(mn), extra);
	if (has_max)
		return schema_fail(err, errlen, "'%s' must be %s %s of at most %s%s", path, article, type,
			    json_object_get_string(mx), extra);
	return schema_fail(err, errlen, "'%s' must be %s %s%s", path, article, type, extra);
}

static int walk(json_object *schema, json_object *v, const char *path, int depth,
		json_object **out, char *err, size_t errlen);

static int cmp_keys(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int walk_object(json_object *schema, json_object *v, const char *path, int depth,
		       json_object **out, char *err, size_t errlen)
{
	json_object *props = NULL, *req, *addl = NULL, *res;
	struct lh_entry *e;
	const char **keys = NULL;
	size_t nkeys = 0, cap;
	char sub[PATH_MAX_LEN];
	int rc = 0;

	json_object_object_get_ex(schema, "properties", &props);
	json_object_object_get_ex(schema, "additionalProperties", &addl);
	if (json_object_object_get_ex(schema, "required", &req)) {
		for (size_t i = 0; i < json_object_array_length(req); i++) {
			const char *name = json_object_get_string(json_object_array_get_idx(req, i));
			if (!json_object_object_get_ex(v, name, NULL))
				return schema_fail(err, errlen, "'%s%s%s' is required", path,
					    path[0] ? "." : "", name);
		}
	}
	res = json_object_new_object();
	if (!res)
		return -ENOMEM;
	/* Every key of the request and of the schema's properties, sorted. */
	cap = (size_t)json_object_object_length(v) +
	      (props ? (size_t)json_object_object_length(props) : 0) + 1;
	keys = calloc(cap, sizeof(*keys));
	if (!keys) {
		rc = -ENOMEM;
		goto out;
	}
	for (e = json_object_get_object(v)->head; e; e = e->next)
		keys[nkeys++] = e->k;
	if (props)
		for (e = json_object_get_object(props)->head; e; e = e->next)
			if (!json_object_object_get_ex(v, e->k, NULL))
				keys[nkeys++] = e->k;
	qsort(keys, nkeys, sizeof(*keys), cmp_keys);
	for (size_t i = 0; i < nkeys && rc == 0; i++) {
		const char *k = keys[i];
		json_object *val = NULL, *ps = NULL, *dflt, *nv = NULL;

		snprintf(sub, sizeof(sub), "%s%s%s", path, path[0] ? "." : "", k);
		/* A JSON null is a NULL value: present, unlike a missing key. */
		bool present = json_object_object_get_ex(v, k, &val);
		if (props)
			json_object_object_get_ex(props, k, &ps);
		if (!present) {
			/* Only schema properties reach here: fill the default. */
			if (ps && json_object_object_get_ex(ps, "default", &dflt)) {
				if ((rc = json_object_deep_copy(dflt, &nv, NULL)) != 0) {
					rc = -ENOMEM;
					break;
				}
			} else if (strcmp(k, "seed") == 0 && ps) {
				uint32_t seed;
				if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed)) {
					rc = schema_fail(err, errlen, "no randomness for a seed");
					break;
				}
				nv = json_object_new_int64(seed);
			} else {
				continue;
			}
		} else if (!ps) {
			if (addl && json_object_is_type(addl, json_type_boolean) &&
			    !json_object_get_boolean(addl)) {
				rc = schema_fail(err, errlen, "unknown field '%s'", sub);
				break;
			}
			if (addl && json_object_is_type(addl, json_type_object))
				rc = walk(addl, val, sub, depth + 1, &nv, err, errlen);
			else
				rc = walk(NULL, val, sub, depth + 1, &nv, err, errlen);
		} else {
			rc = walk(ps, val, sub, depth + 1, &nv, err, errlen);
		}
		if (rc)
			break;
		if (schema_is_secret(k) && nv) {
			json_object_put(nv);
			nv = json_object_new_string("***");
		}
		if ((val && !nv) || json_object_object_add(res, k, nv) != 0) {
			json_object_put(nv);
			rc = -ENOMEM;
		}
	}
out:
	free(keys);
	if (rc) {
		json_object_put(res);
		return rc;
	}
	*out = res;
	return 0;
}

static int walk(json_object *schema, json_object *v, const char *path, int depth,
		json_object **out, char *err, size_t errlen)
{
	json_object *t, *x;
	const char *type = NULL;
	double num;

	if (depth > 64)
		return schema_fail(err, errlen, "'%s' is nested too deeply", path);
	if (schema && json_object_object_get_ex(schema, "type", &t))
		type = json_object_get_string(t);
	if (type && !type_matches(type, v)) {
		if (strcmp(type, "integer") == 0 || strcmp(type, "number") == 0)
			return range_fail(path, schema, err, errlen);
		return schema_fail(err, errlen, "'%s' must be %s %s, not %s", path,
			    strchr("aeiou", type[0]) ? "an" : "a", type, type_of(v));
	}
	if (json_object_is_type(v, json_type_string)) {
		const char *s = json_object_get_string(v);
		size_t n = (size_t)json_object_get_string_len(v);
		if (memchr(s, '\0', n))
			return schema_fail(err, errlen, "'%s' must not contain NUL characters", path);
		if (schema && json_object_object_get_ex(schema, "maxLength", &x) &&
		    utf8_length(s, n) > (size_t)json_object_get_int64(x))
			return schema_fail(err, errlen, "'%s' must be at most %s characters long", path,
				    json_object_get_string(x));
	}
	if (get_number(v, &num) == 0) {
		if (!isfinite(num))
			return schema_fail(err, errlen, "'%s' is out of range", path);
		/* Integers beyond int64 come back from json-c saturated: refuse
		 * them rather than clamp what the client asked for. */
		if (json_object_is_type(v, json_type_int)) {
			errno = 0;
			int64_t i = json_object_get_int64(v);
			if (errno || i == INT64_MAX || i == INT64_MIN)
				return schema_fail(err, errlen, "'%s' is out of range", path);
		}
		if (schema) {
			double lim;
			if ((json_object_object_get_ex(schema, "minimum", &x) &&
			     get_number(x, &lim) == 0 && num < lim) ||
			    (json_object_object_get_ex(schema, "maximum", &x) &&
			     get_number(x, &lim) == 0 && num > lim))
				return range_fail(path, schema, err, errlen);
			if (json_object_object_get_ex(schema, "multipleOf", &x) &&
			    json_object_is_type(v, json_type_int) &&
			    json_object_get_int64(x) > 0 &&
			    json_object_get_int64(v) % json_object_get_int64(x) != 0)
				return range_fail(path, schema, err, errlen);
		}
	}
	if (schema && json_object_object_get_ex(schema, "enum", &x)) {
		bool found = false;
		char list[512] = "";
		size_t used = 0;

		for (size_t i = 0; i < json_object_array_length(x); i++) {
			json_object *e = json_object_array_get_idx(x, i);
			if (json_object_equal(e, v))
				found = true;
			used += (size_t)snprintf(list + used, used < sizeof(list) ? sizeof(list) - used : 0,
						 "%s%s", i ? ", " : "",
						 json_object_to_json_string_ext(e, JSON_C_TO_STRING_PLAIN));
			if (used >= sizeof(list))
				used = sizeof(list) - 1;
		}
		if (!found)
			return schema_fail(err, errlen, "'%s' must be one of %s", path, list);
	}
	if (json_object_is_type(v, json_type_object))
		return walk_object(schema ? schema : NULL, v, path, depth, out, err, errlen);
	if (json_object_is_type(v, json_type_array)) {
		size_t n = json_object_array_length(v);
		json_object *items = NULL, *res;
		char sub[PATH_MAX_LEN];

		if (schema && json_object_object_get_ex(schema, "maxItems", &x) &&
		    n > (size_t)json_object_get_int64(x))
			return schema_fail(err, errlen, "'%s' must have at most %s items", path,
				    json_object_get_string(x));
		if (schema)
			json_object_object_get_ex(schema, "items", &items);
		res = json_object_new_array_ext((int)n);
		if (!res)
			return -ENOMEM;
		for (size_t i = 0; i < n; i++) {
			/* NULL: json_object_deep_copy() refuses a destination
			 * that holds the last item's copy. */
			json_object *nv = NULL;
			int rc;

			snprintf(sub, sizeof(sub), "%s[%zu]", path, i);
			rc = walk(items, json_object_array_get_idx(v, i), sub, depth + 1, &nv, err,
				  errlen);
			if (rc == 0 && json_object_array_add(res, nv) != 0) {
				json_object_put(nv);
				rc = -ENOMEM;
			}
			if (rc) {
				json_object_put(res);
				return rc;
			}
		}
		*out = res;
		return 0;
	}
	if (!v) {
		*out = NULL; /* null */
		return 0;
	}
	return json_object_deep_copy(v, out, NULL) == 0 ? 0 : -ENOMEM;
}

int schema_normalize(json_object *schema, json_object *req, json_object **out, char *err,
		     size_t errlen)
{
	*out = NULL;
	if (!json_object_is_type(req, json_type_object))
		return schema_fail(err, errlen, "a request must be a JSON object");
	return walk(schema, req, "", 0, out, err, errlen);
}

/* ---- checking a schema ---- */

static int check(json_object *s, const char *path, int depth, char *err, size_t errlen)
{
	static const char *const known[] = {"type",	 "properties", "required",   "default",
					    "minimum",	 "maximum",    "multipleOf", "enum",
					    "maxLength", "maxItems",   "items",	     "additionalProperties",
					    "description", "title"};
	static const char *const types[] = {"object", "string", "integer", "number",
					    "boolean", "array", "null"};
	char sub[PATH_MAX_LEN];

	if (depth > 16)
		return schema_fail(err, errlen, "schema nested too deeply at '%s'", path);
	if (!json_object_is_type(s, json_type_object))
		return schema_fail(err, errlen, "schema at '%s' must be an object", path);
	json_object_object_foreach(s, k, v)
	{
		bool ok = false;
		for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
			ok |= strcmp(k, known[i]) == 0;
		if (!ok)
			return schema_fail(err, errlen, "unsupported schema keyword '%s' at '%s'", k, path);
		if (strcmp(k, "type") == 0) {
			bool t = false;
			for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
				t |= json_object_is_type(v, json_type_string) &&
				     strcmp(json_object_get_string(v), types[i]) == 0;
			if (!t)
				return schema_fail(err, errlen, "'type' at '%s' must name one JSON type",
					    path);
		} else if (strcmp(k, "properties") == 0) {
			if (!json_object_is_type(v, json_type_object))
				return schema_fail(err, errlen, "'properties' at '%s' must be an object",
					    path);
			json_object_object_foreach(v, pk, pv)
			{
				snprintf(sub, sizeof(sub), "%s.%s", path, pk);
				int rc = check(pv, sub, depth + 1, err, errlen);
				if (rc)
					return rc;
			}
		} else if (strcmp(k, "required") == 0 || strcmp(k, "enum") == 0) {
			if (!json_object_is_type(v, json_type_array))
				return schema_fail(err, errlen, "'%s' at '%s' must be an array", k, path);
			for (size_t i = 0; strcmp(k, "required") == 0 &&
					   i < json_object_array_length(v); i++)
				if (!json_object_is_type(json_object_array_get_idx(v, i),
							 json_type_string))
					return schema_fail(err, errlen,
						    "'required' at '%s' must list strings", path);
		} else if (strcmp(k, "minimum") == 0 || strcmp(k, "maximum") == 0) {
			double d;
			if (get_number(v, &d) != 0)
				return schema_fail(err, errlen, "'%s' at '%s' must be a number", k, path);
		} else if (strcmp(k, "multipleOf") == 0 || strcmp(k, "maxLength") == 0 ||
			   strcmp(k, "maxItems") == 0) {
			if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
				return schema_fail(err, errlen,
					    "'%s' at '%s' must be a non-negative integer", k, path);
		} else if (strcmp(k, "items") == 0 ||
			   (strcmp(k, "additionalProperties") == 0 &&
			    !json_object_is_type(v, json_type_boolean))) {
			snprintf(sub, sizeof(sub), "%s.%s", path, k);
			int rc = check(v, sub, depth + 1, err, errlen);
			if (rc)
				return rc;
		}
	}
	return 0;
}

int schema_check(json_object *schema, char *err, size_t errlen)
{
	return check(schema, "$", 0, err, errlen);
}
