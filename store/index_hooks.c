/*
 * index_hooks.c - webhook deliveries in the index (SPEC §13; index.h:
 * hooks, deliveries, hookdue, jobhooks, hookatt, usersecrets).
 *
 * A delivery is made inside the transaction of the job change it reports
 * (index_put_job calls index_hooks_on_put), so a change that is durable
 * has its delivery durable too, and a change that is rolled back has
 * none. The engine's webhook sender takes due deliveries (index_hook_due),
 * sends them and records each attempt (index_hook_attempt).
 *
 * Threads: as the rest of the index; the functions with a txn run inside
 * the caller's write transaction.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

#define DLV_FIXED 54
#define HOOK_REC_FIXED 9
#define DUE_KEY_LEN (8 + JOB_ID_LEN)
#define ATT_KEY_LEN (JOB_ID_LEN + 2)
#define ATT_FIXED 14
#define PROGRESS_EVERY_MS 2000

static const char *const event_names[HOOK_EVENTS] = {"start", "progress", "output",
						     "completed"};

const char *hook_event_name(enum hook_event ev)
{
	return (unsigned)ev < HOOK_EVENTS ? event_names[ev] : "?";
}

const char *hook_state_name(enum hook_state st)
{
	static const char *const n[] = {"pending", "delivered", "gone", "given up"};
	return (unsigned)st <= HOOK_GIVEN_UP ? n[st] : "?";
}

int hook_events_parse(const char *name, uint8_t *mask)
{
	for (int i = 0; i < HOOK_EVENTS; i++)
		if (strcmp(name, event_names[i]) == 0) {
			*mask |= (uint8_t)(1u << i);
			return 0;
		}
	return -EINVAL;
}

void hook_delivery_release(struct hook_delivery *d)
{
	job_release(&d->snap);
}

void index_set_hook_wake(struct index *ix, void (*fn)(void *), void *arg)
{
	ix->hook_wake = fn;
	ix->hook_wake_arg = arg;
}

static int damaged(struct index *ix, const char *what)
{
	return store_seterr(STORE_E_INDEX, "damaged %s in '%s/data.mdb'", what, ix->dir);
}

/* ---- records ---- */

static void due_key(uint64_t ms, const uint8_t id[JOB_ID_LEN], uint8_t key[DUE_KEY_LEN])
{
	be64_put(key, ms);
	memcpy(key + 8, id, JOB_ID_LEN);
}

