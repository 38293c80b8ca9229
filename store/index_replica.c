/*
 * index_replica.c - what replication to a bucket keeps in the index (SPEC
 * §12): the outbox of objects to put, the blobs the bucket has confirmed,
 * the order in which the local cache drops their files, and the bytes of
 * the blob files here.
 *
 * DESIGN
 * The outbox is written in the transaction that makes what it copies
 * (index_blob_ref makes a blob record: index_replica_blob_made; a job
 * record becomes complete: index_replica_job_complete), so that nothing
 * committed can be missing from it after a crash; the uploader removes
 * an entry once the bucket has the object. Entries are keyed by a
 * sequence number: the uploader takes them in order, and a failed one
 * waits in place with its not-before time. Counts and bytes live in meta
 * so that `stats` never walks the outbox.
 *
 * A blob's signature enters the outbox in the transaction that records
 * the bucket's confirmation of the blob (so the signature never goes up
 * for a blob the bucket lacks). A blob the bucket has is in `replicated`;
 * once its signature is there too and while its file is here, it is also
 * in `lru`, keyed by when it was last read, which is the order the cache
 * drops files in (index_replica_drop): the cache never drops a blob whose
 * signature is still to be made from it. A blob fetched from the
 * bucket that no job of this store holds gets a record of its own with a
 * reference for the cache (owner uid 0), dropped with its file.
 *
 * Threads: as the rest of the index.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

#define OUTBOX_REC_LEN (1 + 32 + 8 + 8 + 8 + 4 + RECORD_SUM_LEN)
#define REPL_REC_LEN (8 + 8 + 1 + RECORD_SUM_LEN)
#define REPL_LOCAL 1
#define REPL_CACHEREF 2
#define REPL_SIGNED 4
#define LRU_KEY_LEN (8 + INDEX_HASH_LEN)

void index_set_replica(struct index *ix, bool on)
{
	ix->replica = on;
}

int index_meta_add(struct index *ix, MDB_txn *txn, const char *key, int64_t delta)
{
	MDB_val v;
	uint64_t n = 0;
	uint8_t buf[8];
	int rc = index_meta_get(ix, txn, key, &v);

	if (rc == 0 && v.mv_size == 8)
		n = le64_get(v.mv_data);
	else if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read counter");
	/* Never below zero: a counter is a sum of what is there. */
	n = delta < 0 && (uint64_t)-delta > n ? 0 : n + (uint64_t)delta;
	le64_put(buf, n);
	if ((rc = index_meta_put(ix, txn, key, buf, 8)) != 0)
		return index_lmdb_err(ix, rc, "write counter");
	return 0;
}

static uint64_t meta_u64(struct index *ix, MDB_txn *txn, const char *key)
{
	MDB_val v;

	if (index_meta_get(ix, txn, key, &v) == 0 && v.mv_size == 8)
		return le64_get(v.mv_data);
	return 0;
}

/* ---- records ---- */

static void outbox_encode(const struct outbox_entry *e, uint8_t out[OUTBOX_REC_LEN])
{
	out[0] = (uint8_t)e->kind;
	memcpy(out + 1, e->id, 32);
	le64_put(out + 33, e->size);
	le64_put(out + 41, e->enqueued_ms);
	le64_put(out + 49, e->not_before_ms);
	le32_put(out + 57, e->attempts);
	index_record_sum(out, OUTBOX_REC_LEN - RECORD_SUM_LEN, out + OUTBOX_REC_LEN - RECORD_SUM_LEN);
}

static int outbox_decode(struct index *ix, const MDB_val *k, const MDB_val *v,
			 struct outbox_entry *e)
{
	const uint8_t *p = v->mv_data;
	uint8_t sum[RECORD_SUM_LEN];

	if (k->mv_size != 8 || v->mv_size != OUTBOX_REC_LEN)
		return store_seterr(STORE_E_INDEX, "damaged outbox entry in '%s/data.mdb'", ix->dir);
	index_record_sum(p, OUTBOX_REC_LEN - RECORD_SUM_LEN, sum);
	if (memcmp(sum, p + OUTBOX_REC_LEN - RECORD_SUM_LEN, RECORD_SUM_LEN) != 0)
		return store_seterr(STORE_E_INDEX, "outbox entry checksum mismatch in '%s/data.mdb'",
				    ix->dir);
	e->seq = be64_get(k->mv_data);
	e->kind = (char)p[0];
	memcpy(e->id, p + 1, 32);
	e->size = le64_get(p + 33);
	e->enqueued_ms = le64_get(p + 41);
	e->not_before_ms = le64_get(p + 49);
	e->attempts = le32_get(p + 57);
	return 0;
}

