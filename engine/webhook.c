/*
 * webhook.c - delivering job changes to webhooks (SPEC §13), the way the
 * Standard Webhooks specification says, so that stock verifiers accept
 * them.
 *
 * DESIGN
 * A delivery is made by the index in the transaction of the change it
 * reports (index_hooks.c): nothing here decides what to deliver, only
 * when and how. One thread (rfs-webhook) takes due deliveries from the
 * index, at most HOOK_INFLIGHT at a time, renders each body from the job
 * as the change left it (the delivery's snapshot, so every attempt sends
 * the same bytes), signs it and hands it to an HTTP loop of its own
 * (http.c: no redirects, deny_net=, 15 s per attempt). The loop's
 * callback only queues the answer; the thread records each attempt
 * durably (index_hook_attempt) with what follows it: delivered (2xx),
 * gone (410), the next attempt (the schedule with ±10% jitter, or the
 * answer's Retry-After), or given up after the last.
 *
 * A crash between sending and recording sends the delivery again after
 * the restart with the same webhook-id: receivers deduplicate on it
 * (Standard Webhooks' idempotency key). Nothing is held in memory beyond
 * the deliveries in flight: the backlog lives in the index.
 *
 * Signatures: `v1a,` Ed25519 with the store's webhook key (webhook.pub)
 * and `v1,` HMAC-SHA256 with the job owner's secret (webhook.secret),
 * both over "<webhook-id>.<webhook-timestamp>.<body>"; the timestamp is
 * the attempt's, so that a retry hours later is not refused as stale.
 *
 * LOCKING: w->mu guards the slots' `busy` and `answered`, the answered
 * list, `wake` and `stop`; the counters are atomic. The thread is the
 * only one that writes deliveries (index calls are made without mu).
 */
#include <errno.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_p.h"
#include "http.h"
#include "jobview.h"
#include "webhook.h"

#define HOOK_INFLIGHT 32
#define HOOK_TIMEOUT_MS 15000
#define HOOK_RETRY_AFTER_MAX_MS (24ull * 3600 * 1000)
#define HOOK_ANSWER_MAX 4096

static const uint64_t default_schedule[] = {
	5000, 300000, 1800000, 7200000, 18000000, 36000000, 50400000, 72000000, 86400000,
};

struct slot {
	bool busy, answered;
	uint8_t id[JOB_ID_LEN];
	uint16_t tries;
	uint64_t started_ms;
	uint64_t http_id;
	/* The answer (set by the HTTP loop's callback, under mu). */
	long status;
	uint64_t retry_after_ms;
	char message[HOOK_MSG_MAX + 1];
	struct webhooks *w;
	struct slot *next_answered;
};

struct webhooks {
	struct engine *e;
	struct http_deny *deny;
	struct http_loop *http;
	uint64_t schedule[ENGINE_HOOK_RETRY_MAX];
	size_t nschedule;
	pthread_t thread;
	bool started;

	pthread_mutex_t mu;
	pthread_cond_t cond;
	bool wake, stop;
	struct slot slots[HOOK_INFLIGHT];
	struct slot *answered; /* answers to record */

	_Atomic uint64_t delivered, failed, gone, given_up;
	/* A delivery could not be read or its attempt not recorded (a
	 * damaged record, a full disk): it is still due, so nothing starts
	 * before this time (ms), or the thread would send it in a loop.
	 * The thread's own. */
	uint64_t pause_until;
};

/* ---- the text of a delivery ---- */

static void b64(const uint8_t *bin, size_t len, char *out, size_t outlen)
{
	sodium_bin2base64(out, outlen, bin, len, sodium_base64_VARIANT_ORIGINAL);
}

static void hook_id_text(const uint8_t id[JOB_ID_LEN], char out[4 + JOB_ID_STR_LEN + 1])
{
	memcpy(out, "msg_", 4);
	ulid_format(id, out + 4);
}

