/*
 * encode.c - PNG and H.264/MP4 through FFmpeg, Y4M by hand.
 *
 * DESIGN
 * One struct enc per output file. For MP4 the libx264 encoder gets a fixed
 * thread count and the bit-exact flag, the muxer the bit-exact flag and
 * movflags=+faststart, so the same frames give the same bytes on the same
 * build; colour metadata says BT.709 limited range, which is what the
 * kernels produce. PNG is one packet of the PNG encoder, written whole.
 */
#include "encode.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>

struct enc {
	enum enc_format fmt;
	int width, height, fps;
	char path[4096];
	FILE *file; /* PNG and Y4M: opened at enc_open() */
	AVFormatContext *oc;
	AVCodecContext *cc;
	AVStream *st;
	AVFrame *frame;
	AVPacket *pkt;
	int64_t next_pts;
};

const char *enc_format_name(enum enc_format f)
{
	return f == ENC_PNG ? "png" : f == ENC_MP4 ? "mp4" : "y4m";
}

const char *enc_media_type(enum enc_format f)
{
	return f == ENC_PNG ? "image/png" : f == ENC_MP4 ? "video/mp4" : "video/x-yuv4mpeg";
}

int enc_format_parse(const char *name, enum enc_format *f)
{
	for (int i = ENC_PNG; i <= ENC_Y4M; i++)
		if (strcmp(name, enc_format_name((enum enc_format)i)) == 0) {
			*f = (enum enc_format)i;
			return 0;
		}
	return -EINVAL;
}

static int av_fail(char *err, size_t errlen, const char *what, int averr)
{
	char msg[AV_ERROR_MAX_STRING_SIZE];

	av_strerror(averr, msg, sizeof(msg));
	snprintf(err, errlen, "%s: %s", what, msg);
	return averr == AVERROR(ENOMEM) ? -ENOMEM : averr == AVERROR(ENOSPC) ? -ENOSPC : -EIO;
}

static void enc_free(struct enc *e)
{
	if (e->file)
		fclose(e->file);
	if (e->oc) {
		if (e->oc->pb)
			avio_closep(&e->oc->pb);
		avformat_free_context(e->oc);
	}
	avcodec_free_context(&e->cc);
	av_frame_free(&e->frame);
	av_packet_free(&e->pkt);
	free(e);
}

static int open_png(struct enc *e, char *err, size_t errlen)
{
	const AVCodec *c = avcodec_find_encoder(AV_CODEC_ID_PNG);
	int rc;

	if (!c) {
		snprintf(err, errlen, "this FFmpeg has no PNG encoder");
		return -ENOTSUP;
	}
	e->cc = avcodec_alloc_context3(c);
	if (!e->cc)
		return -ENOMEM;
	e->cc->width = e->width;
	e->cc->height = e->height;
	e->cc->pix_fmt = AV_PIX_FMT_RGB24;
	e->cc->time_base = (AVRational){1, 1};
	e->cc->flags |= AV_CODEC_FLAG_BITEXACT;
	e->cc->thread_count = 1;
	if ((rc = avcodec_open2(e->cc, c, NULL)) < 0)
		return av_fail(err, errlen, "cannot open the PNG encoder", rc);
	return 0;
}

static int open_mp4(struct enc *e, char *err, size_t errlen)
{
	const AVCodec *c = avcodec_find_encoder_by_name("libx264");
	AVDictionary *opts = NULL;
	int rc;

	if (!c) {
		snprintf(err, errlen, "this FFmpeg has no libx264 encoder");
		return -ENOTSUP;
	}
	if ((rc = avformat_alloc_output_context2(&e->oc, NULL, "mp4", e->path)) < 0)
		return av_fail(err, errlen, "cannot make an MP4 muxer", rc);
	e->oc->flags |= AVFMT_FLAG_BITEXACT;
	e->st = avformat_new_stream(e->oc, NULL);
	e->cc = avcodec_alloc_context3(c);
	if (!e->st || !e->cc)
		return -ENOMEM;
	e->cc->width = e->width;
	e->cc->height = e->height;
	e->cc->pix_fmt = AV_PIX_FMT_YUV420P;
	e->cc->time_base = (AVRational){1, e->fps};
	e->cc->framerate = (AVRational){e->fps, 1};
	e->cc->gop_size = e->fps * 2;
	e->cc->thread_count = ENC_X264_THREADS;
	e->cc->flags |= AV_CODEC_FLAG_BITEXACT;
	e->cc->color_range = AVCOL_RANGE_MPEG;
	e->cc->color_primaries = AVCOL_PRI_BT709;
	e->cc->color_trc = AVCOL_TRC_BT709;
	e->cc->colorspace = AVCOL_SPC_BT709;
	if (e->oc->oformat->flags & AVFMT_GLOBALHEADER)
		e->cc->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
	av_opt_set(e->cc->priv_data, "preset", "veryfast", 0);
	av_opt_set(e->cc->priv_data, "crf", "20", 0);
	if ((rc = avcodec_open2(e->cc, c, NULL)) < 0)
		return av_fail(err, errlen, "cannot open libx264", rc);
	if ((rc = avcodec_parameters_from_context(e->st->codecpar, e->cc)) < 0)
		return av_fail(err, errlen, "cannot set the stream", rc);
	e->st->time_base = e->cc->time_base;
	if ((rc = avio_open(&e->oc->pb, e->path, AVIO_FLAG_WRITE)) < 0)
		return av_fail(err, errlen, e->path, rc);
	av_dict_set(&opts, "movflags", "+faststart", 0);
	rc = avformat_write_header(e->oc, &opts);
	av_dict_free(&opts);
	if (rc < 0)
		return av_fail(err, errlen, "cannot write the MP4 header", rc);
	e->frame = av_frame_alloc();
	if (!e->frame)
		return -ENOMEM;
	e->frame->format = AV_PIX_FMT_YUV420P;
	e->frame->width = e->width;
	e->frame->height = e->height;
	if ((rc = av_frame_get_buffer(e->frame, 0)) < 0)
		return av_fail(err, errlen, "cannot allocate a frame", rc);
	return 0;
}