static void repl_encode(const struct replica_state *s, uint8_t out[REPL_REC_LEN])
{
	le64_put(out, s->confirmed_ms);
	le64_put(out + 8, s->read_ms);
	out[16] = (uint8_t)((s->local ? REPL_LOCAL : 0) | (s->cache_ref ? REPL_CACHEREF : 0) |
			    (s->signed_ ? REPL_SIGNED : 0));
	index_record_sum(out, REPL_REC_LEN - RECORD_SUM_LEN, out + REPL_REC_LEN - RECORD_SUM_LEN);
}

static int repl_get(struct index *ix, MDB_txn *txn, const uint8_t *hash, struct replica_state *s)
{
	MDB_val k = {INDEX_HASH_LEN, (void *)hash}, v;
	uint8_t sum[RECORD_SUM_LEN];
	const uint8_t *p;
	int rc = mdb_get(txn, ix->replicated, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read replication state");
	p = v.mv_data;
	if (v.mv_size != REPL_REC_LEN)
		return store_seterr(STORE_E_INDEX, "damaged replication state in '%s/data.mdb'",
				    ix->dir);
	index_record_sum(p, REPL_REC_LEN - RECORD_SUM_LEN, sum);
	if (memcmp(sum, p + REPL_REC_LEN - RECORD_SUM_LEN, RECORD_SUM_LEN) != 0)
		return store_seterr(STORE_E_INDEX,
				    "replication state checksum mismatch in '%s/data.mdb'", ix->dir);
	s->confirmed_ms = le64_get(p);
	s->read_ms = le64_get(p + 8);
	s->local = p[16] & REPL_LOCAL;
	s->cache_ref = p[16] & REPL_CACHEREF;
	s->signed_ = p[16] & REPL_SIGNED;
	return 0;
}

static void lru_key(uint64_t read_ms, const uint8_t *hash, uint8_t out[LRU_KEY_LEN])
{
	be64_put(out, read_ms);
	memcpy(out + 8, hash, INDEX_HASH_LEN);
}

/* Write the state, keeping lru in step with the old one (NULL: none). */
static int repl_put(struct index *ix, MDB_txn *txn, const uint8_t *hash,
		    const struct replica_state *old, const struct replica_state *s)
{
	uint8_t rec[REPL_REC_LEN], key[LRU_KEY_LEN];
	MDB_val k = {INDEX_HASH_LEN, (void *)hash}, v = {REPL_REC_LEN, rec}, e = {0, NULL};
	int rc;

	if (old && old->local && old->signed_) {
		lru_key(old->read_ms, hash, key);
		if ((rc = index_del_key(ix, txn, ix->lru, key, LRU_KEY_LEN)) != 0)
			return rc;
	}
	if (!s)
		return (rc = mdb_del(txn, ix->replicated, &k, NULL)) && rc != MDB_NOTFOUND
			       ? index_lmdb_err(ix, rc, "delete replication state")
			       : 0;
	repl_encode(s, rec);
	if ((rc = mdb_put(txn, ix->replicated, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write replication state");
	if (s->local && s->signed_) { /* the cache may drop it */
		MDB_val lk = {LRU_KEY_LEN, key};
		lru_key(s->read_ms, hash, key);
		if ((rc = mdb_put(txn, ix->lru, &lk, &e, 0)) != 0)
			return index_lmdb_err(ix, rc, "write cache order");
	}
	return 0;
}

/* ---- the outbox ---- */

static int outbox_add(struct index *ix, MDB_txn *txn, char kind, const uint8_t *id,
		      size_t idlen, uint64_t size)
{
	struct outbox_entry e = {0};
	uint8_t key[8], rec[OUTBOX_REC_LEN];
	MDB_val k = {8, key}, v = {OUTBOX_REC_LEN, rec};
	int rc;

	e.seq = meta_u64(ix, txn, "outbox_next");
	e.kind = kind;
	memcpy(e.id, id, idlen < 32 ? idlen : 32);
	e.size = size;
	e.enqueued_ms = now_ms();
	be64_put(key, e.seq);
	outbox_encode(&e, rec);
	if ((rc = mdb_put(txn, ix->outbox, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write outbox");
	if ((rc = index_meta_add(ix, txn, "outbox_next", 1)) != 0 ||
	    (rc = index_meta_add(ix, txn, "outbox_n", 1)) != 0)
		return rc;
	return index_meta_add(ix, txn, "outbox_bytes", (int64_t)size);
}

int index_replica_blob_made(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size)
{
	int rc = index_meta_add(ix, txn, "local_bytes", (int64_t)size);

	if (rc || !ix->replica || ix->outbox_hold)
		return rc;
	/* Its signature follows once the bucket has it (done_fn). */
	return outbox_add(ix, txn, OUT_BLOB, hash, INDEX_HASH_LEN, size);
}

int index_replica_blob_gone(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size)
{
	struct replica_state s;
	int rc = repl_get(ix, txn, hash, &s);

	if (rc == STORE_E_NOTFOUND)
		return index_meta_add(ix, txn, "local_bytes", -(int64_t)size);
	if (rc)
		return rc;
	if (s.local && (rc = index_meta_add(ix, txn, "local_bytes", -(int64_t)size)) != 0)
		return rc;
	/* The bucket keeps its copy (other stores may use it). */
	return repl_put(ix, txn, hash, &s, NULL);
}

int index_replica_job_complete(struct index *ix, MDB_txn *txn, const struct job *j)
{
	int rc;

	if (!ix->replica || !(j->flags & JOB_F_HAS_OUTPUT))
		return 0;
	if ((rc = outbox_add(ix, txn, OUT_MANIFEST, j->id, JOB_ID_LEN, 0)) != 0)
		return rc;
	return outbox_add(ix, txn, OUT_MANIFESTSIG, j->id, JOB_ID_LEN, 0);
}

struct put_arg {
	char kind;
	const uint8_t *id;
	size_t idlen;
	uint64_t size;
};

static int put_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct put_arg *a = arg;
	return outbox_add(ix, txn, a->kind, a->id, a->idlen, a->size);
}

int index_outbox_put(struct index *ix, char kind, const uint8_t *id, size_t idlen, uint64_t size)
{
	struct put_arg a = {kind, id, idlen, size};

	if (idlen > 32)
		return -EINVAL;
	return index_write(ix, put_fn, &a);
}

struct due_arg {
	uint64_t now;
	const uint64_t *skip;
	size_t nskip, scan, max, n;
	struct outbox_entry *out;
};

static int due_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct due_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	size_t seen = 0;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->outbox, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read outbox");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && seen < a->scan && a->n < a->max;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT), seen++) {
		struct outbox_entry e;
		bool skip = false;

		if ((rc = outbox_decode(ix, &k, &v, &e)) != 0)
			break;
		for (size_t i = 0; i < a->nskip && !skip; i++)
			skip = a->skip[i] == e.seq;
		if (!skip && e.not_before_ms <= a->now)
			a->out[a->n++] = e;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : rc > 0 ? index_lmdb_err(ix, rc, "read outbox") : rc;
}

int index_outbox_due(struct index *ix, uint64_t now_ms, const uint64_t *skip, size_t nskip,
		     size_t scan, struct outbox_entry *out, size_t max, size_t *n)
{
	struct due_arg a = {now_ms, skip, nskip, scan, max, 0, out};
	int rc = index_read(ix, due_fn, &a);

	*n = a.n;
	return rc;
}

struct done_arg {
	uint64_t seq;
	bool confirmed;
	uint64_t not_before;
};

static int outbox_get(struct index *ix, MDB_txn *txn, uint64_t seq, struct outbox_entry *e)
{
	uint8_t key[8];
	MDB_val k = {8, key}, v;
	int rc;

	be64_put(key, seq);
	if ((rc = mdb_get(txn, ix->outbox, &k, &v)) == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read outbox");
	return outbox_decode(ix, &k, &v, e);
}

static int done_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct done_arg *a = arg;
	struct outbox_entry e;
	struct replica_state old, s = {0};
	struct blob_info bi;
	uint8_t key[8];
	MDB_val k = {8, key}, v;
	int rc = outbox_get(ix, txn, a->seq, &e);

	if (rc)
		return rc;
	be64_put(key, a->seq);
	if ((rc = mdb_del(txn, ix->outbox, &k, NULL)) != 0)
		return index_lmdb_err(ix, rc, "delete outbox entry");
	if ((rc = index_meta_add(ix, txn, "outbox_n", -1)) != 0 ||
	    (rc = index_meta_add(ix, txn, "outbox_bytes", -(int64_t)e.size)) != 0)
		return rc;
	if ((e.kind != OUT_BLOB && e.kind != OUT_BLOBSIG) || !a->confirmed)
		return 0;
	/* Confirmed only while the index still has the blob. */
	k.mv_size = INDEX_HASH_LEN;
	k.mv_data = e.id;
	if ((rc = mdb_get(txn, ix->blobs, &k, &v)) == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read blob");
	if ((rc = index_blob_decode(ix, &v, &bi)) != 0)
		return rc;
	rc = repl_get(ix, txn, e.id, &old);
	if (rc && rc != STORE_E_NOTFOUND)
		return rc;
	if (e.kind == OUT_BLOBSIG) {
		/* Blob and signature are both there: the cache may drop it. */
		if (rc || old.signed_)
			return 0;
		s = old;
		s.signed_ = true;
		return repl_put(ix, txn, e.id, &old, &s);
	}
	if (rc == 0)
		return 0; /* confirmed already */
	s.confirmed_ms = s.read_ms = now_ms();
	s.local = true;
	if ((rc = repl_put(ix, txn, e.id, NULL, &s)) != 0)
		return rc;
	/* Its signature next (never before: a signature without its blob
	 * would be a promise the bucket cannot keep). */
	return outbox_add(ix, txn, OUT_BLOBSIG, e.id, INDEX_HASH_LEN, 0);
}

int index_outbox_done(struct index *ix, uint64_t seq, bool confirmed)
{
	struct done_arg a = {seq, confirmed, 0};
	return index_write(ix, done_fn, &a);
}

static int retry_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct done_arg *a = arg;
	struct outbox_entry e;
	uint8_t key[8], rec[OUTBOX_REC_LEN];
	MDB_val k = {8, key}, v = {OUTBOX_REC_LEN, rec};
	int rc = outbox_get(ix, txn, a->seq, &e);

	if (rc)
		return rc;
	e.attempts++;
	e.not_before_ms = a->not_before;
	be64_put(key, a->seq);
	outbox_encode(&e, rec);
	return (rc = mdb_put(txn, ix->outbox, &k, &v, 0)) ? index_lmdb_err(ix, rc, "write outbox")
							   : 0;
}

int index_outbox_retry(struct index *ix, uint64_t seq, uint64_t not_before_ms)
{
	struct done_arg a = {seq, false, not_before_ms};
	return index_write(ix, retry_fn, &a);
}

static int ostats_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct outbox_stats *s = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	s->objects = meta_u64(ix, txn, "outbox_n");
	s->bytes = meta_u64(ix, txn, "outbox_bytes");
	s->oldest_ms = 0;
	if ((rc = mdb_cursor_open(txn, ix->outbox, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read outbox");
	if ((rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)) == 0) {
		struct outbox_entry e;
		if (outbox_decode(ix, &k, &v, &e) == 0)
			s->oldest_ms = e.enqueued_ms;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "read outbox");
}

int index_outbox_stats(struct index *ix, struct outbox_stats *s)
{
	return index_read(ix, ostats_fn, s);
}

/* ---- the cache ---- */

struct rget_arg {
	const uint8_t *hash;
	struct replica_state *s;
};

static int rget_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct rget_arg *a = arg;
	return repl_get(ix, txn, a->hash, a->s);
}

int index_replica_get(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], struct replica_state *s)
{
	struct rget_arg a = {hash, s};
	return index_read(ix, rget_fn, &a);
}

static int lbytes_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	*(uint64_t *)arg = meta_u64(ix, txn, "local_bytes");
	return 0;
}

int index_local_bytes(struct index *ix, uint64_t *bytes)
{
	return index_read(ix, lbytes_fn, bytes);
}

struct touch_arg {
	const uint8_t (*hashes)[INDEX_HASH_LEN];
	size_t n;
	uint64_t now;
};

static int touch_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct touch_arg *a = arg;

	for (size_t i = 0; i < a->n; i++) {
		struct replica_state old, s;
		int rc = repl_get(ix, txn, a->hashes[i], &old);

		if (rc == STORE_E_NOTFOUND)
			continue;
		if (rc)
			return rc;
		s = old;
		s.read_ms = a->now;
		if ((rc = repl_put(ix, txn, a->hashes[i], &old, &s)) != 0)
			return rc;
	}
	return 0;
}

int index_replica_touch(struct index *ix, const uint8_t (*hashes)[INDEX_HASH_LEN], size_t n,
			uint64_t now_ms)
{
	struct touch_arg a = {hashes, n, now_ms};
	return n ? index_write(ix, touch_fn, &a) : 0;
}

struct lru_arg {
	size_t max, n;
	uint8_t (*hashes)[INDEX_HASH_LEN];
};

static int lru_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct lru_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->lru, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read cache order");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && a->n < a->max;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT))
		if (k.mv_size == LRU_KEY_LEN)
			memcpy(a->hashes[a->n++], (uint8_t *)k.mv_data + 8, INDEX_HASH_LEN);
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "read cache order");
}

