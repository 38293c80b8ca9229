/*
 * ledger.h - the usage ledger's attestations and readers (ledger.c, SPEC
 * §14): opened, started and stopped with the engine. What users call
 * (usage, attest) is in engine.h; ledger_fsck is renderctl fsck's.
 */
#ifndef RENDERFS_LEDGER_H
#define RENDERFS_LEDGER_H

#include <stdio.h>

struct engine;
struct json_object;

int ledger_open(struct engine *e);
int ledger_start(struct engine *e);
void ledger_stop(struct engine *e);
void ledger_close(struct engine *e);

/*
 * Check the usage ledger of the store in dir (not necessarily mounted;
 * read-only): the totals against the journal, and each attestation (its
 * blob, its chain, its period's totals against the journal, its
 * signature). Reports each problem on out; returns their number, or -1
 * when the index cannot be read (store_lasterr()).
 */
long ledger_fsck(const char *dir, FILE *out);

/* A usage summary (`usage`, attestations): {"jobs": {route: {outcome:
 * n}}, "seconds": {device kind: n}, "output_bytes": n, "cache_hits": n},
 * empty; and its seconds, summed as integer milliseconds, made seconds
 * with three decimals. */
struct json_object *ledger_summary_new(void);
void ledger_summary_seconds(struct json_object *s);

#endif
