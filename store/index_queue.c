/*
 * index_queue.c - the run queue and every job state change.
 *
 * DESIGN
 * The queue is an LMDB database whose key order is the scheduling order
 * (see index.h: group, priority descending, fair-share round, id), so a
 * claim is one cursor positioning and the position of nothing depends on
 * RAM. State changes follow SPEC §3's machine; each is one durable write
 * (index_write) that updates the job record and every affected index in
 * the same transaction. The "running" database lists running jobs so that
 * recovery after a crash touches only them.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

void index_queue_item(const struct job *j, uint8_t item[QUEUE_ITEM_LEN])
{
	item[0] = (uint8_t)(255 - j->priority);
	be64_put(item + 1, j->round);
	memcpy(item + 9, j->id, JOB_ID_LEN);
}

int index_fair_get(struct index *ix, MDB_txn *txn, const uint8_t *key, size_t len,
		   uint64_t *val)
{
	MDB_val k = {len, (void *)key}, v;
	int rc = mdb_get(txn, ix->fair, &k, &v);

	if (rc == MDB_NOTFOUND) {
		*val = 0;
		return 0;
	}
	if (rc)
		return index_lmdb_err(ix, rc, "read queue state");
	if (v.mv_size != 8)
		return store_seterr(STORE_E_INDEX, "damaged queue state in '%s/data.mdb'",
				    ix->dir);
	*val = le64_get(v.mv_data);
	return 0;
}

static int fair_put(struct index *ix, MDB_txn *txn, const uint8_t *key, size_t len,
		    uint64_t val)
{
	uint8_t buf[8];
	MDB_val k = {len, (void *)key}, v = {8, buf};
	int rc;

	le64_put(buf, val);
	rc = mdb_put(txn, ix->fair, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write queue state") : 0;
}

/* Queue depth per group (fair key of one byte) and queued jobs per owner
 * across groups (fair key of four bytes: the uid). */
static int count_add(struct index *ix, MDB_txn *txn, const uint8_t *key, size_t len, int delta)
{
	uint64_t d = 0;
	int rc = index_fair_get(ix, txn, key, len, &d);

	if (rc)
		return rc;
	if (delta < 0 && d == 0)
		return store_seterr(STORE_E_INDEX, "queue depth underflow in '%s'", ix->dir);
	return fair_put(ix, txn, key, len, d + (uint64_t)(int64_t)delta);
}

static int depth_add(struct index *ix, MDB_txn *txn, const struct job *j, int delta)
{
	uint8_t uk[4];
	int rc = count_add(ix, txn, &j->group, 1, delta);

	be32_put(uk, j->uid);
	return rc ? rc : count_add(ix, txn, uk, 4, delta);
}

int index_enqueue(struct index *ix, MDB_txn *txn, struct job *j)
{
	uint8_t cur_key[2] = {j->group, (uint8_t)j->priority}, own_key[6], item[QUEUE_ITEM_LEN];
	uint64_t cur = 0, next = 0;
	int rc;

	memcpy(own_key, cur_key, 2);
	be32_put(own_key + 2, j->uid);
	if ((rc = index_fair_get(ix, txn, cur_key, 2, &cur)) != 0 ||
	    (rc = index_fair_get(ix, txn, own_key, 6, &next)) != 0)
		return rc;
	j->round = cur > next ? cur : next;
	if ((rc = fair_put(ix, txn, own_key, 6, j->round + 1)) != 0)
		return rc;
	index_queue_item(j, item);
	if ((rc = index_set_add(ix, txn, ix->queue, &j->group, 1, item, sizeof(item))) != 0)
		return rc;
	return depth_add(ix, txn, j, 1);
}

static void delayed_key(const struct job *j, uint8_t key[8 + JOB_ID_LEN])
{
	be64_put(key, j->round);
	memcpy(key + 8, j->id, JOB_ID_LEN);
}

int index_dequeue(struct index *ix, MDB_txn *txn, struct job *j)
{
	uint8_t item[QUEUE_ITEM_LEN];
	int rc;

	if (j->flags & JOB_F_DELAYED) {
		uint8_t key[8 + JOB_ID_LEN];
		MDB_val k = {sizeof(key), key};

		delayed_key(j, key);
		rc = mdb_del(txn, ix->delayed, &k, NULL);
		if (rc == MDB_NOTFOUND)
			return store_seterr(STORE_E_INDEX,
					    "delayed job missing from the delayed set in '%s'",
					    ix->dir);
		if (rc)
			return index_lmdb_err(ix, rc, "dequeue");
		j->flags &= (uint8_t)~JOB_F_DELAYED;
		j->round = 0;
		return 0;
	}
	index_queue_item(j, item);
	rc = index_set_del(ix, txn, ix->queue, &j->group, 1, item, sizeof(item));
	if (rc == STORE_E_NOTFOUND)
		return store_seterr(STORE_E_INDEX, "queued job missing from the queue in '%s'",
				    ix->dir);
	return rc ? rc : depth_add(ix, txn, j, -1);
}

int index_mark_running(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], bool on)
{
	MDB_val k = {JOB_ID_LEN, (void *)id}, v = {0, NULL};
	int rc = on ? mdb_put(txn, ix->running, &k, &v, 0) : mdb_del(txn, ix->running, &k, NULL);

	if (rc == MDB_NOTFOUND && !on)
		return 0;
	return rc ? index_lmdb_err(ix, rc, "update running set") : 0;
}

/* ---- claim ---- */