int index_replica_lru(struct index *ix, size_t max, uint8_t (*hashes)[INDEX_HASH_LEN], size_t *n)
{
	struct lru_arg a = {max, 0, hashes};
	int rc = index_read(ix, lru_fn, &a);

	*n = a.n;
	return rc;
}

struct drop_arg {
	const uint8_t *hash;
	uint64_t size;
	bool freed;
	uint64_t made_size;
	const char *media_type;
};

static int drop_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct drop_arg *a = arg;
	struct replica_state old, s;
	MDB_val k = {INDEX_HASH_LEN, (void *)a->hash}, v;
	struct blob_info bi;
	int rc = repl_get(ix, txn, a->hash, &old);

	if (rc == STORE_E_NOTFOUND || (rc == 0 && !old.local))
		return store_seterr(STORE_E_STATE, "blob not confirmed in the bucket, or not here");
	if (rc)
		return rc;
	if (!old.signed_)
		return store_seterr(STORE_E_STATE, "the blob's signature is not in the bucket yet");
	if (mdb_get(txn, ix->pins, &k, &v) == 0)
		return store_seterr(STORE_E_STATE, "blob is an input of a job not finished");
	if ((rc = mdb_get(txn, ix->blobs, &k, &v)) != 0)
		return index_lmdb_err(ix, rc, "read blob");
	if ((rc = index_blob_decode(ix, &v, &bi)) != 0)
		return rc;
	a->size = bi.size;
	if (old.cache_ref && bi.refcount == 1) {
		/* Only the cache holds it: the record goes with the file
		 * (index_replica_blob_gone takes the bytes and the state). */
		return index_blob_ref(ix, txn, a->hash, bi.size, "", 0, NULL, -1, &a->freed);
	}
	s = old;
	s.local = false;
	if (old.cache_ref) {
		/* A job holds it too: the cache lets its reference go. */
		s.cache_ref = false;
		if ((rc = index_blob_ref(ix, txn, a->hash, bi.size, "", 0, NULL, -1, &a->freed)) != 0)
			return rc;
	}
	if ((rc = index_meta_add(ix, txn, "local_bytes", -(int64_t)bi.size)) != 0)
		return rc;
	return repl_put(ix, txn, a->hash, &old, &s);
}

