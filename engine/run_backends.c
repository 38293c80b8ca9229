/*
 * run_backends.c - the runners: synth (built in, kernels/) and fal.
 *
 * DESIGN
 * synth renders into the sink's own file (MP4 with +faststart rewrites
 * its header, so the encoder needs a seekable file of its own), then the
 * sink adopts and hashes that file and commits it: the bytes are written
 * once and never copied. Progress is reported per encoded frame, which is
 * also where cancellation and deadlines are checked, so a running job
 * stops within one frame's time.
 *
 * fal is registered for video/wan/default/t2v but its queue protocol is
 * not implemented yet: its jobs end with backend_not_configured and a
 * message that says what is missing, never silently.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_i.h"
#include "synth.h"

static int synth_progress(void *arg, int32_t done, int32_t total)
{
	struct run *r = arg;

	run_progress(r, (double)done / total);
	return run_stopping(r) != STOP_NONE;
}

int run_synth(struct run *r)
{
	struct synth_request sr;
	struct synth_options so = {0};
	struct store_sink *sink = NULL;
	char err[ENGINE_ERR_MAX], device[128];
	int rc;

	rc = synth_parse(r->route->path, r->request, r->request_len, &sr, err, sizeof(err));
	if (rc)
		return run_fail(r, rc, "invalid_request", false, "%s", err);
	rc = store_sink_open(engine_store(r->e), &sink);
	if (rc) {
		synth_request_release(&sr);
		return run_fail(r, rc, "store", true, "%s", store_lasterr());
	}
	so.threads = r->threads;
	so.allow_gpu = r->gpu >= 0;
	so.gpu = r->gpu < 0 ? 0 : r->gpu;
	so.progress = synth_progress;
	so.progress_arg = r;
	run_log(r, "rendering %dx%d, %d frame%s, seed %u, %s", sr.width, sr.height, sr.num_frames,
		sr.num_frames == 1 ? "" : "s", sr.seed, enc_format_name(sr.format));
	rc = synth_render_file(&sr, store_sink_path(sink), &so, device, sizeof(device), err,
			       sizeof(err));
	if (rc) {
		store_sink_abort(sink);
		synth_request_release(&sr);
		if (rc == -ECANCELED && run_stopping(r) != STOP_NONE)
			return -ECANCELED;
		/* A full disk is the store's, and passes: retried later. */
		if (rc == -ENOSPC)
			return run_fail(r, rc, "store", true, "no space left on device (%s)", err);
		return run_fail(r, rc, "render_failed", false, "%s", err);
	}
	if ((rc = store_sink_adopt_file(sink)) != 0) {
		store_sink_abort(sink);
		synth_request_release(&sr);
		return run_fail(r, rc, "store", true, "%s", store_lasterr());
	}
	rc = run_commit_output(r, sink, enc_media_type(sr.format), device);
	synth_request_release(&sr);
	return rc;
}

int run_fal(struct run *r)
{
	json_object *v;
	const char *env = "FAL_KEY";
	bool have_key = false;

	if (r->route->settings) {
		if (json_object_object_get_ex(r->route->settings, "key_env", &v) &&
		    json_object_is_type(v, json_type_string))
			env = json_object_get_string(v);
		have_key = json_object_object_get_ex(r->route->settings, "key", &v);
	}
	if (!have_key) {
		const char *k = getenv(env);
		have_key = k && *k;
	}
	if (!have_key)
		return run_fail(r, -ENOTCONN, "backend_not_configured", false,
				"route %s needs the fal backend with an API key: set %s in the "
				"daemon's environment or \"key\" for this route in a models file "
				"(models=FILE)",
				r->route->path, env);
	return run_fail(r, -ENOTSUP, "backend_not_configured", false,
			"route %s uses the fal backend (model %s), which this version of "
			"renderfs cannot run yet; use image/synth/default/t2i or "
			"video/synth/default/t2v",
			r->route->path, r->route->model_id[0] ? r->route->model_id : "unset");
}