/* The body: {"type", "timestamp", "data": status.json}, malloc'ed. */
static int hook_body(struct engine *e, const struct hook_delivery *d, char **out, size_t *len)
{
	char ts[32], *status = NULL;
	size_t slen = 0;
	int rc = jobview_status_json(e, &d->snap, &status, &slen);

	if (rc)
		return rc;
	while (slen && status[slen - 1] == '\n')
		slen--;
	engine_time_format(d->event_ms, ts);
	rc = dup_text(out, len, "{\"type\":\"job.%s\",\"timestamp\":\"%s\",\"data\":%.*s}",
		      hook_event_name(d->event), ts, (int)slen, status);
	free(status);
	return rc;
}

/* "v1a,<b64> v1,<b64>" over "<id>.<ts>.<body>". */
static int hook_sign(struct engine *e, uint32_t uid, const char *idtext, const char *ts,
		     const char *body, size_t blen, char *out, size_t outlen)
{
	size_t il = strlen(idtext), tl = strlen(ts), ml = il + 1 + tl + 1 + blen;
	uint8_t *msg = malloc(ml), sig[64], mac[crypto_auth_hmacsha256_BYTES], key[32];
	char s1[96], s2[64];
	int rc;

	if (!msg)
		return -ENOMEM;
	memcpy(msg, idtext, il);
	msg[il] = '.';
	memcpy(msg + il + 1, ts, tl);
	msg[il + 1 + tl] = '.';
	memcpy(msg + il + 2 + tl, body, blen);
	if ((rc = store_webhook_sign(e->st, msg, ml, sig)) == 0 &&
	    (rc = store_user_secret(e->st, uid, key)) == 0) {
		crypto_auth_hmacsha256(mac, msg, ml, key);
		sodium_memzero(key, sizeof(key));
		b64(sig, sizeof(sig), s1, sizeof(s1));
		b64(mac, sizeof(mac), s2, sizeof(s2));
		snprintf(out, outlen, "v1a,%s v1,%s", s1, s2);
	}
	free(msg);
	return rc;
}

/* ---- the HTTP loop's side ---- */

static void answered(void *arg, const struct http_response *r)
{
	struct slot *s = arg;
	struct webhooks *w = s->w;

	pthread_mutex_lock(&w->mu);
	s->status = r->status;
	s->retry_after_ms = r->retry_after_ms;
	if (r->status >= 200 && r->status < 300)
		snprintf(s->message, sizeof(s->message), "delivered: HTTP %ld", r->status);
	else if (r->status == 410)
		snprintf(s->message, sizeof(s->message), "HTTP 410: the receiver wants no more");
	else if (r->status >= 300 && r->status < 400)
		snprintf(s->message, sizeof(s->message), "HTTP %ld: redirects are not followed",
			 r->status);
	else if (r->status)
		snprintf(s->message, sizeof(s->message), "HTTP %ld", r->status);
	else
		snprintf(s->message, sizeof(s->message), "%.*s", HOOK_MSG_MAX,
			 r->cancelled ? "stopped: the daemon is shutting down" : r->message);
	s->answered = true;
	s->next_answered = w->answered;
	w->answered = s;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->mu);
}

/* ---- the thread ---- */

