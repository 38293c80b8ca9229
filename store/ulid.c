/*
 * ulid.c - ULID job ids: 48-bit big-endian millisecond time then 80 random
 * bits, written in Crockford base32 (26 characters). Byte order equals
 * time order, which the index relies on for listing in creation order.
 *
 * Ids made in the same millisecond by this process increment the random
 * part (monotonic ULIDs). Protected by ulid_mu: last_ms, last.
 */
#include <errno.h>
#include <pthread.h>
#include <sodium.h>
#include <string.h>
#include <time.h>

#include "index.h"

static pthread_mutex_t ulid_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t last_ms;
static uint8_t last[JOB_ID_LEN];

static const char crockford[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void ulid_new(uint8_t id[JOB_ID_LEN])
{
	uint64_t ms = now_ms();

	pthread_mutex_lock(&ulid_mu);
	if (ms <= last_ms) {
		/* Same millisecond (or the clock went back): increment. */
		int i = JOB_ID_LEN - 1;
		while (i >= 6 && ++last[i] == 0)
			i--;
		if (i < 6) {
			/* 80 bits overflowed: move on to the next millisecond. */
			last_ms++;
			randombytes_buf(last + 6, 10);
		}
	} else {
		last_ms = ms;
		randombytes_buf(last + 6, 10);
		last[6] &= 0x7f; /* room to increment within the millisecond */
	}
	for (int i = 0; i < 6; i++)
		last[i] = (uint8_t)(last_ms >> (40 - 8 * i));
	memcpy(id, last, JOB_ID_LEN);
	pthread_mutex_unlock(&ulid_mu);
}

uint64_t ulid_time_ms(const uint8_t id[JOB_ID_LEN])
{
	uint64_t ms = 0;

	for (int i = 0; i < 6; i++)
		ms = ms << 8 | id[i];
	return ms;
}

void ulid_format(const uint8_t id[JOB_ID_LEN], char out[JOB_ID_STR_LEN + 1])
{
	/* 128 bits as 26 base32 digits: the first digit holds 3 bits. */
	for (int i = 0; i < JOB_ID_STR_LEN; i++) {
		int bit = 128 - 5 * (JOB_ID_STR_LEN - i); /* may be negative for i = 0 */
		unsigned v = 0;

		for (int b = 0; b < 5; b++) {
			int pos = bit + b;
			v <<= 1;
			if (pos >= 0)
				v |= (id[pos / 8] >> (7 - pos % 8)) & 1;
		}
		out[i] = crockford[v];
	}
	out[JOB_ID_STR_LEN] = '\0';
}

static int crockford_value(char c)
{
	if (c >= 'a' && c <= 'z')
		c = (char)(c - 'a' + 'A');
	if (c == 'O')
		c = '0';
	if (c == 'I' || c == 'L')
		c = '1';
	const char *p = strchr(crockford, c);
	return c && p ? (int)(p - crockford) : -1;
}

int ulid_parse(const char *s, uint8_t id[JOB_ID_LEN])
{
	uint8_t out[JOB_ID_LEN] = {0};

	if (strlen(s) != JOB_ID_STR_LEN)
		return -EINVAL;
	for (int i = 0; i < JOB_ID_STR_LEN; i++) {
		int v = crockford_value(s[i]);
		int bit = 128 - 5 * (JOB_ID_STR_LEN - i);

		if (v < 0 || (i == 0 && v > 7))
			return -EINVAL;
		for (int b = 0; b < 5; b++) {
			int pos = bit + b;
			if (pos >= 0 && (v >> (4 - b)) & 1)
				out[pos / 8] |= (uint8_t)(1 << (7 - pos % 8));
		}
	}
	memcpy(id, out, JOB_ID_LEN);
	return 0;
}
