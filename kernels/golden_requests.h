/*
 * golden_requests.h - the fixed requests whose frames the kernel driver
 * compares between CPU and GPU and whose BLAKE3 the unit tests pin.
 * Different prompts, sizes, seeds and frame counts; every layer and motion
 * appears at least once.
 */
#ifndef RENDERFS_GOLDEN_REQUESTS_H
#define RENDERFS_GOLDEN_REQUESTS_H

#include <stdint.h>

struct k_golden {
	const char *prompt, *negative;
	int32_t width, height, frames, fps;
	uint32_t seed;
};

static const struct k_golden k_golden_requests[] = {
	{"a red fox in snow", NULL, 256, 256, 1, 24, 1},
	{"sunset over the ocean waves", NULL, 320, 192, 3, 24, 7},
	{"starry night over mountains with a moon", NULL, 256, 144, 1, 24, 42},
	{"purple nebula in deep space", NULL, 128, 128, 1, 24, 3},
	{"city skyline at night, flickering lights", NULL, 192, 128, 2, 12, 9},
	{"golden desert dunes under a bright sun", "clouds", 256, 128, 1, 24, 11},
	{"green aurora over a snowy forest, slow drifting", NULL, 160, 96, 4, 30, 5},
	{"fire burning in the fog, fast swirl", NULL, 128, 96, 3, 24, 13},
	{"pastel pink clouds over hills, zoom and pan", NULL, 96, 64, 5, 8, 2},
	{"dark blue lake at dawn with trees", "sun", 200, 120, 2, 24, 77},
};

#define K_GOLDEN_COUNT (sizeof(k_golden_requests) / sizeof(k_golden_requests[0]))

#endif