/* Record what slot s's attempt came to, and free the slot. */
static void record(struct webhooks *w, struct slot *s)
{
	struct hook_attempt a = {0};
	enum hook_state st;
	uint64_t now = now_ms(), next = 0;
	int rc;

	a.at_ms = s->started_ms;
	a.ms = (uint32_t)(now - s->started_ms);
	a.status = (uint16_t)(s->status > 0 && s->status < 1000 ? s->status : 0);
	snprintf(a.msg, sizeof(a.msg), "%s", s->message);
	if (s->status >= 200 && s->status < 300) {
		st = HOOK_DELIVERED;
	} else if (s->status == 410) {
		st = HOOK_GONE;
	} else if ((size_t)s->tries >= w->nschedule) {
		st = HOOK_GIVEN_UP;
	} else if (s->retry_after_ms) {
		st = HOOK_PENDING;
		next = now + (s->retry_after_ms < HOOK_RETRY_AFTER_MAX_MS ? s->retry_after_ms
									   : HOOK_RETRY_AFTER_MAX_MS);
	} else {
		/* The schedule's delay, ±10% so that deliveries that failed
		 * together spread out. */
		uint64_t d = w->schedule[s->tries], j = d / 10;

		st = HOOK_PENDING;
		next = now + d - j + (j ? randombytes_uniform((uint32_t)(2 * j)) : 0);
	}
	rc = index_hook_attempt(w->e->ix, s->id, &a, st, next);
	if (rc && rc != STORE_E_NOTFOUND && rc != STORE_E_STATE) {
		fprintf(stderr, "renderfs: cannot record a webhook attempt (deliveries pause "
				"for 5 s): %s\n",
			store_lasterr());
		w->pause_until = now_ms() + 5000;
	}
	atomic_fetch_add(st == HOOK_DELIVERED ? &w->delivered : &w->failed, 1);
	if (st == HOOK_GONE)
		atomic_fetch_add(&w->gone, 1);
	if (st == HOOK_GIVEN_UP)
		atomic_fetch_add(&w->given_up, 1);
	pthread_mutex_lock(&w->mu);
	s->busy = s->answered = false;
	pthread_mutex_unlock(&w->mu);
}

/* Start delivery id in slot s; one that cannot be made (its body or
 * signature) is recorded as a failed attempt and the slot freed. */
static void start(struct webhooks *w, struct slot *s, const uint8_t id[JOB_ID_LEN])
{
	struct engine *e = w->e;
	struct hook_delivery d;
	char idtext[4 + JOB_ID_STR_LEN + 1], ts[24], sig[256], h_id[64], h_ts[48], h_sig[300];
	const char *headers[4];
	char *body = NULL;
	size_t blen = 0;
	int rc = index_hook_get(e->ix, id, &d);

	memcpy(s->id, id, JOB_ID_LEN);
	s->started_ms = now_ms();
	s->status = 0;
	s->retry_after_ms = 0;
	s->message[0] = '\0';
	if (rc) {
		hook_delivery_release(&d);
		if (rc != STORE_E_NOTFOUND) {
			fprintf(stderr, "renderfs: cannot read a webhook delivery (deliveries "
					"pause for 5 s): %s\n",
				store_lasterr());
			w->pause_until = now_ms() + 5000;
		}
		pthread_mutex_lock(&w->mu);
		s->busy = false;
		pthread_mutex_unlock(&w->mu);
		return;
	}
	s->tries = d.tries;
	hook_id_text(id, idtext);
	snprintf(ts, sizeof(ts), "%llu", (unsigned long long)(s->started_ms / 1000));
	if ((rc = hook_body(e, &d, &body, &blen)) != 0 ||
	    (rc = hook_sign(e, d.uid, idtext, ts, body, blen, sig, sizeof(sig))) != 0) {
		snprintf(s->message, sizeof(s->message), "cannot make the delivery: %s",
			 rc == -ENOMEM ? "out of memory" : store_lasterr());
		free(body);
		hook_delivery_release(&d);
		record(w, s);
		return;
	}
	snprintf(h_id, sizeof(h_id), "webhook-id: %s", idtext);
	snprintf(h_ts, sizeof(h_ts), "webhook-timestamp: %s", ts);
	snprintf(h_sig, sizeof(h_sig), "webhook-signature: %s", sig);
	headers[0] = "Content-Type: application/json";
	headers[1] = h_id;
	headers[2] = h_ts;
	headers[3] = h_sig;
	struct http_request rq = {
		.method = "POST",
		.url = d.url,
		.headers = headers,
		.nheaders = 4,
		.body = body,
		.body_len = blen,
		.timeout_ms = HOOK_TIMEOUT_MS,
		.max_body = HOOK_ANSWER_MAX,
	};
	rc = http_submit(w->http, &rq, answered, s, &s->http_id);
	free(body);
	hook_delivery_release(&d);
	if (rc) {
		snprintf(s->message, sizeof(s->message), "cannot send: %s", strerror(-rc));
		record(w, s);
	}
}

