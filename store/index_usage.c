/*
 * index_usage.c - the usage ledger in the index (SPEC §14; index.h:
 * journal, usage, ledger).
 *
 * A job that reaches a final state makes one ledger entry (the journal)
 * and adds it to its owner's totals for the day (usage), in the
 * transaction of that state: index_put_job calls index_usage_add. The
 * journal keeps the entries of deleted and retried jobs (the usage
 * happened); the totals are the journal summed, kept so that reading them
 * does not cost the number of jobs. Attestations (ledger) are signed
 * period totals made by the engine from the journal; each holds a
 * reference on its blob.
 *
 * Threads: as the rest of the index; index_usage_add runs inside the
 * caller's write transaction.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

#define DAY_MS 86400000ull
#define JOURNAL_KEY_LEN (8 + JOB_ID_LEN)
#define ENTRY_FIXED 22
#define ATT_FIXED 48
#define USAGE_KEY_MAX (4 + 4 + 1 + USAGE_NAME_MAX)

static int damaged(struct index *ix, const char *what)
{
	return store_seterr(STORE_E_INDEX, "damaged %s in '%s/data.mdb'", what, ix->dir);
}

/* Take a string of at most max bytes into out (max + 1 bytes); false if
 * damaged. */
static bool take_str(const uint8_t **p, const uint8_t *end, char *out, size_t max)
{
	size_t len;

	if (index_str_len(p, end, max, &len) != 0)
		return false;
	memcpy(out, *p, len);
	out[len] = '\0';
	*p += len;
	return true;
}

/* The output bytes of a job's outputs after the first (extras). */
static int extras_bytes(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
			uint64_t *bytes)
{
	for (unsigned n = 1; n <= INDEX_EXTRAS_MAX; n++) {
		uint8_t key[JOB_ID_LEN + 2];
		MDB_val k = {sizeof(key), key}, v;
		int rc;

		index_extra_key(id, n, key);
		rc = mdb_get(txn, ix->extras, &k, &v);
		if (rc == MDB_NOTFOUND)
			return 0;
		if (rc)
			return index_lmdb_err(ix, rc, "read outputs");
		if (v.mv_size < INDEX_HASH_LEN + 8)
			return damaged(ix, "output record");
		*bytes += le64_get((const uint8_t *)v.mv_data + INDEX_HASH_LEN);
	}
	return 0;
}

/* The entry of a final job, in txn (its outputs after the first too). */
int index_usage_entry(struct index *ix, MDB_txn *txn, const struct job *j, struct ledger_entry *e)
{
	memset(e, 0, sizeof(*e));
	e->at_ms = j->completed_ms;
	memcpy(e->id, j->id, JOB_ID_LEN);
	e->uid = j->uid;
	e->outcome = j->status;
	e->cached = (j->flags & JOB_F_CACHED) != 0;
	e->run_ms = j->run_ms;
	snprintf(e->route, sizeof(e->route), "%s", j->route);
	snprintf(e->kind, sizeof(e->kind), "%s", j->ran_on ? j->ran_on : "");
	/* Bytes it stored: a cached job's output is another's (counted as a
	 * cache hit instead). */
	if (j->status == JOB_COMPLETE && !e->cached && (j->flags & JOB_F_HAS_OUTPUT)) {
		e->bytes = j->output_size;
		if (j->flags & JOB_F_EXTRAS)
			return extras_bytes(ix, txn, j->id, &e->bytes);
	}
	return 0;
}

static size_t encode_entry(const struct ledger_entry *e, uint8_t *buf)
{
	uint8_t *p = buf;

	le32_put(p, e->uid);
	p[4] = (uint8_t)e->outcome;
	p[5] = e->cached ? 1 : 0;
	le64_put(p + 6, e->run_ms);
	le64_put(p + 14, e->bytes);
	p += ENTRY_FIXED;
	p += index_str_put(p, e->route, strlen(e->route));
	p += index_str_put(p, e->kind, strlen(e->kind));
	index_record_sum(buf, (size_t)(p - buf), p);
	return (size_t)(p - buf) + RECORD_SUM_LEN;
}