static void le16_put(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static uint16_t le16_get(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

/* The fixed part of a delivery (its URL and snapshot are copied as they
 * are by the writers that change only the fixed part). */
struct dlv_head {
	enum hook_state state;
	enum hook_event event;
	uint16_t attempts, tries, last_status;
	uint32_t uid;
	uint8_t job[JOB_ID_LEN];
	uint64_t event_ms, next_ms;
	uint16_t url_len;
	uint32_t snap_len;
};

static int dlv_parse(struct index *ix, const MDB_val *v, struct dlv_head *h)
{
	const uint8_t *p = v->mv_data;
	uint8_t sum[RECORD_SUM_LEN];

	if (v->mv_size < DLV_FIXED + RECORD_SUM_LEN || memcmp(p, "RW1", 4) != 0)
		return damaged(ix, "webhook delivery");
	index_record_sum(p, v->mv_size - RECORD_SUM_LEN, sum);
	if (memcmp(sum, p + v->mv_size - RECORD_SUM_LEN, RECORD_SUM_LEN) != 0 ||
	    p[4] > HOOK_GIVEN_UP || p[5] >= HOOK_EVENTS)
		return damaged(ix, "webhook delivery");
	h->state = p[4];
	h->event = p[5];
	h->attempts = le16_get(p + 6);
	h->tries = le16_get(p + 8);
	h->last_status = le16_get(p + 10);
	h->uid = le32_get(p + 12);
	memcpy(h->job, p + 16, JOB_ID_LEN);
	h->event_ms = le64_get(p + 32);
	h->next_ms = le64_get(p + 40);
	h->url_len = le16_get(p + 48);
	h->snap_len = le32_get(p + 50);
	if (h->url_len > INDEX_HOOK_URL_MAX ||
	    (uint64_t)DLV_FIXED + h->url_len + h->snap_len + RECORD_SUM_LEN != v->mv_size)
		return damaged(ix, "webhook delivery");
	return 0;
}

/* Write delivery id with head h and the URL and snapshot given. */
static int dlv_put(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
		   const struct dlv_head *h, const void *url, const void *snap)
{
	size_t total = DLV_FIXED + h->url_len + h->snap_len + RECORD_SUM_LEN;
	uint8_t *p = malloc(total);
	MDB_val k = {JOB_ID_LEN, (void *)id}, v = {total, p};
	int rc;

	if (!p)
		return -ENOMEM;
	memset(p, 0, DLV_FIXED);
	memcpy(p, "RW1", 4);
	p[4] = (uint8_t)h->state;
	p[5] = (uint8_t)h->event;
	le16_put(p + 6, h->attempts);
	le16_put(p + 8, h->tries);
	le16_put(p + 10, h->last_status);
	le32_put(p + 12, h->uid);
	memcpy(p + 16, h->job, JOB_ID_LEN);
	le64_put(p + 32, h->event_ms);
	le64_put(p + 40, h->next_ms);
	le16_put(p + 48, h->url_len);
	le32_put(p + 50, h->snap_len);
	memcpy(p + DLV_FIXED, url, h->url_len);
	memcpy(p + DLV_FIXED + h->url_len, snap, h->snap_len);
	index_record_sum(p, total - RECORD_SUM_LEN, p + total - RECORD_SUM_LEN);
	rc = mdb_put(txn, ix->deliveries, &k, &v, 0);
	free(p);
	return rc ? index_lmdb_err(ix, rc, "write webhook delivery") : 0;
}

static int put_empty(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen)
{
	MDB_val k = {klen, (void *)key}, v = {0, NULL};
	int rc = mdb_put(txn, dbi, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write webhook index") : 0;
}

/* ---- a job's webhook ---- */

int index_hooks_create(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
		       const char *url, uint8_t events)
{
	size_t ul = strlen(url);
	uint8_t buf[HOOK_REC_FIXED + INDEX_HOOK_URL_MAX];
	MDB_val k = {JOB_ID_LEN, (void *)id}, v = {HOOK_REC_FIXED + ul, buf};
	int rc;

	if (ul == 0 || ul > INDEX_HOOK_URL_MAX)
		return store_seterr(-EINVAL, "a webhook URL must have 1 to %d bytes",
				    INDEX_HOOK_URL_MAX);
	buf[0] = events;
	le64_put(buf + 1, 0);
	memcpy(buf + HOOK_REC_FIXED, url, ul);
	rc = mdb_put(txn, ix->hooks, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write webhook") : 0;
}

/* Add a pending delivery of ev for job j, due now. */
static int add_delivery(struct index *ix, MDB_txn *txn, const struct job *j, enum hook_event ev,
			const uint8_t *url, size_t ul, const uint8_t *rec, size_t len)
{
	struct dlv_head h = {0};
	uint8_t id[JOB_ID_LEN], key[DUE_KEY_LEN];
	int rc;

	ulid_new(id);
	h.state = HOOK_PENDING;
	h.event = ev;
	h.uid = j->uid;
	memcpy(h.job, j->id, JOB_ID_LEN);
	h.event_ms = h.next_ms = now_ms();
	h.url_len = (uint16_t)ul;
	h.snap_len = (uint32_t)len;
	due_key(h.next_ms, id, key);
	if ((rc = dlv_put(ix, txn, id, &h, url, rec)) != 0 ||
	    (rc = put_empty(ix, txn, ix->hookdue, key, sizeof(key))) != 0 ||
	    (rc = index_set_add(ix, txn, ix->jobhooks, j->id, JOB_ID_LEN, id, JOB_ID_LEN)) != 0)
		return rc;
	ix->hook_added = true;
	return 0;
}

int index_hooks_on_put(struct index *ix, MDB_txn *txn, const struct job *j, int old_status,
		       uint8_t old_flags, uint16_t old_progress, const uint8_t *rec, size_t len)
{
	MDB_val k = {JOB_ID_LEN, (void *)j->id}, v;
	bool ev[HOOK_EVENTS];
	uint8_t hook[HOOK_REC_FIXED + INDEX_HOOK_URL_MAX];
	size_t hl;
	uint64_t now;
	int rc;

	/* What the change is, from the records alone: most writes (log
	 * lines) are none of these and read nothing more. */
	ev[HOOK_START] = j->status == JOB_RUNNING && old_status != JOB_RUNNING;
	ev[HOOK_PROGRESS] = j->status == JOB_RUNNING && old_status == JOB_RUNNING &&
			    j->progress != old_progress;
	ev[HOOK_OUTPUT] = (j->flags & JOB_F_HAS_OUTPUT) && !(old_flags & JOB_F_HAS_OUTPUT);
	ev[HOOK_COMPLETED] = j->status >= JOB_COMPLETE && old_status < JOB_COMPLETE;
	if (!ev[HOOK_START] && !ev[HOOK_PROGRESS] && !ev[HOOK_OUTPUT] && !ev[HOOK_COMPLETED])
		return 0;
	rc = mdb_get(txn, ix->hooks, &k, &v);
	if (rc == MDB_NOTFOUND)
		return 0; /* not made yet: the creation puts it after the record */
	if (rc)
		return index_lmdb_err(ix, rc, "read webhook");
	if (v.mv_size <= HOOK_REC_FIXED || v.mv_size > sizeof(hook))
		return damaged(ix, "webhook");
	hl = v.mv_size;
	memcpy(hook, v.mv_data, hl);
	now = now_ms();
	if (now < le64_get(hook + 1) + PROGRESS_EVERY_MS)
		ev[HOOK_PROGRESS] = false; /* one per 2 s at most */
	for (int i = 0; i < HOOK_EVENTS; i++) {
		if (!ev[i] || !(hook[0] & (1u << i)))
			continue;
		if ((rc = add_delivery(ix, txn, j, (enum hook_event)i, hook + HOOK_REC_FIXED,
				       hl - HOOK_REC_FIXED, rec, len)) != 0)
			return rc;
		if (i == HOOK_PROGRESS) {
			le64_put(hook + 1, now);
			v.mv_size = hl;
			v.mv_data = hook;
			if ((rc = mdb_put(txn, ix->hooks, &k, &v, 0)) != 0)
				return index_lmdb_err(ix, rc, "write webhook");
		}
	}
	return 0;
}

/* A delivery and its attempts, gone (not its jobhooks entry). */
static int drop_delivery(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN])
{
	int rc = index_del_key(ix, txn, ix->deliveries, id, JOB_ID_LEN);
	return rc ? rc : index_del_prefix(ix, txn, ix->hookatt, id, JOB_ID_LEN, ATT_KEY_LEN);
}

int index_hooks_delete(struct index *ix, MDB_txn *txn, const uint8_t job[JOB_ID_LEN])
{
	MDB_val k = {JOB_ID_LEN, (void *)job}, v;
	int rc;

	if ((rc = index_del_key(ix, txn, ix->hooks, job, JOB_ID_LEN)) != 0)
		return rc;
	/* Ended deliveries go with the job; pending ones are still sent
	 * (their record holds all they need) and go when they end. */
	for (;;) {
		MDB_cursor *cur;
		uint8_t id[JOB_ID_LEN];
		struct dlv_head h;

		if ((rc = mdb_cursor_open(txn, ix->jobhooks, &cur)) != 0)
			return index_lmdb_err(ix, rc, "delete webhooks");
		k.mv_size = JOB_ID_LEN;
		k.mv_data = (void *)job;
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
		mdb_cursor_close(cur);
		if (rc == MDB_NOTFOUND)
			return 0;
		if (rc)
			return index_lmdb_err(ix, rc, "delete webhooks");
		if (v.mv_size != JOB_ID_LEN)
			return damaged(ix, "jobhooks entry");
		memcpy(id, v.mv_data, JOB_ID_LEN);
		if ((rc = index_set_del(ix, txn, ix->jobhooks, job, JOB_ID_LEN, id, JOB_ID_LEN)) != 0)
			return rc;
		k.mv_size = JOB_ID_LEN;
		k.mv_data = id;
		rc = mdb_get(txn, ix->deliveries, &k, &v);
		if (rc == MDB_NOTFOUND)
			continue;
		if (rc)
			return index_lmdb_err(ix, rc, "read webhook delivery");
		if ((rc = dlv_parse(ix, &v, &h)) != 0)
			return rc;
		if (h.state != HOOK_PENDING && (rc = drop_delivery(ix, txn, id)) != 0)
			return rc;
	}
}

/* ---- reads ---- */

struct due_arg {
	uint64_t now;
	const uint8_t (*skip)[JOB_ID_LEN];
	size_t nskip, max, n;
	uint8_t (*ids)[JOB_ID_LEN];
	uint64_t next;
};

static int due_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct due_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->hookdue, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read webhook schedule");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		const uint8_t *key = k.mv_data;
		bool skipped = false;

		if (k.mv_size != DUE_KEY_LEN) {
			mdb_cursor_close(cur);
			return damaged(ix, "webhook schedule entry");
		}
		for (size_t i = 0; i < a->nskip && !skipped; i++)
			skipped = memcmp(a->skip[i], key + 8, JOB_ID_LEN) == 0;
		if (skipped)
			continue;
		if (be64_get(key) > a->now || a->n == a->max) {
			a->next = be64_get(key);
			break;
		}
		memcpy(a->ids[a->n++], key + 8, JOB_ID_LEN);
	}
	mdb_cursor_close(cur);
	return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "read webhook schedule") : 0;
}