static void *hook_main(void *arg)
{
	struct webhooks *w = arg;
	uint8_t inflight[HOOK_INFLIGHT][JOB_ID_LEN], due[HOOK_INFLIGHT][JOB_ID_LEN];

	pthread_mutex_lock(&w->mu);
	while (!w->stop) {
		struct slot *a = w->answered;
		size_t nin = 0, nfree = 0, n = 0;
		uint64_t next = 0, now;

		w->answered = NULL;
		w->wake = false;
		pthread_mutex_unlock(&w->mu);
		while (a) {
			struct slot *nx = a->next_answered;
			record(w, a);
			a = nx;
		}
		pthread_mutex_lock(&w->mu);
		for (size_t i = 0; i < HOOK_INFLIGHT; i++) {
			if (w->slots[i].busy)
				memcpy(inflight[nin++], w->slots[i].id, JOB_ID_LEN);
			else
				nfree++;
		}
		pthread_mutex_unlock(&w->mu);
		now = now_ms();
		if (now < w->pause_until) {
			nfree = 0; /* nothing starts: wait for the pause's end */
			next = w->pause_until;
		}
		if (nfree && index_hook_due(w->e->ix, now, (const uint8_t(*)[JOB_ID_LEN])inflight,
					    nin, nfree, due, &n, &next) != 0) {
			fprintf(stderr, "renderfs: cannot read the webhook schedule: %s\n",
				store_lasterr());
			n = 0;
			next = now + 5000;
		}
		for (size_t k = 0; k < n; k++) {
			struct slot *s = NULL;
			pthread_mutex_lock(&w->mu);
			for (size_t i = 0; i < HOOK_INFLIGHT && !s; i++)
				if (!w->slots[i].busy)
					s = &w->slots[i];
			if (s)
				s->busy = true;
			pthread_mutex_unlock(&w->mu);
			if (s)
				start(w, s, due[k]);
		}
		pthread_mutex_lock(&w->mu);
		if (w->stop || w->wake || w->answered)
			continue;
		/* Until the next is due (a minute at most: the clock may
		 * jump), a delivery is added, or an answer comes. With every
		 * slot busy, `next` says nothing: an answer wakes it. */
		struct timespec ts;
		uint64_t wait = 60000;
		if (now < w->pause_until)
			wait = w->pause_until - now;
		else if (nfree && n < nfree && next)
			wait = next > now ? next - now : 0;
		if (n == nfree && nfree)
			wait = 0; /* more may be due */
		if (wait) {
			engine_abstime(wait < 60000 ? wait : 60000, &ts);
			pthread_cond_timedwait(&w->cond, &w->mu, &ts);
		}
	}
	pthread_mutex_unlock(&w->mu);
	return NULL;
}

/* index_set_hook_wake's callback: a commit added deliveries. */
static void hook_wake(void *arg)
{
	struct webhooks *w = arg;

	pthread_mutex_lock(&w->mu);
	w->wake = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->mu);
}

/* ---- life cycle ---- */

int webhooks_open(struct engine *e, char *err, size_t errlen)
{
	struct webhooks *w = calloc(1, sizeof(*w));
	int rc;

	if (!w)
		return -ENOMEM;
	w->e = e;
	if (e->opt.webhook_retries) {
		w->nschedule = e->opt.webhook_retries;
		memcpy(w->schedule, e->opt.webhook_retry_ms, w->nschedule * sizeof(uint64_t));
	} else {
		w->nschedule = sizeof(default_schedule) / sizeof(default_schedule[0]);
		memcpy(w->schedule, default_schedule, sizeof(default_schedule));
	}
	if ((rc = http_deny_parse(e->opt.deny_net ? e->opt.deny_net : HTTP_DENY_DEFAULT, &w->deny,
				  err, errlen)) != 0) {
		free(w);
		return rc;
	}
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cond, NULL);
	for (size_t i = 0; i < HOOK_INFLIGHT; i++)
		w->slots[i].w = w;
	e->hooks = w;
	return 0;
}

