/*
 * kernels.h - the procedural renderer behind the built-in synth routes.
 *
 * A prompt is mapped through a small lexicon onto a struct k_scene (palette,
 * layers, motion, seeds); every pixel of every frame is then a pure
 * function of (scene, x, y, frame) computed with integer arithmetic only
 * (Q16 fixed point, integer hashes), so the CPU path and the CUDA path
 * produce byte-identical RGB frames on every machine. The CPU path is
 * always built and is the reference; CUDA is chosen at run time when a
 * device exists (RENDERFS_FORCE_CPU=1 forces the CPU).
 *
 * This folder includes nothing but libc and CUDA: it builds and tests on
 * its own (see kernels/CMakeLists.txt and kernels/kernel_driver.c).
 */
#ifndef RENDERFS_KERNELS_H
#define RENDERFS_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "scene.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Build the scene for a prompt. negative may be NULL. Words of the
 * negative prompt remove the layers and colours they name. Unknown words
 * still change the picture, through the scene's variant seed.
 */
void k_scene_from_prompt(const char *prompt, const char *negative, uint32_t seed,
			 struct k_scene *out);

/* Frame geometry and time: what the per-pixel function needs besides the
 * scene. */
struct k_frame {
	int32_t width, height;
	int32_t frame, num_frames, fps;
};

/*
 * Render one RGB24 frame (width * height * 3 bytes, rows top to bottom)
 * on the CPU with up to `threads` threads (0: one per core).
 */
void k_render_cpu(const struct k_scene *s, const struct k_frame *f, uint8_t *rgb,
		  unsigned threads);

/*
 * RGB24 to planar YUV 4:2:0, BT.709 limited range (Y 16..235, C 16..240),
 * chroma from the average of each 2x2 block. width and height are even.
 * y: width * height, u and v: width/2 * height/2 bytes.
 */
void k_rgb_to_yuv420_cpu(const uint8_t *rgb, int32_t width, int32_t height, uint8_t *y,
			 uint8_t *u, uint8_t *v, unsigned threads);

/* ---- CUDA (kernels_cuda.cu; absent builds answer false / -ENOTSUP) ---- */

/* True when the build has CUDA, a driver and at least one device, and
 * RENDERFS_FORCE_CPU is not set. Never fails otherwise: false is the
 * clean fallback. */
bool k_cuda_available(void);
/* CUDA devices usable now (0 without driver, device or with RENDERFS_FORCE_CPU). */
int k_cuda_device_count(void);

/* The model name of CUDA device n ("NVIDIA H200") into buf; -ENODEV
 * when there is none (buf ""). */
int k_cuda_device_model(int device, char *buf, size_t len);

/* Frames a GPU renders per launch; callers size their batches with it. */
#define K_GPU_BATCH 8

/* Per-worker GPU state: device buffers allocated once and reused. */
struct k_gpu;

/* Returns 0, or -ENOTSUP without CUDA / device, -ENOMEM. */
int k_gpu_open(int device, int32_t max_width, int32_t max_height, struct k_gpu **out);
void k_gpu_close(struct k_gpu *g);
/* Render frames [first, first + count) of f's video into rgb (count
 * frames back to back) and, when y is not NULL, their YUV 4:2:0 planes
 * (each frame's Y then U then V, back to back). */
int k_gpu_render(struct k_gpu *g, const struct k_scene *s, const struct k_frame *f, int32_t first,
		 int32_t count, uint8_t *rgb, uint8_t *yuv);
const char *k_gpu_name(struct k_gpu *g);

/* ---- measurement (kernels/rate.c) ---- */

/* Megapixels per second of the CPU path over `frames` frames of w x h,
 * best of three runs. */
double k_cpu_rate(const struct k_scene *s, int32_t w, int32_t h, int32_t frames,
		  unsigned threads);
/* Megapixels per second of the GPU path at w x h, RGB and YUV copied back
 * to the host, over 240 frames after a warm-up batch; negative on error.
 * g must have been opened for at least w x h. */
double k_gpu_rate(struct k_gpu *g, const struct k_scene *s, int32_t w, int32_t h);

#ifdef __cplusplus
}
#endif

#endif
