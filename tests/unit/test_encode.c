/*
 * test_encode.c - synth outputs decode to what was rendered: the PNG to the
 * raw RGB frame (decoded with libavcodec), the MP4 as H.264 with the right
 * size, frame count and fps (ffprobe), its index before its data
 * (+faststart) and the same bytes on a second run; the Y4M holds exactly
 * the YUV planes of the kernels.
 */
#include <errno.h>
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "fileutil.h"
#include "kernels.h"
#include "synth.h"

static char dir[64];

static int render(const char *route, const char *json, const char *path, char *err)
{
	struct synth_request r;
	struct synth_options o = {2, false, 0, NULL, NULL};
	char device[64];
	int rc = synth_parse(route, json, strlen(json), &r, err, 256);

	if (rc)
		return rc;
	rc = synth_render_file(&r, path, &o, device, sizeof(device), err, 256);
	synth_request_release(&r);
	return rc;
}

/* Decode the first video frame of path as RGB24 into out (w*h*3). */
static int decode_png(const char *path, int w, int h, uint8_t *out)
{
	AVFormatContext *fc = NULL;
	AVCodecContext *cc = NULL;
	AVPacket *pkt = av_packet_alloc();
	AVFrame *fr = av_frame_alloc();
	int rc = -1;

	if (avformat_open_input(&fc, path, NULL, NULL) < 0 || avformat_find_stream_info(fc, NULL) < 0)
		goto out;
	const AVCodec *c = avcodec_find_decoder(fc->streams[0]->codecpar->codec_id);
	cc = avcodec_alloc_context3(c);
	if (!c || !cc || avcodec_parameters_to_context(cc, fc->streams[0]->codecpar) < 0 ||
	    avcodec_open2(cc, c, NULL) < 0 || av_read_frame(fc, pkt) < 0 ||
	    avcodec_send_packet(cc, pkt) < 0 || avcodec_receive_frame(cc, fr) < 0)
		goto out;
	if (fr->format != AV_PIX_FMT_RGB24 || fr->width != w || fr->height != h)
		goto out;
	for (int y = 0; y < h; y++)
		memcpy(out + (size_t)y * w * 3, fr->data[0] + (size_t)y * fr->linesize[0],
		       (size_t)w * 3);
	rc = 0;
out:
	av_frame_free(&fr);
	av_packet_free(&pkt);
	avcodec_free_context(&cc);
	avformat_close_input(&fc);
	return rc;
}

static void test_png(void)
{
	const int w = 160, h = 96;
	char path[128], err[256];
	uint8_t *raw = malloc((size_t)w * h * 3), *dec = malloc((size_t)w * h * 3);
	struct k_scene s;
	struct k_frame f = {w, h, 0, 1, 24};

	snprintf(path, sizeof(path), "%s/fox.png", dir);
	REQUIRE(render(SYNTH_ROUTE_IMAGE,
		       "{\"prompt\":\"a red fox in snow\",\"width\":160,\"height\":96,\"seed\":5}",
		       path, err) == 0,
		"render: %s", err);
	k_scene_from_prompt("a red fox in snow", NULL, 5, &s);
	k_render_cpu(&s, &f, raw, 1);
	CHECK(decode_png(path, w, h, dec) == 0, "the PNG does not decode to 160x96 RGB24");
	CHECK(memcmp(raw, dec, (size_t)w * h * 3) == 0, "the PNG's pixels differ from the frame");
	free(raw);
	free(dec);
}

static int probe(const char *path, const char *entry, char *out, size_t outsz)
{
	char cmd[512];
	FILE *p;

	snprintf(cmd, sizeof(cmd),
		 "ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=%s "
		 "-of default=noprint_wrappers=1:nokey=1 '%s'",
		 entry, path);
	p = popen(cmd, "r");
	if (!p || !fgets(out, (int)outsz, p)) {
		if (p)
			pclose(p);
		return -1;
	}
	out[strcspn(out, "\n")] = '\0';
	return pclose(p) == 0 ? 0 : -1;
}