int index_hook_due(struct index *ix, uint64_t now, const uint8_t (*skip)[JOB_ID_LEN], size_t nskip,
		   size_t max, uint8_t (*ids)[JOB_ID_LEN], size_t *n, uint64_t *next_ms)
{
	struct due_arg a = {now, skip, nskip, max, 0, ids, 0};
	int rc = index_read(ix, due_fn, &a);

	*n = rc ? 0 : a.n;
	*next_ms = rc ? 0 : a.next;
	return rc;
}

struct get_arg {
	const uint8_t *id;
	struct hook_delivery *out;
};

static int get_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct get_arg *a = arg;
	struct hook_delivery *d = a->out;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v, sv;
	struct dlv_head h;
	int rc = mdb_get(txn, ix->deliveries, &k, &v);

	if (rc == MDB_NOTFOUND)
		return store_seterr(STORE_E_NOTFOUND, "no such webhook delivery");
	if (rc)
		return index_lmdb_err(ix, rc, "read webhook delivery");
	if ((rc = dlv_parse(ix, &v, &h)) != 0)
		return rc;
	memcpy(d->id, a->id, JOB_ID_LEN);
	memcpy(d->job, h.job, JOB_ID_LEN);
	d->event = h.event;
	d->state = h.state;
	d->attempts = h.attempts;
	d->tries = h.tries;
	d->last_status = h.last_status;
	d->uid = h.uid;
	d->event_ms = h.event_ms;
	d->next_ms = h.next_ms;
	memcpy(d->url, (const uint8_t *)v.mv_data + DLV_FIXED, h.url_len);
	d->url[h.url_len] = '\0';
	if (memchr(d->url, '\0', h.url_len))
		return damaged(ix, "webhook delivery");
	sv.mv_size = h.snap_len;
	sv.mv_data = (uint8_t *)v.mv_data + DLV_FIXED + h.url_len;
	return index_decode_job(ix, h.job, &sv, &d->snap);
}

