/*
 * test_kernels.c - the synth renderer: golden BLAKE3 of raw frames for the
 * fixed requests (CPU path), the same bytes with 1, 2 and 7 threads, exact
 * YUV conversion values, the lexicon, and request validation.
 *
 * `test_kernels --print` prints the golden table for the current code
 * (used once, when the renderer changes on purpose).
 */
#include <errno.h>
#include <string.h>

#include "blake3.h"
#include "check.h"
#include "golden_requests.h"
#include "kernels.h"
#include "synth.h"

static const char *golden_hex[K_GOLDEN_COUNT] = {
#include "kernels_golden.inc"
};

/* BLAKE3 of all RGB frames of request q, then of all YUV frames. */
static void hash_request(const struct k_golden *q, unsigned threads, char rgb_hex[65],
			 char yuv_hex[65])
{
	struct k_scene s;
	struct k_frame f = {q->width, q->height, 0, q->frames, q->fps};
	size_t frgb = (size_t)q->width * q->height * 3, ysz = (size_t)q->width * q->height;
	uint8_t *rgb = malloc(frgb), *yuv = malloc(ysz * 3 / 2), h[32];
	struct b3_hasher hr, hy;

	b3_hasher_init(&hr);
	b3_hasher_init(&hy);
	k_scene_from_prompt(q->prompt, q->negative, q->seed, &s);
	for (int32_t i = 0; i < q->frames; i++) {
		f.frame = i;
		k_render_cpu(&s, &f, rgb, threads);
		k_rgb_to_yuv420_cpu(rgb, q->width, q->height, yuv, yuv + ysz, yuv + ysz + ysz / 4,
				    threads);
		b3_hasher_update(&hr, rgb, frgb);
		b3_hasher_update(&hy, yuv, ysz * 3 / 2);
	}
	b3_hasher_finalize(&hr, h, 32);
	b3_to_hex(h, rgb_hex);
	b3_hasher_finalize(&hy, h, 32);
	b3_to_hex(h, yuv_hex);
	free(rgb);
	free(yuv);
}

static void test_golden(void)
{
	for (size_t i = 0; i < K_GOLDEN_COUNT; i++) {
		char rgb[65], yuv[65];

		hash_request(&k_golden_requests[i], 0, rgb, yuv);
		CHECK(strcmp(rgb, golden_hex[i]) == 0, "'%s': frames hash %s, golden %s",
		      k_golden_requests[i].prompt, rgb, golden_hex[i]);
	}
}

static void test_threads(void)
{
	for (size_t i = 0; i < K_GOLDEN_COUNT; i += 3) {
		char r1[65], y1[65], r2[65], y2[65], r7[65], y7[65];

		hash_request(&k_golden_requests[i], 1, r1, y1);
		hash_request(&k_golden_requests[i], 2, r2, y2);
		hash_request(&k_golden_requests[i], 7, r7, y7);
		CHECK(strcmp(r1, r2) == 0 && strcmp(r1, r7) == 0, "RGB differs across threads: %s",
		      k_golden_requests[i].prompt);
		CHECK(strcmp(y1, y2) == 0 && strcmp(y1, y7) == 0, "YUV differs across threads: %s",
		      k_golden_requests[i].prompt);
	}
}

static void test_yuv_values(void)
{
	const struct {
		uint8_t rgb[3], y, u, v;
	} cases[] = {
		{{255, 255, 255}, 235, 128, 128}, {{0, 0, 0}, 16, 128, 128},
		{{255, 0, 0}, 63, 102, 240},	  {{0, 255, 0}, 172, 42, 26},
		{{0, 0, 255}, 32, 240, 118},	  {{128, 128, 128}, 126, 128, 128},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint8_t rgb[2 * 2 * 3], y[4], u, v;

		for (int p = 0; p < 4; p++)
			memcpy(rgb + 3 * p, cases[i].rgb, 3);
		k_rgb_to_yuv420_cpu(rgb, 2, 2, y, &u, &v, 1);
		CHECK(y[0] == cases[i].y && y[3] == cases[i].y && u == cases[i].u &&
			      v == cases[i].v,
		      "rgb %d,%d,%d -> %d %d %d, want %d %d %d", cases[i].rgb[0], cases[i].rgb[1],
		      cases[i].rgb[2], y[0], u, v, cases[i].y, cases[i].u, cases[i].v);
	}
}

