/*
 * index_i.h - internals shared by index.c (environment, records, group
 * commit) and index_queue.c (queue, fair share, job state changes).
 */
#ifndef RENDERFS_INDEX_I_H
#define RENDERFS_INDEX_I_H

#include <lmdb.h>
#include <pthread.h>
#include <string.h>

#include "index.h"

/* Items of the set databases (index.h). */
#define QUEUE_ITEM_LEN (1 + 8 + JOB_ID_LEN) /* 255 - priority | round | id */
#define SEQ_ITEM_LEN (2 + JOB_ID_LEN)	    /* seq & 0xffff | id */
#define SET_FLAGS (MDB_DUPSORT | MDB_DUPFIXED)

/* One caller's change, run by whichever thread leads the next commit. */
struct index_wop {
	int (*fn)(struct index *ix, MDB_txn *txn, void *arg);
	void *arg;
	int rc;
	bool done;
	struct index_wop *next;
	uint64_t queued_ns, taken_ns, done_ns; /* CLOCK_MONOTONIC, for the time split */
	pthread_cond_t cond; /* its owner waits here: done, or to lead the next batch */
	/* A write nobody waits for (index_write_async): called once it is
	 * durable or has failed (err: why), by the thread that committed it;
	 * the op is then freed. NULL: its owner waits on cond. */
	void (*done_fn)(void *arg, int rc, const char *err);
	/* Why it failed, as the leader's thread said it (store_lasterr is
	 * per thread): its owner's message, or done_fn's err. */
	char err[512];
};

struct index {
	MDB_env *env;
	MDB_dbi meta, jobs, requests, queue, fair, running, byroute, byowner, byseq, names,
		digests, logs, blobs, blobusers, counts, delayed, handles, rgroups, creds, remote, inputs, extras, results, made,
		hooks, deliveries, hookdue, jobhooks, hookatt, usersecrets, journal, usage, ledger,
		outbox, replicated, lru, pins;
	char dir[4096];
	bool read_only;
	/* LMDB tripped one of its assertions in a write (a damaged file):
	 * no more writes. Set by a write leader, read by the next (wmu
	 * orders them). */
	bool damaged;
	bool names_per_owner; /* set before other threads use the index */
	bool replica;	      /* new blobs enter the outbox (index_set_replica) */
	/* Set by a write op around its own calls (ops of a batch run one at
	 * a time, on the leader's thread): a blob record it makes is one the
	 * bucket has, not one to put (index_replica_fetched). */
	bool outbox_hold;
	uint32_t upgraded_from; /* format upgraded at open (0: none); set once */
	uint64_t upgraded_jobs;

	/*
	 * Group commit. Protected by wmu: wq_head, wq_tail, wq_len, leader,
	 * active, commits, writes, gathering. The leader runs the queued ops
	 * without holding wmu; the ops' owners are blocked on their op's own
	 * cond until their `done` is set under wmu. A commit's end wakes
	 * exactly its batch's owners and the first queued op's with an owner
	 * waiting (to lead the next batch); when only ops nobody waits for
	 * (index_write_async) are queued, the leader leads again, so a queued
	 * op is always taken. The leader calls the async ops' done_fn after
	 * its commit, without wmu. gcond wakes a leader gathering a batch
	 * once as many ops as it waits for are queued.
	 */
	pthread_mutex_t wmu;
	pthread_cond_t gcond;
	struct index_wop *wq_head, *wq_tail;
	size_t wq_len;
	bool leader, gathering;
	size_t active; /* writers seen at the end of the last commit */
	uint64_t commits, writes;
	/* Where writes spend their time (index_stats), summed over writes:
	 * queued until a leader takes them, taken until committed, committed
	 * until their owner runs again; and over batches: applying the ops,
	 * the commit (its sync). */
	uint64_t op_queue_ns, op_batch_ns, op_wake_ns, batch_apply_ns, batch_sync_ns;
	/* A write added a delivery (set in a transaction, under wmu's batch;
	 * read and cleared by the leader after its commit); hook_wake is set
	 * once before threads share the index. */
	bool hook_added;
	void (*hook_wake)(void *);
	void *hook_wake_arg;
	size_t last_txnid; /* LMDB's at the last commit that wrote: a batch
			      that changed nothing commits nothing (no sync) */
	/* The data file's size, kept ahead of LMDB's last page by
	 * grow_ahead() (the leader's, between batches); page size and map
	 * size. Set at open (0: not grown, a read-only index). */
	uint64_t file_size, map_size;
	unsigned psize;
};

