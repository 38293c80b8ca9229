/*
 * scene.h - the scene description and the per-pixel function, shared
 * verbatim by the CPU path (C) and the CUDA path.
 *
 * DESIGN
 * Only integer arithmetic: coordinates and weights are Q16 fixed point
 * (65536 = 1.0), noise comes from an integer hash, curves are integer
 * polynomials (smoothstep, a parabolic sine). No floating point, so there
 * is no FMA contraction, rounding mode or library function that could make
 * two devices disagree; all overflow is on unsigned types or bounded by
 * construction in int64. A pixel is composed back to front: sky, space,
 * nebula, aurora, stars, sun, moon, clouds, then the horizon's layers
 * (mountains, hills, city, forest, sea, desert, snow ground), fire, falling
 * snow and fog, then the palette's tint and brightness.
 */
#ifndef RENDERFS_SCENE_H
#define RENDERFS_SCENE_H

#include <stdint.h>

#ifdef __CUDACC__
#define KFN __host__ __device__ static inline
#else
#define KFN static inline
#endif

enum {
	K_SKY = 1 << 0,
	K_SUN = 1 << 1,
	K_MOON = 1 << 2,
	K_STARS = 1 << 3,
	K_CLOUDS = 1 << 4,
	K_SEA = 1 << 5,
	K_WAVES = 1 << 6,
	K_MOUNTAINS = 1 << 7,
	K_HILLS = 1 << 8,
	K_FOREST = 1 << 9,
	K_DESERT = 1 << 10,
	K_SNOW = 1 << 11,
	K_FIRE = 1 << 12,
	K_CITY = 1 << 13,
	K_FOG = 1 << 14,
	K_SPACE = 1 << 15,
	K_NEBULA = 1 << 16,
	K_AURORA = 1 << 17,
};

enum {
	K_M_SLOW = 1 << 0,
	K_M_FAST = 1 << 1,
	K_M_DRIFT = 1 << 2,
	K_M_ZOOM = 1 << 3,
	K_M_PAN = 1 << 4,
	K_M_SWIRL = 1 << 5,
	K_M_FLICKER = 1 << 6,
	K_M_SUNRISE = 1 << 7,
	K_M_SUNSET = 1 << 8,
};

/* Everything a pixel depends on besides its position and time. */
struct k_scene {
	uint32_t layers; /* K_* */
	uint32_t motion; /* K_M_* */
	uint32_t seed;	 /* request seed mixed with unknown words */
	uint8_t sky_top[3], sky_low[3], ground[3], accent[3];
	int32_t tint[3];    /* per-channel gain, Q8 (256 = unchanged) */
	int32_t bright;	    /* Q8 brightness gain */
	int32_t pastel;	    /* Q8 blend toward white */
	int32_t speed;	    /* Q8 motion speed */
	int32_t horizon;    /* Q16 height of the horizon from the top */
	int32_t sun_x;	    /* Q16 */
	int32_t sun_y;	    /* Q16 */
	int32_t moon_x, moon_y;
};

#define Q16 65536
#define Q16_HALF 32768

KFN uint32_t k_hash(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return x;
}

KFN uint32_t k_hash2(int32_t x, int32_t y, uint32_t seed)
{
	return k_hash((uint32_t)x * 0x9E3779B1u ^ k_hash((uint32_t)y * 0x85EBCA77u + seed));
}

/* Q16 smoothstep of t in [0, Q16]. */
KFN int32_t k_smooth(int32_t t)
{
	int64_t tt = (int64_t)t * t >> 16;
	return (int32_t)(tt * (3 * Q16 - 2 * (int64_t)t) >> 16);
}

KFN int32_t k_clampq(int32_t t)
{
	return t < 0 ? 0 : t > Q16 ? Q16 : t;
}

KFN int32_t k_lerp(int32_t a, int32_t b, int32_t t)
{
	return a + (int32_t)(((int64_t)(b - a) * t) >> 16);
}