/* Take the group's first job into *out (queued -> running). */
static int claim_next(struct index *ix, MDB_txn *txn, uint8_t group, struct job *out)
{
	uint8_t id[JOB_ID_LEN], cur_key[2];
	MDB_cursor *cur;
	MDB_val k = {1, &group}, v;
	struct job j;
	int rc;

	/* The group's first item: the smallest. */
	if ((rc = mdb_cursor_open(txn, ix->queue, &cur)) != 0)
		return index_lmdb_err(ix, rc, "claim");
	rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
	mdb_cursor_close(cur);
	if (rc)
		return rc == MDB_NOTFOUND ? STORE_E_NOTFOUND : index_lmdb_err(ix, rc, "claim");
	if (v.mv_size != QUEUE_ITEM_LEN)
		return store_seterr(STORE_E_INDEX, "damaged queue entry in '%s/data.mdb'", ix->dir);
	memcpy(id, (uint8_t *)v.mv_data + 9, JOB_ID_LEN);
	if ((rc = index_get_job(ix, txn, id, &j)) != 0)
		return rc;
	if (j.status != JOB_QUEUED) {
		job_release(&j);
		return store_seterr(STORE_E_INDEX, "queue entry for a job that is not queued");
	}
	if ((rc = index_dequeue(ix, txn, &j)) != 0)
		goto out;
	cur_key[0] = j.group;
	cur_key[1] = (uint8_t)j.priority;
	if ((rc = fair_put(ix, txn, cur_key, 2, j.round)) != 0)
		goto out;
	j.status = JOB_RUNNING;
	j.attempts++;
	j.started_ms = j.updated_ms = now_ms();
	j.progress = 0;
	j.flags &= (uint8_t)~JOB_F_CANCEL_REQUESTED;
	if ((rc = index_put_job(ix, txn, &j)) != 0 ||
	    (rc = index_mark_running(ix, txn, j.id, true)) != 0)
		goto out;
	*out = j;
	return 0;
out:
	job_release(&j);
	return rc;
}

struct claim_many_arg {
	uint8_t group;
	struct job *out;
	size_t max, n;
};

static int claim_many_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct claim_many_arg *a = arg;
	int rc = 0;

	while (a->n < a->max && (rc = claim_next(ix, txn, a->group, &a->out[a->n])) == 0)
		a->n++;
	/* An empty queue ends the batch; any other error fails all of it (a
	 * claim that failed half-way must not be committed). */
	return rc == STORE_E_NOTFOUND && a->n ? 0 : rc;
}

int index_job_claim_many(struct index *ix, uint8_t group, size_t max, struct job *out,
			 size_t *n)
{
	struct claim_many_arg a = {group, out, max, 0};
	int rc = index_write(ix, claim_many_fn, &a);

	*n = rc ? 0 : a.n;
	if (rc)
		for (size_t i = 0; i < a.n; i++)
			job_release(&out[i]); /* the batch's commit failed */
	return rc;
}

int index_job_claim(struct index *ix, uint8_t group, struct job *out)
{
	size_t n;

	return index_job_claim_many(ix, group, 1, out, &n);
}

/* ---- single-job changes ---- */

/*
 * The common shape of a state change: read the job, apply `change`, write
 * it back. change() returns 0 or an error, and may touch other databases.
 */
struct change_arg {
	const uint8_t *id;
	int (*change)(struct index *ix, MDB_txn *txn, struct job *j, void *arg);
	void *arg;
};

static int change_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct change_arg *a = arg;
	struct job j;
	int rc = index_get_job(ix, txn, a->id, &j);

	if (rc == STORE_E_NOTFOUND) {
		char idstr[JOB_ID_STR_LEN + 1];
		ulid_format(a->id, idstr);
		return store_seterr(rc, "job %s is gone (deleted)", idstr);
	}
	if (rc)
		return rc;
	rc = a->change(ix, txn, &j, a->arg);
	if (rc == 0)
		rc = index_put_job(ix, txn, &j);
	job_release(&j);
	return rc;
}

int index_change_job(struct index *ix, const uint8_t id[JOB_ID_LEN],
		      int (*change)(struct index *, MDB_txn *, struct job *, void *), void *arg)
{
	struct change_arg a = {id, change, arg};
	return index_write(ix, change_fn, &a);
}

/* A change of a job queued without waiting (index_write_async). */
struct change_async {
	uint8_t id[JOB_ID_LEN];
	struct change_arg c;
	void (*free_arg)(void *arg);
	void (*done)(void *arg, int rc, const char *err);
	void *done_arg;
};

static int change_async_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct change_async *x = arg;

	return change_fn(ix, txn, &x->c);
}

static void change_async_done(void *arg, int rc, const char *err)
{
	struct change_async *x = arg;

	if (x->done)
		x->done(x->done_arg, rc, err);
	x->free_arg(x->c.arg);
	free(x);
}

int index_change_job_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
			   int (*change)(struct index *, MDB_txn *, struct job *, void *),
			   void *arg, void (*free_arg)(void *arg),
			   void (*done)(void *arg, int rc, const char *err), void *done_arg)
{
	struct change_async *x = calloc(1, sizeof(*x));
	int rc;

	if (!x) {
		free_arg(arg);
		return store_seterr(-ENOMEM, "out of memory");
	}
	memcpy(x->id, id, JOB_ID_LEN);
	x->c = (struct change_arg){x->id, change, arg};
	x->free_arg = free_arg;
	x->done = done;
	x->done_arg = done_arg;
	if ((rc = index_write_async(ix, change_async_fn, x, change_async_done)) != 0) {
		free_arg(arg);
		free(x);
	}
	return rc;
}

int index_state_err(const struct job *j, const char *op)
{
	char idstr[JOB_ID_STR_LEN + 1];

	ulid_format(j->id, idstr);
	return store_seterr(STORE_E_STATE, "cannot %s job %s: it is %s", op, idstr,
			    job_status_name(j->status));
}