static void test_lexicon(void)
{
	struct k_scene a, b, c;

	k_scene_from_prompt("Sunset over the OCEAN, with waves", NULL, 1, &a);
	CHECK((a.layers & (K_SEA | K_WAVES | K_SUN)) == (K_SEA | K_WAVES | K_SUN) &&
		      (a.motion & K_M_SUNSET),
	      "layers %x motion %x", a.layers, a.motion);
	k_scene_from_prompt("sunset over the ocean with waves", "waves", 1, &b);
	CHECK((b.layers & K_SEA) && !(b.layers & K_WAVES), "negative prompt removes waves");
	k_scene_from_prompt("Sunset over the OCEAN, with waves", NULL, 1, &b);
	CHECK(memcmp(&a, &b, sizeof(a)) == 0, "same words, same scene");
	k_scene_from_prompt("sunset over the ocean with waves and a zebra", NULL, 1, &c);
	CHECK(c.seed != a.seed && c.layers == a.layers, "an unknown word changes the seed only");
	k_scene_from_prompt("sunset over the ocean with waves", NULL, 2, &c);
	CHECK(c.seed != a.seed, "the request seed changes the scene seed");
	k_scene_from_prompt("dark red forest", NULL, 1, &c);
	CHECK(c.bright < 256 && c.tint[0] > c.tint[2] && (c.layers & K_FOREST), "dark red forest");
	k_scene_from_prompt("", NULL, 1, &c);
	CHECK(c.layers & ~(uint32_t)K_SKY, "an empty prompt still draws a landscape");
	k_scene_from_prompt("fast swirling nebula, zoom", NULL, 1, &c);
	CHECK((c.layers & K_SPACE) && (c.motion & (K_M_FAST | K_M_SWIRL | K_M_ZOOM)) ==
					      (K_M_FAST | K_M_SWIRL | K_M_ZOOM),
	      "motion words");
}

static int parse(const char *route, const char *json, char *err)
{
	struct synth_request r;
	int rc = synth_parse(route, json, strlen(json), &r, err, 256);

	if (rc == 0)
		synth_request_release(&r);
	return rc;
}

