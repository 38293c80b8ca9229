/*
 * kernel_driver.c - standalone check of the kernels (libc and CUDA only).
 *
 *   kernel_driver          frame hashes of the golden requests on the CPU
 *                          and, where a device exists, the GPU; exit 1 if
 *                          any GPU frame (RGB or YUV) differs from the CPU's
 *   kernel_driver --bench  CPU megapixels/s with 1 and 2 threads; on a GPU,
 *                          its rate at 1280x720 and the ratio to 2 CPU threads
 *
 * Builds without FUSE, LMDB or FFmpeg: cmake -S kernels -B build-kernels,
 * or nvcc -O2 -Ikernels kernels/{kernel_driver.c,lexicon.c,render_cpu.c}
 * kernels/kernels_cuda.cu -o kernel_driver.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "golden_requests.h"
#include "kernels.h"

/* FNV-1a 64 of each golden request's RGB frames, from the CPU reference.
 * Pinned here too so that this driver alone proves, on any machine, that
 * its CPU path draws what ours does (tests/unit pins BLAKE3 as well). */
static const uint64_t golden_fnv[K_GOLDEN_COUNT] = {
	0xfb3dbb07fae90a25ull, 0x8079ff1b5de225aeull, 0x7a174b5870fbb1eaull,
	0x84d964bd011c6e0eull, 0xe2e79d593183ee93ull, 0x7afb31b462886fd5ull,
	0x37d8792ed93afd56ull, 0x523ae32181dddac3ull, 0x3cfcab90257e5906ull,
	0xb152107acb4bbc51ull,
};

/* FNV-1a 64: enough to name frames here; the unit tests pin BLAKE3. */
static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

static int check(void)
{
	struct k_gpu *g = NULL;
	bool gpu = k_cuda_available() && k_gpu_open(0, 1920, 1080, &g) == 0;
	int bad = 0;

	printf("device: %s\n", gpu ? k_gpu_name(g) : "none (CPU only)");
	for (size_t r = 0; r < K_GOLDEN_COUNT; r++) {
		const struct k_golden *q = &k_golden_requests[r];
		struct k_scene s;
		struct k_frame f = {q->width, q->height, 0, q->frames, q->fps};
		size_t frgb = (size_t)q->width * q->height * 3, fyuv = frgb / 2;
		uint8_t *cpu = malloc(frgb * q->frames), *cyuv = malloc(fyuv * q->frames);
		uint64_t h = 0xcbf29ce484222325ull;

		k_scene_from_prompt(q->prompt, q->negative, q->seed, &s);
		for (int32_t i = 0; i < q->frames; i++) {
			uint8_t *y = cyuv + fyuv * i;
			f.frame = i;
			k_render_cpu(&s, &f, cpu + frgb * i, 0);
			k_rgb_to_yuv420_cpu(cpu + frgb * i, q->width, q->height, y,
					    y + frgb / 3, y + frgb / 3 + frgb / 12, 0);
		}
		h = fnv(h, cpu, frgb * q->frames);
		printf("%-50s %4dx%-4d x%-2d cpu %016llx", q->prompt, q->width, q->height,
		       q->frames, (unsigned long long)h);
		if (h != golden_fnv[r]) {
			printf("  DIFFERS from the golden %016llx",
			       (unsigned long long)golden_fnv[r]);
			bad++;
		}
		/* One thread draws the same frames as many. */
		uint8_t *one = malloc(frgb);
		f.frame = q->frames - 1;
		k_render_cpu(&s, &f, one, 1);
		if (memcmp(one, cpu + frgb * (size_t)(q->frames - 1), frgb) != 0) {
			printf("  1-thread frame DIFFERS");
			bad++;
		}
		free(one);
		if (gpu) {
			uint8_t *grgb = malloc(frgb * q->frames), *gyuv = malloc(fyuv * q->frames);
			int rc = k_gpu_render(g, &s, &f, 0, q->frames, grgb, gyuv);
			bool same = rc == 0 && memcmp(grgb, cpu, frgb * q->frames) == 0 &&
				    memcmp(gyuv, cyuv, fyuv * q->frames) == 0;
			printf("  gpu %s", same ? "identical" : "DIFFERENT");
			bad += !same;
			free(grgb);
			free(gyuv);
		}
		printf("\n");
		free(cpu);
		free(cyuv);
	}
	if (gpu)
		printf("%s\n", bad ? "GPU and CPU frames differ" : "GPU == CPU for every frame");
	printf("%s\n", bad ? "FAILED" : "CPU frames match the golden hashes");
	k_gpu_close(g);
	return bad ? 1 : 0;
}

static int bench(void)
{
	struct k_scene s;
	const char *prompt = "sunset over the ocean waves with clouds and mountains, drifting";
	struct k_gpu *g;

	k_scene_from_prompt(prompt, NULL, 1, &s);
	double one = k_cpu_rate(&s, 512, 512, 6, 1), two = k_cpu_rate(&s, 512, 512, 6, 2);
	printf("CPU renderer, 512x512, '%s'\n", prompt);
	printf("  1 thread : %7.2f MP/s\n  2 threads: %7.2f MP/s\n  ratio 2/1: %.2f (target >= "
	       "1.8)\n",
	       one, two, two / one);
	if (!k_cuda_available() || k_gpu_open(0, 1280, 720, &g) != 0) {
		printf("GPU: none available\n");
		return 0;
	}
	double gpu = k_gpu_rate(g, &s, 1280, 720), cpu720 = k_cpu_rate(&s, 1280, 720, 2, 2);
	printf("GPU %s, 1280x720 with YUV and copies: %.1f MP/s; CPU 2 threads %.2f MP/s; "
	       "ratio %.0f (target >= 100)\n",
	       k_gpu_name(g), gpu, cpu720, gpu / cpu720);
	k_gpu_close(g);
	return gpu > 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--bench") == 0)
		return bench();
	if (argc > 1) {
		fprintf(stderr, "usage: %s [--bench]\n", argv[0]);
		return 2;
	}
	return check();
}