/* Run fn(ix, txn, arg) in a durable transaction shared with concurrent
 * callers. Returns fn's result, or the commit's error. */
int index_write(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg);
/*
 * The same without waiting for it: fn's write is queued behind every
 * write queued before it (so committed after them, or with them), and
 * done(arg, rc, err) is called once it is durable (rc 0) or has failed
 * (err says why), by the thread that commits it: a commit under way
 * takes it into the next batch, and the caller returns at once; with
 * none under way the caller commits it itself before returning. done
 * must not call into the index's writes, and may run on any thread that
 * writes (holding whatever that thread holds): it must only take locks
 * that nothing holds across an index write. Returns 0 (done will be
 * called) or an error (it will not: nothing was queued).
 */
int index_write_async(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg,
		      void (*done)(void *arg, int rc, const char *err));

/* index.c: the metadata database and the named databases. */
int index_meta_get(struct index *ix, MDB_txn *txn, const char *key, MDB_val *v);
int index_meta_put(struct index *ix, MDB_txn *txn, const char *key, const void *data,
		   size_t len);
/* Open every named database, creating it when create is set. */
int index_open_all(struct index *ix, MDB_txn *txn, bool create);

/* index_migrate.c: run the steps from format `from` to the current one in
 * txn; *njobs: the jobs the steps that read every record read. */
int index_migrate(struct index *ix, MDB_txn *txn, uint32_t from, uint64_t *njobs);

/* Run fn(ix, txn, arg) in a read-only transaction; returns fn's result. */
int index_read(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg);

/* LMDB result -> store code, recording a message. */
int index_lmdb_err(struct index *ix, int rc, const char *what);

int index_get_job(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], struct job *j);
int index_put_job(struct index *ix, MDB_txn *txn, const struct job *j);
/* A log line (len bytes, no newline) appended to j's log in txn; j's
 * log_size and updated_ms follow, and j is for the caller to put. */
int index_log_append(struct index *ix, MDB_txn *txn, struct job *j, const char *line, size_t len);
/* What runs j (backend, model; NULL: ""), for the caller to put: -ENOMEM. */
int index_job_set_runner(struct job *j, const char *backend, const char *model);
/* j's result.json in txn (JOB_F_RESULT set on j, for the caller to put). */
int index_result_store(struct index *ix, MDB_txn *txn, struct job *j, const char *text,
		       size_t len);
/* 0 if line can be a log line (at most INDEX_LOG_LINE_MAX bytes, no
 * newline, no NUL), else -EINVAL with a message. */
int index_log_line_check(const char *line, size_t len);
/* Decode a job record value (index_get_job's decoder). */
int index_decode_job(struct index *ix, const uint8_t id[JOB_ID_LEN], const MDB_val *v,
		     struct job *j);
/* index_hooks.c: the deliveries a job change makes (index_put_job, for a
 * job with JOB_F_WEBHOOK): old status (-1: new job), flags and progress,
 * and the new record's bytes. */
int index_hooks_on_put(struct index *ix, MDB_txn *txn, const struct job *j, int old_status,
		       uint8_t old_flags, uint16_t old_progress, const uint8_t *rec, size_t len);
/* index_usage.c: the ledger entry and totals of a job that reached a final
 * state at completed_ms (index_put_job; the format 14 upgrade for every
 * final job). */
int index_usage_add(struct index *ix, MDB_txn *txn, const struct job *j, uint64_t completed_ms);
/* *at_ms, or the first time after it, without a journal entry of job id. */
int index_journal_free_time(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
			    uint64_t *at_ms);
