/*
 * synth.h - the built-in synth backend: image/synth/default/t2i and
 * video/synth/default/t2v, rendered by kernels/ and encoded by encode.h.
 */
#ifndef RENDERFS_SYNTH_H
#define RENDERFS_SYNTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "encode.h"

#define SYNTH_ROUTE_IMAGE "image/synth/default/t2i"
#define SYNTH_ROUTE_VIDEO "video/synth/default/t2v"
#define SYNTH_PROMPT_MAX 2000

/* A validated request. Strings are owned: synth_request_release(). */
struct synth_request {
	bool video;
	char *prompt, *negative;
	int32_t width, height, num_frames, fps;
	uint32_t seed;
	bool seed_given;
	enum enc_format format;
};

/*
 * Parse and validate a request for route (SYNTH_ROUTE_*): types, bounds
 * (width and height multiples of 8 from 64 to 4096, video at most
 * 1920x1080; num_frames 1..1000; fps 1..60), enums and unknown fields.
 * Nothing large is allocated before the bounds are checked. Returns 0, or
 * -EINVAL with a message naming the field and its bounds in err.
 */
int synth_parse(const char *route, const char *json, size_t len, struct synth_request *out,
		char *err, size_t errlen);
void synth_request_release(struct synth_request *r);

/* Called after each encoded frame; a non-zero return stops the render,
 * which then fails with -ECANCELED. */
typedef int (*synth_progress_fn)(void *arg, int32_t done, int32_t total);

struct synth_options {
	unsigned threads;   /* CPU render threads; 0: one per core */
	bool allow_gpu;	    /* use CUDA when a device exists */
	int gpu;	    /* with allow_gpu: the CUDA device number */
	synth_progress_fn progress;
	void *progress_arg;
};

/*
 * Render r into the file at path. *device receives "cpu" or the GPU's
 * name (at least 64 bytes). Returns 0 or a negative errno with err set.
 */
int synth_render_file(const struct synth_request *r, const char *path,
		      const struct synth_options *opt, char *device, size_t devlen, char *err,
		      size_t errlen);

#endif