int index_replica_drop(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint64_t *size,
		       bool *freed)
{
	struct drop_arg a = {hash, 0, false, 0, NULL};
	int rc = index_write(ix, drop_fn, &a);

	*size = a.size;
	*freed = a.freed;
	return rc;
}

static int fetched_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct drop_arg *a = arg;
	struct replica_state old, s = {0};
	MDB_val k = {INDEX_HASH_LEN, (void *)a->hash}, v;
	bool freed = false;
	int rc = mdb_get(txn, ix->blobs, &k, &v);

	if (rc == MDB_NOTFOUND) {
		/* Unknown here: the cache's own reference keeps the record
		 * (index_blob_ref counts the bytes); the bucket has it. */
		ix->outbox_hold = true; /* the bucket has it: nothing to put */
		rc = index_blob_ref(ix, txn, a->hash, a->made_size, a->media_type, 0, NULL, 1, &freed);
		ix->outbox_hold = false;
		if (rc)
			return rc;
		rc = repl_get(ix, txn, a->hash, &old);
		if (rc && rc != STORE_E_NOTFOUND)
			return rc;
		s.confirmed_ms = s.read_ms = now_ms();
		s.local = s.cache_ref = true;
		s.signed_ = true; /* as the bucket has it: not this store's to sign */
		return repl_put(ix, txn, a->hash, rc ? NULL : &old, &s);
	}
	if (rc)
		return index_lmdb_err(ix, rc, "read blob");
	if ((rc = repl_get(ix, txn, a->hash, &old)) == STORE_E_NOTFOUND)
		return 0; /* its file was here all along */
	if (rc)
		return rc;
	if (old.local)
		return 0;
	s = old;
	s.local = true;
	s.read_ms = now_ms();
	if ((rc = index_meta_add(ix, txn, "local_bytes", (int64_t)a->made_size)) != 0)
		return rc;
	return repl_put(ix, txn, a->hash, &old, &s);
}