static int decode_entry(struct index *ix, const MDB_val *k, const MDB_val *v,
			struct ledger_entry *e)
{
	const uint8_t *p = v->mv_data, *end;
	uint8_t sum[RECORD_SUM_LEN];

	if (k->mv_size != JOURNAL_KEY_LEN || v->mv_size < ENTRY_FIXED + 2 + RECORD_SUM_LEN)
		return damaged(ix, "ledger entry");
	end = p + v->mv_size - RECORD_SUM_LEN;
	index_record_sum(p, v->mv_size - RECORD_SUM_LEN, sum);
	if (memcmp(sum, end, RECORD_SUM_LEN) != 0 || p[4] < JOB_COMPLETE || p[4] > JOB_CANCELLED ||
	    p[5] > 1)
		return damaged(ix, "ledger entry");
	memset(e, 0, sizeof(*e));
	e->at_ms = be64_get(k->mv_data);
	memcpy(e->id, (const uint8_t *)k->mv_data + 8, JOB_ID_LEN);
	e->uid = le32_get(p);
	e->outcome = p[4];
	e->cached = p[5];
	e->run_ms = le64_get(p + 6);
	e->bytes = le64_get(p + 14);
	p += ENTRY_FIXED;
	if (!take_str(&p, end, e->route, INDEX_ROUTE_MAX) || !e->route[0] ||
	    !take_str(&p, end, e->kind, INDEX_ROUTE_MAX) || p != end)
		return damaged(ix, "ledger entry");
	return 0;
}

