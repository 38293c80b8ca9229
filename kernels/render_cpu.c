/*
 * render_cpu.c - the CPU path: rows split across threads, each pixel from
 * k_pixel() (scene.h). The reference the CUDA path is compared against.
 *
 * Threads share nothing but read-only inputs and write disjoint rows, so
 * any thread count gives the same bytes. Rows are dealt round-robin rather
 * than in bands: the cost of a row depends on what crosses it (clouds,
 * sea, city), and contiguous bands left one thread idle.
 */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "kernels.h"

/* Rows dealt to a thread at a time when rendering. */
#define ROW_UNIT 8

struct rows {
	const struct k_scene *s;
	const struct k_frame *f;
	const uint8_t *rgb_in;
	uint8_t *rgb, *y, *u, *v;
	int32_t y0, stride; /* rows y0, y0 + stride, ...; for YUV, row pairs */
};

static void *render_rows(void *arg)
{
	struct rows *r = arg;
	const struct k_frame *f = r->f;

	for (int32_t y0 = r->y0; y0 < f->height; y0 += r->stride)
		for (int32_t y = y0; y < y0 + ROW_UNIT && y < f->height; y++)
			for (int32_t x = 0; x < f->width; x++)
				k_pixel(r->s, x, y, f->width, f->height, f->frame, f->num_frames,
					f->fps, r->rgb + ((size_t)y * f->width + x) * 3);
	return NULL;
}

static void *yuv_rows(void *arg)
{
	struct rows *r = arg;
	int32_t w = r->f->width;

	for (int32_t y = r->y0; y < r->f->height; y += r->stride)
		for (int32_t x = 0; x < w; x += 2)
			k_yuv_block(r->rgb_in, x, y, w, r->y, r->u, r->v, w / 2);
	return NULL;
}

static unsigned thread_count(unsigned threads, int32_t rows)
{
	if (threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		threads = n > 0 ? (unsigned)n : 1;
	}
	if (threads > 64)
		threads = 64;
	if ((int32_t)threads > rows)
		threads = rows > 0 ? (unsigned)rows : 1;
	return threads;
}

/* Run fn over [0, height) with `threads` threads taking every threads-th
 * unit of `step` rows; the calling thread takes the last share. */
static void run_bands(void *(*fn)(void *), struct rows *proto, int32_t height, unsigned threads,
		      int32_t step)
{
	struct rows r[64];
	pthread_t tid[64];
	bool started[64] = {false};
	int32_t units = (height + step - 1) / step;

	threads = thread_count(threads, units);
	for (unsigned i = 0; i < threads; i++) {
		r[i] = *proto;
		r[i].y0 = (int32_t)i * step;
		r[i].stride = (int32_t)threads * step;
		if (i + 1 < threads)
			started[i] = pthread_create(&tid[i], NULL, fn, &r[i]) == 0;
	}
	fn(&r[threads - 1]);
	for (unsigned i = 0; i + 1 < threads; i++) {
		if (started[i])
			pthread_join(tid[i], NULL);
		else
			fn(&r[i]); /* no thread to spare: do the band here */
	}
}

void k_render_cpu(const struct k_scene *s, const struct k_frame *f, uint8_t *rgb,
		  unsigned threads)
{
	struct rows proto = {s, f, NULL, rgb, NULL, NULL, NULL, 0, 0};

	run_bands(render_rows, &proto, f->height, threads, ROW_UNIT);
}

void k_rgb_to_yuv420_cpu(const uint8_t *rgb, int32_t width, int32_t height, uint8_t *y,
			 uint8_t *u, uint8_t *v, unsigned threads)
{
	struct k_frame f = {width, height, 0, 1, 1};
	struct rows proto = {NULL, &f, rgb, NULL, y, u, v, 0, 0};

	run_bands(yuv_rows, &proto, height, threads, 2);
}