int index_hook_get(struct index *ix, const uint8_t id[JOB_ID_LEN], struct hook_delivery *out)
{
	struct get_arg a = {id, out};

	memset(out, 0, sizeof(*out));
	return index_read(ix, get_fn, &a);
}

struct list_arg {
	const uint8_t *job, *after;
	size_t max, n;
	uint8_t (*ids)[JOB_ID_LEN];
};

static int list_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct list_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k = {JOB_ID_LEN, (void *)a->job}, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->jobhooks, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read webhooks");
	if (a->after) {
		v.mv_size = JOB_ID_LEN;
		v.mv_data = (void *)a->after;
		rc = mdb_cursor_get(cur, &k, &v, MDB_GET_BOTH_RANGE);
		if (rc == 0 && memcmp(v.mv_data, a->after, JOB_ID_LEN) == 0)
			rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP);
	} else {
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
	}
	for (; rc == 0 && a->n < a->max; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP)) {
		if (v.mv_size != JOB_ID_LEN) {
			mdb_cursor_close(cur);
			return damaged(ix, "jobhooks entry");
		}
		memcpy(a->ids[a->n++], v.mv_data, JOB_ID_LEN);
	}
	mdb_cursor_close(cur);
	return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "read webhooks") : 0;
}

int index_hook_list(struct index *ix, const uint8_t job[JOB_ID_LEN], const uint8_t *after,
		    size_t max, uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	struct list_arg a = {job, after, max, 0, ids};
	int rc = index_read(ix, list_fn, &a);

	*n = rc ? 0 : a.n;
	return rc;
}