int index_replica_fetched(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
			  const char *media_type)
{
	struct drop_arg a = {hash, 0, false, size, media_type ? media_type : ""};
	return index_write(ix, fetched_fn, &a);
}

struct push_arg {
	uint64_t n;
	uint8_t after[INDEX_HASH_LEN];
	bool started, more;
};

/* One batch of blobs (after a->after), then of jobs, per transaction. */
static int push_blobs_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct push_arg *a = arg;
	uint8_t batch[256][INDEX_HASH_LEN];
	uint64_t sizes[256];
	MDB_cursor *cur;
	MDB_val k = {INDEX_HASH_LEN, a->after}, v;
	size_t n = 0;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->blobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read blobs");
	rc = mdb_cursor_get(cur, &k, &v, a->started ? MDB_SET_RANGE : MDB_FIRST);
	if (rc == 0 && a->started && k.mv_size == INDEX_HASH_LEN &&
	    memcmp(k.mv_data, a->after, INDEX_HASH_LEN) == 0)
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	for (; rc == 0 && n < 256; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct blob_info bi;
		if (k.mv_size != INDEX_HASH_LEN || index_blob_decode(ix, &v, &bi) != 0)
			continue;
		memcpy(batch[n], k.mv_data, INDEX_HASH_LEN);
		sizes[n++] = bi.size;
	}
	mdb_cursor_close(cur);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read blobs");
	a->more = n == 256;
	for (size_t i = 0; i < n; i++) {
		struct replica_state s;
		if ((rc = repl_get(ix, txn, batch[i], &s)) == 0)
			continue;
		if (rc != STORE_E_NOTFOUND)
			return rc;
		if ((rc = outbox_add(ix, txn, OUT_BLOB, batch[i], INDEX_HASH_LEN, sizes[i])) != 0)
			return rc;
		a->n++; /* its signature follows once the bucket has it */
	}
	if (n) {
		memcpy(a->after, batch[n - 1], INDEX_HASH_LEN);
		a->started = true;
	}
	return 0;
}

