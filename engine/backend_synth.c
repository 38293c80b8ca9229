/*
 * backend_synth.c - the procedural renderer (kernels/) as a backend: its
 * two built-in routes, images and video, deterministic, no settings.
 *
 * DESIGN
 * synth renders into the sink's own file (MP4 with +faststart rewrites
 * its header, so the encoder needs a seekable file of its own), then the
 * sink adopts and hashes that file and commits it: the bytes are written
 * once and never copied. Progress is reported per encoded frame, which is
 * also where cancellation and deadlines are checked, so a running job
 * stops within one frame's time.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "engine_i.h"
#include "route.h"

extern const struct backend backend_synth;
#include "synth.h"

static int synth_progress(void *arg, int32_t done, int32_t total)
{
	struct run *r = arg;

	run_progress(r, (double)done / total);
	return run_stopping(r) != STOP_NONE;
}

static int synth_run(struct run *r)
{
	struct synth_request sr;
	struct synth_options so = {0};
	struct store_sink *sink = NULL;
	char err[ENGINE_ERR_MAX], device[128];
	int rc;

	rc = synth_parse(r->route->path, r->request, r->request_len, &sr, err, sizeof(err));
	if (rc)
		return run_fail(r, rc, "invalid_request", "%s", err);
	const char *path = NULL;
	rc = store_sink_open(engine_store(r->e), &sink);
	if (rc == 0 && (rc = store_sink_path(sink, &path)) != 0)
		store_sink_abort(sink);
	if (rc) {
		synth_request_release(&sr);
		return run_fail(r, rc, "store", "%s", store_lasterr());
	}
	so.threads = r->threads;
	so.allow_gpu = r->gpu >= 0;
	so.gpu = r->gpu < 0 ? 0 : r->gpu;
	so.progress = synth_progress;
	so.progress_arg = r;
	run_log(r, "rendering %dx%d, %d frame%s, seed %u, %s", sr.width, sr.height, sr.num_frames,
		sr.num_frames == 1 ? "" : "s", sr.seed, enc_format_name(sr.format));
	rc = synth_render_file(&sr, path, &so, device, sizeof(device), err,
			       sizeof(err));
	if (rc) {
		store_sink_abort(sink);
		synth_request_release(&sr);
		if (rc == -ECANCELED && run_stopping(r) != STOP_NONE)
			return -ECANCELED;
		/* A full disk is the store's, and passes: retried later. */
		if (rc == -ENOSPC)
			return run_fail(r, rc, "store", "no space left on device (%s)", err);
		return run_fail(r, rc, "render_failed", "%s", err);
	}
	if ((rc = store_sink_adopt_file(sink)) != 0) {
		store_sink_abort(sink);
		synth_request_release(&sr);
		return run_fail(r, rc, "store", "%s", store_lasterr());
	}
	rc = run_commit_output(r, sink, enc_media_type(sr.format), device);
	synth_request_release(&sr);
	return rc;
}

static int synth_configure(struct route *rt, json_object *settings, void **state,
			   char *err, size_t errlen)
{
	(void)rt;
	*state = NULL;
	return backend_settings_check(&backend_synth, settings, NULL, 0, err, errlen);
}

/* The renderer's own checks (route, sizes the schema cannot say). */
static int synth_check(const struct route *rt, const char *request, size_t len, char *err,
		       size_t errlen)
{
	struct synth_request sr;
	int rc = synth_parse(rt->path, request, len, &sr, err, errlen);

	if (rc == 0)
		synth_request_release(&sr);
	return rc;
}

const struct backend backend_synth = {
	.name = "synth",
	.remote = false,
	.configure = synth_configure,
	.check = synth_check,
	.run = synth_run,
};
