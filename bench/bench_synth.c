/*
 * bench_synth.c - figures for the synth renderer, as ratios measured in
 * one run:
 *   - CPU megapixels/s at 512x512 with 1 and 2 threads, and their ratio;
 *   - for a 512x512, 48-frame MP4: time to render and convert the frames,
 *     time to encode them, the encoder's share of the two, and the
 *     pipelined wall time (render and encode overlapped) against their sum;
 *   - on a GPU: its rate at 1280x720 and the ratio to 2 CPU threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"
#include "synth.h"

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *PROMPT = "sunset over the ocean waves with clouds, drifting";

static double cpu_rate(int32_t w, int32_t h, int32_t frames, unsigned threads)
{
	struct k_scene s;
	struct k_frame f = {w, h, 0, frames, 24};
	uint8_t *rgb = malloc((size_t)w * h * 3);
	double best = 0;

	k_scene_from_prompt(PROMPT, NULL, 1, &s);
	for (int rep = 0; rep < 3; rep++) {
		double t0 = now();
		for (int32_t i = 0; i < frames; i++) {
			f.frame = i;
			k_render_cpu(&s, &f, rgb, threads);
		}
		double r = (double)w * h * frames / (now() - t0) / 1e6;
		if (r > best)
			best = r;
	}
	free(rgb);
	return best;
}

int main(void)
{
	const int32_t W = 512, H = 512, N = 48;
	size_t frgb = (size_t)W * H * 3, ysz = (size_t)W * H;
	char path[] = "/tmp/renderfs-bench-XXXXXX", err[256], dev[320];

	double one = cpu_rate(W, H, 8, 1), two = cpu_rate(W, H, 8, 2);
	printf("== CPU renderer, %dx%d, '%s' (best of 3) ==\n", W, H, PROMPT);
	printf("1 thread : %7.2f MP/s\n2 threads: %7.2f MP/s\nratio 2/1: %.2f (target >= 1.8)\n",
	       one, two, two / one);

	/* Render + convert all frames, then encode them, separately. */
	struct k_scene s;
	struct k_frame f = {W, H, 0, N, 24};
	uint8_t *rgb = malloc(frgb), *yuv = malloc(ysz * 3 / 2 * N);
	k_scene_from_prompt(PROMPT, NULL, 1, &s);
	double t0 = now();
	for (int32_t i = 0; i < N; i++) {
		uint8_t *y = yuv + ysz * 3 / 2 * i;
		f.frame = i;
		k_render_cpu(&s, &f, rgb, 2);
		k_rgb_to_yuv420_cpu(rgb, W, H, y, y + ysz, y + ysz + ysz / 4, 2);
	}
	double render = now() - t0;
	int fd = mkstemp(path);
	close(fd);
	struct enc *e;
	t0 = now();
	if (enc_open(ENC_MP4, path, W, H, 24, &e, err, sizeof(err)) != 0) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	for (int32_t i = 0; i < N; i++) {
		uint8_t *y = yuv + ysz * 3 / 2 * i;
		enc_put_yuv(e, y, y + ysz, y + ysz + ysz / 4);
	}
	enc_close(e);
	double encode = now() - t0;

	/* The pipeline as the backend runs it. */
	struct synth_request r = {true, strdup(PROMPT), NULL, W, H, N, 24, 1, true, ENC_MP4};
	struct synth_options o = {2, false, NULL, NULL};
	t0 = now();
	if (synth_render_file(&r, path, &o, dev, sizeof(dev), err, sizeof(err)) != 0) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	double piped = now() - t0;
	unlink(path);
	synth_request_release(&r);
	printf("\n== %dx%d, %d-frame MP4 (libx264, %d threads), CPU rendering with 2 threads ==\n",
	       W, H, N, ENC_X264_THREADS);
	printf("render + YUV : %6.3f s\nencode       : %6.3f s\nencoder share: %.0f%% of "
	       "render + encode\n",
	       render, encode, 100 * encode / (render + encode));
	printf("pipelined    : %6.3f s = %.2f of the sum (overlap; 2 cores shared by both)\n",
	       piped, piped / (render + encode));
	free(rgb);
	free(yuv);

	if (!k_cuda_available()) {
		printf("\nGPU: no CUDA device here (RENDERFS_FORCE_CPU or no driver/device); run "
		       "kernels/kernel_driver --bench where one exists\n");
		return 0;
	}
	struct k_gpu *g;
	if (k_gpu_open(0, 1280, 720, &g) != 0)
		return 1;
	struct k_frame gf = {1280, 720, 0, 240, 24};
	uint8_t *grgb = malloc((size_t)1280 * 720 * 3 * 48), *gyuv = malloc((size_t)1280 * 720 * 3 / 2 * 48);
	k_gpu_render(g, &s, &gf, 0, 8, grgb, gyuv);
	t0 = now();
	for (int rep = 0; rep < 5; rep++)
		k_gpu_render(g, &s, &gf, rep * 48, 48, grgb, gyuv);
	double grate = 1280.0 * 720 * 48 * 5 / (now() - t0) / 1e6;
	double c720 = cpu_rate(1280, 720, 2, 2);
	printf("\nGPU %s at 1280x720: %.1f MP/s, CPU 2 threads %.2f MP/s, ratio %.0f (target >= "
	       "100)\n",
	       k_gpu_name(g), grate, c720, grate / c720);
	free(grgb);
	free(gyuv);
	k_gpu_close(g);
	return 0;
}