static int push_jobs_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct push_arg *a = arg;
	uint8_t batch[256][JOB_ID_LEN];
	MDB_cursor *cur;
	MDB_val k = {JOB_ID_LEN, a->after}, v;
	size_t n = 0;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->jobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read jobs");
	rc = mdb_cursor_get(cur, &k, &v, a->started ? MDB_SET_RANGE : MDB_FIRST);
	if (rc == 0 && a->started && k.mv_size == JOB_ID_LEN &&
	    memcmp(k.mv_data, a->after, JOB_ID_LEN) == 0)
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	for (; rc == 0 && n < 256; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT))
		if (k.mv_size == JOB_ID_LEN)
			memcpy(batch[n++], k.mv_data, JOB_ID_LEN);
	mdb_cursor_close(cur);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read jobs");
	a->more = n == 256;
	for (size_t i = 0; i < n; i++) {
		struct job j;
		if ((rc = index_get_job(ix, txn, batch[i], &j)) != 0)
			return rc;
		if (j.status == JOB_COMPLETE && (j.flags & JOB_F_HAS_OUTPUT)) {
			if ((rc = outbox_add(ix, txn, OUT_MANIFEST, j.id, JOB_ID_LEN, 0)) == 0)
				rc = outbox_add(ix, txn, OUT_MANIFESTSIG, j.id, JOB_ID_LEN, 0);
			a->n += 2;
		}
		job_release(&j);
		if (rc)
			return rc;
	}
	if (n) {
		memcpy(a->after, batch[n - 1], JOB_ID_LEN);
		a->started = true;
	}
	return 0;
}

