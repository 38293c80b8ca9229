/*
 * index_migrate.c - index format migrations: one step per format, each
 * taking an index of format `from` to from + 1 inside the caller's write
 * transaction (index_open()'s, so that a crash leaves the old index), and
 * each rebuilding what its format adds from the job records.
 *
 * Adding a format: a step here, a line in migrations[], INDEX_FORMAT_VERSION
 * in index.h, and a store of the previous format in tests/data/
 * (make-store.sh) for tests/test_upgrade.py.
 *
 * Threads: only index_open() calls it, before the index is shared.
 */
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

/*
 * fn(ix, txn, job, arg) for every job, inside the caller's write
 * transaction, in batches of ids so that no cursor is open while fn
 * moves records. *njobs: how many.
 */
static int each_job(struct index *ix, MDB_txn *txn,
		    int (*fn)(struct index *, MDB_txn *, struct job *, void *), void *arg,
		    uint64_t *njobs)
{
	uint8_t last[JOB_ID_LEN], batch[256][JOB_ID_LEN];
	bool started = false;
	int rc;

	*njobs = 0;
	for (;;) {
		MDB_cursor *cur;
		MDB_val k = {JOB_ID_LEN, last}, v;
		size_t n = 0;

		if ((rc = mdb_cursor_open(txn, ix->jobs, &cur)) != 0)
			return index_lmdb_err(ix, rc, "upgrade: read jobs");
		rc = started ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE)
			     : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
		if (rc == 0 && started && memcmp(k.mv_data, last, JOB_ID_LEN) == 0)
			rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
		for (; rc == 0 && n < 256; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			if (k.mv_size != JOB_ID_LEN) {
				mdb_cursor_close(cur);
				return store_seterr(STORE_E_INDEX, "damaged job key in '%s/data.mdb'",
						    ix->dir);
			}
			memcpy(batch[n++], k.mv_data, JOB_ID_LEN);
		}
		mdb_cursor_close(cur);
		if (rc != 0 && rc != MDB_NOTFOUND)
			return index_lmdb_err(ix, rc, "upgrade: read jobs");
		for (size_t i = 0; i < n; i++) {
			struct job j;

			if ((rc = index_get_job(ix, txn, batch[i], &j)) != 0)
				return rc;
			rc = fn(ix, txn, &j, arg);
			job_release(&j);
			if (rc)
				return rc;
		}
		*njobs += n;
		if (n < 256)
			return 0;
		memcpy(last, batch[n - 1], JOB_ID_LEN);
		started = true;
	}
}

static int write_version(struct index *ix, MDB_txn *txn, uint32_t version)
{
	uint8_t ver[4];
	int rc;

	le32_put(ver, version);
	rc = index_meta_put(ix, txn, "version", ver, 4);
	return rc ? index_lmdb_err(ix, rc, "upgrade: write version") : 0;
}

static int upgrade_1_job(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	int rc = index_put_job(ix, txn, j);

	(void)arg;
	if (!rc)
		rc = index_job_entries(ix, txn, j, true);
	if (!rc && j->status == JOB_QUEUED) {
		uint8_t item[QUEUE_ITEM_LEN];
		index_queue_item(j, item);
		rc = index_set_add(ix, txn, ix->queue, &j->group, 1, item, sizeof(item));
	}
	return rc;
}

/*
 * Format 1 -> 2, inside the caller's write transaction: the four set
 * databases are dropped and rebuilt from the job records, which are
 * rewritten in the new layout (decode_job() reads both). A crash before
 * the commit leaves the format-1 index untouched.
 */
static int upgrade_1(struct index *ix, MDB_txn *txn, uint64_t *njobs)
{
	static const char *const sets[] = {"queue", "byroute", "byowner", "byseq"};
	MDB_dbi dbi;
	int rc;

	for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++) {
		if ((rc = mdb_dbi_open(txn, sets[i], 0, &dbi)) != 0 ||
		    (rc = mdb_drop(txn, dbi, 1)) != 0)
			return index_lmdb_err(ix, rc, "upgrade: drop old listing");
	}
	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	if ((rc = each_job(ix, txn, upgrade_1_job, NULL, njobs)) != 0)
		return rc;
	return write_version(ix, txn, 2);
}

static int upgrade_2_job(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	uint8_t key[INDEX_NAME_KEY_MAX];
	MDB_val k, v = {JOB_ID_LEN, j->id};
	int rc;

	(void)arg;
	if (j->name[0]) {
		if (!(k.mv_size = index_name_key(j->route, j->name, j->uid, key)))
			return store_seterr(STORE_E_INDEX, "damaged job name in '%s/data.mdb'",
					    ix->dir);
		k.mv_data = key;
		if ((rc = mdb_put(txn, ix->names, &k, &v, 0)) != 0)
			return index_lmdb_err(ix, rc, "upgrade: write name");
	}
	if (j->flags & JOB_F_HAS_OUTPUT)
		return index_blob_user(ix, txn, j->output_hash, j->uid, 1);
	return 0;
}

/*
 * Format 2 -> 3, inside the caller's write transaction: names are keyed
 * by owner too, and blobusers is new; both are rebuilt from the job
 * records. A crash before the commit leaves the format-2 index untouched.
 */
static int upgrade_2(struct index *ix, MDB_txn *txn, uint64_t *njobs)
{
	int rc;

	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	if ((rc = mdb_drop(txn, ix->names, 0)) != 0 || (rc = mdb_drop(txn, ix->blobusers, 0)) != 0)
		return index_lmdb_err(ix, rc, "upgrade: empty names");
	if ((rc = each_job(ix, txn, upgrade_2_job, NULL, njobs)) != 0)
		return rc;
	return write_version(ix, txn, 3);
}

