/*
 * test_schema.c - the JSON Schema subset, normalization, and the routes:
 * defaults, seeds, key order, masked secrets, every refusal's message.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "backend.h"
#include "errors.h"
#include "route.h"
#include "schema.h"

static const char *schema_text =
	"{\"type\": \"object\", \"additionalProperties\": false, \"required\": [\"prompt\"],"
	" \"properties\": {\"prompt\": {\"type\": \"string\", \"maxLength\": 5},"
	" \"n\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 9, \"multipleOf\": 3,"
	"  \"default\": 3},"
	" \"mode\": {\"type\": \"string\", \"enum\": [\"a\", \"b\"], \"default\": \"a\"},"
	" \"seed\": {\"type\": \"integer\", \"minimum\": 0},"
	" \"api_key\": {\"type\": \"string\"},"
	" \"tags\": {\"type\": \"array\", \"maxItems\": 2, \"items\": {\"type\": \"string\"}},"
	" \"opt\": {\"type\": \"object\", \"properties\": {\"z\": {\"type\": \"boolean\"},"
	"  \"Password\": {\"type\": \"string\"}}}}}";

static void normalize_ok(json_object *schema, const char *in, const char *want_prefix)
{
	json_object *req = json_tokener_parse(in), *out = NULL;
	char err[256] = "";
	int rc = schema_normalize(schema, req, &out, err, sizeof(err));

	CHECK(rc == 0, "%s: %s", in, err);
	if (rc == 0) {
		const char *t = json_object_to_json_string_ext(out, JSON_C_TO_STRING_PLAIN);
		CHECK(strncmp(t, want_prefix, strlen(want_prefix)) == 0, "%s -> %s", in, t);
	}
	json_object_put(out);
	json_object_put(req);
}

static void normalize_bad(json_object *schema, const char *in, const char *msg)
{
	json_object *req = json_tokener_parse(in), *out = NULL;
	char err[256] = "";
	int rc = schema_normalize(schema, req, &out, err, sizeof(err));

	CHECK(rc == -EINVAL && strstr(err, msg), "%s: rc %d, '%s' (want '%s')", in, rc, err, msg);
	CHECK(out == NULL, "no output on error");
	json_object_put(req);
}

static void test_normalize(void)
{
	json_object *schema = json_tokener_parse(schema_text);
	char err[256];

	REQUIRE(schema && schema_check(schema, err, sizeof(err)) == 0, "schema: %s", err);
	/* Defaults, sorted keys, seed chosen, secrets masked at any depth. */
	normalize_ok(schema, "{\"prompt\": \"hi\", \"api_key\": \"sk-1\", \"opt\": {\"z\": true, "
			     "\"Password\": \"p\"}, \"seed\": 7}",
		     "{\"api_key\":\"***\",\"mode\":\"a\",\"n\":3,\"opt\":{\"Password\":\"***\","
		     "\"z\":true},\"prompt\":\"hi\",\"seed\":7}");
	normalize_ok(schema, "{\"prompt\": \"x\"}", "{\"mode\":\"a\",\"n\":3,\"prompt\":\"x\",\"seed\":");
	/* Arrays of several items (each item's copy once made a second copy
	 * fail: "out of memory" for any list of two). */
	normalize_ok(schema, "{\"prompt\": \"x\", \"seed\": 1, \"tags\": [\"a\", \"b\"]}",
		     "{\"mode\":\"a\",\"n\":3,\"prompt\":\"x\",\"seed\":1,\"tags\":[\"a\",\"b\"]}");
	/* Code points, not bytes: five characters of two bytes each fit. */
	normalize_ok(schema, "{\"prompt\": \"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\", \"seed\": 1}",
		     "{\"mode\":\"a\"");
	normalize_bad(schema, "{}", "'prompt' is required");
	normalize_bad(schema, "{\"prompt\": 1}", "'prompt' must be a string, not integer");
	normalize_bad(schema, "{\"prompt\": null}", "'prompt' must be a string, not null");
	normalize_bad(schema, "{\"prompt\": \"toolong\"}", "at most 5 characters");
	normalize_bad(schema, "{\"prompt\": \"a\", \"n\": 4}", "'n' must be an integer from 1 to 9, a multiple of 3");
	normalize_bad(schema, "{\"prompt\": \"a\", \"n\": 12}", "from 1 to 9");
	normalize_bad(schema, "{\"prompt\": \"a\", \"n\": 3.0}", "'n' must be an integer");
	normalize_bad(schema, "{\"prompt\": \"a\", \"mode\": \"c\"}", "'mode' must be one of \"a\", \"b\"");
	normalize_bad(schema, "{\"prompt\": \"a\", \"x\": 1}", "unknown field 'x'");
	normalize_bad(schema, "{\"prompt\": \"a\", \"tags\": [\"1\", \"2\", \"3\"]}", "at most 2 items");
	normalize_bad(schema, "{\"prompt\": \"a\", \"tags\": [1]}", "'tags[0]' must be a string");
	normalize_bad(schema, "{\"prompt\": \"a\", \"opt\": {\"z\": 1}}", "'opt.z' must be a boolean");
	normalize_bad(schema, "{\"prompt\": \"a\\u0000b\"}", "must not contain NUL");
	normalize_bad(schema, "{\"prompt\": \"a\", \"seed\": 1e400}", "'seed'");
	normalize_bad(schema, "[1]", "must be a JSON object");
	json_object_put(schema);
}

