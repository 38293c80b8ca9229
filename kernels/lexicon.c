/*
 * lexicon.c - from prompt words to a struct k_scene.
 *
 * DESIGN
 * Words are lowercase ASCII letter runs. Each known word sets layers, a
 * motion, or pulls the palette toward a colour; "dark", "bright", "pastel"
 * change brightness and saturation. Words of the negative prompt remove
 * what they name (a layer word's own layer is its highest bit). Every other word is hashed into the scene's seed, so an
 * unknown word still changes the picture (noise, positions), and the same
 * words always give the same scene. Layers imply their companions (waves
 * need a sea, a nebula lives in space) and set a fitting palette (night
 * for stars and moon, warm for sunsets and deserts); a prompt without any
 * layer word gets one of four landscapes chosen by its seed.
 */
#include <string.h>

#include "kernels.h"

struct word {
	const char *w;
	uint32_t layers, motion;
	uint8_t rgb[3]; /* colour words: all three set; others zero */
	int8_t kind;	/* 0 layer/motion, 1 colour, 2 dark, 3 bright, 4 pastel, 5 night, 6 day */
};

static const struct word lexicon[] = {
	/* layers */
	{"sky", K_SKY, 0, {0}, 0},	     {"sun", K_SUN, 0, {0}, 0},
	{"sunny", K_SUN, 0, {0}, 0},	     {"moon", K_MOON, 0, {0}, 0},
	{"moonlit", K_MOON, 0, {0}, 0},	     {"star", K_STARS, 0, {0}, 0},
	{"stars", K_STARS, 0, {0}, 0},	     {"starry", K_STARS, 0, {0}, 0},
	{"cloud", K_CLOUDS, 0, {0}, 0},	     {"clouds", K_CLOUDS, 0, {0}, 0},
	{"cloudy", K_CLOUDS, 0, {0}, 0},     {"sea", K_SEA, 0, {0}, 0},
	{"ocean", K_SEA, 0, {0}, 0},	     {"water", K_SEA, 0, {0}, 0},
	{"lake", K_SEA, 0, {0}, 0},	     {"wave", K_SEA | K_WAVES, 0, {0}, 0},
	{"waves", K_SEA | K_WAVES, 0, {0}, 0}, {"mountain", K_MOUNTAINS, 0, {0}, 0},
	{"mountains", K_MOUNTAINS, 0, {0}, 0}, {"peaks", K_MOUNTAINS, 0, {0}, 0},
	{"hill", K_HILLS, 0, {0}, 0},	     {"hills", K_HILLS, 0, {0}, 0},
	{"forest", K_FOREST, 0, {0}, 0},     {"tree", K_FOREST, 0, {0}, 0},
	{"trees", K_FOREST, 0, {0}, 0},	     {"woods", K_FOREST, 0, {0}, 0},
	{"desert", K_DESERT, 0, {0}, 0},     {"dunes", K_DESERT, 0, {0}, 0},
	{"sand", K_DESERT, 0, {0}, 0},	     {"snow", K_SNOW, 0, {0}, 0},
	{"snowy", K_SNOW, 0, {0}, 0},	     {"winter", K_SNOW, 0, {0}, 0},
	{"fire", K_FIRE, 0, {0}, 0},	     {"flames", K_FIRE, 0, {0}, 0},
	{"burning", K_FIRE, 0, {0}, 0},	     {"city", K_CITY, 0, {0}, 0},
	{"skyline", K_CITY, 0, {0}, 0},	     {"town", K_CITY, 0, {0}, 0},
	{"fog", K_FOG, 0, {0}, 0},	     {"mist", K_FOG, 0, {0}, 0},
	{"foggy", K_FOG, 0, {0}, 0},	     {"misty", K_FOG, 0, {0}, 0},
	{"space", K_SPACE | K_STARS, 0, {0}, 0}, {"galaxy", K_SPACE | K_STARS | K_NEBULA, 0, {0}, 0},
	{"cosmos", K_SPACE | K_STARS, 0, {0}, 0}, {"nebula", K_SPACE | K_STARS | K_NEBULA, 0, {0}, 0},
	{"aurora", K_AURORA | K_STARS, 0, {0}, 0},
	/* motion */
	{"slow", 0, K_M_SLOW, {0}, 0},	     {"slowly", 0, K_M_SLOW, {0}, 0},
	{"fast", 0, K_M_FAST, {0}, 0},	     {"quick", 0, K_M_FAST, {0}, 0},
	{"drifting", 0, K_M_DRIFT, {0}, 0},  {"drift", 0, K_M_DRIFT, {0}, 0},
	{"zoom", 0, K_M_ZOOM, {0}, 0},	     {"zooming", 0, K_M_ZOOM, {0}, 0},
	{"pan", 0, K_M_PAN, {0}, 0},	     {"panning", 0, K_M_PAN, {0}, 0},
	{"swirl", 0, K_M_SWIRL, {0}, 0},     {"swirling", 0, K_M_SWIRL, {0}, 0},
	{"flicker", 0, K_M_FLICKER, {0}, 0}, {"flickering", 0, K_M_FLICKER, {0}, 0},
	{"twinkling", 0, K_M_FLICKER, {0}, 0}, {"sunrise", K_SUN, K_M_SUNRISE, {0}, 0},
	{"dawn", K_SUN, K_M_SUNRISE, {0}, 0}, {"sunset", K_SUN, K_M_SUNSET, {0}, 0},
	{"dusk", K_SUN, K_M_SUNSET, {0}, 0},
	/* colours and tone */
	{"red", 0, 0, {220, 40, 40}, 1},     {"crimson", 0, 0, {180, 20, 50}, 1},
	{"orange", 0, 0, {245, 140, 40}, 1}, {"golden", 0, 0, {240, 190, 70}, 1},
	{"gold", 0, 0, {240, 190, 70}, 1},   {"yellow", 0, 0, {240, 225, 60}, 1},
	{"green", 0, 0, {60, 190, 80}, 1},   {"teal", 0, 0, {40, 170, 170}, 1},
	{"cyan", 0, 0, {60, 210, 230}, 1},   {"blue", 0, 0, {50, 100, 230}, 1},
	{"purple", 0, 0, {140, 60, 200}, 1}, {"violet", 0, 0, {150, 80, 230}, 1},
	{"pink", 0, 0, {240, 130, 190}, 1},  {"white", 0, 0, {240, 240, 245}, 1},
	{"silver", 0, 0, {200, 205, 215}, 1}, {"grey", 0, 0, {140, 140, 145}, 1},
	{"gray", 0, 0, {140, 140, 145}, 1},  {"black", 0, 0, {15, 15, 20}, 2},
	{"dark", 0, 0, {0}, 2},		     {"bright", 0, 0, {0}, 3},
	{"pastel", 0, 0, {0}, 4},	     {"night", K_STARS, 0, {0}, 5},
	{"midnight", K_STARS | K_MOON, 0, {0}, 5}, {"day", K_SUN, 0, {0}, 6},
};

