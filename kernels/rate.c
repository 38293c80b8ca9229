/*
 * rate.c - throughput of the CPU and GPU paths, shared by kernel_driver
 * --bench and bench/bench_synth so that both measure the same way.
 */
#include <stdlib.h>
#include <time.h>

#include "kernels.h"

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double k_cpu_rate(const struct k_scene *s, int32_t w, int32_t h, int32_t frames,
		  unsigned threads)
{
	struct k_frame f = {w, h, 0, frames, 24};
	uint8_t *rgb = malloc((size_t)w * h * 3);
	double best = 0;

	if (!rgb)
		return -1;
	for (int rep = 0; rep < 3; rep++) {
		double t0 = now();
		for (int32_t i = 0; i < frames; i++) {
			f.frame = i;
			k_render_cpu(s, &f, rgb, threads);
		}
		double r = (double)w * h * frames / (now() - t0) / 1e6;
		if (r > best)
			best = r;
	}
	free(rgb);
	return best;
}

double k_gpu_rate(struct k_gpu *g, const struct k_scene *s, int32_t w, int32_t h)
{
	enum { BATCHES = 5, PER = 48 };
	struct k_frame f = {w, h, 0, BATCHES * PER, 24};
	size_t frgb = (size_t)w * h * 3;
	uint8_t *rgb = malloc(frgb * PER), *yuv = malloc(frgb / 2 * PER);
	double rate = -1;

	if (rgb && yuv && k_gpu_render(g, s, &f, 0, 8, rgb, yuv) == 0) {
		double t0 = now();
		int rc = 0;
		for (int b = 0; b < BATCHES && rc == 0; b++)
			rc = k_gpu_render(g, s, &f, b * PER, PER, rgb, yuv);
		if (rc == 0)
			rate = (double)w * h * BATCHES * PER / (now() - t0) / 1e6;
	}
	free(rgb);
	free(yuv);
	return rate;
}