/* Value noise in [0, Q16) at Q16 coordinates. */
KFN int32_t k_noise2(int32_t x, int32_t y, uint32_t seed)
{
	int32_t ix = x >> 16, iy = y >> 16;
	int32_t fx = k_smooth(x & 0xffff), fy = k_smooth(y & 0xffff);
	int32_t a = (int32_t)(k_hash2(ix, iy, seed) >> 16);
	int32_t b = (int32_t)(k_hash2(ix + 1, iy, seed) >> 16);
	int32_t c = (int32_t)(k_hash2(ix, iy + 1, seed) >> 16);
	int32_t d = (int32_t)(k_hash2(ix + 1, iy + 1, seed) >> 16);
	return k_lerp(k_lerp(a, b, fx), k_lerp(c, d, fx), fy);
}

/* Fractal sum of `oct` octaves, in [0, Q16). */
KFN int32_t k_fbm(int32_t x, int32_t y, uint32_t seed, int oct)
{
	int64_t sum = 0, norm = 0;
	int32_t amp = Q16;

	for (int i = 0; i < oct; i++) {
		sum += (int64_t)k_noise2(x, y, seed + (uint32_t)i * 0x68E31DA4u) * amp;
		norm += amp;
		amp >>= 1;
		x = (int32_t)((uint32_t)x << 1) + 0x3A7F1;
		y = (int32_t)((uint32_t)y << 1) + 0x1B3C5;
	}
	return (int32_t)(sum / norm);
}

/* Sine of a Q16 phase (one turn = Q16), in [-Q16, Q16], by parabolas. */
KFN int32_t k_sin(int32_t phase)
{
	int32_t p = phase & 0xffff;
	int32_t q = (p & 0x7fff) << 1; /* position within the half turn */
	int32_t v = (int32_t)(((int64_t)q * (Q16 - q)) >> 14);

	return p < Q16_HALF ? v : -v;
}

KFN void k_mix(int32_t c[3], int32_t r, int32_t g, int32_t b, int32_t t)
{
	t = k_clampq(t);
	c[0] = k_lerp(c[0], r, t);
	c[1] = k_lerp(c[1], g, t);
	c[2] = k_lerp(c[2], b, t);
}

KFN void k_mixc(int32_t c[3], const uint8_t col[3], int32_t t)
{
	k_mix(c, col[0], col[1], col[2], t);
}

/* c = the colour t (Q16) of the way from (r0, g0, b0) to (r1, g1, b1). */
KFN void k_grad(int32_t c[3], int32_t r0, int32_t g0, int32_t b0, int32_t r1, int32_t g1,
		int32_t b1, int32_t t)
{
	c[0] = k_lerp(r0, r1, t);
	c[1] = k_lerp(g0, g1, t);
	c[2] = k_lerp(b0, b1, t);
}

/* |p - q|^2 in Q16 units, with x scaled by the aspect ratio (Q16). */
KFN int64_t k_dist2(int32_t px, int32_t py, int32_t qx, int32_t qy, int32_t aspect)
{
	int64_t dx = ((int64_t)(px - qx) * aspect) >> 16, dy = py - qy;
	return (dx * dx + dy * dy) >> 16;
}

/* 1 - d/r as Q16 for a soft disc edge of width `soft` (Q16 of r). */
KFN int32_t k_disc(int64_t d2, int32_t r, int32_t soft)
{
	int64_t r2 = ((int64_t)r * r) >> 16;
	int64_t in = ((int64_t)(r - soft) * (r - soft)) >> 16;

	if (d2 >= r2)
		return 0;
	if (d2 <= in)
		return Q16;
	return (int32_t)(((r2 - d2) << 16) / (r2 - in > 0 ? r2 - in : 1));
}

/*
 * The colour of pixel (x, y) of frame f: the whole renderer. Writes three
 * bytes to out.
 */