static int progress_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	(void)ix;
	(void)txn;
	if (j->status != JOB_RUNNING)
		return index_state_err(j, "report progress of");
	j->progress = *(uint16_t *)arg;
	j->updated_ms = now_ms();
	return 0;
}

int index_job_progress(struct index *ix, const uint8_t id[JOB_ID_LEN], uint16_t thousandths)
{
	if (thousandths > 1000)
		return store_seterr(-EINVAL, "progress %u is above 1000 thousandths", thousandths);
	return index_change_job(ix, id, progress_change, &thousandths);
}

struct attach_arg {
	const uint8_t *hash;
	uint64_t size;
	const char *media_type, *device;
	bool cached;
};

/* `made` as job id takes (delta > 0) or lets go of (delta < 0) the blob as
 * its output: the first job to take it made it; forgotten when that job
 * lets go of it. */
static int made_change(struct index *ix, MDB_txn *txn, const uint8_t *hash,
			const uint8_t id[JOB_ID_LEN], int delta)
{
	MDB_val k = {INDEX_HASH_LEN, (void *)hash}, v = {JOB_ID_LEN, (void *)id};
	int rc;

	if (delta > 0) {
		rc = mdb_put(txn, ix->made, &k, &v, MDB_NOOVERWRITE);
		return rc && rc != MDB_KEYEXIST ? index_lmdb_err(ix, rc, "write made") : 0;
	}
	rc = mdb_get(txn, ix->made, &k, &v);
	if (rc == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read made");
	if (v.mv_size != JOB_ID_LEN || memcmp(v.mv_data, id, JOB_ID_LEN) != 0)
		return 0;
	rc = mdb_del(txn, ix->made, &k, NULL);
	return rc ? index_lmdb_err(ix, rc, "delete made") : 0;
}

/* The blob's reference count and its owner's count (blobusers) move together. */
int index_blob_ref(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size,
		   const char *media_type, uint32_t uid, const uint8_t *maker, int delta,
		   bool *freed)
{
	MDB_val k = {INDEX_HASH_LEN, (void *)hash}, v;
	uint8_t rec[BLOB_REC_MAX];
	struct blob_info b = {0};
	int rc = mdb_get(txn, ix->blobs, &k, &v);
	bool created = rc == MDB_NOTFOUND;

	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read blob");
	if (rc == 0) {
		if ((rc = index_blob_decode(ix, &v, &b)) != 0)
			return rc;
		if (delta > 0 && b.size != size)
			return store_seterr(STORE_E_CORRUPT,
					    "blob size %llu differs from the indexed %llu",
					    (unsigned long long)size, (unsigned long long)b.size);
	} else if (delta < 0) {
		return store_seterr(STORE_E_INDEX, "output blob missing from the index in '%s'",
				    ix->dir);
	} else {
		if (strlen(media_type) >= sizeof(b.media_type))
			return store_seterr(-EINVAL, "media type too long");
		b.size = size;
		b.created_ms = now_ms();
		snprintf(b.media_type, sizeof(b.media_type), "%s", media_type);
	}
	if (delta < 0 && b.refcount == 0)
		return store_seterr(STORE_E_INDEX, "blob reference count underflow in '%s'",
				    ix->dir);
	b.refcount += (uint64_t)(int64_t)delta;
	if ((rc = index_blob_user(ix, txn, hash, uid, delta)) != 0)
		return rc;
	if (b.refcount == 0) {
		*freed = true;
		if ((rc = mdb_del(txn, ix->blobs, &k, NULL)) != 0)
			return index_lmdb_err(ix, rc, "delete blob");
		if ((rc = index_replica_blob_gone(ix, txn, hash, b.size)) != 0)
			return rc;
		rc = mdb_del(txn, ix->made, &k, NULL);
		return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "delete made") : 0;
	}
	v.mv_size = index_blob_encode(&b, rec);
	v.mv_data = rec;
	if ((rc = mdb_put(txn, ix->blobs, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write blob");
	if (created && (rc = index_replica_blob_made(ix, txn, hash, size)) != 0)
		return rc; /* a new record: a new blob file */
	return maker ? made_change(ix, txn, hash, maker, delta) : 0;
}

static int attach_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct attach_arg *a = arg;
	bool freed = false;
	int rc;

	if (j->status != JOB_RUNNING && j->status != JOB_QUEUED)
		return index_state_err(j, "attach an output to");
	if (j->flags & JOB_F_HAS_OUTPUT)
		return index_state_err(j, "attach a second output to");
	if ((rc = index_blob_ref(ix, txn, a->hash, a->size, a->media_type, j->uid, j->id, 1,
				 &freed)) != 0)
		return rc;
	memcpy(j->output_hash, a->hash, INDEX_HASH_LEN);
	j->output_size = a->size;
	j->flags |= JOB_F_HAS_OUTPUT | (a->cached ? JOB_F_CACHED : 0);
	free(j->media_type);
	free(j->device);
	j->media_type = strdup(a->media_type);
	j->device = strdup(a->device ? a->device : "");
	if (!j->media_type || !j->device)
		return -ENOMEM;
	j->updated_ms = now_ms();
	return 0;
}

int index_job_attach_output(struct index *ix, const uint8_t id[JOB_ID_LEN],
			    const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
			    const char *media_type, const char *device, bool cached)
{
	struct attach_arg a = {hash, size, media_type, device, cached};

	if (strlen(media_type) > 127)
		return store_seterr(-EINVAL, "media type longer than 127 bytes");
	return index_change_job(ix, id, attach_change, &a);
}

/* An attach queued without waiting: its own copy of everything. */
struct attach_async {
	uint8_t id[JOB_ID_LEN];
	uint8_t hash[INDEX_HASH_LEN];
	struct attach_arg a;
	char *media_type, *device;
	void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err);
};

static void attach_async_free(void *arg)
{
	struct attach_async *x = arg;

	free(x->media_type);
	free(x->device);
	free(x);
}

static int attach_async_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	return attach_change(ix, txn, j, &((struct attach_async *)arg)->a);
}

