/*
 * synth.c - request validation and the render -> convert -> encode
 * pipeline of the synth backend.
 *
 * DESIGN
 * A producer thread renders batches of frames (one frame on the CPU, up to
 * 8 on a GPU) into two alternating slots, converting them to YUV 4:2:0;
 * the calling thread encodes one slot while the producer fills the other,
 * so rendering and encoding overlap and neither waits longer than the
 * other's work. Buffers are sized from the validated request, once.
 * Protected by pipe.mu: slot_state[], producer_rc, stop.
 */
#include "synth.h"

#include <errno.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "kernels.h"
#include "schema.h"

void synth_request_release(struct synth_request *r)
{
	free(r->prompt);
	free(r->negative);
	r->prompt = r->negative = NULL;
}

static int get_int(json_object *v, const char *name, int64_t lo, int64_t hi, int64_t *out,
		   char *err, size_t errlen)
{
	if (!json_object_is_type(v, json_type_int))
		return schema_fail(err, errlen, "'%s' must be an integer from %lld to %lld", name,
			    (long long)lo, (long long)hi);
	errno = 0;
	int64_t x = json_object_get_int64(v);
	if (errno || x < lo || x > hi)
		return schema_fail(err, errlen, "'%s' must be an integer from %lld to %lld", name,
			    (long long)lo, (long long)hi);
	*out = x;
	return 0;
}

int synth_parse(const char *route, const char *json, size_t len, struct synth_request *r,
		char *err, size_t errlen)
{
	json_tokener *tok;
	json_object *root;
	int rc = 0;

	memset(r, 0, sizeof(*r));
	if (strcmp(route, SYNTH_ROUTE_VIDEO) == 0)
		r->video = true;
	else if (strcmp(route, SYNTH_ROUTE_IMAGE) != 0)
		return schema_fail(err, errlen, "'%s' is not a synth route (%s, %s)", route,
			    SYNTH_ROUTE_IMAGE, SYNTH_ROUTE_VIDEO);
	r->width = r->video ? 640 : 512;
	r->height = r->video ? 360 : 512;
	r->num_frames = r->video ? 48 : 1;
	r->fps = 24;
	r->format = r->video ? ENC_MP4 : ENC_PNG;

	tok = json_tokener_new_ex(64);
	if (!tok)
		return -ENOMEM;
	root = json_tokener_parse_ex(tok, json, (int)len);
	if (!root || json_tokener_get_error(tok) != json_tokener_success) {
		rc = schema_fail(err, errlen, "not valid JSON: %s",
			  json_tokener_error_desc(json_tokener_get_error(tok)));
		goto out;
	}
	if (tok->char_offset < (int)len && strspn(json + tok->char_offset, " \t\r\n") !=
						   len - (size_t)tok->char_offset) {
		rc = schema_fail(err, errlen, "text after the JSON object");
		goto out;
	}
	if (!json_object_is_type(root, json_type_object)) {
		rc = schema_fail(err, errlen, "a request must be a JSON object");
		goto out;
	}
	json_object_object_foreach(root, key, val)
	{
		int64_t x = 0;

		if (strcmp(key, "prompt") == 0 || strcmp(key, "negative_prompt") == 0) {
			if (!json_object_is_type(val, json_type_string)) {
				rc = schema_fail(err, errlen, "'%s' must be a string", key);
				goto out;
			}
			int n = json_object_get_string_len(val);
			if (n > SYNTH_PROMPT_MAX) {
				rc = schema_fail(err, errlen, "'%s' must be at most %d bytes", key,
					  SYNTH_PROMPT_MAX);
				goto out;
			}
			char **dst = key[0] == 'p' ? &r->prompt : &r->negative;
			*dst = strdup(json_object_get_string(val));
			if (!*dst) {
				rc = -ENOMEM;
				goto out;
			}
		} else if (strcmp(key, "width") == 0 || strcmp(key, "height") == 0) {
			int64_t max = r->video ? (key[0] == 'w' ? 1920 : 1080) : 4096;
			if ((rc = get_int(val, key, 64, max, &x, err, errlen)) != 0)
				goto out;
			if (x % 8) {
				rc = schema_fail(err, errlen, "'%s' must be a multiple of 8 from 64 to %lld",
					  key, (long long)max);
				goto out;
			}
			*(key[0] == 'w' ? &r->width : &r->height) = (int32_t)x;
		} else if (strcmp(key, "num_frames") == 0 && r->video) {
			if ((rc = get_int(val, key, 1, 1000, &x, err, errlen)) != 0)
				goto out;
			r->num_frames = (int32_t)x;
		} else if (strcmp(key, "fps") == 0 && r->video) {
			if ((rc = get_int(val, key, 1, 60, &x, err, errlen)) != 0)
				goto out;
			r->fps = (int32_t)x;
		} else if (strcmp(key, "seed") == 0) {
			if ((rc = get_int(val, key, 0, UINT32_MAX, &x, err, errlen)) != 0)
				goto out;
			r->seed = (uint32_t)x;
			r->seed_given = true;
		} else if (strcmp(key, "format") == 0) {
			enum enc_format f;
			const char *allowed = r->video ? "'mp4' or 'y4m'" : "'png'";
			if (!json_object_is_type(val, json_type_string) ||
			    enc_format_parse(json_object_get_string(val), &f) != 0 ||
			    (f == ENC_PNG) == r->video) {
				rc = schema_fail(err, errlen, "'format' must be %s", allowed);
				goto out;
			}
			r->format = f;
		} else {
			rc = schema_fail(err, errlen, "unknown field '%s' for %s", key, route);
			goto out;
		}
	}
	if (!r->prompt) {
		rc = schema_fail(err, errlen, "'prompt' is required");
		goto out;
	}
	if (!r->seed_given && getrandom(&r->seed, sizeof(r->seed), 0) != sizeof(r->seed))
		rc = schema_fail(err, errlen, "no randomness for a seed");
out:
	if (root)
		json_object_put(root);
	json_tokener_free(tok);
	if (rc)
		synth_request_release(r);
	return rc;
}