KFN void k_pixel(const struct k_scene *s, int32_t x, int32_t y, int32_t w, int32_t h,
		 int32_t frame, int32_t nframes, int32_t fps, uint8_t *out)
{
	const uint32_t L = s->layers, M = s->motion, seed = s->seed;
	/* time in Q16 seconds, scaled by speed; progress 0..Q16 over the video */
	int32_t t = (int32_t)(((int64_t)frame * Q16 / (fps > 0 ? fps : 1)) * s->speed >> 8);
	int32_t prog = nframes > 1 ? (int32_t)((int64_t)frame * Q16 / (nframes - 1)) : 0;
	int32_t aspect = (int32_t)((int64_t)w * Q16 / h);
	int32_t u = (int32_t)(((int64_t)x * 2 + 1) * Q16 / (2 * w));
	int32_t v = (int32_t)(((int64_t)y * 2 + 1) * Q16 / (2 * h));
	int32_t c[3];

	/* Camera: zoom toward the centre, pan sideways, swirl as a warp. */
	if (M & K_M_ZOOM) {
		int32_t scale = Q16 - (prog >> 2);
		u = Q16_HALF + (int32_t)(((int64_t)(u - Q16_HALF) * scale) >> 16);
		v = Q16_HALF + (int32_t)(((int64_t)(v - Q16_HALF) * scale) >> 16);
	}
	if (M & K_M_PAN)
		u += prog >> 2;
	if (M & K_M_SWIRL) {
		u += k_sin(v * 2 + t / 4) >> 5;
		v += k_sin(u * 2 - t / 4) >> 6;
	}

	const int32_t hz = s->horizon;
	int32_t sun_y = s->sun_y;
	if (M & K_M_SUNRISE)
		sun_y = hz + Q16 / 20 - (int32_t)(((int64_t)prog * (hz - Q16 / 6)) >> 16);
	if (M & K_M_SUNSET)
		sun_y = Q16 / 6 + (int32_t)(((int64_t)prog * (hz - Q16 / 6 + Q16 / 20)) >> 16);

	/* Sky: vertical gradient; warmer near the horizon while the sun is low. */
	int32_t sky_t = k_clampq((int32_t)((int64_t)v * Q16 / (hz > 0 ? hz : 1)));
	k_grad(c, s->sky_top[0], s->sky_top[1], s->sky_top[2], s->sky_low[0], s->sky_low[1],
	       s->sky_low[2], k_smooth(sky_t));
	if ((L & K_SUN) && (M & (K_M_SUNRISE | K_M_SUNSET))) {
		int32_t low = k_clampq((sun_y - hz / 2) * 2); /* 0 high sun .. Q16 at horizon */
		k_mix(c, 255, 120, 40, (int32_t)(((int64_t)low * sky_t >> 16) * 3 / 4));
	}
	if (L & K_SPACE)
		k_mix(c, 4, 4, 12, Q16 - Q16 / 8);

	if (L & K_NEBULA) {
		int32_t n = k_fbm(u * 3, v * 3 + (t >> 6), seed ^ 0x51u, 5);
		int32_t m = k_fbm(u * 2 + 0x8000, v * 2, seed ^ 0x77u, 4);
		int32_t a = k_clampq((n - Q16 * 2 / 5) * 3);
		k_mix(c, 90 + (m >> 10), 30, 150 - (m >> 10), a);
		k_mix(c, s->accent[0], s->accent[1], s->accent[2], a * (m >> 9) >> 8);
	}
	if (L & K_AURORA) {
		int32_t band = k_noise2(u * 3 + (t >> 3), 0x1234, seed ^ 0xA5u);
		int32_t wave = k_sin(u + band + (t >> 2)) >> 3;
		int32_t center = Q16 / 4 + wave;
		int32_t d = v - center;
		int32_t a = k_clampq(Q16 - (d < 0 ? -d : d) * 6);
		a = (int32_t)((int64_t)a * k_noise2(u * 24, v * 3 - (t >> 2), seed ^ 0x3Cu) >> 16);
		k_mix(c, 60, 255, 140, a);
		k_mix(c, 170, 60, 255, (int32_t)(((int64_t)a * (Q16 - sky_t)) >> 18));
	}
	if (L & K_STARS) {
		int32_t cell = (w > h ? w : h) / 90 + 1;
		int32_t cx = x / cell, cy = y / cell;
		uint32_t hs = k_hash2(cx, cy, seed ^ 0x5A5Au);
		if ((hs & 0xff) < 10 && v < hz) {
			int32_t sx = (int32_t)((hs >> 8) % (uint32_t)cell);
			int32_t sy = (int32_t)((hs >> 16) % (uint32_t)cell);
			int32_t dx = x - cx * cell - sx, dy = y - cy * cell - sy;
			int32_t tw = Q16;
			if (M & K_M_FLICKER)
				tw = Q16 / 2 + (k_sin((int32_t)(hs >> 12) + t * 3) >> 1);
			if (dx * dx + dy * dy <= 1 + (int32_t)(hs >> 30))
				k_mix(c, 255, 255, 240, tw * 7 / 8);
		}
	}
	if (L & K_SUN) {
		int64_t d2 = k_dist2(u, v, s->sun_x, sun_y, aspect);
		int32_t glow = k_disc(d2, Q16 / 4, Q16 / 4);
		k_mix(c, 255, 200, 120, glow >> 2);
		k_mix(c, 255, 245, 200, k_disc(d2, Q16 / 16, Q16 / 200));
	}
	if (L & K_MOON) {
		int64_t d2 = k_dist2(u, v, s->moon_x, s->moon_y, aspect);
		int32_t disc = k_disc(d2, Q16 / 20, Q16 / 300);
		if (disc) {
			int32_t crater = k_fbm(u * 40, v * 40, seed ^ 0x33u, 3);
			int32_t shade = 200 + (crater >> 11);
			k_mix(c, shade, shade, shade - 10, disc);
		}
		k_mix(c, 180, 190, 220, k_disc(d2, Q16 / 8, Q16 / 8) >> 3);
	}
	if (L & K_CLOUDS) {
		int32_t drift = (M & K_M_DRIFT) ? t / 6 : t / 24;
		int32_t n = k_fbm(u * 4 + drift, v * 9, seed ^ 0xC10u, 5);
		int32_t a = k_clampq((n - Q16 / 2) * 4);
		a = (int32_t)((int64_t)a * k_clampq((hz - v) * 8) >> 16);
		int32_t shade = 255 - (k_noise2(u * 8 + drift, v * 16, seed ^ 0x99u) >> 11);
		k_mix(c, shade, shade, shade, a * 7 / 8);
	}

	/* The horizon's layers, far to near. */
	if (L & K_MOUNTAINS) {
		int32_t ridge = hz - Q16 / 5 - (k_fbm(u * 3, 0x777, seed ^ 0x3Fu, 5) >> 2) + Q16 / 8;
		if (v > ridge) {
			int32_t depth = k_clampq((v - ridge) * 4);
			k_grad(c, 70, 80, 110, 35, 40, 60, depth);
			if ((L & K_SNOW) && v < ridge + Q16 / 20)
				k_mix(c, 245, 245, 255, Q16 - (v - ridge) * 20);
		}
	}
	if (L & K_HILLS) {
		int32_t ridge = hz - Q16 / 14 - (k_fbm(u * 2, 0x999, seed ^ 0x4Bu, 3) >> 3) + Q16 / 16;
		if (v > ridge) {
			int32_t depth = k_clampq((v - ridge) * 3);
			k_grad(c, 90, 150, 70, 40, 90, 40, depth);
		}
	}
	if (L & K_CITY) {
		int32_t bx = (int32_t)(((int64_t)u * 28) >> 16);
		uint32_t hb = k_hash2(bx, 7, seed ^ 0xC17u);
		int32_t top = hz - Q16 / 12 - (int32_t)((hb >> 16) % (uint32_t)(Q16 / 3));
		if (v > top && v <= hz + Q16 / 40) {
			c[0] = 25;
			c[1] = 25;
			c[2] = 35;
			int32_t wx = x / 4, wy = y / 5;
			uint32_t lit = k_hash2(wx, wy, seed ^ 0x111u);
			if ((x % 4) && (y % 5) > 1 && (lit & 7) < 3) {
				int32_t on = (M & K_M_FLICKER) && (k_hash2(wx, wy, (uint32_t)(t >> 14)) & 15) == 0;
				if (!on)
					k_mix(c, 255, 210, 120, Q16 * 9 / 10);
			}
		}
	}
	if (L & K_FOREST) {
		int32_t tree_w = Q16 / 40;
		int32_t tx = u / tree_w, fx = u % tree_w;
		uint32_t ht = k_hash2(tx, 3, seed ^ 0xF0Fu);
		int32_t tall = Q16 / 12 + (int32_t)((ht >> 16) % (uint32_t)(Q16 / 10));
		int32_t edge = fx < tree_w / 2 ? fx : tree_w - fx; /* triangle crown */
		int32_t top = hz + Q16 / 30 - (int32_t)((int64_t)tall * edge * 2 / tree_w);
		if (v > top) {
			int32_t depth = k_clampq((v - top) * 3);
			k_grad(c, 30, 90, 45, 10, 40, 20, depth);
		}
	}
	if (v > hz) {
		int32_t below = (int32_t)((int64_t)(v - hz) * Q16 / (Q16 - hz > 0 ? Q16 - hz : 1));
		if (L & K_SEA) {
			int32_t wv = 0;
			if (L & K_WAVES) {
				int32_t persp = Q16 / 8 + below;
				int32_t ph = (int32_t)(((int64_t)v * 40 * Q16 / persp)) + t;
				wv = k_sin(ph + (k_noise2(u * 8, v * 30, seed ^ 0x3u) >> 2)) >> 3;
			}
			c[0] = k_lerp(s->sky_low[0] / 2 + 10, 5, below) + (wv >> 11);
			c[1] = k_lerp(s->sky_low[1] / 2 + 40, 30, below) + (wv >> 11);
			c[2] = k_lerp(s->sky_low[2] / 2 + 90, 60, below) + (wv >> 10);
			if (L & K_SUN) {
				int32_t dx = u - s->sun_x;
				int32_t col = k_clampq(Q16 - (dx < 0 ? -dx : dx) * 14);
				int32_t sp = k_noise2(u * 60, v * 200 + t, seed ^ 0x8u);
				k_mix(c, 255, 220, 150, (int32_t)((int64_t)col * sp >> 17));
			}
		} else if (L & K_DESERT) {
			int32_t dune = k_sin(u * 3 + (k_fbm(u * 2, v * 4, seed ^ 0xD0u, 3) >> 1) +
					     (int32_t)((int64_t)below * 3));
			c[0] = 215 + (dune >> 12) - (below >> 11);
			c[1] = 170 + (dune >> 12) - (below >> 10);
			c[2] = 110 + (dune >> 13) - (below >> 10);
		} else if (L & K_SNOW) {
			int32_t n = k_fbm(u * 6, v * 12, seed ^ 0x5Eu, 3);
			c[0] = 225 + (n >> 12) - (below >> 12);
			c[1] = 232 + (n >> 12) - (below >> 12);
			c[2] = 245 - (below >> 13);
		} else if (!(L & (K_FOREST | K_HILLS | K_MOUNTAINS | K_CITY | K_SPACE))) {
			k_grad(c, s->ground[0], s->ground[1], s->ground[2], s->ground[0] / 2,
			       s->ground[1] / 2, s->ground[2] / 2, below);
		} else if (!(L & K_SPACE)) {
			int32_t n = k_noise2(u * 20, v * 40, seed ^ 0x61u) >> 12;
			c[0] = k_lerp(s->ground[0], 20, below) + n;
			c[1] = k_lerp(s->ground[1], 30, below) + n;
			c[2] = k_lerp(s->ground[2], 20, below);
		}
	}
	if (L & K_FIRE) {
		/* Heat: noise rising with time, fading with height; its value
		 * picks the colour (dark red, red, orange, yellow core). */
		int32_t n = k_fbm(u * 7, v * 5 + t * 2, seed ^ 0xF1u, 4);
		int32_t height = Q16 - v; /* 0 at the bottom */
		int32_t heat = n * 3 / 2 - height * 5 / 2 - Q16 / 10;
		if (M & K_M_FLICKER)
			heat += (k_noise2(t * 4, 0, seed) - Q16_HALF) >> 2;
		if (heat > 0) {
			int32_t a = k_clampq(heat * 6);
			k_mix(c, 120 + (heat >> 9), 10 + (heat >> 10), 0, a);
			k_mix(c, 250, 120, 10, (heat - Q16 / 6) * 4);
			k_mix(c, 255, 225, 110, (heat - Q16 * 2 / 5) * 3);
		}
	}
	if (L & K_SNOW) {
		int32_t fall = t / 3;
		int32_t cell = (w > h ? w : h) / 60 + 2;
		int32_t fy = y - (int32_t)(((int64_t)fall * h) >> 16);
		int32_t cx = x / cell, cy = (fy >= 0 ? fy : fy - cell + 1) / cell;
		uint32_t hs = k_hash2(cx, cy, seed ^ 0x5u);
		if ((hs & 7) < 3) {
			int32_t sx = (int32_t)((hs >> 8) % (uint32_t)cell);
			int32_t sy = (int32_t)((hs >> 16) % (uint32_t)cell);
			int32_t dx = x - cx * cell - sx, dy = fy - cy * cell - sy;
			if (dx * dx + dy * dy <= 2)
				k_mix(c, 255, 255, 255, Q16 * 7 / 8);
		}
	}
	if (L & K_FOG) {
		int32_t d = v - hz;
		int32_t a = k_clampq(Q16 - (d < 0 ? -d : d) * 2);
		a = a * 3 / 4 + (k_fbm(u * 3 + t / 10, v * 6, seed ^ 0xF06u, 3) >> 2);
		k_mix(c, 205, 208, 212, a);
	}

	/* Palette: tint, brightness, pastel. */
	for (int i = 0; i < 3; i++) {
		int32_t val = c[i] * s->tint[i] >> 8;
		val = val * s->bright >> 8;
		val = val + (((255 - val) * s->pastel) >> 8);
		out[i] = (uint8_t)(val < 0 ? 0 : val > 255 ? 255 : val);
	}
}