static void attach_async_done(void *arg, int rc, const char *err)
{
	struct attach_async *x = arg;

	if (rc && x->failed)
		x->failed(x->id, err);
}

int index_job_attach_output_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
				  const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
				  const char *media_type, const char *device,
				  void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err))
{
	struct attach_async *x;

	if (strlen(media_type) > 127)
		return store_seterr(-EINVAL, "media type longer than 127 bytes");
	if (!(x = calloc(1, sizeof(*x))) || !(x->media_type = strdup(media_type)) ||
	    (device && !(x->device = strdup(device)))) {
		if (x)
			attach_async_free(x);
		return store_seterr(-ENOMEM, "out of memory");
	}
	memcpy(x->id, id, JOB_ID_LEN);
	memcpy(x->hash, hash, INDEX_HASH_LEN);
	x->a = (struct attach_arg){x->hash, size, x->media_type, x->device, false};
	x->failed = failed;
	return index_change_job_async(ix, id, attach_async_change, x, attach_async_free,
				      attach_async_done, x);
}

struct finish_arg {
	enum job_status final;
	const char *code, *message;
	const struct job_usage *used;
	const char *line; /* a last log line (NULL: none) */
	size_t line_len;
	const char *result; /* result.json (NULL: none) */
	size_t result_len;
};

/* A running job's attempt ends: what it used joins the job's (the
 * service's measure where it gave one, else wall time). */
static int attempt_used(struct job *j, const struct job_usage *u)
{
	uint64_t now = now_ms();
	char *kind;

	if (u && u->reported_ms >= 0)
		j->run_ms += (uint64_t)u->reported_ms;
	else if (j->started_ms && now > j->started_ms)
		j->run_ms += now - j->started_ms;
	if (!(kind = strdup(u && u->kind ? u->kind : "")))
		return -ENOMEM;
	free(j->ran_on);
	j->ran_on = kind;
	return 0;
}

static int finish_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct finish_arg *a = arg;
	int rc;

	if (j->status == JOB_QUEUED) {
		if ((rc = index_dequeue(ix, txn, j)) != 0)
			return rc;
	} else if (j->status == JOB_RUNNING) {
		if ((rc = index_mark_running(ix, txn, j->id, false)) != 0 ||
		    (rc = attempt_used(j, a->used)) != 0)
			return rc;
	} else {
		return index_state_err(j, "finish");
	}
	if (a->final == JOB_COMPLETE && !(j->flags & JOB_F_HAS_OUTPUT))
		return index_state_err(j, "complete (no output attached)");
	if (a->line && (rc = index_log_append(ix, txn, j, a->line, a->line_len)) != 0)
		return rc;
	if (a->result && (rc = index_result_store(ix, txn, j, a->result, a->result_len)) != 0)
		return rc;
	j->status = a->final;
	j->completed_ms = j->updated_ms = now_ms();
	j->flags &= (uint8_t)~JOB_F_CANCEL_REQUESTED;
	if (a->final == JOB_COMPLETE)
		j->progress = 1000;
	if (a->final == JOB_ERROR) {
		free(j->error_code);
		free(j->error_message);
		j->error_code = strdup(a->code ? a->code : "error");
		j->error_message = strdup(a->message ? a->message : "");
		if (!j->error_code || !j->error_message)
			return -ENOMEM;
	}
	return 0;
}

int index_job_finish(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_status final,
		     const char *error_code, const char *error_message)
{
	return index_job_finish_used(ix, id, final, error_code, error_message, NULL);
}

int index_job_finish_used(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_status final,
			  const char *error_code, const char *error_message,
			  const struct job_usage *used)
{
	return index_job_finish_logged(ix, id, final, error_code, error_message, used, NULL, 0,
				       NULL, 0);
}

/* What a job's end is given, checked before it is written or queued. */
static int finish_check(const struct finish_arg *a)
{
	if (a->final != JOB_COMPLETE && a->final != JOB_ERROR && a->final != JOB_CANCELLED)
		return store_seterr(-EINVAL, "'%s' is not a final state",
				    job_status_name(a->final));
	if (a->result && a->result_len > INDEX_RESULT_MAX)
		return store_seterr(-EFBIG, "a result of %zu bytes is over %d", a->result_len,
				    INDEX_RESULT_MAX);
	return a->line ? index_log_line_check(a->line, a->line_len) : 0;
}

int index_job_finish_logged(struct index *ix, const uint8_t id[JOB_ID_LEN],
			    enum job_status final, const char *error_code,
			    const char *error_message, const struct job_usage *used,
			    const char *line, size_t len, const char *result, size_t result_len)
{
	struct finish_arg a = {final, error_code, error_message, used, line, len, result,
			       result_len};
	int rc = finish_check(&a);

	return rc ? rc : index_change_job(ix, id, finish_change, &a);
}

/* A job's end queued without waiting: its own copy of everything. */
struct finish_async {
	struct finish_arg a;
	struct job_usage used;
	char *code, *message, *kind, *line, *result;
};

static void finish_async_free(void *arg)
{
	struct finish_async *x = arg;

	free(x->code);
	free(x->message);
	free(x->kind);
	free(x->line);
	free(x->result);
	free(x);
}

static int finish_async_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	return finish_change(ix, txn, j, &((struct finish_async *)arg)->a);
}