static void test_mp4(void)
{
	const char *req = "{\"prompt\":\"sunset over the ocean waves, slow pan\",\"width\":128,"
			  "\"height\":96,\"num_frames\":12,\"fps\":12,\"seed\":3}";
	char a[128], b[128], err[256], v[64], *ta, *tb;
	size_t la, lb;

	snprintf(a, sizeof(a), "%s/a.mp4", dir);
	snprintf(b, sizeof(b), "%s/b.mp4", dir);
	REQUIRE(render(SYNTH_ROUTE_VIDEO, req, a, err) == 0, "render: %s", err);
	REQUIRE(render(SYNTH_ROUTE_VIDEO, req, b, err) == 0, "render: %s", err);
	REQUIRE(file_read_small(a, 1 << 24, &ta, &la) == 0 && file_read_small(b, 1 << 24, &tb, &lb) == 0,
		"read");
	CHECK(la == lb && memcmp(ta, tb, la) == 0, "two renders of one request differ");
	char *moov = memmem(ta, la, "moov", 4), *mdat = memmem(ta, la, "mdat", 4);
	CHECK(moov && mdat && moov < mdat, "the MP4 index is not at the front (+faststart)");
	free(ta);
	free(tb);
	if (!have_tool("ffprobe")) {
		printf("SKIP ffprobe checks: ffprobe is not installed (apt-get install ffmpeg)\n");
		return;
	}
	CHECK(probe(a, "codec_name", v, sizeof(v)) == 0 && strcmp(v, "h264") == 0, "codec %s", v);
	CHECK(probe(a, "width", v, sizeof(v)) == 0 && strcmp(v, "128") == 0, "width %s", v);
	CHECK(probe(a, "height", v, sizeof(v)) == 0 && strcmp(v, "96") == 0, "height %s", v);
	CHECK(probe(a, "nb_read_frames", v, sizeof(v)) == 0 && strcmp(v, "12") == 0, "frames %s", v);
	CHECK(probe(a, "r_frame_rate", v, sizeof(v)) == 0 && strcmp(v, "12/1") == 0, "fps %s", v);
	CHECK(probe(a, "pix_fmt", v, sizeof(v)) == 0 && strcmp(v, "yuv420p") == 0, "pix_fmt %s", v);
}

static void test_y4m(void)
{
	const int w = 64, h = 64, n = 3;
	char path[128], err[256], *text;
	size_t len, ysz = (size_t)w * h;
	struct k_scene s;
	struct k_frame f = {w, h, 0, n, 10};

	snprintf(path, sizeof(path), "%s/c.y4m", dir);
	REQUIRE(render(SYNTH_ROUTE_VIDEO,
		       "{\"prompt\":\"aurora\",\"width\":64,\"height\":64,\"num_frames\":3,"
		       "\"fps\":10,\"seed\":8,\"format\":\"y4m\"}",
		       path, err) == 0,
		"render: %s", err);
	REQUIRE(file_read_small(path, 1 << 20, &text, &len) == 0, "read");
	const char *hdr = "YUV4MPEG2 W64 H64 F10:1 Ip A1:1 C420jpeg XCOLORRANGE=LIMITED\n";
	size_t hl = strlen(hdr);
	CHECK(len == hl + n * (6 + ysz * 3 / 2) && memcmp(text, hdr, hl) == 0, "Y4M layout");
	k_scene_from_prompt("aurora", NULL, 8, &s);
	uint8_t *rgb = malloc(ysz * 3), *yuv = malloc(ysz * 3 / 2);
	for (int i = 0; i < n && len == hl + n * (6 + ysz * 3 / 2); i++) {
		const char *frame = text + hl + (size_t)i * (6 + ysz * 3 / 2);
		f.frame = i;
		k_render_cpu(&s, &f, rgb, 1);
		k_rgb_to_yuv420_cpu(rgb, w, h, yuv, yuv + ysz, yuv + ysz + ysz / 4, 1);
		CHECK(memcmp(frame, "FRAME\n", 6) == 0 && memcmp(frame + 6, yuv, ysz * 3 / 2) == 0,
		      "Y4M frame %d differs from the kernels' YUV", i);
	}
	free(rgb);
	free(yuv);
	free(text);
}

static void test_errors(void)
{
	char err[256];
	int rc = render(SYNTH_ROUTE_IMAGE, "{\"prompt\":\"x\",\"width\":64,\"height\":64}",
			"/nonexistent-dir/x.png", err);

	CHECK(rc != 0 && strstr(err, "x.png"), "unwritable output: %d %s", rc, err);
	rc = render(SYNTH_ROUTE_VIDEO, "{\"prompt\":\"x\",\"width\":64,\"height\":64,\"num_frames\":2}",
		    "/nonexistent-dir/x.mp4", err);
	CHECK(rc != 0 && strstr(err, "x.mp4"), "unwritable video: %d %s", rc, err);
}

int main(void)
{
	test_tmpdir(dir, "encode");
	test_png();
	test_mp4();
	test_y4m();
	test_errors();
	rm_rf(dir);
	return check_done("test_encode");
}
