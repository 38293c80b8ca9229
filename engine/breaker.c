/*
 * breaker.c - the circuit breaker of a backend instance (SPEC §8): the
 * state machine alone (engine_p.h says the states); remote.c keeps one per
 * target, calls it under remote->mu, and holds jobs in the queue while it
 * is open.
 */
#include <stdio.h>
#include <string.h>

#include "engine_p.h"

void breaker_init(struct breaker *b, const char *backend, const char *target, unsigned threshold,
                  uint64_t base_ms)
{
	memset(b, 0, sizeof(*b));
	b->backend = backend;
	snprintf(b->target, sizeof(b->target), "%s", target);
	/* It is a label in stats and a word in messages: one plain line. */
	for (char *p = b->target; *p; p++)
		if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
			*p = '_';
	b->threshold = threshold ? threshold : 1;
	b->base_ms = base_ms ? base_ms : 1000;
	b->open_ms = b->base_ms;
}

bool breaker_may_claim(struct breaker *b, uint64_t now)
{
	switch (b->state) {
	case BREAKER_CLOSED:
		return true;
	case BREAKER_OPEN:
		if (now < b->until_ms)
			return false;
		b->state = BREAKER_HALF_OPEN;
		b->probing = false;
		return true;
	case BREAKER_HALF_OPEN:
		return !b->probing;
	}
	return false;
}

bool breaker_claimed(struct breaker *b)
{
	if (b->state != BREAKER_HALF_OPEN)
		return false;
	b->probing = true;
	return true;
}

void breaker_unclaimed(struct breaker *b)
{
	if (b->state == BREAKER_HALF_OPEN)
		b->probing = false;
}

static void open_now(struct breaker *b, uint64_t now, bool again)
{
	if (again) {
		b->open_ms *= 2;
		if (b->open_ms > BREAKER_MAX_MS)
			b->open_ms = BREAKER_MAX_MS;
	} else {
		b->open_ms = b->base_ms;
	}
	b->state = BREAKER_OPEN;
	b->until_ms = now + b->open_ms;
	b->probing = false;
	b->opened++;
}

enum breaker_state breaker_result(struct breaker *b, bool probe, enum breaker_outcome o,
                                  uint64_t now)
{
	if (probe && b->state == BREAKER_HALF_OPEN) {
		b->probing = false;
		if (o == BREAKER_ANSWERED) {
			b->state = BREAKER_CLOSED;
			b->failures = 0;
			b->open_ms = b->base_ms;
		} else if (o == BREAKER_FAILED) {
			open_now(b, now, true);
		}
		return b->state;
	}
	if (o == BREAKER_ANSWERED) {
		if (b->state == BREAKER_CLOSED)
			b->failures = 0;
	} else if (o == BREAKER_FAILED && b->state == BREAKER_CLOSED &&
	           ++b->failures >= b->threshold) {
		b->failures = 0;
		open_now(b, now, false);
	}
	return b->state;
}

const char *breaker_state_name(enum breaker_state s)
{
	static const char *const names[] = {"closed", "open", "half_open"};
	return names[s];
}