int index_job_finish_logged_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
				  enum job_status final, const char *error_code,
				  const char *error_message, const struct job_usage *used,
				  const char *line, size_t len, const char *result,
				  size_t result_len,
				  void (*done)(void *arg, int rc, const char *err), void *arg)
{
	struct finish_arg a = {final, error_code, error_message, used, line, len, result,
			       result_len};
	struct finish_async *x;
	bool bad = false;
	int rc = finish_check(&a);

	if (rc)
		return rc;
	if (!(x = calloc(1, sizeof(*x))))
		return store_seterr(-ENOMEM, "out of memory");
	x->code = index_copy(error_code, error_code ? strlen(error_code) : 0, &bad);
	x->message = index_copy(error_message, error_message ? strlen(error_message) : 0, &bad);
	x->line = index_copy(line, len, &bad);
	x->result = index_copy(result, result_len, &bad);
	if (used) {
		x->kind = index_copy(used->kind, used->kind ? strlen(used->kind) : 0, &bad);
		x->used = (struct job_usage){x->kind, used->reported_ms};
	}
	if (bad) {
		finish_async_free(x);
		return store_seterr(-ENOMEM, "out of memory");
	}
	x->a = (struct finish_arg){final,   x->code, x->message, used ? &x->used : NULL,
				   x->line, len,     x->result, result_len};
	return index_change_job_async(ix, id, finish_async_change, x, finish_async_free, done,
				      arg);
}

struct requeue_arg {
	const uint64_t *due;	       /* NULL: into the queue now */
	bool counted;		       /* the attempt ran (not held back) */
	const struct job_usage *used;
	const char *line;	       /* a last log line (NULL: none) */
	size_t line_len;
};

/* running -> queued: into the queue, or with a due time (ms) into the
 * delayed set until then. */
static int requeue_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	const struct requeue_arg *a = arg;
	uint8_t key[8 + JOB_ID_LEN];
	MDB_val k = {sizeof(key), key}, v = {0, NULL};
	int rc;

	if (j->status != JOB_RUNNING)
		return index_state_err(j, "requeue");
	if ((rc = index_mark_running(ix, txn, j->id, false)) != 0)
		return rc;
	if (a->counted && (rc = attempt_used(j, a->used)) != 0)
		return rc;
	if (a->line && (rc = index_log_append(ix, txn, j, a->line, a->line_len)) != 0)
		return rc;
	j->status = JOB_QUEUED;
	j->progress = 0;
	j->updated_ms = now_ms();
	if (!a->due)
		return index_enqueue(ix, txn, j);
	j->flags |= JOB_F_DELAYED;
	j->round = *a->due;
	delayed_key(j, key);
	rc = mdb_put(txn, ix->delayed, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "delay") : 0;
}

int index_job_requeue(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t not_before_ms,
		      const struct job_usage *used)
{
	return index_job_requeue_logged(ix, id, not_before_ms, used, NULL, 0);
}

int index_job_requeue_logged(struct index *ix, const uint8_t id[JOB_ID_LEN],
			     uint64_t not_before_ms, const struct job_usage *used,
			     const char *line, size_t len)
{
	struct requeue_arg a = {not_before_ms ? &not_before_ms : NULL, true, used, line, len};
	int rc;

	if (line && (rc = index_log_line_check(line, len)) != 0)
		return rc;
	return index_change_job(ix, id, requeue_change, &a);
}

static int return_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct requeue_arg a = {NULL, false, NULL, NULL, 0};
	int rc = requeue_change(ix, txn, j, &a);

	(void)arg;

	if (rc == 0 && j->attempts > 0)
		j->attempts--;
	return rc;
}

int index_job_return(struct index *ix, const uint8_t id[JOB_ID_LEN])
{
	return index_change_job(ix, id, return_change, NULL);
}

struct promote_arg {
	uint64_t now, next;
	bool write;
};

/* Up to 256 due jobs per transaction (the caller loops while any remain). */
static int promote_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct promote_arg *a = arg;
	int rc = 0;

	a->next = 0;
	for (int n = 0; n < 256; n++) {
		MDB_cursor *cur;
		MDB_val k, v;
		uint8_t id[JOB_ID_LEN];
		struct job j;

		if ((rc = mdb_cursor_open(txn, ix->delayed, &cur)) != 0)
			return index_lmdb_err(ix, rc, "read delayed");
		rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
		mdb_cursor_close(cur);
		if (rc == MDB_NOTFOUND)
			return 0;
		if (rc)
			return index_lmdb_err(ix, rc, "read delayed");
		if (k.mv_size != 8 + JOB_ID_LEN)
			return store_seterr(STORE_E_INDEX, "damaged delayed entry in '%s/data.mdb'",
					    ix->dir);
		if (be64_get(k.mv_data) > a->now || !a->write) {
			a->next = be64_get(k.mv_data);
			return 0;
		}
		memcpy(id, (uint8_t *)k.mv_data + 8, JOB_ID_LEN);
		if ((rc = index_get_job(ix, txn, id, &j)) != 0)
			return rc;
		if (j.status != JOB_QUEUED || !(j.flags & JOB_F_DELAYED)) {
			job_release(&j);
			return store_seterr(STORE_E_INDEX, "delayed entry for a job that is not delayed");
		}
		if ((rc = index_dequeue(ix, txn, &j)) == 0 && (rc = index_enqueue(ix, txn, &j)) == 0)
			rc = index_put_job(ix, txn, &j);
		job_release(&j);
		if (rc)
			return rc;
	}
	a->next = a->now; /* more are due */
	return 0;
}

int index_promote_due(struct index *ix, uint64_t now, uint64_t *next_ms)
{
	struct promote_arg a = {now, 0, true};
	int rc;

	do
		rc = index_write(ix, promote_fn, &a);
	while (rc == 0 && a.next == now);
	*next_ms = rc ? 0 : a.next;
	return rc;
}