static void test_validation(void)
{
	const char *I = SYNTH_ROUTE_IMAGE, *V = SYNTH_ROUTE_VIDEO;
	const struct {
		const char *route, *json, *needle;
	} bad[] = {
		{I, "{\"prompt\":\"x\",\"width\":63}", "'width' must be an integer from 64 to 4096"},
		{I, "{\"prompt\":\"x\",\"width\":4104}", "'width' must be an integer from 64 to 4096"},
		{I, "{\"prompt\":\"x\",\"height\":100}", "'height' must be a multiple of 8"},
		{V, "{\"prompt\":\"x\",\"width\":1928}", "from 64 to 1920"},
		{V, "{\"prompt\":\"x\",\"height\":1088}", "from 64 to 1080"},
		{V, "{\"prompt\":\"x\",\"num_frames\":0}", "'num_frames' must be an integer from 1 to 1000"},
		{V, "{\"prompt\":\"x\",\"num_frames\":1001}", "from 1 to 1000"},
		{V, "{\"prompt\":\"x\",\"fps\":61}", "'fps' must be an integer from 1 to 60"},
		{V, "{\"prompt\":\"x\",\"fps\":2.5}", "'fps' must be an integer"},
		{I, "{\"prompt\":\"x\",\"num_frames\":2}", "unknown field 'num_frames'"},
		{I, "{\"prompt\":\"x\",\"colour\":\"red\"}", "unknown field 'colour'"},
		{I, "{\"width\":64}", "'prompt' is required"},
		{I, "{\"prompt\":7}", "'prompt' must be a string"},
		{I, "{\"prompt\":\"x\",\"format\":\"gif\"}", "'format' must be 'png'"},
		{V, "{\"prompt\":\"x\",\"format\":\"png\"}", "'format' must be 'mp4' or 'y4m'"},
		{I, "{\"prompt\":\"x\",\"seed\":-1}", "'seed' must be an integer from 0 to 4294967295"},
		{I, "{\"prompt\":\"x\",\"seed\":4294967296}", "'seed'"},
		{I, "[1,2]", "must be a JSON object"},
		{I, "{\"prompt\":\"x\"", "not valid JSON"},
		{I, "{\"prompt\":\"x\"} {}", "text after the JSON object"},
		{"video/other/default/t2v", "{\"prompt\":\"x\"}", "not a synth route"},
	};
	char err[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = parse(bad[i].route, bad[i].json, err);
		CHECK(rc == -EINVAL && strstr(err, bad[i].needle), "%s: rc %d, '%s'", bad[i].json, rc,
		      err);
	}
	struct synth_request r;
	const char *ok = "{\"prompt\":\"fox\",\"negative_prompt\":\"blur\",\"width\":1920,"
			 "\"height\":1080,\"num_frames\":1000,\"fps\":60,\"seed\":4294967295,"
			 "\"format\":\"y4m\"}";
	CHECK(synth_parse(V, ok, strlen(ok), &r, err, sizeof(err)) == 0 && r.width == 1920 &&
		      r.num_frames == 1000 && r.fps == 60 && r.seed == 4294967295u &&
		      r.format == ENC_Y4M && strcmp(r.negative, "blur") == 0,
	      "largest valid video request: %s", err);
	synth_request_release(&r);
	CHECK(synth_parse(I, "{\"prompt\":\"fox\"}", 16, &r, err, sizeof(err)) == 0 &&
		      r.width == 512 && r.height == 512 && r.num_frames == 1 && r.format == ENC_PNG &&
		      !r.seed_given,
	      "image defaults");
	synth_request_release(&r);
}

/*
 * Every layer and motion at extreme sizes and times: under the sanitizer
 * build (CI) any signed overflow here fails the run, which matters because
 * undefined arithmetic is where CPU and GPU compilers could disagree.
 */
static void test_extremes(void)
{
	const char *all = "galaxy aurora fire city sea waves desert snow fog mountains hills "
			  "forest moon sun stars clouds swirl zoom pan flicker fast sunrise "
			  "bright bright bright pastel red";
	const int32_t sizes[][2] = {{64, 64}, {4096, 64}, {64, 4096}};
	const int32_t times[][3] = {{0, 1, 1}, {999, 1000, 1}, {59, 60, 60}};

	for (size_t z = 0; z < 3; z++)
		for (size_t t = 0; t < 3; t++) {
			struct k_scene s;
			struct k_frame f = {sizes[z][0], sizes[z][1], times[t][0], times[t][1],
					    times[t][2]};
			size_t n = (size_t)f.width * f.height;
			uint8_t *rgb = malloc(n * 3), *y = malloc(n * 3 / 2);

			k_scene_from_prompt(all, NULL, 0xFFFFFFFFu - (uint32_t)t, &s);
			k_render_cpu(&s, &f, rgb, 2);
			k_rgb_to_yuv420_cpu(rgb, f.width, f.height, y, y + n, y + n + n / 4, 2);
			/* Something was drawn: not one flat colour. */
			bool varied = false;
			for (size_t i = 3; i < n * 3 && !varied; i += 3)
				varied = memcmp(rgb, rgb + i, 3) != 0;
			CHECK(varied, "flat frame at %dx%d, frame %d", f.width, f.height, f.frame);
			free(rgb);
			free(y);
		}
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--print") == 0) {
		for (size_t i = 0; i < K_GOLDEN_COUNT; i++) {
			char rgb[65], yuv[65];
			hash_request(&k_golden_requests[i], 0, rgb, yuv);
			printf("\t\"%s\",\n", rgb);
		}
		return 0;
	}
	test_golden();
	test_threads();
	test_extremes();
	test_yuv_values();
	test_lexicon();
	test_validation();
	return check_done("test_kernels");
}
