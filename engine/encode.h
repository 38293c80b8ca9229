/*
 * encode.h - writing rendered frames as PNG, MP4 (H.264) or Y4M files.
 *
 * PNG and MP4 go through FFmpeg (libavcodec, libavformat); Y4M is written
 * directly. Outputs are deterministic on a given build: bit-exact flags,
 * no timestamps or version strings in the container, a fixed number of
 * encoder threads, and MP4s with their index at the front (+faststart).
 *
 * A struct enc belongs to one thread.
 */
#ifndef RENDERFS_ENCODE_H
#define RENDERFS_ENCODE_H

#include <stddef.h>
#include <stdint.h>

enum enc_format {
	ENC_PNG,
	ENC_MP4,
	ENC_Y4M,
};

const char *enc_format_name(enum enc_format f); /* "png", "mp4", "y4m" */
const char *enc_media_type(enum enc_format f);	/* "image/png", ... */
/* Returns 0 and sets *f, or -EINVAL. */
int enc_format_parse(const char *name, enum enc_format *f);

#define ENC_X264_THREADS 2

struct enc;

/*
 * Start a file at path. width and height even (PNG: any); fps for video.
 * On error, err (errlen bytes) says why. PNG takes one frame.
 */
int enc_open(enum enc_format fmt, const char *path, int width, int height, int fps,
	     struct enc **out, char *err, size_t errlen);
/* PNG takes RGB24; MP4 and Y4M take YUV 4:2:0 planes (BT.709, limited). */
int enc_put_rgb(struct enc *e, const uint8_t *rgb);
int enc_put_yuv(struct enc *e, const uint8_t *y, const uint8_t *u, const uint8_t *v);
/* Finish the file (flush, trailer) and free e; 0 or a negative errno. */
int enc_close(struct enc *e);
/* Free e and remove the partial file. */
void enc_abort(struct enc *e);

#endif