int index_delayed_next(struct index *ix, uint64_t *next_ms)
{
	struct promote_arg a = {0, 0, false};
	int rc = index_read(ix, promote_fn, &a);

	*next_ms = rc ? 0 : a.next;
	return rc;
}

static int cancel_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	int rc;

	(void)arg;
	if (j->status == JOB_QUEUED) {
		if ((rc = index_dequeue(ix, txn, j)) != 0)
			return rc;
		j->status = JOB_CANCELLED;
		j->completed_ms = j->updated_ms = now_ms();
		return 0;
	}
	if (j->status == JOB_RUNNING) {
		j->flags |= JOB_F_CANCEL_REQUESTED;
		j->updated_ms = now_ms();
		return 0;
	}
	return index_state_err(j, "cancel");
}

int index_job_cancel(struct index *ix, const uint8_t id[JOB_ID_LEN])
{
	return index_change_job(ix, id, cancel_change, NULL);
}

static int retry_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	(void)arg;
	if (j->status != JOB_ERROR && j->status != JOB_CANCELLED)
		return index_state_err(j, "retry");
	j->status = JOB_QUEUED;
	j->attempts = 0;
	j->progress = 0;
	j->started_ms = j->completed_ms = 0;
	j->updated_ms = now_ms();
	j->error_code[0] = '\0';
	j->error_message[0] = '\0';
	/* A new run: what the last one used stays in the ledger. */
	j->run_ms = 0;
	j->ran_on[0] = '\0';
	return index_enqueue(ix, txn, j);
}

int index_job_retry(struct index *ix, const uint8_t id[JOB_ID_LEN])
{
	return index_change_job(ix, id, retry_change, NULL);
}

static int priority_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	enum job_priority p = *(enum job_priority *)arg;
	int rc;

	if (j->status != JOB_QUEUED || (j->flags & JOB_F_DELAYED)) {
		j->priority = p; /* a delayed job enters the queue with it */
		return 0;
	}
	if ((rc = index_dequeue(ix, txn, j)) != 0)
		return rc;
	j->priority = p;
	return index_enqueue(ix, txn, j);
}

int index_job_set_priority(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_priority p)
{
	if (p > JOB_PRIO_HIGH)
		return store_seterr(-EINVAL, "invalid priority %d", (int)p);
	return index_change_job(ix, id, priority_change, &p);
}

struct hide_arg {
	uint16_t mask;
	bool release;
	bool freed;
	uint8_t freed_hash[INDEX_HASH_LEN];
};

static int hide_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct hide_arg *a = arg;
	int rc;

	j->hidden |= a->mask;
	if (a->release && (j->flags & JOB_F_HAS_OUTPUT)) {
		if (j->status != JOB_COMPLETE)
			return index_state_err(j, "release the output of");
		rc = index_blob_ref(ix, txn, j->output_hash, j->output_size, "", j->uid, j->id, -1,
				    &a->freed);
		if (rc)
			return rc;
		if (a->freed)
			memcpy(a->freed_hash, j->output_hash, INDEX_HASH_LEN);
		j->flags = (uint8_t)((j->flags & ~JOB_F_HAS_OUTPUT) | JOB_F_OUTPUT_RELEASED);
	}
	j->updated_ms = now_ms();
	return 0;
}

int index_job_hide(struct index *ix, const uint8_t id[JOB_ID_LEN], uint16_t mask,
		   bool release_output, bool *freed, uint8_t freed_hash[INDEX_HASH_LEN])
{
	struct hide_arg a = {mask, release_output, false, {0}};
	int rc = index_change_job(ix, id, hide_change, &a);

	*freed = rc == 0 && a.freed;
	if (*freed)
		memcpy(freed_hash, a.freed_hash, INDEX_HASH_LEN);
	return rc;
}

/* ---- delete ---- */

struct delete_arg {
	const uint8_t *id;
	struct index_freed *freed;
};