/*
 * One 2x2 block of RGB24 (top-left at x, y; row stride w * 3) to four Y
 * samples and one U and one V, BT.709 limited range, 8-bit coefficients:
 *   Y = 16 + (47 R + 157 G + 16 B) / 256
 *   U = 128 + (-26 R - 86 G + 112 B) / 256, V = 128 + (112 R - 102 G - 10 B) / 256
 * with rounding, chroma from the block's average colour. Offsets keep every
 * intermediate non-negative.
 */
KFN void k_yuv_block(const uint8_t *rgb, int32_t x, int32_t y, int32_t w, uint8_t *Y,
		     uint8_t *U, uint8_t *V, int32_t cw)
{
	int32_t sr = 0, sg = 0, sb = 0;

	for (int dy = 0; dy < 2; dy++)
		for (int dx = 0; dx < 2; dx++) {
			const uint8_t *p = rgb + ((size_t)(y + dy) * w + (x + dx)) * 3;
			int32_t r = p[0], g = p[1], b = p[2];
			Y[(size_t)(y + dy) * w + x + dx] =
				(uint8_t)(16 + ((47 * r + 157 * g + 16 * b + 128) >> 8));
			sr += r;
			sg += g;
			sb += b;
		}
	sr = (sr + 2) >> 2;
	sg = (sg + 2) >> 2;
	sb = (sb + 2) >> 2;
	U[(size_t)(y / 2) * cw + x / 2] =
		(uint8_t)((-26 * sr - 86 * sg + 112 * sb + 128 + 128 * 256) >> 8);
	V[(size_t)(y / 2) * cw + x / 2] =
		(uint8_t)((112 * sr - 102 * sg - 10 * sb + 128 + 128 * 256) >> 8);
}

#endif