/* usage[uid | day | kind | name] += delta. */
static int bump(struct index *ix, MDB_txn *txn, uint32_t uid, uint32_t day, char kind,
		const char *name, size_t nlen, uint64_t delta)
{
	uint8_t key[USAGE_KEY_MAX], val[8];
	MDB_val k = {9 + nlen, key}, v;
	uint64_t n = 0;
	int rc;

	if (nlen > USAGE_NAME_MAX)
		return store_seterr(-EINVAL, "usage name too long");
	be32_put(key, uid);
	be32_put(key + 4, day);
	key[8] = (uint8_t)kind;
	memcpy(key + 9, name, nlen);
	rc = mdb_get(txn, ix->usage, &k, &v);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read usage");
	if (rc == 0) {
		if (v.mv_size != 8)
			return damaged(ix, "usage total");
		n = le64_get(v.mv_data);
	}
	le64_put(val, n + delta);
	v.mv_size = 8;
	v.mv_data = val;
	rc = mdb_put(txn, ix->usage, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write usage") : 0;
}

int index_journal_free_time(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
			    uint64_t *at_ms)
{
	uint8_t key[JOURNAL_KEY_LEN];
	MDB_val k = {sizeof(key), key}, v;
	int rc;

	memcpy(key + 8, id, JOB_ID_LEN);
	for (;; (*at_ms)++) {
		be64_put(key, *at_ms);
		if ((rc = mdb_get(txn, ix->journal, &k, &v)) == MDB_NOTFOUND)
			return 0;
		if (rc)
			return index_lmdb_err(ix, rc, "read ledger");
	}
}

int index_usage_add(struct index *ix, MDB_txn *txn, const struct job *j, uint64_t completed_ms)
{
	struct ledger_entry e;
	uint8_t key[JOURNAL_KEY_LEN], buf[ENTRY_FIXED + 2 * (2 + INDEX_ROUTE_MAX) + RECORD_SUM_LEN];
	char name[USAGE_NAME_MAX + 1];
	MDB_val k = {sizeof(key), key}, v;
	uint32_t day = (uint32_t)(completed_ms / DAY_MS);
	const char *outcome = job_status_name(j->status);
	size_t rlen = strlen(j->route);
	int rc;

	if ((rc = index_usage_entry(ix, txn, j, &e)) != 0)
		return rc;
	e.at_ms = completed_ms;
	be64_put(key, e.at_ms);
	memcpy(key + 8, e.id, JOB_ID_LEN);
	v.mv_size = encode_entry(&e, buf);
	v.mv_data = buf;
	if ((rc = mdb_put(txn, ix->journal, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write ledger entry");
	if (rlen > INDEX_ROUTE_MAX)
		return damaged(ix, "route");
	memcpy(name, j->route, rlen);
	name[rlen] = '\0';
	memcpy(name + rlen + 1, outcome, strlen(outcome));
	if ((rc = bump(ix, txn, e.uid, day, USAGE_JOBS, name, rlen + 1 + strlen(outcome), 1)) != 0)
		return rc;
	if ((e.run_ms || e.kind[0]) &&
	    (rc = bump(ix, txn, e.uid, day, USAGE_MS, e.kind, strlen(e.kind), e.run_ms)) != 0)
		return rc;
	if (e.bytes && (rc = bump(ix, txn, e.uid, day, USAGE_BYTES, "", 0, e.bytes)) != 0)
		return rc;
	if (e.cached && (rc = bump(ix, txn, e.uid, day, USAGE_CACHED, "", 0, 1)) != 0)
		return rc;
	return 0;
}

int index_journal_get(struct index *ix, MDB_txn *txn, uint64_t at_ms, const uint8_t id[JOB_ID_LEN],
		      struct ledger_entry *e)
{
	uint8_t key[JOURNAL_KEY_LEN];
	MDB_val k = {sizeof(key), key}, v;
	int rc;

	be64_put(key, at_ms);
	memcpy(key + 8, id, JOB_ID_LEN);
	if ((rc = mdb_get(txn, ix->journal, &k, &v)) != 0)
		return index_lmdb_err(ix, rc, "read ledger entry");
	return decode_entry(ix, &k, &v, e);
}

/* ---- reading the totals ---- */

/* How a cursor walk ended: the caller's function stopped it (its
 * value), the end was reached (0), or LMDB or a decoder failed. */
static int walk_end(struct index *ix, int rc, int stop, const char *what)
{
	if (stop)
		return stop;
	if (rc == MDB_NOTFOUND)
		return 0;
	return rc > 0 ? index_lmdb_err(ix, rc, what) : rc;
}

struct rows_arg {
	uint32_t uid, day;
	int (*fn)(const struct usage_row *r, void *arg);
	void *arg;
};

static int rows_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct rows_arg *a = arg;
	uint8_t start[8];
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, stop = 0;

	if ((rc = mdb_cursor_open(txn, ix->usage, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read usage");
	if (a->uid == INDEX_ANY_OWNER) {
		rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
	} else {
		be32_put(start, a->uid);
		be32_put(start + 4, a->day);
		k.mv_size = sizeof(start);
		k.mv_data = start;
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	}
	for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		const uint8_t *p = k.mv_data;
		struct usage_row r;

		if (k.mv_size < 9 || k.mv_size > USAGE_KEY_MAX || v.mv_size != 8) {
			rc = damaged(ix, "usage total");
			break;
		}
		r.uid = be32_get(p);
		if (a->uid != INDEX_ANY_OWNER && r.uid != a->uid) {
			rc = MDB_NOTFOUND;
			break;
		}
		r.day = be32_get(p + 4);
		if (r.day < a->day)
			continue;
		r.kind = (char)p[8];
		r.nlen = k.mv_size - 9;
		memcpy(r.name, p + 9, r.nlen);
		r.name[r.nlen] = '\0';
		r.value = le64_get(v.mv_data);
		if ((stop = a->fn(&r, a->arg)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	return walk_end(ix, rc, stop, "read usage");
}

int index_usage_rows(struct index *ix, uint32_t uid, uint32_t day,
		     int (*fn)(const struct usage_row *r, void *arg), void *arg)
{
	struct rows_arg a = {uid, day, fn, arg};

	return index_read(ix, rows_fn, &a);
}

/* ---- the journal ---- */

struct walk_arg {
	uint64_t from, to;
	int (*fn)(const struct ledger_entry *e, void *arg);
	void *arg;
};

static int walk_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct walk_arg *a = arg;
	uint8_t start[8];
	MDB_cursor *cur;
	MDB_val k = {sizeof(start), start}, v;
	int rc, stop = 0;

	if ((rc = mdb_cursor_open(txn, ix->journal, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read ledger");
	be64_put(start, a->from + 1);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct ledger_entry e;

		if ((rc = decode_entry(ix, &k, &v, &e)) != 0)
			break;
		if (e.at_ms > a->to) {
			rc = MDB_NOTFOUND;
			break;
		}
		if ((stop = a->fn(&e, a->arg)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	return walk_end(ix, rc, stop, "read ledger");
}

int index_journal_walk(struct index *ix, uint64_t from_ms, uint64_t to_ms,
		       int (*fn)(const struct ledger_entry *e, void *arg), void *arg)
{
	struct walk_arg a = {from_ms, to_ms, fn, arg};

	if (to_ms <= from_ms)
		return 0;
	return index_read(ix, walk_fn, &a);
}

/* ---- attestations ---- */

static int decode_att(struct index *ix, const MDB_val *k, const MDB_val *v, struct attestation *a)
{
	const uint8_t *p = v->mv_data, *end;
	uint8_t sum[RECORD_SUM_LEN];

	if (k->mv_size != 8 || v->mv_size < ATT_FIXED + 2 + RECORD_SUM_LEN)
		return damaged(ix, "attestation record");
	end = p + v->mv_size - RECORD_SUM_LEN;
	index_record_sum(p, v->mv_size - RECORD_SUM_LEN, sum);
	if (memcmp(sum, end, RECORD_SUM_LEN) != 0)
		return damaged(ix, "attestation record");
	memset(a, 0, sizeof(*a));
	a->end_ms = be64_get(k->mv_data);
	a->from_ms = le64_get(p);
	memcpy(a->hash, p + 8, INDEX_HASH_LEN);
	a->size = le64_get(p + 40);
	p += ATT_FIXED;
	if (!take_str(&p, end, a->name, sizeof(a->name) - 1) || !a->name[0] ||
	    !take_str(&p, end, a->sig, LEDGER_SIG_MAX) || p != end || a->from_ms >= a->end_ms)
		return damaged(ix, "attestation record");
	return 0;
}

struct list_arg {
	uint64_t after;
	struct attestation *out;
	size_t max, *n;
	const char *name; /* find by name */
	bool last;
};

static int list_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct list_arg *a = arg;
	uint8_t start[8];
	MDB_cursor *cur;
	MDB_val k = {sizeof(start), start}, v;
	int rc;

	*a->n = 0;
	if ((rc = mdb_cursor_open(txn, ix->ledger, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read ledger");
	be64_put(start, a->after + 1);
	rc = a->last ? mdb_cursor_get(cur, &k, &v, MDB_LAST)
		     : mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	for (; rc == 0 && *a->n < a->max; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if ((rc = decode_att(ix, &k, &v, &a->out[*a->n])) != 0)
			break;
		if (!a->name || strcmp(a->out[*a->n].name, a->name) == 0)
			(*a->n)++;
	}
	mdb_cursor_close(cur);
	if (rc == MDB_NOTFOUND || rc == 0)
		return 0;
	return rc > 0 ? index_lmdb_err(ix, rc, "read ledger") : rc;
}

int index_ledger_list(struct index *ix, uint64_t after, struct attestation *out, size_t max,
		      size_t *n)
{
	struct list_arg a = {after, out, max, n, NULL, false};

	return index_read(ix, list_fn, &a);
}

int index_ledger_last(struct index *ix, struct attestation *out)
{
	size_t n;
	struct list_arg a = {0, out, 1, &n, NULL, true};
	int rc = index_read(ix, list_fn, &a);

	return rc ? rc : n ? 0 : STORE_E_NOTFOUND;
}

int index_ledger_find(struct index *ix, const char *name, struct attestation *out)
{
	size_t n;
	struct list_arg a = {0, out, 1, &n, name, false};
	int rc = index_read(ix, list_fn, &a);

	return rc ? rc : n ? 0 : STORE_E_NOTFOUND;
}

struct attest_arg {
	uint64_t end;
	const struct ledger_maker *m;
	struct attestation *out;
};

/* In the write lock: every job change before it is in the journal, every
 * one after it has a later completion time, so the period's entries are
 * exactly those it reads. */
static int attest_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct attest_arg *a = arg;
	struct attestation *out = a->out, last;
	uint8_t key[8], buf[ATT_FIXED + 2 + 64 + 2 + LEDGER_SIG_MAX + RECORD_SUM_LEN], *p = buf;
	MDB_cursor *cur;
	MDB_val k, v;
	bool have_last = false, freed = false;
	uint64_t end = a->end ? a->end : now_ms();
	int rc;

	/* The chain: this one starts where the last one ended. */
	if ((rc = mdb_cursor_open(txn, ix->ledger, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read ledger");
	rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	if (rc == 0 && (rc = decode_att(ix, &k, &v, &last)) == 0)
		have_last = true;
	mdb_cursor_close(cur);
	if (rc && rc != MDB_NOTFOUND)
		return rc > 0 ? index_lmdb_err(ix, rc, "read ledger") : rc;
	memset(out, 0, sizeof(*out));
	out->from_ms = have_last ? last.end_ms : 0;
	out->end_ms = end;
	if (end <= out->from_ms)
		return store_seterr(STORE_E_STATE, "the period to %llu ms is attested already",
				    (unsigned long long)end);
	if ((rc = a->m->begin(a->m->arg, out->from_ms, end, have_last ? &last : NULL)) != 0)
		return rc;
	if ((rc = mdb_cursor_open(txn, ix->journal, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read ledger");
	be64_put(key, out->from_ms + 1);
	k.mv_size = sizeof(key);
	k.mv_data = key;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct ledger_entry e;

		if ((rc = decode_entry(ix, &k, &v, &e)) != 0)
			break;
		if (e.at_ms > end) {
			rc = MDB_NOTFOUND;
			break;
		}
		if ((rc = a->m->entry(a->m->arg, &e)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND)
		return rc > 0 ? index_lmdb_err(ix, rc, "read ledger") : rc;
	if ((rc = a->m->finish(a->m->arg, out)) != 0)
		return rc;
	if (!out->name[0] || strchr(out->name, '/') || out->name[0] == '.' ||
	    strnlen(out->sig, LEDGER_SIG_MAX + 1) > LEDGER_SIG_MAX)
		return store_seterr(-EINVAL, "bad attestation '%s'", out->name);
	le64_put(p, out->from_ms);
	memcpy(p + 8, out->hash, INDEX_HASH_LEN);
	le64_put(p + 40, out->size);
	p += ATT_FIXED;
	p += index_str_put(p, out->name, strnlen(out->name, 63));
	p += index_str_put(p, out->sig, strlen(out->sig));
	index_record_sum(buf, (size_t)(p - buf), p);
	be64_put(key, end);
	k.mv_size = sizeof(key);
	k.mv_data = key;
	v.mv_size = (size_t)(p - buf) + RECORD_SUM_LEN;
	v.mv_data = buf;
	if ((rc = mdb_put(txn, ix->ledger, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write attestation");
	/* The ledger's files stay here (fsck reads them): pinned for the cache. */
	if ((rc = index_pin_blob(ix, txn, out->hash, 1)) != 0)
		return rc;
	return index_blob_ref(ix, txn, out->hash, out->size, "application/json", 0, NULL, 1,
			      &freed);
}

int index_ledger_attest(struct index *ix, uint64_t end_ms, const struct ledger_maker *m,
			struct attestation *out)
{
	struct attest_arg a = {end_ms, m, out};

	return index_write(ix, attest_fn, &a);
}