/* The ledger entry a final job makes (fsck: what the journal must hold),
 * and the journal's entry at (at_ms, id) (STORE_E_NOTFOUND: none). */
int index_usage_entry(struct index *ix, MDB_txn *txn, const struct job *j, struct ledger_entry *e);
int index_journal_get(struct index *ix, MDB_txn *txn, uint64_t at_ms, const uint8_t id[JOB_ID_LEN],
		      struct ledger_entry *e);
/* index_replica.c: a blob record was made (size: its bytes) or dropped
 * (index_blob_ref): the local bytes, the outbox, the replication state. */
int index_replica_blob_made(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size);
int index_replica_blob_gone(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size);
/* A job became complete with an output: its manifest enters the outbox. */
int index_replica_job_complete(struct index *ix, MDB_txn *txn, const struct job *j);
/* The inputs of job id are needed (delta 1: it was made or is queued
 * again) or not any more (-1: it reached a final state or went): each
 * input's count in pins, which keeps the cache from dropping it. */
int index_pins_move(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], int delta);
/* One blob's count in pins (an attestation's: its ledger keeps it here). */
int index_pin_blob(struct index *ix, MDB_txn *txn, const uint8_t *hash, int delta);
/* Add delta to the u64 meta counter key. */
int index_meta_add(struct index *ix, MDB_txn *txn, const char *key, int64_t delta);
/* index_hooks.c: a job's webhook (at creation) and its end (at delete). */
int index_hooks_create(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
		       const char *url, uint8_t events);
int index_hooks_delete(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN]);

/* Delete key from dbi (absent: 0). */
int index_del_key(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t len);
/* Delete every key of dbi that is klen bytes long and starts with the plen
 * bytes of prefix (a job's log lines, a delivery's attempts). */
int index_del_prefix(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *prefix,
		     size_t plen, size_t klen);

/* Set databases: add an item under key (present already: 0), remove it
 * (absent: STORE_E_NOTFOUND), or test for it. */
int index_set_add(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen,
		  const void *item, size_t ilen);
int index_set_del(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen,
		  const void *item, size_t ilen);
bool index_set_has(MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen, const void *item,
		   size_t ilen);

/* A job's entries in byroute, byowner and byseq: add (on create and when
 * upgrading an index) or remove (on delete). fsck checks them the same
 * way through index_job_listed(). */
int index_job_entries(struct index *ix, MDB_txn *txn, const struct job *j, bool add);
/* Which of byroute (1), byowner (2), byseq (4) lack the job: 0 when none. */
int index_job_listed(struct index *ix, MDB_txn *txn, const struct job *j);

/* Integer codecs. */
static inline void be64_put(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}
static inline uint64_t be64_get(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}
static inline void be32_put(uint8_t *p, uint32_t v)
{
	for (int i = 3; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}
static inline uint32_t be32_get(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void le64_put(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++, v >>= 8)
		p[i] = (uint8_t)v;
}
static inline uint64_t le64_get(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}
static inline void le32_put(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++, v >>= 8)
		p[i] = (uint8_t)v;
}
static inline uint32_t le32_get(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

#define RECORD_SUM_LEN 8
#define BLOB_REC_MAX (24 + 127 + RECORD_SUM_LEN)

/* Strings in records (index.h): a length (LEB128, one byte below 128,
 * two up to 16383), then the bytes. put: the bytes written; len: read the
 * length of the string at *p (moving past it) and check that its bytes
 * are there, at most max and without NUL: 0, or -1 when damaged. */
size_t index_str_put(uint8_t *p, const char *s, size_t len);
int index_str_len(const uint8_t **p, const uint8_t *end, size_t max, size_t *len);

/* First 8 bytes of the BLAKE3 of data: the record checksum. */
void index_record_sum(const void *data, size_t len, uint8_t out[RECORD_SUM_LEN]);

/* Blob records (index.h): decode checks length and checksum. */
int index_blob_decode(struct index *ix, const MDB_val *v, struct blob_info *out);
/* Move one job of route from status `from` to `to` in counts (-1: none). */
int index_count_move(struct index *ix, MDB_txn *txn, const char *route, int from, int to);
/* Add delta (+1 or -1) to the count of uid's jobs whose output is hash. */
/* index_queue.c: a blob's reference count (and its user's) by delta;
 * *freed when it reached 0 (the record is gone, and who made it). maker:
 * the job whose output the reference is (NULL: an input), which keeps
 * `made` (index.h): the first job whose output a blob is made it, and is
 * forgotten when it lets go of it. */
int index_blob_ref(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint64_t size,
		   const char *media_type, uint32_t uid, const uint8_t *maker, int delta,
		   bool *freed);
/* index_queue.c: queue state (fair), the read-change-write of one job,
 * and the error for a change its state forbids. */
int index_fair_get(struct index *ix, MDB_txn *txn, const uint8_t *key, size_t len,
		   uint64_t *val);
int index_change_job(struct index *ix, const uint8_t id[JOB_ID_LEN],
		     int (*change)(struct index *ix, MDB_txn *txn, struct job *j, void *arg),
		     void *arg);
/* The same queued, not waited for (index_write_async): arg is the
 * change's own copy of what it needs, given to free_arg after done (may
 * be NULL) was called with done_arg; if it cannot be queued, arg is freed
 * and the error returned. */
int index_change_job_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
			   int (*change)(struct index *ix, MDB_txn *txn, struct job *j, void *arg),
			   void *arg, void (*free_arg)(void *arg),
			   void (*done)(void *arg, int rc, const char *err), void *done_arg);