static int delete_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct delete_arg *a = arg;
	uint8_t key[INDEX_NAME_KEY_MAX];
	struct job j;
	MDB_val k, v;
	int rc = index_get_job(ix, txn, a->id, &j);

	if (rc)
		return rc;
	if (j.status == JOB_RUNNING) {
		rc = index_state_err(&j, "delete (cancel it first)");
		goto out;
	}
	if (j.status == JOB_QUEUED && (rc = index_dequeue(ix, txn, &j)) != 0)
		goto out;
	/* The digest entry, if it names this job, would memoize a deleted job:
	 * the digest is computed from the request before it goes. */
	k.mv_size = JOB_ID_LEN;
	k.mv_data = j.id;
	if ((rc = mdb_get(txn, ix->requests, &k, &v)) == 0) {
		uint8_t digest[2][INDEX_HASH_LEN];
		MDB_val dv;

		/* Either form (memoization per owner or not, as mounted). */
		index_request_digest(j.route, v.mv_data, v.mv_size, INDEX_ANY_OWNER, digest[0]);
		index_request_digest(j.route, v.mv_data, v.mv_size, j.uid, digest[1]);
		for (int i = 0; i < 2; i++) {
			k.mv_size = INDEX_HASH_LEN;
			k.mv_data = digest[i];
			if (mdb_get(txn, ix->digests, &k, &dv) == 0 && dv.mv_size == JOB_ID_LEN &&
			    memcmp(dv.mv_data, j.id, JOB_ID_LEN) == 0 &&
			    (rc = index_del_key(ix, txn, ix->digests, digest[i], INDEX_HASH_LEN)) != 0)
				goto out;
		}
	} else if (rc != MDB_NOTFOUND) {
		rc = index_lmdb_err(ix, rc, "delete");
		goto out;
	}
	if (j.status < JOB_COMPLETE && (rc = index_pins_move(ix, txn, j.id, -1)) != 0)
		goto out;
	if ((rc = index_count_move(ix, txn, j.route, (int)j.status, -1)) != 0 ||
	    (rc = index_del_key(ix, txn, ix->jobs, j.id, JOB_ID_LEN)) != 0 ||
	    (rc = index_del_key(ix, txn, ix->requests, j.id, JOB_ID_LEN)) != 0 ||
	    (rc = index_del_key(ix, txn, ix->handles, j.id, JOB_ID_LEN)) != 0 ||
	    (rc = index_del_key(ix, txn, ix->creds, j.id, JOB_ID_LEN)) != 0 ||
	    (rc = index_del_key(ix, txn, ix->remote, j.id, JOB_ID_LEN)) != 0 ||
	    (rc = index_job_entries(ix, txn, &j, false)) != 0)
		goto out;
	if ((j.flags & JOB_F_WEBHOOK) && (rc = index_hooks_delete(ix, txn, j.id)) != 0)
		goto out;
	if (j.name[0]) {
		size_t kl = index_name_key(j.route, j.name, j.uid, key);
		if (kl && (rc = index_del_key(ix, txn, ix->names, key, kl)) != 0)
			goto out;
	}
	/* Log lines: every key with the job id as prefix. */
	if ((rc = index_del_prefix(ix, txn, ix->logs, j.id, JOB_ID_LEN, JOB_ID_LEN + 8)) != 0)
		goto out;
	a->freed->n = 0;
	if (j.flags & JOB_F_HAS_OUTPUT) {
		bool freed = false;
		rc = index_blob_ref(ix, txn, j.output_hash, j.output_size, "", j.uid, j.id, -1,
				    &freed);
		if (rc == 0 && freed)
			memcpy(a->freed->hash[a->freed->n++], j.output_hash, INDEX_HASH_LEN);
	}
	/* Its outputs after the first, and its result. */
	for (;;) {
		uint8_t ek[JOB_ID_LEN + 2];
		MDB_cursor *ec;
		bool freed = false;

		if (rc)
			goto out;
		index_extra_key(j.id, 1, ek);
		k.mv_size = sizeof(ek);
		k.mv_data = ek;
		if ((rc = mdb_cursor_open(txn, ix->extras, &ec)) != 0) {
			rc = index_lmdb_err(ix, rc, "delete outputs");
			goto out;
		}
		rc = mdb_cursor_get(ec, &k, &v, MDB_SET_RANGE);
		if (rc || k.mv_size != JOB_ID_LEN + 2 || memcmp(k.mv_data, j.id, JOB_ID_LEN) != 0 ||
		    v.mv_size < INDEX_HASH_LEN + 9) {
			mdb_cursor_close(ec);
			rc = 0;
			break;
		}
		uint8_t h[INDEX_HASH_LEN];
		memcpy(h, v.mv_data, INDEX_HASH_LEN);
		uint64_t sz = le64_get((const uint8_t *)v.mv_data + INDEX_HASH_LEN);
		rc = mdb_cursor_del(ec, 0);
		mdb_cursor_close(ec);
		if (rc) {
			rc = index_lmdb_err(ix, rc, "delete outputs");
			goto out;
		}
		rc = index_blob_ref(ix, txn, h, sz, "", j.uid, j.id, -1, &freed);
		if (rc == 0 && freed && a->freed->n < sizeof(a->freed->hash) / INDEX_HASH_LEN)
			memcpy(a->freed->hash[a->freed->n++], h, INDEX_HASH_LEN);
	}
	if ((rc = index_del_key(ix, txn, ix->results, j.id, JOB_ID_LEN)) != 0)
		goto out;
	/* Its inputs give back their references. */
	k.mv_size = JOB_ID_LEN;
	k.mv_data = j.id;
	if (rc == 0 && (rc = mdb_get(txn, ix->inputs, &k, &v)) == 0) {
		struct job_input in[INDEX_INPUTS_MAX];
		size_t n = 0;

		if (index_inputs_decode(&v, in, INDEX_INPUTS_MAX, &n) != 0) {
			rc = store_seterr(STORE_E_INDEX, "damaged inputs of a job in '%s'", ix->dir);
			goto out;
		}
		for (size_t i = 0; i < n && rc == 0; i++) {
			bool freed = false;
			rc = index_blob_ref(ix, txn, in[i].hash, in[i].size, "", j.uid, NULL, -1,
					    &freed);
			if (rc == 0 && freed)
				memcpy(a->freed->hash[a->freed->n++], in[i].hash, INDEX_HASH_LEN);
		}
		if (rc == 0)
			rc = index_del_key(ix, txn, ix->inputs, j.id, JOB_ID_LEN);
	} else if (rc == MDB_NOTFOUND) {
		rc = 0;
	} else if (rc) {
		rc = index_lmdb_err(ix, rc, "delete inputs");
	}
out:
	job_release(&j);
	return rc;
}

int index_job_delete(struct index *ix, const uint8_t id[JOB_ID_LEN], struct index_freed *freed)
{
	struct delete_arg a = {id, freed};
	int rc;

	freed->n = 0;
	rc = index_write(ix, delete_fn, &a);
	if (rc)
		freed->n = 0;
	return rc;
}

/* ---- queue depth, recovery ---- */

/* One counter of the fair database (see count_add), read on its own. */
struct count_arg {
	const uint8_t *key;
	size_t len;
	uint64_t n;
};

static int count_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct count_arg *a = arg;
	return index_fair_get(ix, txn, a->key, a->len, &a->n);
}