int index_replica_push_all(struct index *ix, uint64_t *n)
{
	struct push_arg a = {0};
	int rc;

	do {
		if ((rc = index_write(ix, push_blobs_fn, &a)) != 0)
			goto out;
	} while (a.more);
	memset(&a.after, 0, sizeof(a.after));
	a.started = false;
	do {
		if ((rc = index_write(ix, push_jobs_fn, &a)) != 0)
			goto out;
	} while (a.more);
out:
	*n = a.n;
	return rc;
}

struct rlist_arg {
	const uint8_t *after;
	size_t max, n;
	uint8_t (*hashes)[INDEX_HASH_LEN];
	struct replica_state *states;
};

static int rlist_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct rlist_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k = {INDEX_HASH_LEN, (void *)a->after}, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->replicated, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read replicated");
	rc = mdb_cursor_get(cur, &k, &v, a->after ? MDB_SET_RANGE : MDB_FIRST);
	if (rc == 0 && a->after && k.mv_size == INDEX_HASH_LEN &&
	    memcmp(k.mv_data, a->after, INDEX_HASH_LEN) == 0)
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	for (; rc == 0 && a->n < a->max; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size != INDEX_HASH_LEN)
			continue;
		if (a->states && (rc = repl_get(ix, txn, k.mv_data, &a->states[a->n])) != 0)
			break;
		memcpy(a->hashes[a->n++], k.mv_data, INDEX_HASH_LEN);
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : rc < 0 ? rc : index_lmdb_err(ix, rc, "read replicated");
}

int index_replica_list(struct index *ix, const uint8_t *after, size_t max,
		       uint8_t (*hashes)[INDEX_HASH_LEN], struct replica_state *states, size_t *n)
{
	struct rlist_arg a = {after, max, 0, hashes, states};
	int rc = index_read(ix, rlist_fn, &a);

	*n = a.n;
	return rc;
}

static int cfg_put_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	const char *text = arg;
	int rc = index_meta_put(ix, txn, "replica", text, strlen(text));
	return rc ? index_lmdb_err(ix, rc, "write replica") : 0;
}

int index_replica_config_put(struct index *ix, const char *text)
{
	return index_write(ix, cfg_put_fn, (void *)text);
}

struct cfg_get_arg {
	char *out;
	size_t len;
};

static int cfg_get_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct cfg_get_arg *a = arg;
	MDB_val v;
	int rc = index_meta_get(ix, txn, "replica", &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read replica");
	if (v.mv_size >= a->len || memchr(v.mv_data, '\0', v.mv_size))
		return store_seterr(STORE_E_INDEX, "damaged replica setting in '%s/data.mdb'", ix->dir);
	memcpy(a->out, v.mv_data, v.mv_size);
	a->out[v.mv_size] = '\0';
	return 0;
}

int index_replica_config_get(struct index *ix, char *out, size_t len)
{
	struct cfg_get_arg a = {out, len};
	return index_read(ix, cfg_get_fn, &a);
}

/* ---- inputs of unfinished jobs stay here ---- */

int index_pins_move(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], int delta)
{
	MDB_val k = {JOB_ID_LEN, (void *)id}, v;
	struct job_input in[INDEX_INPUTS_MAX];
	size_t n = 0;
	int rc = mdb_get(txn, ix->inputs, &k, &v);

	if (rc == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read inputs");
	if (index_inputs_decode(&v, in, INDEX_INPUTS_MAX, &n) != 0)
		return store_seterr(STORE_E_INDEX, "damaged inputs of a job in '%s'", ix->dir);
	for (size_t i = 0; i < n; i++)
		if ((rc = index_pin_blob(ix, txn, in[i].hash, delta)) != 0)
			return rc;
	return 0;
}

int index_pin_blob(struct index *ix, MDB_txn *txn, const uint8_t *hash, int delta)
{
	MDB_val pk = {INDEX_HASH_LEN, (void *)hash}, pv;
	uint64_t c = 0;
	uint8_t buf[8];
	int rc;

	if ((rc = mdb_get(txn, ix->pins, &pk, &pv)) == 0 && pv.mv_size == 8)
		c = le64_get(pv.mv_data);
	else if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read pins");
	c = delta < 0 ? (c ? c - 1 : 0) : c + 1;
	if (c == 0)
		return index_del_key(ix, txn, ix->pins, hash, INDEX_HASH_LEN);
	le64_put(buf, c);
	pv.mv_size = 8;
	pv.mv_data = buf;
	return (rc = mdb_put(txn, ix->pins, &pk, &pv, 0)) ? index_lmdb_err(ix, rc, "write pins") : 0;
}
