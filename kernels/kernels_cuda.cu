/*
 * kernels_cuda.cu - the CUDA path: the same k_pixel() and k_yuv_block() as
 * the CPU (scene.h, integer arithmetic only), one thread per pixel.
 *
 * DESIGN
 * A struct k_gpu belongs to one worker: its device buffers hold a batch of
 * K_GPU_BATCH frames at the largest size it was opened for, allocated once
 * and reused. Batches alternate between two buffer sets on two streams, so
 * the copy of one batch back to the host overlaps the rendering of the
 * next (double buffering). Any CUDA failure -- no driver, no device --
 * makes k_cuda_available() false: the caller uses the CPU, never an error.
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

struct k_gpu {
	int device;
	int32_t max_w, max_h;
	size_t frame_rgb, frame_yuv;
	uint8_t *d_rgb[2], *d_yuv[2];
	cudaStream_t stream[2];
	char name[300];
};

__global__ void k_render_kernel(struct k_scene s, int32_t w, int32_t h, int32_t first,
				int32_t nframes, int32_t fps, uint8_t *rgb)
{
	int32_t x = (int32_t)(blockIdx.x * blockDim.x + threadIdx.x);
	int32_t y = (int32_t)(blockIdx.y * blockDim.y + threadIdx.y);
	int32_t i = (int32_t)blockIdx.z;

	if (x >= w || y >= h)
		return;
	k_pixel(&s, x, y, w, h, first + i, nframes, fps,
		rgb + ((size_t)i * w * h + (size_t)y * w + x) * 3);
}

__global__ void k_yuv_kernel(const uint8_t *rgb, int32_t w, int32_t h, uint8_t *yuv)
{
	int32_t x = (int32_t)(blockIdx.x * blockDim.x + threadIdx.x) * 2;
	int32_t y = (int32_t)(blockIdx.y * blockDim.y + threadIdx.y) * 2;
	int32_t i = (int32_t)blockIdx.z;
	size_t ysz = (size_t)w * h, csz = ysz / 4;
	uint8_t *Y = yuv + (ysz + 2 * csz) * i;

	if (x >= w || y >= h)
		return;
	k_yuv_block(rgb + ysz * 3 * i, x, y, w, Y, Y + ysz, Y + ysz + csz, w / 2);
}

extern "C" int k_cuda_device_count(void)
{
	const char *force = getenv("RENDERFS_FORCE_CPU");
	int n = 0;

	if (force && *force && strcmp(force, "0") != 0)
		return 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess) {
		cudaGetLastError(); /* clear it: no driver is not an error here */
		return 0;
	}
	return n;
}

extern "C" int k_cuda_device_model(int device, char *buf, size_t len)
{
	cudaDeviceProp prop;

	if (len == 0)
		return -EINVAL;
	if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
		cudaGetLastError();
		buf[0] = '\0';
		return -ENODEV;
	}
	snprintf(buf, len, "%s", prop.name);
	return 0;
}

extern "C" bool k_cuda_available(void)
{
	return k_cuda_device_count() > 0;
}

extern "C" void k_gpu_close(struct k_gpu *g)
{
	if (!g)
		return;
	for (int b = 0; b < 2; b++) {
		if (g->d_rgb[b])
			cudaFree(g->d_rgb[b]);
		if (g->d_yuv[b])
			cudaFree(g->d_yuv[b]);
		if (g->stream[b])
			cudaStreamDestroy(g->stream[b]);
	}
	free(g);
}

extern "C" int k_gpu_open(int device, int32_t max_w, int32_t max_h, struct k_gpu **out)
{
	struct k_gpu *g;
	cudaDeviceProp prop;

	if (!k_cuda_available())
		return -ENOTSUP;
	g = (struct k_gpu *)calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->device = device;
	g->max_w = max_w;
	g->max_h = max_h;
	g->frame_rgb = (size_t)max_w * max_h * 3;
	g->frame_yuv = (size_t)max_w * max_h * 3 / 2;
	if (cudaSetDevice(device) != cudaSuccess ||
	    cudaGetDeviceProperties(&prop, device) != cudaSuccess)
		goto fail;
	snprintf(g->name, sizeof(g->name), "cuda:%d %s", device, prop.name);
	for (int b = 0; b < 2; b++)
		if (cudaMalloc(&g->d_rgb[b], g->frame_rgb * K_GPU_BATCH) != cudaSuccess ||
		    cudaMalloc(&g->d_yuv[b], g->frame_yuv * K_GPU_BATCH) != cudaSuccess ||
		    cudaStreamCreateWithFlags(&g->stream[b], cudaStreamNonBlocking) != cudaSuccess)
			goto fail;
	*out = g;
	return 0;
fail:
	cudaGetLastError();
	k_gpu_close(g);
	return -ENOMEM;
}

extern "C" const char *k_gpu_name(struct k_gpu *g)
{
	return g->name;
}

extern "C" int k_gpu_render(struct k_gpu *g, const struct k_scene *s, const struct k_frame *f,
			    int32_t first, int32_t count, uint8_t *rgb, uint8_t *yuv)
{
	size_t frgb = (size_t)f->width * f->height * 3, fyuv = frgb / 2;
	dim3 block(16, 16);
	int rc = 0;

	if (f->width > g->max_w || f->height > g->max_h || (f->width | f->height) & 1)
		return -EINVAL;
	if (cudaSetDevice(g->device) != cudaSuccess)
		return -EIO;
	for (int32_t done = 0, b = 0; done < count; done += K_GPU_BATCH, b ^= 1) {
		int32_t n = count - done < K_GPU_BATCH ? count - done : K_GPU_BATCH;
		dim3 grid((unsigned)(f->width + 15) / 16, (unsigned)(f->height + 15) / 16,
			  (unsigned)n);
		dim3 cgrid((unsigned)(f->width / 2 + 15) / 16, (unsigned)(f->height / 2 + 15) / 16,
			   (unsigned)n);

		/* The buffer set b was last used two batches ago: wait for its
		 * copies before overwriting it. */
		cudaStreamSynchronize(g->stream[b]);
		k_render_kernel<<<grid, block, 0, g->stream[b]>>>(*s, f->width, f->height,
								   first + done, f->num_frames,
								   f->fps, g->d_rgb[b]);
		if (yuv)
			k_yuv_kernel<<<cgrid, block, 0, g->stream[b]>>>(g->d_rgb[b], f->width,
									 f->height, g->d_yuv[b]);
		cudaMemcpyAsync(rgb + frgb * done, g->d_rgb[b], frgb * n, cudaMemcpyDeviceToHost,
				g->stream[b]);
		if (yuv)
			cudaMemcpyAsync(yuv + fyuv * done, g->d_yuv[b], fyuv * n,
					cudaMemcpyDeviceToHost, g->stream[b]);
	}
	for (int b = 0; b < 2; b++)
		if (cudaStreamSynchronize(g->stream[b]) != cudaSuccess)
			rc = -EIO;
	if (cudaGetLastError() != cudaSuccess)
		rc = -EIO;
	return rc;
}