struct att_arg {
	const uint8_t *id;
	struct hook_attempt *out;
	size_t max, n;
};

static int att_decode(struct index *ix, const MDB_val *v, struct hook_attempt *a)
{
	const uint8_t *p = v->mv_data;
	size_t ml;

	if (v->mv_size < ATT_FIXED || v->mv_size > ATT_FIXED + HOOK_MSG_MAX)
		return damaged(ix, "webhook attempt");
	a->at_ms = le64_get(p);
	a->ms = le32_get(p + 8);
	a->status = le16_get(p + 12);
	ml = v->mv_size - ATT_FIXED;
	memcpy(a->msg, p + ATT_FIXED, ml);
	a->msg[ml] = '\0';
	return memchr(a->msg, '\0', ml) ? damaged(ix, "webhook attempt") : 0;
}

static int att_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct att_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->hookatt, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read webhook attempts");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && a->n < a->max;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size != ATT_KEY_LEN || memcmp(k.mv_data, a->id, JOB_ID_LEN) != 0)
			break;
		if ((rc = att_decode(ix, &v, &a->out[a->n])) != 0) {
			mdb_cursor_close(cur);
			return rc;
		}
		a->n++;
	}
	mdb_cursor_close(cur);
	return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "read webhook attempts") : 0;
}

int index_hook_attempts(struct index *ix, const uint8_t id[JOB_ID_LEN], struct hook_attempt *out,
			size_t max, size_t *n)
{
	struct att_arg a = {id, out, max, 0};
	int rc = index_read(ix, att_fn, &a);

	*n = rc ? 0 : a.n;
	return rc;
}

static int backlog_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	MDB_stat st;
	int rc = mdb_stat(txn, ix->hookdue, &st);

	if (rc)
		return index_lmdb_err(ix, rc, "read webhook schedule");
	*(uint64_t *)arg = st.ms_entries;
	return 0;
}

int index_hook_backlog(struct index *ix, uint64_t *n)
{
	return index_read(ix, backlog_fn, n);
}

struct events_arg {
	const uint8_t *job;
	uint8_t *events;
};

static int events_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct events_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->job}, v;
	int rc = mdb_get(txn, ix->hooks, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read webhook");
	if (v.mv_size <= HOOK_REC_FIXED || v.mv_size > HOOK_REC_FIXED + INDEX_HOOK_URL_MAX)
		return damaged(ix, "webhook");
	*a->events = ((const uint8_t *)v.mv_data)[0];
	return 0;
}