static void test_schema_check(void)
{
	static const char *bad[][2] = {
		{"[]", "must be an object"},
		{"{\"type\": \"text\"}", "'type'"},
		{"{\"pattern\": \"x\"}", "unsupported schema keyword 'pattern'"},
		{"{\"properties\": {\"a\": {\"minimum\": \"1\"}}}", "'minimum' at '$.a'"},
		{"{\"required\": [1]}", "'required'"},
		{"{\"maxLength\": -1}", "non-negative"},
	};
	char err[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		json_object *s = json_tokener_parse(bad[i][0]);
		int rc = schema_check(s, err, sizeof(err));
		CHECK(rc == -EINVAL && strstr(err, bad[i][1]), "%s: '%s'", bad[i][0], err);
		json_object_put(s);
	}
	CHECK(schema_is_secret("FAL_KEY") && schema_is_secret("auth_token") &&
		      !schema_is_secret("prompt"),
	      "secret names");
	/* Words, not substrings: what models take is not masked. */
	{
		static const char *const secret[] = {
		    "api_key", "apiKey", "APIKey", "X-API-KEY", "key", "key2", "openai_key",
		    "access_token", "authToken", "client_secret", "secretKey", "Password",
		    "db_passwd", "api_keys", "hf.token"};
		static const char *const plain[] = {"keyframes", "keywords", "max_tokens",
						    "num_tokens", "prompt",
						    "passage", "tokenizer"};
		for (size_t i = 0; i < sizeof(secret) / sizeof(secret[0]); i++)
			CHECK(schema_is_secret(secret[i]), "'%s' is a secret's name", secret[i]);
		for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++)
			CHECK(!schema_is_secret(plain[i]), "'%s' is not a secret's name", plain[i]);
	}
}

static void test_routes(void)
{
	struct route_table t;
	char err[512];
	const struct route *r;

	REQUIRE(route_table_load(&t, NULL, 3, err, sizeof(err)) == 0, "built-in: %s", err);
	r = route_find(&t, "video/wan/default/t2v");
	CHECK(r && r->backend == backend_find("fal") && strcmp(r->model_id, "fal-ai/wan-t2v") == 0,
	      "wan -> fal");
	r = route_find(&t, "image/synth/default/t2i");
	CHECK(r && r->backend == backend_find("synth") && r->deterministic && r->max_attempts == 3,
	      "synth image");
	CHECK(strcmp(route_media_ext("video/mp4"), "mp4") == 0 &&
		      strcmp(route_media_ext("x/unknown"), "bin") == 0,
	      "extensions");
	CHECK(strstr(t.models_json, "\"routes\"") != NULL, "models.json text");
	route_table_release(&t);
	CHECK(backend_find("nope") == NULL && strcmp(backend_names(), "synth, fal, replicate, openai-images, exec, comfyui") == 0,
	      "registry: %s", backend_names());
}

/* Each code of the catalog has its row in the README's table, retried or
 * not as the catalog says, and the table has no other code. */
static void test_error_catalog(void)
{
	FILE *f = fopen(RENDERFS_README, "r");
	char line[1024];
	size_t n, rows = 0;
	const struct error_def *cat = error_catalog(&n);

	for (size_t i = 0; i < n; i++)
		CHECK(error_find(cat[i].code) == &cat[i], "catalog entry %s", cat[i].code);

	REQUIRE(f != NULL, "open %s", RENDERFS_README);
	while (fgets(line, sizeof(line), f)) {
		char code[64], retried[8];
		const struct error_def *d;

		if (sscanf(line, " | `%63[a-z_]` | %7[a-z] |", code, retried) != 2)
			continue;
		rows++;
		d = error_find(code);
		CHECK(d != NULL, "README lists '%s', which is not in the catalog", code);
		if (d)
			CHECK(d->retried == (strcmp(retried, "yes") == 0),
			      "README says '%s' is%s retried", code, d->retried ? " not" : "");
	}
	fclose(f);
	CHECK(rows == n, "README's table has %zu codes, the catalog %zu", rows, n);
	CHECK(error_find("nope") == NULL, "unknown code");
}

int main(void)
{
	test_error_catalog();
	test_normalize();
	test_schema_check();
	test_routes();
	return check_done("test_schema");
}