int index_state_err(const struct job *j, const char *op);
/* index.c: a copy of len bytes of p, NUL-terminated, for a write queued
 * without waiting; NULL for p NULL, and without memory (*bad then set). */
char *index_copy(const void *p, size_t len, bool *bad);
/* index_jobs.c: the job holding name on route (owner uid, or anyone's
 * with any_owner: the lowest uid's), into id. STORE_E_NOTFOUND if none. */
int index_name_find(struct index *ix, MDB_txn *txn, const char *route, const char *name,
		    uint32_t uid, bool any_owner, uint8_t id[JOB_ID_LEN]);
/* index_outputs.c: the key of a job's output n in extras. */
void index_extra_key(const uint8_t id[JOB_ID_LEN], unsigned n, uint8_t key[JOB_ID_LEN + 2]);
/* index_outputs.c: a job's inputs (index_job_inputs' encoding). */
int index_inputs_decode(const MDB_val *v, struct job_input *in, size_t max, size_t *n);
int index_blob_user(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint32_t uid,
		    int delta);
/* The names key of (route, name, uid) in buf; its length, or 0 if too long. */
#define INDEX_NAME_KEY_MAX (INDEX_ROUTE_MAX + 1 + INDEX_NAME_MAX + 1 + 4)
size_t index_name_key(const char *route, const char *name, uint32_t uid,
		      uint8_t buf[INDEX_NAME_KEY_MAX]);
size_t index_blob_encode(const struct blob_info *b, uint8_t out[BLOB_REC_MAX]);

/* index_check.c: walk the B-tree of an LMDB data file (see there). */
int index_check_tree(const char *path, unsigned psize, off_t meta_off, uint64_t last_pg);

static inline void be16_put(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static inline uint16_t be16_get(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

/* The byseq entry of seq: key seq >> 16, item low 16 bits | id. */
static inline void seq_entry(uint64_t seq, const uint8_t *id, uint8_t key[8],
			     uint8_t item[SEQ_ITEM_LEN])
{
	be64_put(key, seq >> 16);
	be16_put(item, (uint16_t)seq);
	if (id)
		memcpy(item + 2, id, JOB_ID_LEN);
	else
		memset(item + 2, 0, JOB_ID_LEN);
}

/* index_queue.c */
/* The queue item of a queued job (key: its group). */
void index_queue_item(const struct job *j, uint8_t item[QUEUE_ITEM_LEN]);
int index_enqueue(struct index *ix, MDB_txn *txn, struct job *j);
int index_dequeue(struct index *ix, MDB_txn *txn, struct job *j);
int index_mark_running(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], bool on);

#endif