int webhooks_start(struct engine *e)
{
	struct webhooks *w = e->hooks;
	int rc;

	if ((rc = http_loop_start(w->deny, &w->http)) != 0)
		return rc;
	index_set_hook_wake(e->ix, hook_wake, w);
	if (pthread_create(&w->thread, NULL, hook_main, w) != 0) {
		index_set_hook_wake(e->ix, NULL, NULL);
		http_loop_stop(w->http);
		w->http = NULL;
		return -EAGAIN;
	}
	pthread_setname_np(w->thread, "rfs-webhook");
	w->started = true;
	return 0;
}

void webhooks_stop(struct engine *e)
{
	struct webhooks *w = e->hooks;

	if (!w || !w->started)
		return;
	pthread_mutex_lock(&w->mu);
	w->stop = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->mu);
	pthread_join(w->thread, NULL);
	/* Transfers in flight end `cancelled` (their callbacks queue them);
	 * they stay due and go again at the next start, same webhook-id. */
	http_loop_stop(w->http);
	w->http = NULL;
	for (struct slot *s = w->answered; s; s = s->next_answered)
		s->busy = false;
	w->answered = NULL;
	w->started = false;
}

void webhooks_close(struct engine *e)
{
	struct webhooks *w = e->hooks;

	if (!w)
		return;
	webhooks_stop(e);
	/* No index writer is left (the engine has stopped): its wake-up may
	 * go (a commit after the stop only woke a thread that was gone). */
	index_set_hook_wake(e->ix, NULL, NULL);
	http_deny_free(w->deny);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cond);
	free(w);
	e->hooks = NULL;
}

void webhooks_stats(struct engine *e, struct textbuf *b)
{
	struct webhooks *w = e->hooks;
	uint64_t backlog = 0;

	if (!w)
		return;
	if (index_hook_backlog(e->ix, &backlog) != 0)
		backlog = 0;
	tb_printf(b,
		  "# HELP renderfs_webhook_attempts_total Webhook delivery attempts since the "
		  "mount, by outcome.\n"
		  "# TYPE renderfs_webhook_attempts_total counter\n"
		  "renderfs_webhook_attempts_total{outcome=\"delivered\"} %llu\n"
		  "renderfs_webhook_attempts_total{outcome=\"failed\"} %llu\n"
		  "# HELP renderfs_webhook_deliveries_ended_total Deliveries that ended without "
		  "a 2xx since the mount.\n"
		  "# TYPE renderfs_webhook_deliveries_ended_total counter\n"
		  "renderfs_webhook_deliveries_ended_total{outcome=\"gone\"} %llu\n"
		  "renderfs_webhook_deliveries_ended_total{outcome=\"given_up\"} %llu\n"
		  "# HELP renderfs_webhook_backlog Webhook deliveries waiting for an attempt.\n"
		  "# TYPE renderfs_webhook_backlog gauge\n"
		  "renderfs_webhook_backlog %llu\n",
		  (unsigned long long)atomic_load(&w->delivered),
		  (unsigned long long)atomic_load(&w->failed),
		  (unsigned long long)atomic_load(&w->gone),
		  (unsigned long long)atomic_load(&w->given_up), (unsigned long long)backlog);
}

/* ---- what users read and write ---- */

int engine_webhook_url_check(const char *url, char *err, size_t errlen)
{
	size_t n = strlen(url);

	if (n == 0 || n > INDEX_HOOK_URL_MAX) {
		snprintf(err, errlen, "'webhook' must be a URL of 1 to %d bytes", INDEX_HOOK_URL_MAX);
		return -EINVAL;
	}
	if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0) {
		snprintf(err, errlen, "'webhook' must be an http:// or https:// URL");
		return -EINVAL;
	}
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)url[i] <= ' ' || url[i] == 0x7f) {
			snprintf(err, errlen, "'webhook' must not hold spaces or control characters");
			return -EINVAL;
		}
	return 0;
}