static int upgrade_3_job(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	(void)arg;
	return index_count_move(ix, txn, j->route, -1, (int)j->status);
}

/*
 * Format 3 -> 4: jobs per route and status (counts) are kept with every
 * status change; counted once here from the job records, so that no
 * mount scans them again.
 */
static int upgrade_3(struct index *ix, MDB_txn *txn, uint64_t *njobs)
{
	int rc;

	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	if ((rc = mdb_drop(txn, ix->counts, 0)) != 0)
		return index_lmdb_err(ix, rc, "upgrade: empty counts");
	if ((rc = each_job(ix, txn, upgrade_3_job, NULL, njobs)) != 0)
		return rc;
	return write_version(ix, txn, 4);
}

static int upgrade_14_job(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	(void)arg;
	return j->status >= JOB_COMPLETE ? index_usage_add(ix, txn, j, j->completed_ms) : 0;
}

/*
 * Format 14 -> 15: the usage ledger (journal, usage, ledger). Each job
 * already final enters the journal and the totals as it would have on
 * finishing (its run time unknown: 0).
 */
static int upgrade_14(struct index *ix, MDB_txn *txn, uint64_t *njobs)
{
	int rc;

	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	if ((rc = each_job(ix, txn, upgrade_14_job, NULL, njobs)) != 0)
		return rc;
	return write_version(ix, txn, 15);
}

/*
 * Format 15 -> 16: replication (outbox, replicated, lru, pins) and the
 * bytes of the blob files here (meta "local_bytes"), summed from the blob
 * records; the inputs of unfinished jobs and the ledger's attestations
 * are pinned.
 */
static int upgrade_15_job(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	(void)arg;
	return j->status < JOB_COMPLETE ? index_pins_move(ix, txn, j->id, 1) : 0;
}

static int upgrade_15(struct index *ix, MDB_txn *txn, uint64_t *njobs)
{
	MDB_cursor *cur;
	MDB_val k, v;
	uint64_t bytes = 0;
	uint8_t buf[8];
	int rc;

	*njobs = 0;
	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	if ((rc = mdb_cursor_open(txn, ix->blobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "upgrade: read blobs");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct blob_info bi;
		if (index_blob_decode(ix, &v, &bi) == 0)
			bytes += bi.size;
	}
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "upgrade: read blobs");
	le64_put(buf, bytes);
	if ((rc = index_meta_put(ix, txn, "local_bytes", buf, 8)) != 0)
		return index_lmdb_err(ix, rc, "upgrade: write local bytes");
	if ((rc = each_job(ix, txn, upgrade_15_job, NULL, njobs)) != 0)
		return rc;
	/* The ledger's attestations stay here too. */
	if ((rc = mdb_cursor_open(txn, ix->ledger, &cur)) != 0)
		return index_lmdb_err(ix, rc, "upgrade: read ledger");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT))
		if (v.mv_size >= 40 && (rc = index_pin_blob(ix, txn, (uint8_t *)v.mv_data + 8, 1)) != 0)
			break;
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND)
		return rc > 0 ? index_lmdb_err(ix, rc, "upgrade: read ledger") : rc;
	return write_version(ix, txn, 16);
}

/* A step that only adds empty databases (or a record layout that older
 * renderfs cannot read): create what is missing, say the new format. */
static int add_only(struct index *ix, MDB_txn *txn, uint64_t *njobs, uint32_t version)
{
	int rc;

	*njobs = 0;
	if ((rc = index_open_all(ix, txn, true)) != 0)
		return rc;
	return write_version(ix, txn, version);
}

/*
 * Each step takes an index of format `from` to from + 1 inside the
 * caller's write transaction; an open runs every step from the index's
 * format on, all in one transaction (a crash leaves the old index).
 */
static const struct migration {
	uint32_t from;
	int (*step)(struct index *ix, MDB_txn *txn, uint64_t *njobs); /* NULL: add_only */
} migrations[] = {
	{1, upgrade_1},
	{2, upgrade_2},
	{3, upgrade_3},
	/* The rest add databases, nothing to rebuild: */
	{4, NULL},  /* delayed: retries wait there, not in a worker */
	{5, NULL},  /* RJ3 records (backend, model), which format 5 cannot read */
	{6, NULL},  /* handles: backends' durable handles */
	{7, NULL},  /* rgroups: each remote route's queue group (its jobs move
		       from the shared group when a mount names the routes) */
	{8, NULL},  /* creds: sealed per-job credentials */
	{9, NULL},  /* remote: what a service said of each job */
	{10, NULL}, /* inputs: the blobs a request names (cas:<hex>) */
	{11, NULL}, /* extras and results: outputs after the first, result.json */
	{12, NULL}, /* made: the job whose output made a blob (older blobs: unknown) */
	{13, NULL}, /* webhooks: hooks, deliveries, hookdue, jobhooks, hookatt,
		       usersecrets (older jobs have none) */
	{14, upgrade_14},
	{15, upgrade_15},
};
_Static_assert(sizeof(migrations) / sizeof(migrations[0]) == INDEX_FORMAT_VERSION - 1,
	       "one migration step per format");

int index_migrate(struct index *ix, MDB_txn *txn, uint32_t from, uint64_t *njobs)
{
	*njobs = 0;
	for (size_t i = 0; i < sizeof(migrations) / sizeof(migrations[0]); i++) {
		uint64_t n = 0;
		int rc;

		if (migrations[i].from < from)
			continue;
		rc = migrations[i].step ? migrations[i].step(ix, txn, &n)
					: add_only(ix, txn, &n, migrations[i].from + 1);
		if (rc != 0)
			return rc;
		if (n > *njobs)
			*njobs = n; /* the steps that read every job count them */
	}
	return 0;
}