int index_hook_events(struct index *ix, const uint8_t job[JOB_ID_LEN], uint8_t *events)
{
	struct events_arg a = {job, events};
	return index_read(ix, events_fn, &a);
}

/* ---- writes ---- */

struct attempt_arg {
	const uint8_t *id;
	const struct hook_attempt *att;
	enum hook_state state;
	uint64_t next;
};

static int attempt_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct attempt_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	uint8_t key[DUE_KEY_LEN], akey[ATT_KEY_LEN], arec[ATT_FIXED + HOOK_MSG_MAX];
	struct dlv_head h;
	uint8_t *copy;
	size_t ml = strnlen(a->att->msg, HOOK_MSG_MAX);
	int rc = mdb_get(txn, ix->deliveries, &k, &v);

	if (rc == MDB_NOTFOUND)
		return store_seterr(STORE_E_NOTFOUND, "no such webhook delivery");
	if (rc)
		return index_lmdb_err(ix, rc, "read webhook delivery");
	if ((rc = dlv_parse(ix, &v, &h)) != 0)
		return rc;
	if (h.state != HOOK_PENDING)
		return store_seterr(STORE_E_STATE, "the webhook delivery is %s",
				    hook_state_name(h.state));
	if (!(copy = malloc(v.mv_size)))
		return -ENOMEM;
	memcpy(copy, v.mv_data, v.mv_size);
	due_key(h.next_ms, a->id, key);
	if ((rc = index_del_key(ix, txn, ix->hookdue, key, sizeof(key))) != 0)
		goto out;
	/* The attempt, and the oldest gone past the number kept. */
	memcpy(akey, a->id, JOB_ID_LEN);
	be16_put(akey + JOB_ID_LEN, h.attempts);
	le64_put(arec, a->att->at_ms);
	le32_put(arec + 8, a->att->ms);
	le16_put(arec + 12, a->att->status);
	memcpy(arec + ATT_FIXED, a->att->msg, ml);
	k.mv_size = sizeof(akey);
	k.mv_data = akey;
	v.mv_size = ATT_FIXED + ml;
	v.mv_data = arec;
	if ((rc = mdb_put(txn, ix->hookatt, &k, &v, 0)) != 0) {
		rc = index_lmdb_err(ix, rc, "write webhook attempt");
		goto out;
	}
	if (h.attempts >= HOOK_ATTEMPTS_KEPT) {
		be16_put(akey + JOB_ID_LEN, (uint16_t)(h.attempts - HOOK_ATTEMPTS_KEPT));
		if ((rc = index_del_key(ix, txn, ix->hookatt, akey, sizeof(akey))) != 0)
			goto out;
	}
	if (h.attempts < UINT16_MAX)
		h.attempts++;
	if (h.tries < UINT16_MAX)
		h.tries++;
	h.last_status = a->att->status;
	h.state = a->state;
	if (a->state == HOOK_PENDING) {
		h.next_ms = a->next;
		due_key(h.next_ms, a->id, key);
		if ((rc = put_empty(ix, txn, ix->hookdue, key, sizeof(key))) != 0)
			goto out;
	}
	if ((rc = dlv_put(ix, txn, a->id, &h, copy + DLV_FIXED, copy + DLV_FIXED + h.url_len)) != 0)
		goto out;
	if (a->state != HOOK_PENDING) {
		/* Ended: a delivery whose job is gone goes too. */
		k.mv_size = JOB_ID_LEN;
		k.mv_data = h.job;
		rc = mdb_get(txn, ix->jobs, &k, &v);
		if (rc == MDB_NOTFOUND)
			rc = drop_delivery(ix, txn, a->id);
		else if (rc)
			rc = index_lmdb_err(ix, rc, "read job");
	}
out:
	free(copy);
	return rc;
}

int index_hook_attempt(struct index *ix, const uint8_t id[JOB_ID_LEN],
		       const struct hook_attempt *att, enum hook_state state, uint64_t next_ms)
{
	struct attempt_arg a = {id, att, state, next_ms};
	return index_write(ix, attempt_fn, &a);
}

