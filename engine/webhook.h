/*
 * webhook.h - the engine's webhook sender (webhook.c, SPEC §13): opened,
 * started and stopped with the engine. What users call (the URL check,
 * webhook.pub, webhook.secret, a job's webhooks file, redeliver) is in
 * engine.h.
 */
#ifndef RENDERFS_WEBHOOK_H
#define RENDERFS_WEBHOOK_H

#include <stddef.h>

struct engine;
struct textbuf;

int webhooks_open(struct engine *e, char *err, size_t errlen);
int webhooks_start(struct engine *e);
/* Stops sending: deliveries in flight stay due, sent again at the next
 * start with the same webhook-id. */
void webhooks_stop(struct engine *e);
void webhooks_close(struct engine *e);
void webhooks_stats(struct engine *e, struct textbuf *b);

#endif
