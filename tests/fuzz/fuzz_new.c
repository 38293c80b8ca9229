/*
 * fuzz_new.c - libFuzzer target for the `new` file: the request scanner,
 * the strict parser (UTF-8, duplicate keys, escapes) and the route's JSON
 * Schema normalization, driven through new_file_write() exactly as FUSE
 * drives it, with writes split where the input says.
 *
 * DESIGN
 * newfile.c is compiled into this file so that its static functions run
 * as they do in the daemon. The engine's side of a submission is played
 * by engine_submit() below, which runs the real schema_normalize() of the
 * real default route and answers as the engine does (in order, up to the
 * first refusal, the rest -ECANCELED); it creates no job, since durable
 * commits are not what this target looks at.
 *
 * Input format: byte 0 picks the write sizes (a seed for a small LCG),
 * byte 1 bit 0 opens O_APPEND, bit 1 makes the writer write the rest of a
 * short write again (as cat and dd do); the rest is the data written. A
 * failed write's chunk is dropped and the next one goes to the same file
 * offset, as a failed write() leaves it.
 *
 * Checks beyond what the sanitizers catch: a write never reports more than
 * it was given, nor 0; every object the engine accepted was answered.
 */
#include "../../fs/newfile.c"

#include <assert.h>

#include "backend.h"
#include "schema.h"

/* The registry's backends, without their runners (nothing runs here):
 * the built-in routes configure as in the daemon. */
static int accept_settings(struct route *rt, json_object *settings, void **state,
			   char *err, size_t errlen)
{
	(void)rt, (void)settings, (void)err, (void)errlen;
	*state = NULL;
	return 0;
}

const struct backend backend_synth = {.name = "synth", .configure = accept_settings};
const struct backend backend_fal = {.name = "fal", .remote = true, .configure = accept_settings};
const struct backend backend_replicate = {.name = "replicate", .remote = true,
					  .configure = accept_settings};
const struct backend backend_openai = {.name = "openai-images", .remote = true,
				       .configure = accept_settings};
const struct backend backend_exec = {.name = "exec", .configure = accept_settings};
const struct backend backend_comfyui = {.name = "comfyui", .remote = true,
					.configure = accept_settings};

static struct route_table table;
static struct fsctx fs;
static size_t accepted;

uint64_t now_ms(void)
{
	return 0; /* the log budget then refills only at start: deterministic */
}

uint64_t mono_ns(void)
{
	return 0; /* only new's time counters read it */
}

void engine_count_rejected(struct engine *e, uint64_t n)
{
	(void)e;
	(void)n;
}

int engine_submit(struct engine *e, const char *route, uint32_t uid, uint32_t gid,
		  struct engine_submission *subs, size_t n)
{
	const struct route *r = route_find(&table, route);
	bool refused = false;

	(void)e, (void)uid, (void)gid;
	for (size_t i = 0; i < n; i++) {
		json_object *input = subs[i].obj, *norm = NULL;

		subs[i].rc = 0;
		subs[i].err[0] = '\0';
		if (refused) {
			subs[i].rc = -ECANCELED;
			continue;
		}
		if (json_object_object_get_ex(subs[i].obj, "input", NULL))
			json_object_object_get_ex(subs[i].obj, "input", &input);
		subs[i].rc = json_object_is_type(input, json_type_object)
				     ? schema_normalize(r->schema, input, &norm, subs[i].err,
							sizeof(subs[i].err))
				     : -EINVAL;
		json_object_put(norm);
		if (subs[i].rc) {
			refused = true;
			continue;
		}
		snprintf(subs[i].id, sizeof(subs[i].id), "job-%zu", accepted++);
	}
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char err[256];

	(void)argc, (void)argv;
	if (route_table_load(&table, NULL, 3, err, sizeof(err)) != 0)
		abort();
	fs.max_request = 4096; /* small, so that the size limits are reached */
	if (new_limits_create(1 << 22, 1 << 21, &fs.limits) != 0)
		abort();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct route *r = route_find(&table, "image/synth/default/t2i");
	struct new_file *nf;
	uint32_t seed;
	bool retry;
	size_t pos = 0, before = accepted, ids = 0;
	uint64_t off = 0, roff = 0;
	char out[4096];
	ssize_t got;

	if (size < 2)
		return 0;
	seed = data[0];
	retry = data[1] & 2;
	if (new_file_open(&fs, r, 1000, 1000, data[1] & 1, &nf) != 0)
		abort();
	data += 2;
	size -= 2;
	while (pos < size) {
		size_t n;
		ssize_t w;

		seed = seed * 1103515245u + 12345u;
		n = 1 + (seed >> 16) % 97;
		if ((seed >> 8) & 1)
			n *= 64;
		if (n > size - pos)
			n = size - pos;
		w = new_file_write(nf, (const char *)data + pos, n, off);
		assert(w <= (ssize_t)n && w != 0);
		if (w < 0) {
			/* The writer drops this chunk and goes on with the next
			 * at the same file offset (a failed write moves none). */
			pos += n;
		} else {
			off += (uint64_t)w;
			/* A short count: the rest is written again (cat, dd),
			 * or dropped by a careless writer. */
			pos += retry ? (size_t)w : n;
		}
	}
	while ((got = new_file_read(nf, out, sizeof(out), roff)) > 0) {
		roff += (uint64_t)got;
		for (ssize_t i = 0; i < got; i++)
			ids += out[i] == '\n';
	}
	(void)new_file_flush(nf);
	new_file_release(nf);
	/* Every accepted object was answered (with its id; refusals add error
	 * lines), unless the answers overflowed RESP_MAX. */
	assert(ids >= accepted - before || size > RESP_MAX);
	return 0;
}