struct redeliver_arg {
	const uint8_t *job;
	uint64_t now, n;
};

static int redeliver_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct redeliver_arg *a = arg;
	uint8_t after[JOB_ID_LEN], ids[64][JOB_ID_LEN];
	bool started = false;
	int rc;

	a->n = 0;
	for (;;) {
		struct list_arg la = {a->job, started ? after : NULL, 64, 0, ids};

		if ((rc = list_fn(ix, txn, &la)) != 0)
			return rc;
		for (size_t i = 0; i < la.n; i++) {
			MDB_val k = {JOB_ID_LEN, ids[i]}, v;
			uint8_t key[DUE_KEY_LEN], *copy;
			struct dlv_head h;

			if ((rc = mdb_get(txn, ix->deliveries, &k, &v)) == MDB_NOTFOUND)
				continue;
			if (rc)
				return index_lmdb_err(ix, rc, "read webhook delivery");
			if ((rc = dlv_parse(ix, &v, &h)) != 0)
				return rc;
			if (h.state != HOOK_GIVEN_UP && h.state != HOOK_GONE)
				continue;
			if (!(copy = malloc(v.mv_size)))
				return -ENOMEM;
			memcpy(copy, v.mv_data, v.mv_size);
			h.state = HOOK_PENDING;
			h.tries = 0;
			h.next_ms = a->now;
			due_key(h.next_ms, ids[i], key);
			rc = dlv_put(ix, txn, ids[i], &h, copy + DLV_FIXED,
				     copy + DLV_FIXED + h.url_len);
			free(copy);
			if (rc || (rc = put_empty(ix, txn, ix->hookdue, key, sizeof(key))) != 0)
				return rc;
			ix->hook_added = true;
			a->n++;
		}
		if (la.n < 64)
			return 0;
		memcpy(after, ids[la.n - 1], JOB_ID_LEN);
		started = true;
	}
}

int index_hook_redeliver(struct index *ix, const uint8_t job[JOB_ID_LEN], uint64_t now,
			 uint64_t *n)
{
	struct redeliver_arg a = {job, now, 0};
	int rc = index_write(ix, redeliver_fn, &a);

	*n = rc ? 0 : a.n;
	return rc;
}

/* ---- owners' secrets ---- */

struct secret_arg {
	uint32_t uid;
	const void *in;
	size_t inlen;
	void **out;
	size_t *outlen;
	bool existed;
};

static int secret_get_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct secret_arg *a = arg;
	uint8_t key[4];
	MDB_val k = {4, key}, v;
	int rc;

	be32_put(key, a->uid);
	rc = mdb_get(txn, ix->usersecrets, &k, &v);
	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read webhook secret");
	if (v.mv_size == 0 || v.mv_size > 256)
		return damaged(ix, "webhook secret");
	if (!(*a->out = malloc(v.mv_size)))
		return -ENOMEM;
	memcpy(*a->out, v.mv_data, v.mv_size);
	*a->outlen = v.mv_size;
	return 0;
}

int index_user_secret_get(struct index *ix, uint32_t uid, void **out, size_t *len)
{
	struct secret_arg a = {uid, NULL, 0, out, len, false};
	return index_read(ix, secret_get_fn, &a);
}

static int secret_put_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct secret_arg *a = arg;
	uint8_t key[4];
	MDB_val k = {4, key}, v = {a->inlen, (void *)a->in};
	int rc;

	be32_put(key, a->uid);
	rc = mdb_put(txn, ix->usersecrets, &k, &v, MDB_NOOVERWRITE);
	if (rc == MDB_KEYEXIST) {
		a->existed = true;
		return 0;
	}
	return rc ? index_lmdb_err(ix, rc, "write webhook secret") : 0;
}

int index_user_secret_put(struct index *ix, uint32_t uid, const void *sealed, size_t len,
			  bool *existed)
{
	struct secret_arg a = {uid, sealed, len, NULL, NULL, false};
	int rc = index_write(ix, secret_put_fn, &a);

	*existed = a.existed;
	return rc;
}
