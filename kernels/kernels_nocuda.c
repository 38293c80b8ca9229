/*
 * kernels_nocuda.c - what a build without the CUDA Toolkit answers: no GPU,
 * so every caller takes the CPU path (k_render_cpu), which is complete.
 */
#include <errno.h>

#include "kernels.h"

bool k_cuda_available(void)
{
	return false;
}

int k_cuda_device_count(void)
{
	return 0;
}

int k_cuda_device_model(int device, char *buf, size_t len)
{
	(void)device;
	if (len)
		buf[0] = '\0';
	return -ENODEV;
}

int k_gpu_open(int device, int32_t max_w, int32_t max_h, struct k_gpu **out)
{
	(void)device;
	(void)max_w;
	(void)max_h;
	*out = NULL;
	return -ENOTSUP;
}

void k_gpu_close(struct k_gpu *g)
{
	(void)g;
}

int k_gpu_render(struct k_gpu *g, const struct k_scene *s, const struct k_frame *f, int32_t first,
		 int32_t count, uint8_t *rgb, uint8_t *yuv)
{
	(void)g, (void)s, (void)f, (void)first, (void)count, (void)rgb, (void)yuv;
	return -ENOTSUP;
}

const char *k_gpu_name(struct k_gpu *g)
{
	(void)g;
	return "none";
}