int enc_open(enum enc_format fmt, const char *path, int width, int height, int fps,
	     struct enc **out, char *err, size_t errlen)
{
	struct enc *e = calloc(1, sizeof(*e));
	int rc = 0;

	if (!e)
		return -ENOMEM;
	e->fmt = fmt;
	e->width = width;
	e->height = height;
	e->fps = fps > 0 ? fps : 1;
	snprintf(e->path, sizeof(e->path), "%s", path);
	e->pkt = av_packet_alloc();
	if (!e->pkt) {
		enc_free(e);
		return -ENOMEM;
	}
	av_log_set_level(AV_LOG_ERROR);
	if (fmt != ENC_MP4) {
		e->file = fopen(path, "wb");
		if (!e->file) {
			rc = -errno;
			snprintf(err, errlen, "cannot create '%s': %s", path, strerror(errno));
		} else if (fmt == ENC_PNG) {
			rc = open_png(e, err, errlen);
		} else if (fprintf(e->file,
				   "YUV4MPEG2 W%d H%d F%d:1 Ip A1:1 C420jpeg XCOLORRANGE=LIMITED\n",
				   width, height, e->fps) < 0) {
			rc = -EIO;
		}
	} else {
		rc = open_mp4(e, err, errlen);
	}
	if (rc) {
		enc_abort(e);
		return rc;
	}
	*out = e;
	return 0;
}

/* The errno of a failed write: ENOSPC and EDQUOT matter (the job is
 * retried when space returns); others are EIO. */
static int write_errno(int err)
{
	return err == ENOSPC || err == EDQUOT ? -ENOSPC : -EIO;
}

/* The same for libavformat's writes (the muxer's I/O context keeps the
 * error of the write that failed). */
static int mux_errno(struct enc *e, int averr)
{
	if (e->oc && e->oc->pb && e->oc->pb->error < 0)
		averr = e->oc->pb->error;
	return averr == AVERROR(ENOSPC) || averr == AVERROR(EDQUOT) ? -ENOSPC : -EIO;
}

/* Send a frame (or NULL to flush) and write every packet that comes out. */
static int drain(struct enc *e, AVFrame *f)
{
	int rc = avcodec_send_frame(e->cc, f);

	if (rc < 0)
		return -EIO;
	for (;;) {
		rc = avcodec_receive_packet(e->cc, e->pkt);
		if (rc == AVERROR(EAGAIN) || rc == AVERROR_EOF)
			return 0;
		if (rc < 0)
			return -EIO;
		if (e->fmt == ENC_PNG) {
			errno = 0;
			size_t n = fwrite(e->pkt->data, 1, (size_t)e->pkt->size, e->file);
			rc = n == (size_t)e->pkt->size ? 0 : write_errno(errno);
		} else {
			av_packet_rescale_ts(e->pkt, e->cc->time_base, e->st->time_base);
			e->pkt->stream_index = e->st->index;
			rc = av_interleaved_write_frame(e->oc, e->pkt);
			rc = rc < 0 ? mux_errno(e, rc) : 0;
		}
		av_packet_unref(e->pkt);
		if (rc)
			return rc;
	}
}

int enc_put_rgb(struct enc *e, const uint8_t *rgb)
{
	AVFrame *f;
	int rc;

	if (e->fmt != ENC_PNG)
		return -EINVAL;
	f = av_frame_alloc();
	if (!f)
		return -ENOMEM;
	f->format = AV_PIX_FMT_RGB24;
	f->width = e->width;
	f->height = e->height;
	f->data[0] = (uint8_t *)rgb;
	f->linesize[0] = e->width * 3;
	rc = drain(e, f);
	av_frame_free(&f);
	return rc;
}

int enc_put_yuv(struct enc *e, const uint8_t *y, const uint8_t *u, const uint8_t *v)
{
	size_t ysz = (size_t)e->width * e->height, csz = ysz / 4;
	int rc;

	if (e->fmt == ENC_Y4M) {
		errno = 0;
		if (fputs("FRAME\n", e->file) < 0 || fwrite(y, 1, ysz, e->file) != ysz ||
		    fwrite(u, 1, csz, e->file) != csz || fwrite(v, 1, csz, e->file) != csz)
			return write_errno(errno);
		return 0;
	}
	if (e->fmt != ENC_MP4)
		return -EINVAL;
	if ((rc = av_frame_make_writable(e->frame)) < 0)
		return -ENOMEM;
	const uint8_t *src[4] = {y, u, v, NULL};
	const int lines[4] = {e->width, e->width / 2, e->width / 2, 0};
	av_image_copy(e->frame->data, e->frame->linesize, src, lines, AV_PIX_FMT_YUV420P, e->width,
		      e->height);
	e->frame->pts = e->next_pts++;
	return drain(e, e->frame);
}

int enc_close(struct enc *e)
{
	int rc = 0;

	if (e->fmt != ENC_MP4) {
		errno = 0;
		rc = fflush(e->file) == 0 && fsync(fileno(e->file)) == 0 ? 0 : write_errno(errno);
	} else {
		rc = drain(e, NULL);
		if (rc == 0 && (rc = av_write_trailer(e->oc)) < 0)
			rc = mux_errno(e, rc);
	}
	if (rc) {
		enc_abort(e);
		return rc;
	}
	enc_free(e);
	return 0;
}

void enc_abort(struct enc *e)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s", e->path);
	enc_free(e);
	unlink(path);
}