static const struct word *lookup(const char *w, size_t n)
{
	for (size_t i = 0; i < sizeof(lexicon) / sizeof(lexicon[0]); i++)
		if (strlen(lexicon[i].w) == n && memcmp(lexicon[i].w, w, n) == 0)
			return &lexicon[i];
	return NULL;
}

static void set3(uint8_t d[3], int r, int g, int b)
{
	d[0] = (uint8_t)r;
	d[1] = (uint8_t)g;
	d[2] = (uint8_t)b;
}

static void pull(uint8_t d[3], const uint8_t c[3], int num, int den)
{
	for (int i = 0; i < 3; i++)
		d[i] = (uint8_t)(d[i] + (c[i] - d[i]) * num / den);
}

/* Call fn for each word (lowercase letter run, at most 31 letters). */
static void words(const char *text, void (*fn)(void *, const char *, size_t), void *arg)
{
	char w[32];
	size_t n = 0;

	for (const char *p = text;; p++) {
		char ch = *p;
		if (ch >= 'A' && ch <= 'Z')
			ch = (char)(ch - 'A' + 'a');
		if (ch >= 'a' && ch <= 'z') {
			if (n < sizeof(w))
				w[n++] = ch;
			continue;
		}
		if (n > 0 && n <= sizeof(w))
			fn(arg, w, n);
		n = 0;
		if (!*p)
			break;
	}
}

struct parse {
	uint32_t layers, motion, neg_layers, neg_motion, variant;
	int colours, dark, bright, pastel, night, day;
	int sum[3];
	bool negative;
};

static void on_word(void *arg, const char *w, size_t n)
{
	struct parse *p = arg;
	const struct word *e = lookup(w, n);

	if (!e) {
		/* Unknown: FNV-1a of the word, mixed into the variant. */
		uint32_t h = 2166136261u;
		for (size_t i = 0; i < n; i++)
			h = (h ^ (uint8_t)w[i]) * 16777619u;
		p->variant = k_hash(p->variant ^ h) + (p->negative ? 0x9E37u : 0);
		return;
	}
	if (p->negative) {
		/* Remove what the word names, not what it implies: "waves"
		 * removes the waves, not the sea; "sunset" the motion, not the
		 * sun. A word's own layer is its highest bit. */
		if (e->motion)
			p->neg_motion |= e->motion;
		else if (e->layers)
			p->neg_layers |= 1u << (31 - __builtin_clz(e->layers));
		return;
	}
	p->layers |= e->layers;
	p->motion |= e->motion;
	switch (e->kind) {
	case 1:
		for (int i = 0; i < 3; i++)
			p->sum[i] += e->rgb[i];
		p->colours++;
		break;
	case 2:
		p->dark++;
		break;
	case 3:
		p->bright++;
		break;
	case 4:
		p->pastel++;
		break;
	case 5:
		p->night++;
		break;
	case 6:
		p->day++;
		break;
	}
}