/* ---- the pipeline ---- */

enum slot_state { SLOT_FREE, SLOT_FULL };

struct pipe {
	const struct synth_request *r;
	const struct synth_options *opt;
	struct k_scene scene;
	struct k_gpu *gpu;
	size_t frgb, fyuv;
	uint8_t *rgb[2], *yuv[2];
	int32_t batch;

	pthread_mutex_t mu;
	pthread_cond_t cond;
	enum slot_state state[2];
	int producer_rc;
	bool stop;
};

static int render_batch(struct pipe *p, int slot, int32_t first, int32_t n)
{
	const struct synth_request *r = p->r;
	struct k_frame f = {r->width, r->height, first, r->num_frames, r->fps};

	if (p->gpu)
		return k_gpu_render(p->gpu, &p->scene, &f, first, n, p->rgb[slot],
				    r->format == ENC_PNG ? NULL : p->yuv[slot]);
	for (int32_t i = 0; i < n; i++) {
		uint8_t *rgb = p->rgb[slot] + p->frgb * i, *y = p->yuv[slot] + p->fyuv * i;
		size_t ysz = (size_t)r->width * r->height;

		f.frame = first + i;
		k_render_cpu(&p->scene, &f, rgb, p->opt->threads);
		if (r->format != ENC_PNG)
			k_rgb_to_yuv420_cpu(rgb, r->width, r->height, y, y + ysz, y + ysz + ysz / 4,
					    p->opt->threads);
	}
	return 0;
}

static void *producer(void *arg)
{
	struct pipe *p = arg;
	int slot = 0;

	for (int32_t first = 0; first < p->r->num_frames; first += p->batch, slot ^= 1) {
		int32_t n = p->r->num_frames - first < p->batch ? p->r->num_frames - first : p->batch;
		int rc;

		pthread_mutex_lock(&p->mu);
		while (p->state[slot] != SLOT_FREE && !p->stop)
			pthread_cond_wait(&p->cond, &p->mu);
		bool stop = p->stop;
		pthread_mutex_unlock(&p->mu);
		if (stop)
			break;
		rc = render_batch(p, slot, first, n);
		pthread_mutex_lock(&p->mu);
		if (rc)
			p->producer_rc = rc;
		p->state[slot] = SLOT_FULL;
		pthread_cond_broadcast(&p->cond);
		pthread_mutex_unlock(&p->mu);
		if (rc)
			break;
	}
	return NULL;
}