int engine_webhook_pub(struct engine *e, char **out, size_t *len)
{
	uint8_t pk[32];
	char t[64];
	int rc = store_webhook_pubkey(e->st, pk);

	if (rc)
		return rc;
	b64(pk, sizeof(pk), t, sizeof(t));
	return dup_text(out, len, "whpk_%s\n", t);
}

int engine_webhook_secret(struct engine *e, uint32_t uid, char **out, size_t *len)
{
	uint8_t key[32];
	char t[64];
	int rc = store_user_secret(e->st, uid, key);

	if (rc)
		return rc;
	_Static_assert(6 + sodium_base64_ENCODED_LEN(32, sodium_base64_VARIANT_ORIGINAL) ==
			       ENGINE_HOOK_SECRET_TEXT_LEN,
		       "webhook.secret's size (fs/nodes.c)");
	b64(key, sizeof(key), t, sizeof(t));
	sodium_memzero(key, sizeof(key));
	rc = dup_text(out, len, "whsec_%s\n", t);
	sodium_memzero(t, sizeof(t));
	return rc;
}

/* The job's `webhooks` file: per delivery a line, then its attempts. */
int engine_webhooks_text(struct engine *e, const struct job *j, char **out, size_t *len)
{
	struct textbuf b = {malloc(1024), 0, 1024, false};
	uint8_t ids[64][JOB_ID_LEN], after[JOB_ID_LEN];
	struct hook_attempt *att = calloc(HOOK_ATTEMPTS_KEPT, sizeof(*att));
	uint8_t events = 0;
	bool started = false;
	int rc = 0;

	if (!b.p || !att) {
		free(b.p);
		free(att);
		return -ENOMEM;
	}
	b.p[0] = '\0';
	/* Not the URL: it may hold a token, and others may read job files. */
	if (index_hook_events(e->ix, j->id, &events) == 0) {
		tb_printf(&b, "# webhook events");
		for (int i = 0; i < HOOK_EVENTS; i++)
			if (events & (1u << i))
				tb_printf(&b, " %s", hook_event_name((enum hook_event)i));
		tb_printf(&b, "\n");
	}
	for (;;) {
		size_t n = 0;

		if ((rc = index_hook_list(e->ix, j->id, started ? after : NULL, 64, ids, &n)) != 0)
			break;
		for (size_t i = 0; i < n; i++) {
			struct hook_delivery d;
			char idtext[4 + JOB_ID_STR_LEN + 1], t1[32], t2[32];
			size_t na = 0;

			if (index_hook_get(e->ix, ids[i], &d) != 0) {
				hook_delivery_release(&d);
				continue;
			}
			hook_id_text(ids[i], idtext);
			engine_time_format(d.event_ms, t1);
			tb_printf(&b, "%s job.%s %s %s attempts=%u", idtext, hook_event_name(d.event),
				  t1, hook_state_name(d.state), d.attempts);
			if (d.state == HOOK_PENDING) {
				engine_time_format(d.next_ms, t2);
				tb_printf(&b, " next=%s", t2);
			}
			tb_printf(&b, "\n");
			hook_delivery_release(&d);
			if (index_hook_attempts(e->ix, ids[i], att, HOOK_ATTEMPTS_KEPT, &na) != 0)
				continue;
			for (size_t k = 0; k < na; k++) {
				engine_time_format(att[k].at_ms, t1);
				tb_printf(&b, "  %s %s attempt %ums http=%u %s\n", idtext, t1,
					  att[k].ms, att[k].status, att[k].msg);
			}
		}
		if (n < 64)
			break;
		memcpy(after, ids[n - 1], JOB_ID_LEN);
		started = true;
	}
	free(att);
	if (rc || b.oom) {
		free(b.p);
		return rc ? rc : -ENOMEM;
	}
	*out = b.p;
	*len = b.len;
	return 0;
}

int engine_redeliver(struct engine *e, const uint8_t id[JOB_ID_LEN])
{
	uint64_t n = 0;
	int rc = index_hook_redeliver(e->ix, id, now_ms(), &n);

	if (rc)
		return rc;
	return n ? 0 : -EALREADY;
}