void k_scene_from_prompt(const char *prompt, const char *negative, uint32_t seed,
			 struct k_scene *s)
{
	struct parse p;
	uint32_t h;

	memset(&p, 0, sizeof(p));
	memset(s, 0, sizeof(*s));
	words(prompt ? prompt : "", on_word, &p);
	if (negative) {
		p.negative = true;
		words(negative, on_word, &p);
	}
	s->seed = k_hash(seed ^ k_hash(p.variant + 0x1234567u));
	h = k_hash(s->seed ^ 0xABCDEFu);

	uint32_t L = p.layers;
	const uint32_t ground = K_SEA | K_MOUNTAINS | K_HILLS | K_FOREST | K_DESERT | K_CITY |
				K_SNOW | K_FIRE;
	if (!(L & ~(uint32_t)K_SKY)) {
		static const uint32_t presets[4] = {
			K_SKY | K_CLOUDS | K_HILLS | K_SUN,
			K_SKY | K_SEA | K_WAVES | K_SUN | K_CLOUDS,
			K_SKY | K_MOUNTAINS | K_FOREST | K_CLOUDS,
			K_SKY | K_STARS | K_MOON | K_HILLS,
		};
		L |= presets[h & 3];
	}
	L |= K_SKY;
	L &= ~p.neg_layers;
	s->layers = L;
	s->motion = p.motion & ~p.neg_motion;

	/* Palette: day by default; night, sunset or desert where it fits. */
	bool night = (p.night || (L & (K_STARS | K_MOON | K_AURORA | K_SPACE)) != 0) &&
		     !p.day && !(L & K_SUN && !(s->motion & (K_M_SUNRISE | K_M_SUNSET)));
	if (L & K_SUN && !p.night)
		night = false;
	set3(s->sky_top, 40, 100, 200);
	set3(s->sky_low, 170, 205, 240);
	set3(s->ground, 80, 115, 60);
	set3(s->accent, 230, 110, 180);
	if (night) {
		set3(s->sky_top, 4, 8, 28);
		set3(s->sky_low, 25, 40, 85);
		set3(s->ground, 20, 30, 28);
	}
	if (s->motion & (K_M_SUNRISE | K_M_SUNSET)) {
		set3(s->sky_top, 50, 60, 140);
		set3(s->sky_low, 250, 160, 90);
	}
	if (L & K_DESERT) {
		set3(s->sky_low, 245, 215, 170);
		set3(s->ground, 210, 170, 110);
	}
	if (L & K_SNOW)
		set3(s->ground, 225, 230, 240);
	if (p.colours) {
		uint8_t c[3];
		for (int i = 0; i < 3; i++)
			c[i] = (uint8_t)(p.sum[i] / p.colours);
		pull(s->sky_top, c, 1, 2);
		pull(s->sky_low, c, 2, 5);
		pull(s->ground, c, 1, 4);
		pull(s->accent, c, 3, 4);
		for (int i = 0; i < 3; i++)
			s->tint[i] = 256 * 4 / 5 + c[i] * 64 / 255 + 13;
	} else {
		s->tint[0] = s->tint[1] = s->tint[2] = 256;
	}
	s->bright = 256;
	for (int i = 0; i < p.dark; i++)
		s->bright = s->bright * 3 / 5;
	for (int i = 0; i < p.bright; i++)
		s->bright = s->bright * 5 / 4;
	if (s->bright < 48)
		s->bright = 48;
	if (s->bright > 420)
		s->bright = 420;
	s->pastel = p.pastel ? 100 : 0;
	s->speed = (s->motion & K_M_FAST) ? 640 : (s->motion & K_M_SLOW) ? 96 : 256;

	/* Geometry from the seed. */
	s->horizon = (L & ground) ? Q16 * 58 / 100 + (int32_t)(h % (Q16 / 10))
				  : Q16 * 11 / 10; /* no ground: all sky */
	if (L & K_SEA)
		s->horizon = Q16 * 55 / 100 + (int32_t)(h % (Q16 / 16));
	s->sun_x = Q16 * 55 / 100 + (int32_t)((h >> 8) % (Q16 * 3 / 10));
	s->sun_y = Q16 / 5 + (int32_t)((h >> 12) % (Q16 / 6));
	s->moon_x = Q16 * 15 / 100 + (int32_t)((h >> 16) % (Q16 / 5));
	s->moon_y = Q16 / 6 + (int32_t)((h >> 4) % (Q16 / 8));
}