int synth_render_file(const struct synth_request *r, const char *path,
		      const struct synth_options *opt, char *device, size_t devlen, char *err,
		      size_t errlen)
{
	struct pipe p;
	struct enc *e = NULL;
	pthread_t tid;
	int rc = 0, slot = 0;
	bool started = false;

	memset(&p, 0, sizeof(p));
	p.r = r;
	p.opt = opt;
	p.frgb = (size_t)r->width * r->height * 3;
	p.fyuv = p.frgb / 2;
	p.batch = 1;
	k_scene_from_prompt(r->prompt, r->negative, r->seed, &p.scene);
	snprintf(device, devlen, "cpu");
	if (opt->allow_gpu && k_cuda_available() && k_gpu_open(opt->gpu, r->width, r->height, &p.gpu) == 0) {
		p.batch = K_GPU_BATCH;
		snprintf(device, devlen, "%s", k_gpu_name(p.gpu));
	}
	pthread_mutex_init(&p.mu, NULL);
	pthread_cond_init(&p.cond, NULL);
	for (int s = 0; s < 2; s++) {
		p.rgb[s] = malloc(p.frgb * (size_t)p.batch);
		p.yuv[s] = malloc(p.fyuv * (size_t)p.batch);
		if (!p.rgb[s] || !p.yuv[s]) {
			rc = -ENOMEM;
			snprintf(err, errlen, "out of memory for %dx%d frames", r->width, r->height);
			goto out;
		}
	}
	if ((rc = enc_open(r->format, path, r->width, r->height, r->fps, &e, err, errlen)) != 0)
		goto out;
	if (pthread_create(&tid, NULL, producer, &p) != 0) {
		rc = -EAGAIN;
		snprintf(err, errlen, "cannot start the render thread");
		goto out;
	}
	started = true;
	for (int32_t first = 0; first < r->num_frames && rc == 0; first += p.batch, slot ^= 1) {
		int32_t n = r->num_frames - first < p.batch ? r->num_frames - first : p.batch;

		pthread_mutex_lock(&p.mu);
		while (p.state[slot] != SLOT_FULL && p.producer_rc == 0)
			pthread_cond_wait(&p.cond, &p.mu);
		rc = p.producer_rc;
		pthread_mutex_unlock(&p.mu);
		if (rc) {
			snprintf(err, errlen, "rendering failed on %s", device);
			break;
		}
		for (int32_t i = 0; i < n && rc == 0; i++) {
			const uint8_t *y = p.yuv[slot] + p.fyuv * i;
			size_t ysz = (size_t)r->width * r->height;

			rc = r->format == ENC_PNG
				     ? enc_put_rgb(e, p.rgb[slot] + p.frgb * i)
				     : enc_put_yuv(e, y, y + ysz, y + ysz + ysz / 4);
			if (rc)
				snprintf(err, errlen, "encoding frame %d failed", first + i);
			else if (opt->progress &&
				 opt->progress(opt->progress_arg, first + i + 1, r->num_frames)) {
				rc = -ECANCELED;
				snprintf(err, errlen, "stopped after frame %d", first + i + 1);
			}
		}
		pthread_mutex_lock(&p.mu);
		p.state[slot] = SLOT_FREE;
		pthread_cond_broadcast(&p.cond);
		pthread_mutex_unlock(&p.mu);
	}
out:
	if (started) {
		pthread_mutex_lock(&p.mu);
		p.stop = true;
		pthread_cond_broadcast(&p.cond);
		pthread_mutex_unlock(&p.mu);
		pthread_join(tid, NULL);
	}
	if (e) {
		if (rc == 0) {
			rc = enc_close(e);
			if (rc)
				snprintf(err, errlen, "cannot finish '%s': %s", path, strerror(-rc));
		} else {
			enc_abort(e);
		}
	}
	for (int s = 0; s < 2; s++) {
		free(p.rgb[s]);
		free(p.yuv[s]);
	}
	k_gpu_close(p.gpu);
	pthread_mutex_destroy(&p.mu);
	pthread_cond_destroy(&p.cond);
	return rc;
}