static int count_read(struct index *ix, const uint8_t *key, size_t len, uint64_t *n)
{
	struct count_arg a = {key, len, 0};
	int rc = index_read(ix, count_fn, &a);

	*n = a.n;
	return rc;
}

int index_queue_depth(struct index *ix, uint8_t group, uint64_t *n)
{
	return count_read(ix, &group, 1, n);
}

/* The one-byte keys of "fair" are the groups' depths: seek from group to
 * group, so the cost follows the groups in use, not INDEX_GROUPS. */
struct depths_arg {
	uint64_t *sum;	 /* or */
	uint64_t *depth; /* INDEX_GROUPS of them */
};

static int total_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct depths_arg *a = arg;
	MDB_cursor *cur;
	unsigned g = 0;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->fair, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read queue state");
	while (g < INDEX_GROUPS) {
		uint8_t key = (uint8_t)g;
		MDB_val k = {1, &key}, v;

		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (rc)
			break;
		g = ((const uint8_t *)k.mv_data)[0];
		if (k.mv_size == 1 && v.mv_size == 8) {
			if (a->sum)
				*a->sum += le64_get(v.mv_data);
			else
				a->depth[g] = le64_get(v.mv_data);
		}
		g++;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "read queue state");
}

int index_queue_total(struct index *ix, uint64_t *n)
{
	struct depths_arg a = {n, NULL};

	*n = 0;
	return index_read(ix, total_fn, &a);
}

int index_queue_depths(struct index *ix, uint64_t *depth)
{
	struct depths_arg a = {NULL, depth};

	memset(depth, 0, INDEX_GROUPS * sizeof(*depth));
	return index_read(ix, total_fn, &a);
}

int index_user_queued(struct index *ix, uint32_t uid, uint64_t *n)
{
	uint8_t uk[4];

	be32_put(uk, uid);
	return count_read(ix, uk, 4, n);
}

struct position_arg {
	const uint8_t *id;
	uint64_t pos;
};

static int position_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct position_arg *a = arg;
	uint8_t item[QUEUE_ITEM_LEN], group;
	MDB_cursor *cur;
	MDB_val k, v;
	struct job j;
	int rc = index_get_job(ix, txn, a->id, &j);

	if (rc)
		return rc;
	if (j.status != JOB_QUEUED || (j.flags & JOB_F_DELAYED)) {
		rc = index_state_err(&j, "give the queue position of");
		job_release(&j);
		return rc;
	}
	index_queue_item(&j, item);
	group = j.group;
	job_release(&j);
	if ((rc = mdb_cursor_open(txn, ix->queue, &cur)) != 0)
		return index_lmdb_err(ix, rc, "queue position");
	k.mv_size = 1;
	k.mv_data = &group;
	/* The items before the job's own, in its group. */
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP)) {
		if (v.mv_size != QUEUE_ITEM_LEN || memcmp(v.mv_data, item, QUEUE_ITEM_LEN) >= 0)
			break;
		a->pos++;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "queue position");
}

int index_queue_position(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t *pos)
{
	struct position_arg a = {id, 0};
	int rc = index_read(ix, position_fn, &a);

	*pos = a.pos;
	return rc;
}

struct recover_arg {
	uint32_t max_attempts;
	struct index_recovery *r;
};

static int recover_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct recover_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->running, &cur)) != 0)
		return index_lmdb_err(ix, rc, "recover");
	while ((rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)) == 0) {
		uint8_t id[JOB_ID_LEN];
		struct job j;

		if (k.mv_size != JOB_ID_LEN) {
			rc = store_seterr(STORE_E_INDEX, "damaged running set in '%s'", ix->dir);
			break;
		}
		memcpy(id, k.mv_data, JOB_ID_LEN);
		if ((rc = mdb_cursor_del(cur, 0)) != 0) {
			rc = index_lmdb_err(ix, rc, "recover");
			break;
		}
		if ((rc = index_get_job(ix, txn, id, &j)) != 0) {
			if (rc == STORE_E_NOTFOUND)
				continue; /* deleted job: the entry was stale */
			break;
		}
		if (j.status == JOB_RUNNING && (j.flags & JOB_F_HAS_OUTPUT)) {
			/* The crash fell between committing the output and
			 * finishing: the output is durable and the job is done.
			 * Running it again would try to attach a second output. */
			j.status = JOB_COMPLETE;
			j.progress = 1000;
			j.flags &= (uint8_t)~JOB_F_CANCEL_REQUESTED;
			j.completed_ms = j.updated_ms = now_ms();
			a->r->completed++;
		} else if (j.status == JOB_RUNNING && j.attempts >= a->max_attempts) {
			j.status = JOB_ERROR;
			j.completed_ms = j.updated_ms = now_ms();
			free(j.error_code);
			free(j.error_message);
			j.error_code = strdup("interrupted");
			j.error_message = strdup("the job was interrupted by daemon restarts "
						 "too many times");
			rc = j.error_code && j.error_message ? 0 : -ENOMEM;
			a->r->interrupted++;
		} else if (j.status == JOB_RUNNING) {
			j.status = JOB_QUEUED;
			j.progress = 0;
			j.flags &= (uint8_t)~JOB_F_CANCEL_REQUESTED;
			j.updated_ms = now_ms();
			rc = index_enqueue(ix, txn, &j);
			a->r->requeued++;
		}
		if (rc == 0)
			rc = index_put_job(ix, txn, &j);
		job_release(&j);
		if (rc)
			break;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : rc;
}

int index_recover(struct index *ix, uint32_t max_attempts, struct index_recovery *r)
{
	struct recover_arg a = {max_attempts, r};

	memset(r, 0, sizeof(*r));
	return index_write(ix, recover_fn, &a);
}
