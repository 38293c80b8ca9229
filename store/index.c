/*
 * index.c - the LMDB environment of the store: opening and validating it,
 * group commit, listing, lookups, logs and metadata. The rest of the
 * index, by what it owns: index_record.c (record layouts), index_migrate.c
 * (format migrations), index_jobs.c (creating jobs, their per-job
 * records), index_queue.c (the queue, state changes, delete, recovery),
 * index_outputs.c (outputs after the first, results, inputs),
 * index_groups.c (remote routes' queue groups), index_blob.c (blob
 * records), index_check.c (pre-open checks).
 *
 * DESIGN
 * Durability: LMDB commits with a full sync (no MDB_NOSYNC, which can
 * corrupt the environment on power loss). Throughput under concurrency
 * comes from group commit instead: callers append their change to a queue;
 * the first caller that finds no commit in progress becomes the leader,
 * takes every queued change, applies each in a nested transaction of one
 * write transaction, commits once (one sync) and wakes the others. While
 * it syncs, new changes queue up for the next leader, so the batch size
 * grows with the number of concurrent writers. A change that fails aborts
 * only its nested transaction.
 *
 * Robustness: LMDB maps the data file and trusts it. Before opening, the
 * two meta pages are checked (magic, version, page size) and the file size
 * against the last page in use, so a truncated or foreign file is refused
 * with an error instead of faulting on access. Every record is validated
 * as it is decoded; a damaged record is reported as STORE_E_INDEX.
 *
 * Pointers from LMDB (MDB_val) are valid only inside their transaction:
 * everything returned to callers is copied out first.
 */
#include "index.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "blake3.h"
#include "err.h"
#include "fileutil.h"
#include "index_i.h"

#define DEFAULT_MAP_SIZE ((size_t)64 << 30)

static const char *status_names[] = {"queued", "running", "complete", "error", "cancelled"};
static const char *prio_names[] = {"low", "normal", "high"};

const char *job_status_name(enum job_status s)
{
	return (unsigned)s < 5 ? status_names[s] : "unknown";
}

const char *job_priority_name(enum job_priority p)
{
	return (unsigned)p < 3 ? prio_names[p] : "unknown";
}

int job_priority_parse(const char *s, enum job_priority *p)
{
	for (int i = 0; i < 3; i++)
		if (strcmp(s, prio_names[i]) == 0) {
			*p = (enum job_priority)i;
			return 0;
		}
	return -EINVAL;
}

void job_release(struct job *j)
{
	free(j->route);
	free(j->name);
	free(j->media_type);
	free(j->device);
	free(j->error_code);
	free(j->error_message);
	free(j->backend);
	free(j->model);
	free(j->ran_on);
	j->route = j->name = j->media_type = j->device = j->error_code = j->error_message =
		j->backend = j->model = j->ran_on = NULL;
}

int index_lmdb_err(struct index *ix, int rc, const char *what)
{
	switch (rc) {
	case MDB_SUCCESS:
		return 0;
	case MDB_NOTFOUND:
		return STORE_E_NOTFOUND;
	case MDB_MAP_FULL:
		return store_seterr(-ENOSPC, "%s: the index in '%s' is full", what, ix->dir);
	case MDB_CORRUPTED:
	case MDB_PAGE_NOTFOUND:
	case MDB_INVALID:
	case MDB_BAD_TXN:
	case MDB_BAD_VALSIZE:
	case MDB_INCOMPATIBLE:
		return store_seterr(STORE_E_INDEX, "%s: '%s/data.mdb' is damaged: %s", what,
				    ix->dir, mdb_strerror(rc));
	case MDB_VERSION_MISMATCH:
		return store_seterr(STORE_E_INDEX, "%s: '%s' was written by another LMDB version",
				    what, ix->dir);
	default:
		if (rc > 0)
			return store_seterr(-rc, "%s: '%s/data.mdb': %s", what, ix->dir,
					    strerror(rc));
		return store_seterr(STORE_E_INDEX, "%s: '%s': %s", what, ix->dir,
				    mdb_strerror(rc));
	}
}

/* ---- pre-open validation of data.mdb ---- */

#define LMDB_MAGIC 0xBEEFC0DEu
#define LMDB_DATA_VERSION 1
#define P_META 0x08

/*
 * Check the meta pages of an existing data.mdb (LMDB 0.9 layout on 64-bit:
 * page header 16 bytes, then magic u32, version u32, address, map size,
 * two 48-byte db records whose first holds the page size, last page u64,
 * txnid u64). Returns 0 when the file is absent (a new index) or sound.
 */
static int check_data_file_once(const char *dir)
{
	char path[4200];
	uint8_t page[2][512];
	struct stat st;
	uint64_t best_txn = 0, last_pg = 0;
	unsigned psize = 0;
	int fd, valid = 0, best = 0;

	snprintf(path, sizeof(path), "%s/data.mdb", dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0
				       : store_seterr(-errno, "cannot open '%s': %s", path,
						      strerror(errno));
	if (fstat(fd, &st) != 0 || pread(fd, page[0], sizeof(page[0]), 0) != sizeof(page[0])) {
		close(fd);
		return store_seterr(STORE_E_INDEX,
				    "'%s' is truncated or unreadable (%lld bytes): not a "
				    "renderfs index",
				    path, (long long)st.st_size);
	}
	psize = le32_get(page[0] + 40);
	if (psize < 512 || psize > 65536 || (psize & (psize - 1)) ||
	    st.st_size < 2 * (off_t)psize ||
	    pread(fd, page[1], sizeof(page[1]), psize) != sizeof(page[1])) {
		close(fd);
		return store_seterr(STORE_E_INDEX,
				    "'%s' is not an LMDB index (foreign, damaged or truncated file)",
				    path);
	}
	close(fd);
	for (int i = 0; i < 2; i++) {
		const uint8_t *p = page[i];
		uint16_t flags = (uint16_t)(p[10] | p[11] << 8);

		if (!(flags & P_META) || le32_get(p + 16) != LMDB_MAGIC ||
		    le32_get(p + 20) != LMDB_DATA_VERSION || le32_get(p + 40) != psize)
			continue;
		valid++;
		if (le64_get(p + 144) >= best_txn) {
			best_txn = le64_get(p + 144);
			last_pg = le64_get(p + 136);
			best = i;
		}
	}
	if (valid < 2)
		return store_seterr(STORE_E_INDEX,
				    "'%s' is not an LMDB index or its meta pages are damaged", path);
	if ((uint64_t)st.st_size < (last_pg + 1) * psize)
		return store_seterr(STORE_E_INDEX,
				    "'%s' is truncated: %lld bytes, but its pages reach %llu bytes",
				    path, (long long)st.st_size,
				    (unsigned long long)((last_pg + 1) * psize));
	return index_check_tree(path, psize, (off_t)best * psize, last_pg);
}

/*
 * A writer in another process may commit while the file is walked and
 * reuse pages under the walk; a damaged file fails every time, so a
 * failure is confirmed by walking again.
 */
static int check_data_file(const char *dir)
{
	int rc = 0;

	for (int attempt = 0; attempt < 3; attempt++) {
		rc = check_data_file_once(dir);
		if (rc != STORE_E_INDEX)
			return rc;
	}
	return rc;
}

/* ---- open / close ---- */

struct dbdef {
	const char *name;
	size_t off;
	unsigned flags;
};

static const struct dbdef dbdefs[] = {
	{"meta", offsetof(struct index, meta), 0},
	{"jobs", offsetof(struct index, jobs), 0},
	{"requests", offsetof(struct index, requests), 0},
	{"queue", offsetof(struct index, queue), SET_FLAGS},
	{"fair", offsetof(struct index, fair), 0},
	{"running", offsetof(struct index, running), 0},
	{"byroute", offsetof(struct index, byroute), SET_FLAGS},
	{"byowner", offsetof(struct index, byowner), SET_FLAGS},
	{"byseq", offsetof(struct index, byseq), SET_FLAGS},
	{"names", offsetof(struct index, names), 0},
	{"digests", offsetof(struct index, digests), 0},
	{"logs", offsetof(struct index, logs), 0},
	{"blobs", offsetof(struct index, blobs), 0},
	{"blobusers", offsetof(struct index, blobusers), 0},
	{"counts", offsetof(struct index, counts), 0},
	{"delayed", offsetof(struct index, delayed), 0},
	{"handles", offsetof(struct index, handles), 0},
	{"rgroups", offsetof(struct index, rgroups), 0},
	{"creds", offsetof(struct index, creds), 0},
	{"remote", offsetof(struct index, remote), 0},
	{"inputs", offsetof(struct index, inputs), 0},
	{"extras", offsetof(struct index, extras), 0},
	{"results", offsetof(struct index, results), 0},
	{"made", offsetof(struct index, made), 0},
	{"hooks", offsetof(struct index, hooks), 0},
	{"deliveries", offsetof(struct index, deliveries), 0},
	{"hookdue", offsetof(struct index, hookdue), 0},
	{"jobhooks", offsetof(struct index, jobhooks), SET_FLAGS},
	{"hookatt", offsetof(struct index, hookatt), 0},
	{"usersecrets", offsetof(struct index, usersecrets), 0},
	{"journal", offsetof(struct index, journal), 0},
	{"usage", offsetof(struct index, usage), 0},
	{"ledger", offsetof(struct index, ledger), 0},
	{"outbox", offsetof(struct index, outbox), 0},
	{"replicated", offsetof(struct index, replicated), 0},
	{"lru", offsetof(struct index, lru), 0},
	{"pins", offsetof(struct index, pins), 0},
};
#define NDBS (sizeof(dbdefs) / sizeof(dbdefs[0]))

int index_meta_get(struct index *ix, MDB_txn *txn, const char *key, MDB_val *v)
{
	MDB_val k = {strlen(key), (void *)key};
	return mdb_get(txn, ix->meta, &k, v);
}

int index_meta_put(struct index *ix, MDB_txn *txn, const char *key, const void *data,
		   size_t len)
{
	MDB_val k = {strlen(key), (void *)key}, v = {len, (void *)data};
	return mdb_put(txn, ix->meta, &k, &v, 0);
}

/* Open every named database, creating it when create is set. */
int index_open_all(struct index *ix, MDB_txn *txn, bool create)
{
	for (size_t i = 0; i < NDBS; i++) {
		int rc = mdb_dbi_open(txn, dbdefs[i].name, dbdefs[i].flags | (create ? MDB_CREATE : 0),
				      (MDB_dbi *)((char *)ix + dbdefs[i].off));
		if (rc == MDB_NOTFOUND || rc == MDB_INCOMPATIBLE)
			return store_seterr(STORE_E_INDEX,
					    "'%s/data.mdb' lacks the '%s' database or has it in "
					    "another layout",
					    ix->dir, dbdefs[i].name);
		if (rc)
			return index_lmdb_err(ix, rc, "open database");
	}
	return 0;
}

static void on_lmdb_assert(MDB_env *env, const char *msg);

/* Open the named databases; create them (and the metadata) on a new index,
 * upgrade an index of an older format. */
static int open_dbs(struct index *ix)
{
	MDB_txn *txn;
	MDB_dbi main;
	MDB_stat st;
	MDB_val v;
	uint32_t ver;
	int rc;

	rc = mdb_txn_begin(ix->env, NULL, ix->read_only ? MDB_RDONLY : 0, &txn);
	if (rc)
		return index_lmdb_err(ix, rc, "begin");
	rc = mdb_dbi_open(txn, "meta", 0, &ix->meta);
	if (rc == MDB_NOTFOUND) {
		/* No metadata: a new environment, unless it holds other data. */
		if (mdb_dbi_open(txn, NULL, 0, &main) == 0 && mdb_stat(txn, main, &st) == 0 &&
		    st.ms_entries > 0) {
			mdb_txn_abort(txn);
			return store_seterr(STORE_E_INDEX,
					    "'%s/data.mdb' is an LMDB environment but not a "
					    "renderfs index",
					    ix->dir);
		}
		if (ix->read_only) {
			mdb_txn_abort(txn);
			/* An empty environment: a first open that died before
			 * its first commit (fsck: no index yet). */
			return store_seterr(STORE_E_NOTFOUND, "'%s' holds no renderfs index",
					    ix->dir);
		}
		uint8_t verb[4], id[16], seq[8];
		le32_put(verb, INDEX_FORMAT_VERSION);
		randombytes_buf(id, sizeof(id));
		le64_put(seq, 1);
		if ((rc = index_open_all(ix, txn, true)) != 0) {
			mdb_txn_abort(txn);
			return rc;
		}
		rc = index_meta_put(ix, txn, "version", verb, 4);
		if (!rc)
			rc = index_meta_put(ix, txn, "store_id", id, 16);
		if (!rc)
			rc = index_meta_put(ix, txn, "next_seq", seq, 8);
		if (rc) {
			mdb_txn_abort(txn);
			return index_lmdb_err(ix, rc, "create index");
		}
		rc = mdb_txn_commit(txn);
		return rc ? index_lmdb_err(ix, rc, "create index") : 0;
	}
	if (rc) {
		mdb_txn_abort(txn);
		return index_lmdb_err(ix, rc, "open index");
	}
	rc = index_meta_get(ix, txn, "version", &v);
	if (rc || v.mv_size != 4) {
		mdb_txn_abort(txn);
		return store_seterr(STORE_E_INDEX, "'%s/data.mdb' has no valid format version",
				    ix->dir);
	}
	ver = le32_get(v.mv_data);
	if (ver == 0 || ver > INDEX_FORMAT_VERSION) {
		mdb_txn_abort(txn);
		return store_seterr(STORE_E_VERSION,
				    "'%s/data.mdb' has format version %u; this renderfs reads %d",
				    ix->dir, ver, INDEX_FORMAT_VERSION);
	}
	if (ver < INDEX_FORMAT_VERSION) {
		uint64_t njobs;

		if (ix->read_only) {
			mdb_txn_abort(txn);
			return store_seterr(STORE_E_VERSION,
					    "'%s/data.mdb' has format version %u; mounting the "
					    "store with renderfs upgrades it to %d",
					    ix->dir, ver, INDEX_FORMAT_VERSION);
		}
		if ((rc = index_migrate(ix, txn, ver, &njobs)) != 0) {
			mdb_txn_abort(txn);
			return rc;
		}
		rc = mdb_txn_commit(txn);
		if (rc)
			return index_lmdb_err(ix, rc, "upgrade index");
		ix->upgraded_from = ver;
		ix->upgraded_jobs = njobs;
		return 0;
	}
	if ((rc = index_open_all(ix, txn, false)) != 0) {
		mdb_txn_abort(txn);
		return rc;
	}
	/* Committed even when read-only: handles opened in an aborted
	 * transaction are closed with it. */
	rc = mdb_txn_commit(txn);
	return rc ? index_lmdb_err(ix, rc, "open index") : 0;
}

int index_open(const char *dir, const struct index_options *opt, struct index **out)
{
	struct index *ix;
	int rc;

	if (strlen(dir) >= sizeof(ix->dir))
		return store_seterr(-ENAMETOOLONG, "path too long: '%s'", dir);
	if (!(opt && opt->read_only) && (rc = dir_ensure(dir, 0700)) != 0)
		return rc;
	if ((rc = check_data_file(dir)) != 0)
		return rc;
	ix = calloc(1, sizeof(*ix));
	if (!ix)
		return -ENOMEM;
	snprintf(ix->dir, sizeof(ix->dir), "%s", dir);
	ix->read_only = opt && opt->read_only;
	pthread_mutex_init(&ix->wmu, NULL);
	pthread_cond_init(&ix->gcond, NULL);

	rc = mdb_env_create(&ix->env);
	if (!rc)
		rc = mdb_env_set_assert(ix->env, on_lmdb_assert);
	if (!rc)
		rc = mdb_env_set_maxdbs(ix->env, 40);
	if (!rc)
		rc = mdb_env_set_mapsize(ix->env, opt && opt->map_size ? opt->map_size
								    : DEFAULT_MAP_SIZE);
	if (!rc)
		rc = mdb_env_set_maxreaders(ix->env, 1022);
	if (rc) {
		rc = index_lmdb_err(ix, rc, "create environment");
		goto fail;
	}
	rc = mdb_env_open(ix->env, dir, MDB_NOTLS | (ix->read_only ? MDB_RDONLY : 0), 0600);
	if (rc) {
		rc = index_lmdb_err(ix, rc, "open");
		goto fail;
	}
	if ((rc = open_dbs(ix)) != 0)
		goto fail;
	MDB_envinfo info;
	if (mdb_env_info(ix->env, &info) == 0) {
		ix->last_txnid = info.me_last_txnid;
		ix->map_size = info.me_mapsize;
	}
	MDB_stat est;
	mdb_filehandle_t fd;
	struct stat fst;
	if (!ix->read_only && mdb_env_stat(ix->env, &est) == 0 &&
	    mdb_env_get_fd(ix->env, &fd) == 0 && fstat(fd, &fst) == 0) {
		ix->psize = est.ms_psize;
		ix->file_size = (uint64_t)fst.st_size;
	}
	*out = ix;
	return 0;
fail:
	index_close(ix);
	return rc;
}

uint32_t index_upgraded(struct index *ix, uint64_t *njobs)
{
	*njobs = ix->upgraded_jobs;
	return ix->upgraded_from;
}

void index_close(struct index *ix)
{
	if (!ix)
		return;
	if (ix->env)
		mdb_env_close(ix->env);
	pthread_mutex_destroy(&ix->wmu);
	pthread_cond_destroy(&ix->gcond);
	free(ix);
}

/* ---- LMDB's assertions ----
 *
 * LMDB checks its invariants with assertions that abort the process, and
 * a damaged file (a flipped bit in a page number) can trip them. Inside
 * the index's own transactions one becomes an error instead: the assert
 * callback jumps back to where the transaction began (on this thread),
 * which aborts it and fails with STORE_E_INDEX; after one in a write the
 * index takes no more writes (ix->damaged). Outside them LMDB aborts as
 * it always did. What a transaction's callback allocated before the jump
 * is lost: bounded, and only on a damaged index.
 */
static __thread sigjmp_buf *guard_jmp;
static __thread char guard_msg[200];

static void on_lmdb_assert(MDB_env *env, const char *msg)
{
	(void)env;
	if (!guard_jmp)
		return; /* LMDB aborts */
	snprintf(guard_msg, sizeof(guard_msg), "%s", msg);
	siglongjmp(*guard_jmp, 1);
}

static int damaged_err(struct index *ix)
{
	return store_seterr(STORE_E_INDEX,
			    "the index in '%s' is damaged (LMDB: %s); it takes no more writes: "
			    "stop the mount and run renderctl fsck",
			    ix->dir, guard_msg[0] ? guard_msg : "an earlier failed check");
}

/* ---- group commit ---- */

/* op failed with rc: it keeps the message, set on this (the leader's)
 * thread, for its owner's (store_lasterr is per thread) or its done_fn. */
static void op_fail(struct index_wop *op, int rc)
{
	op->rc = rc;
	snprintf(op->err, sizeof(op->err), "%s", store_lasterr());
}

/* The batch's transaction; *txnp holds it while it is open, for the jump
 * back from an assertion. *sync_ns: the time of the final commit (LMDB's
 * page writes and its syncs). */
static void run_batch_txn(struct index *ix, struct index_wop *batch, MDB_txn *volatile *txnp,
			  uint64_t *sync_ns)
{
	MDB_txn *txn;
	struct index_wop *op;
	int rc;

	rc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (rc) {
		rc = index_lmdb_err(ix, rc, "begin write");
		for (op = batch; op; op = op->next)
			op_fail(op, rc);
		return;
	}
	*txnp = txn;
	if (!batch->next) {
		/* Alone: no nested transaction needed. */
		store_seterr(0, "%s", ""); /* a failure without a message has none */
		if ((rc = batch->fn(ix, txn, batch->arg)) != 0) {
			op_fail(batch, rc);
			*txnp = NULL;
			mdb_txn_abort(txn);
			return;
		}
	} else {
		for (op = batch; op; op = op->next) {
			MDB_txn *child;

			rc = mdb_txn_begin(ix->env, txn, 0, &child);
			if (rc) {
				op_fail(op, index_lmdb_err(ix, rc, "begin nested"));
				continue;
			}
			store_seterr(0, "%s", "");
			if ((rc = op->fn(ix, child, op->arg)) != 0) {
				op_fail(op, rc);
				mdb_txn_abort(child);
				continue;
			}
			rc = mdb_txn_commit(child);
			if (rc)
				op_fail(op, index_lmdb_err(ix, rc, "commit nested"));
		}
	}
	uint64_t t0 = mono_ns();
	rc = mdb_txn_commit(txn);
	*sync_ns = mono_ns() - t0;
	*txnp = NULL; /* committed or not, it is gone */
	if (rc) {
		rc = index_lmdb_err(ix, rc, "commit");
		for (op = batch; op; op = op->next)
			if (op->rc == 0)
				op_fail(op, rc);
	}
}

/* Fail every write of the batch with rc. */
static void batch_fail(struct index_wop *batch, int rc)
{
	for (struct index_wop *op = batch; op; op = op->next)
		op_fail(op, rc);
}

static void run_batch(struct index *ix, struct index_wop *batch, uint64_t *sync_ns)
{
	sigjmp_buf jb, *prev = guard_jmp;
	MDB_txn *volatile txn = NULL;
	struct index_wop *volatile all = batch;

	if (ix->damaged) {
		batch_fail(batch, damaged_err(ix));
		return;
	}
	if (sigsetjmp(jb, 0)) {
		guard_jmp = prev;
		if (txn)
			mdb_txn_abort(txn);
		ix->damaged = true;
		batch_fail(all, damaged_err(ix));
		return;
	}
	guard_jmp = &jb;
	run_batch_txn(ix, all, &txn, sync_ns);
	guard_jmp = prev;
}

/*
 * Wait (bounded) until as many writers as were active at the end of the
 * last commit have queued. Without this, the writers released by one
 * commit are still on their way back when the next leader takes the
 * queue, and N steady writers split into two alternating half-batches.
 * A lone writer never waits (active is 1).
 */
#define GATHER_NS 200000

/*
 * LMDB appends pages at the end of its data file, so nearly every commit
 * makes the file longer, and a sync that must make a new size durable
 * costs the filesystem a journal commit on top of the data (measured here:
 * 16 writers 12,000 -> 13,800 jobs/s, p99 2.2 -> 1.7 ms, with the file
 * grown ahead). So the leader keeps GROW_LOW..GROW_STEP bytes of written
 * zeros (allocated blocks, not a hole or fallocate's unwritten extents,
 * whose first write is a metadata change too) past LMDB's last page.
 * Only between batches, by the leader: no transaction writes meanwhile,
 * and LMDB never reads or maps pages it has not allocated itself. A
 * failure (no space) gives the part back and is tried again at a later
 * commit; LMDB's own writes report a full disk as they always did.
 */
#define GROW_LOW (512u << 10)
#define GROW_STEP (2u << 20)

/* Whether fewer than GROW_LOW bytes are left past LMDB's last page. */
static bool grow_due(const struct index *ix, size_t last_pgno)
{
	return ix->psize && ix->file_size < ((uint64_t)last_pgno + 1) * ix->psize + GROW_LOW;
}

/* Called by the leader when grow_due(). */
static void grow_ahead(struct index *ix, size_t last_pgno)
{
	static const char zeros[1 << 16];
	uint64_t used = ((uint64_t)last_pgno + 1) * ix->psize, end, off;
	mdb_filehandle_t fd;

	if (mdb_env_get_fd(ix->env, &fd) != 0)
		return;
	end = used + GROW_STEP;
	if (end > ix->map_size)
		end = ix->map_size;
	off = ix->file_size > used ? ix->file_size : used;
	for (; off < end; off += sizeof(zeros)) {
		size_t n = end - off < sizeof(zeros) ? (size_t)(end - off) : sizeof(zeros);

		if (pwrite(fd, zeros, n, (off_t)off) != (ssize_t)n) {
			/* Nothing past LMDB's pages is in use: give it back. */
			int r = ftruncate(fd, (off_t)(ix->file_size > used ? ix->file_size : used));

			(void)r;
			return;
		}
	}
	ix->file_size = end;
}

static void gather(struct index *ix)
{
	struct timespec deadline;

	if (ix->wq_len >= ix->active)
		return;
	ix->gathering = true;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_nsec += GATHER_NS;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	while (ix->wq_len < ix->active)
		if (pthread_cond_timedwait(&ix->gcond, &ix->wmu, &deadline) == ETIMEDOUT)
			break;
	ix->gathering = false;
}

/* Queue op (wmu held). */
static void enqueue(struct index *ix, struct index_wop *op)
{
	if (ix->wq_tail)
		ix->wq_tail->next = op;
	else
		ix->wq_head = op;
	ix->wq_tail = op;
	ix->wq_len++;
	if (ix->gathering && ix->wq_len >= ix->active)
		pthread_cond_signal(&ix->gcond);
}

/* The first queued op whose owner waits for it (wmu held); NULL: none. */
static struct index_wop *first_waiter(struct index *ix)
{
	struct index_wop *op = ix->wq_head;

	while (op && op->done_fn)
		op = op->next;
	return op;
}

/*
 * Lead batches (wmu held, no leader): one, then more for as long as only
 * ops that nobody waits for are queued (an op with an owner waiting is
 * woken to lead instead). The async ops' done_fn are called between
 * batches, without wmu; meanwhile another thread may have become the
 * leader, which then takes what is queued.
 */
static void lead(struct index *ix)
{
	do {
		struct index_wop *batch, *async = NULL, **async_tail = &async, *w;
		uint64_t n = 0, waiting = 0, taken = mono_ns(), sync_ns = 0, done;

		ix->leader = true;
		gather(ix);
		batch = ix->wq_head;
		ix->wq_head = ix->wq_tail = NULL;
		ix->wq_len = 0;
		pthread_mutex_unlock(&ix->wmu);
		run_batch(ix, batch, &sync_ns);
		done = mono_ns();
		pthread_mutex_lock(&ix->wmu);
		ix->batch_sync_ns += sync_ns;
		ix->batch_apply_ns += done - taken - sync_ns;
		while (batch) {
			struct index_wop *next = batch->next;
			batch->taken_ns = taken;
			batch->done_ns = done;
			if (batch->done_fn) {
				ix->op_queue_ns += taken - batch->queued_ns;
				ix->op_batch_ns += done - taken;
				batch->next = NULL;
				*async_tail = batch;
				async_tail = &batch->next;
			} else {
				/* Its owner may return and free it once wmu is let
				 * go (the leader's own op: once this returns). */
				batch->done = true;
				pthread_cond_signal(&batch->cond);
				waiting++;
			}
			batch = next;
			n++;
		}
		/* A batch whose writers changed nothing (a claim that found
		 * no job) made no commit and no sync: it is not counted. */
		MDB_envinfo info;
		bool grow = false;
		if (mdb_env_info(ix->env, &info) == 0 && info.me_last_txnid != ix->last_txnid) {
			ix->last_txnid = info.me_last_txnid;
			ix->commits++;
			grow = grow_due(ix, info.me_last_pgno);
		}
		ix->writes += n;
		if (grow) {
			/* Still the leader: no commit runs meanwhile. */
			pthread_mutex_unlock(&ix->wmu);
			grow_ahead(ix, info.me_last_pgno);
			pthread_mutex_lock(&ix->wmu);
		}
		/* The batch's waiting writers return soon; those queued
		 * already wait. */
		ix->active = (size_t)waiting + ix->wq_len;
		ix->leader = false;
		if (ix->hook_added) {
			ix->hook_added = false;
			if (ix->hook_wake)
				ix->hook_wake(ix->hook_wake_arg); /* does not block */
		}
		/* The first op queued meanwhile with an owner waiting leads
		 * the next batch. */
		if ((w = first_waiter(ix)))
			pthread_cond_signal(&w->cond);
		if (async) {
			pthread_mutex_unlock(&ix->wmu);
			while (async) {
				struct index_wop *next = async->next;
				async->done_fn(async->arg, async->rc, async->err);
				free(async);
				async = next;
			}
			pthread_mutex_lock(&ix->wmu);
		}
	} while (!ix->leader && ix->wq_head && !first_waiter(ix));
}

int index_write(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg)
{
	struct index_wop op = {fn, arg, 0, false, NULL, mono_ns(), 0, 0, PTHREAD_COND_INITIALIZER,
			       NULL, ""};

	if (ix->read_only)
		return store_seterr(-EROFS, "the index in '%s' is open read-only", ix->dir);
	pthread_mutex_lock(&ix->wmu);
	enqueue(ix, &op);
	while (!op.done) {
		if (ix->leader) {
			pthread_cond_wait(&op.cond, &ix->wmu);
			continue;
		}
		lead(ix); /* its first batch holds op */
	}
	ix->op_queue_ns += op.taken_ns - op.queued_ns;
	ix->op_batch_ns += op.done_ns - op.taken_ns;
	ix->op_wake_ns += mono_ns() - op.done_ns;
	pthread_mutex_unlock(&ix->wmu);
	pthread_cond_destroy(&op.cond);
	/* Whoever led the batch, the caller's message is its write's. */
	return op.rc ? store_seterr(op.rc, "%s", op.err) : 0;
}

static int settle_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	(void)ix;
	(void)txn;
	(void)arg;
	return 0;
}

/* A write that changes nothing: its batch comes after every batch that
 * took a write queued before it (one leader at a time, the queue in
 * order), and a batch that changes nothing makes no commit. */
int index_writes_settle(struct index *ix)
{
	return index_write(ix, settle_fn, NULL);
}

char *index_copy(const void *p, size_t len, bool *bad)
{
	char *c;

	if (!p)
		return NULL;
	if (!(c = malloc(len + 1))) {
		*bad = true;
		return NULL;
	}
	memcpy(c, p, len);
	c[len] = '\0';
	return c;
}

int index_write_async(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg,
		      void (*done)(void *arg, int rc, const char *err))
{
	struct index_wop *op;

	if (ix->read_only)
		return store_seterr(-EROFS, "the index in '%s' is open read-only", ix->dir);
	if (!(op = calloc(1, sizeof(*op))))
		return store_seterr(-ENOMEM, "out of memory");
	op->fn = fn;
	op->arg = arg;
	op->done_fn = done;
	op->queued_ns = mono_ns();
	pthread_mutex_lock(&ix->wmu);
	enqueue(ix, op);
	if (!ix->leader)
		lead(ix);
	pthread_mutex_unlock(&ix->wmu);
	return 0;
}

int index_read(struct index *ix, int (*fn)(struct index *, MDB_txn *, void *), void *arg)
{
	sigjmp_buf jb, *prev = guard_jmp;
	MDB_txn *txn;
	MDB_txn *volatile open = NULL;
	int rc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);

	if (rc)
		return index_lmdb_err(ix, rc, "begin read");
	open = txn;
	if (sigsetjmp(jb, 0)) {
		guard_jmp = prev;
		mdb_txn_abort(open);
		return store_seterr(STORE_E_INDEX, "the index in '%s' is damaged (LMDB: %s)",
				    ix->dir, guard_msg);
	}
	guard_jmp = &jb;
	rc = fn(ix, txn, arg);
	guard_jmp = prev;
	mdb_txn_abort(txn);
	return rc;
}

struct get_arg {
	const uint8_t *id;
	struct job *out;
};

static int get_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct get_arg *a = arg;
	return index_get_job(ix, txn, a->id, a->out);
}

int index_job_get(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job *out)
{
	struct get_arg a = {id, out};
	return index_read(ix, get_fn, &a);
}

/* ---- deletes ---- */

int index_del_key(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t len)
{
	MDB_val k = {len, (void *)key};
	int rc = mdb_del(txn, dbi, &k, NULL);

	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "delete");
}

int index_del_prefix(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *prefix,
		     size_t plen, size_t klen)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, dbi, &cur)) != 0)
		return index_lmdb_err(ix, rc, "delete");
	/* Reposition after each delete: deleting the last entry of the
	 * database leaves the cursor unpositioned. */
	for (;;) {
		k.mv_size = plen;
		k.mv_data = (void *)prefix;
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (rc || k.mv_size != klen || memcmp(k.mv_data, prefix, plen) != 0)
			break;
		if ((rc = mdb_cursor_del(cur, 0)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "delete") : 0;
}

/* ---- sets and listing ---- */

int index_set_add(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen,
		  const void *item, size_t ilen)
{
	MDB_val k = {klen, (void *)key}, v = {ilen, (void *)item};
	/* Items usually come in order (ids and seqs grow): appended, a full
	 * page is left full instead of split in half. MDB_KEYEXIST: the item
	 * is not the key's last, so it goes in its place. */
	int rc = mdb_put(txn, dbi, &k, &v, MDB_APPENDDUP);

	if (rc == MDB_KEYEXIST)
		rc = mdb_put(txn, dbi, &k, &v, MDB_NODUPDATA);
	return rc == 0 || rc == MDB_KEYEXIST ? 0 : index_lmdb_err(ix, rc, "write listing");
}

int index_set_del(struct index *ix, MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen,
		  const void *item, size_t ilen)
{
	MDB_val k = {klen, (void *)key}, v = {ilen, (void *)item};
	int rc = mdb_del(txn, dbi, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	return rc ? index_lmdb_err(ix, rc, "delete from listing") : 0;
}

bool index_set_has(MDB_txn *txn, MDB_dbi dbi, const void *key, size_t klen, const void *item,
		   size_t ilen)
{
	MDB_val k = {klen, (void *)key}, v = {ilen, (void *)item};
	MDB_cursor *cur;
	bool has;

	if (mdb_cursor_open(txn, dbi, &cur) != 0)
		return false;
	has = mdb_cursor_get(cur, &k, &v, MDB_GET_BOTH) == 0;
	mdb_cursor_close(cur);
	return has;
}

int index_job_entries(struct index *ix, MDB_txn *txn, const struct job *j, bool add)
{
	uint8_t ownerkey[4], seqkey[8], seqitem[SEQ_ITEM_LEN];
	int (*op)(struct index *, MDB_txn *, MDB_dbi, const void *, size_t, const void *,
		  size_t) = add ? index_set_add : index_set_del;
	int rc;

	be32_put(ownerkey, j->uid);
	seq_entry(j->seq, j->id, seqkey, seqitem);
	/* Removing: an entry already missing is no reason to keep the rest. */
	rc = op(ix, txn, ix->byroute, j->route, strlen(j->route), j->id, JOB_ID_LEN);
	if (rc == 0 || rc == STORE_E_NOTFOUND)
		rc = op(ix, txn, ix->byowner, ownerkey, 4, j->id, JOB_ID_LEN);
	if (rc == 0 || rc == STORE_E_NOTFOUND)
		rc = op(ix, txn, ix->byseq, seqkey, 8, seqitem, SEQ_ITEM_LEN);
	return rc == STORE_E_NOTFOUND ? 0 : rc;
}

int index_job_listed(struct index *ix, MDB_txn *txn, const struct job *j)
{
	uint8_t ownerkey[4], seqkey[8], seqitem[SEQ_ITEM_LEN];
	int missing = 0;

	be32_put(ownerkey, j->uid);
	seq_entry(j->seq, j->id, seqkey, seqitem);
	if (!index_set_has(txn, ix->byroute, j->route, strlen(j->route), j->id, JOB_ID_LEN))
		missing |= 1;
	if (!index_set_has(txn, ix->byowner, ownerkey, 4, j->id, JOB_ID_LEN))
		missing |= 2;
	if (!index_set_has(txn, ix->byseq, seqkey, 8, seqitem, SEQ_ITEM_LEN))
		missing |= 4;
	return missing;
}

struct list_arg {
	MDB_dbi dbi;
	MDB_val key; /* the set's key; mv_size 0: the jobs database itself */
	const uint8_t *after;
	size_t max;
	uint8_t (*ids)[JOB_ID_LEN];
	size_t n;
};

/* Collect ids > after: the items of a set's key, or the keys of jobs. */
static int list_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct list_arg *a = arg;
	bool set = a->key.mv_size > 0;
	MDB_cursor *cur;
	MDB_val k = a->key, v = {JOB_ID_LEN, (void *)a->after};
	MDB_cursor_op first, next = set ? MDB_NEXT_DUP : MDB_NEXT;
	int rc, err = 0;

	if (set) {
		first = a->after ? MDB_GET_BOTH_RANGE : MDB_SET_KEY;
	} else {
		first = a->after ? MDB_SET_RANGE : MDB_FIRST;
		k = v; /* jobs: the ids are the keys */
	}
	if ((rc = mdb_cursor_open(txn, set ? a->dbi : ix->jobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "list");
	rc = mdb_cursor_get(cur, &k, &v, first);
	while (rc == 0 && a->n < a->max) {
		const MDB_val *idv = set ? &v : &k;

		if (idv->mv_size != JOB_ID_LEN) {
			err = store_seterr(STORE_E_INDEX, "damaged listing entry in '%s/data.mdb'",
					   ix->dir);
			break;
		}
		if (!a->after || memcmp(idv->mv_data, a->after, JOB_ID_LEN) > 0)
			memcpy(a->ids[a->n++], idv->mv_data, JOB_ID_LEN);
		rc = mdb_cursor_get(cur, &k, &v, next);
	}
	mdb_cursor_close(cur);
	if (err)
		return err;
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "list");
}

int index_list_by_route(struct index *ix, const char *route, const uint8_t *after, size_t max,
			uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	size_t rl = strlen(route);
	struct list_arg a = {ix->byroute, {rl, (void *)route}, after, max, ids, 0};
	int rc;

	*n = 0;
	if (rl == 0 || rl > INDEX_ROUTE_MAX)
		return -EINVAL;
	rc = index_read(ix, list_fn, &a);
	*n = a.n;
	return rc;
}

int index_list_by_owner(struct index *ix, uint32_t uid, const uint8_t *after, size_t max,
			uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	uint8_t key[4];
	struct list_arg a = {ix->byowner, {4, key}, after, max, ids, 0};
	int rc;

	be32_put(key, uid);
	rc = index_read(ix, list_fn, &a);
	*n = a.n;
	return rc;
}

int index_list_all(struct index *ix, const uint8_t *after, size_t max,
		   uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	struct list_arg a = {ix->jobs, {0, NULL}, after, max, ids, 0};
	int rc = index_read(ix, list_fn, &a);

	*n = a.n;
	return rc;
}

/* ---- lookups ---- */

struct lookup_arg {
	MDB_dbi dbi;
	MDB_val key;
	uint8_t *out;
	size_t out_len;
};

static int lookup_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct lookup_arg *a = arg;
	MDB_val v;
	int rc = mdb_get(txn, a->dbi, &a->key, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "lookup");
	if (v.mv_size != a->out_len)
		return store_seterr(STORE_E_INDEX, "damaged entry in '%s/data.mdb'", ix->dir);
	memcpy(a->out, v.mv_data, a->out_len);
	return 0;
}

struct seq_range_arg {
	uint64_t seq;
	uint8_t *id;
	bool exact; /* index_job_by_seq(): seq itself or STORE_E_NOTFOUND */
};

/* The first byseq entry at or after a->seq: its seq and id. */
static int seq_range_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct seq_range_arg *a = arg;
	uint8_t key[8], item[SEQ_ITEM_LEN];
	MDB_val k = {8, key}, v = {SEQ_ITEM_LEN, item};
	MDB_cursor *cur;
	int rc;

	seq_entry(a->seq, NULL, key, item);
	if ((rc = mdb_cursor_open(txn, ix->byseq, &cur)) != 0)
		return index_lmdb_err(ix, rc, "seek seq");
	/* In seq's own key, the first item at or after it; else the first
	 * item of the next key. */
	rc = mdb_cursor_get(cur, &k, &v, MDB_GET_BOTH_RANGE);
	if (rc == MDB_NOTFOUND && !a->exact) {
		k = (MDB_val){8, key};
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (rc == 0 && k.mv_size == 8 && memcmp(k.mv_data, key, 8) == 0)
			rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_NODUP);
	}
	mdb_cursor_close(cur);
	if (rc)
		return index_lmdb_err(ix, rc, "seek seq");
	if (k.mv_size != 8 || v.mv_size != SEQ_ITEM_LEN)
		return store_seterr(STORE_E_INDEX, "damaged seq entry in '%s/data.mdb'", ix->dir);
	uint64_t found = be64_get(k.mv_data) << 16 | be16_get(v.mv_data);
	if (a->exact && found != a->seq)
		return index_lmdb_err(ix, MDB_NOTFOUND, "seek seq");
	a->seq = found;
	memcpy(a->id, (const uint8_t *)v.mv_data + 2, JOB_ID_LEN);
	return 0;
}

int index_job_seq_at_or_after(struct index *ix, uint64_t *seq, uint8_t id[JOB_ID_LEN])
{
	struct seq_range_arg a = {*seq, id, false};
	int rc = index_read(ix, seq_range_fn, &a);

	if (rc == 0)
		*seq = a.seq;
	return rc;
}

static int next_seq_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	MDB_val v;
	int rc = index_meta_get(ix, txn, "next_seq", &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read next_seq");
	if (v.mv_size != 8)
		return store_seterr(STORE_E_INDEX, "damaged next_seq in '%s'", ix->dir);
	*(uint64_t *)arg = le64_get(v.mv_data);
	return 0;
}

int index_next_seq(struct index *ix, uint64_t *seq)
{
	return index_read(ix, next_seq_fn, seq);
}

int index_job_by_seq(struct index *ix, uint64_t seq, uint8_t id[JOB_ID_LEN])
{
	struct seq_range_arg a = {seq, id, true};
	return index_read(ix, seq_range_fn, &a);
}

void index_set_names_per_owner(struct index *ix, bool per_owner)
{
	ix->names_per_owner = per_owner;
}

struct name_arg {
	const char *route, *name;
	uint32_t uid;
	uint8_t *id;
};

static int name_lookup_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct name_arg *a = arg;
	int rc;

	if (!ix->names_per_owner)
		return index_name_find(ix, txn, a->route, a->name, 0, true, a->id);
	rc = index_name_find(ix, txn, a->route, a->name, a->uid, false, a->id);
	if (rc == STORE_E_NOTFOUND && a->uid == 0)
		rc = index_name_find(ix, txn, a->route, a->name, 0, true, a->id);
	return rc;
}

int index_name_lookup(struct index *ix, const char *route, const char *name, uint32_t uid,
		      uint8_t id[JOB_ID_LEN])
{
	struct name_arg a = {route, name, uid, id};
	return index_read(ix, name_lookup_fn, &a);
}

int index_blob_user(struct index *ix, MDB_txn *txn, const uint8_t *hash, uint32_t uid,
		    int delta)
{
	uint8_t key[INDEX_HASH_LEN + 4], val[8];
	MDB_val k = {sizeof(key), key}, v;
	uint64_t n = 0;
	int rc;

	memcpy(key, hash, INDEX_HASH_LEN);
	be32_put(key + INDEX_HASH_LEN, uid);
	rc = mdb_get(txn, ix->blobusers, &k, &v);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read blob users");
	if (rc == 0) {
		if (v.mv_size != 8)
			return store_seterr(STORE_E_INDEX, "damaged blob user entry in '%s/data.mdb'",
					    ix->dir);
		n = le64_get(v.mv_data);
	}
	if (delta < 0 && n == 0)
		return store_seterr(STORE_E_INDEX, "blob user count underflow in '%s'", ix->dir);
	n += (uint64_t)(int64_t)delta;
	if (n == 0) {
		rc = mdb_del(txn, ix->blobusers, &k, NULL);
		return rc ? index_lmdb_err(ix, rc, "write blob users") : 0;
	}
	le64_put(val, n);
	v.mv_size = 8;
	v.mv_data = val;
	rc = mdb_put(txn, ix->blobusers, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write blob users") : 0;
}

struct counts_arg {
	const char *route;
	uint64_t *out;
};

static int counts_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct counts_arg *a = arg;
	MDB_val k = {strlen(a->route), (void *)a->route}, v;
	int rc = mdb_get(txn, ix->counts, &k, &v);

	memset(a->out, 0, INDEX_STATUSES * sizeof(uint64_t));
	if (rc == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read counts");
	if (v.mv_size != INDEX_STATUSES * 8)
		return store_seterr(STORE_E_INDEX, "damaged counts of '%s' in '%s/data.mdb'",
				    a->route, ix->dir);
	for (int i = 0; i < INDEX_STATUSES; i++)
		a->out[i] = le64_get((const uint8_t *)v.mv_data + 8 * i);
	return 0;
}

int index_route_counts(struct index *ix, const char *route, uint64_t out[INDEX_STATUSES])
{
	struct counts_arg a = {route, out};
	return index_read(ix, counts_fn, &a);
}

static int used_by_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	const uint8_t *key = arg;
	MDB_val k = {INDEX_HASH_LEN + 4, (void *)key}, v;
	int rc = mdb_get(txn, ix->blobusers, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	return rc ? index_lmdb_err(ix, rc, "read blob users") : 0;
}

int index_blob_used_by(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint32_t uid)
{
	uint8_t key[INDEX_HASH_LEN + 4];

	memcpy(key, hash, INDEX_HASH_LEN);
	be32_put(key + INDEX_HASH_LEN, uid);
	return index_read(ix, used_by_fn, key);
}

void index_request_digest(const char *route, const char *request, size_t len, uint32_t owner,
			  uint8_t out[INDEX_HASH_LEN])
{
	struct b3_hasher h;
	uint8_t tail[5] = {0};

	b3_hasher_init(&h);
	b3_hasher_update(&h, route, strlen(route) + 1);
	b3_hasher_update(&h, request, len);
	if (owner != INDEX_ANY_OWNER) {
		be32_put(tail + 1, owner);
		b3_hasher_update(&h, tail, sizeof(tail));
	}
	b3_hasher_finalize(&h, out, INDEX_HASH_LEN);
}

int index_digest_lookup(struct index *ix, const uint8_t digest[INDEX_HASH_LEN],
			uint8_t id[JOB_ID_LEN])
{
	struct lookup_arg a = {ix->digests, {INDEX_HASH_LEN, (void *)digest}, id, JOB_ID_LEN};
	return index_read(ix, lookup_fn, &a);
}

struct digest_arg {
	const uint8_t *digest, *id;
};

static int digest_put_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct digest_arg *a = arg;
	MDB_val k = {INDEX_HASH_LEN, (void *)a->digest}, v = {JOB_ID_LEN, (void *)a->id};
	int rc = mdb_put(txn, ix->digests, &k, &v, 0);

	return rc ? index_lmdb_err(ix, rc, "write digest") : 0;
}

int index_digest_put(struct index *ix, const uint8_t digest[INDEX_HASH_LEN],
		     const uint8_t id[JOB_ID_LEN])
{
	struct digest_arg a = {digest, id};
	return index_write(ix, digest_put_fn, &a);
}

/* ---- logs ---- */

struct log_arg {
	const uint8_t *id;
	const char *line;
	size_t len;
	const char *backend, *model; /* non-NULL: record them (a start) */
};

int index_log_line_check(const char *line, size_t len)
{
	if (len > INDEX_LOG_LINE_MAX || memchr(line, '\n', len) || memchr(line, '\0', len))
		return store_seterr(-EINVAL, "a log line is at most %d bytes, without newline or "
					     "NUL", INDEX_LOG_LINE_MAX);
	return 0;
}

int index_log_append(struct index *ix, MDB_txn *txn, struct job *j, const char *text, size_t len)
{
	uint8_t key[JOB_ID_LEN + 8];
	MDB_val k = {sizeof(key), key}, v;
	char *line = malloc(len + 1);
	int rc;

	if (!line)
		return -ENOMEM;
	memcpy(key, j->id, JOB_ID_LEN);
	be64_put(key + JOB_ID_LEN, j->log_size);
	memcpy(line, text, len);
	line[len] = '\n';
	v.mv_size = len + 1;
	v.mv_data = line;
	rc = mdb_put(txn, ix->logs, &k, &v, 0);
	free(line);
	if (rc)
		return index_lmdb_err(ix, rc, "append log");
	j->log_size += len + 1;
	j->updated_ms = now_ms();
	return 0;
}

int index_job_set_runner(struct job *j, const char *backend, const char *model)
{
	char *b = strdup(backend), *m = strdup(model ? model : "");

	if (!b || !m) {
		free(b);
		free(m);
		return -ENOMEM;
	}
	free(j->backend);
	free(j->model);
	j->backend = b;
	j->model = m;
	return 0;
}

static int log_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct log_arg *a = arg;
	struct job j;
	int rc = index_get_job(ix, txn, a->id, &j);

	if (rc)
		return rc;
	if ((rc = index_log_append(ix, txn, &j, a->line, a->len)) != 0) {
		job_release(&j);
		return rc;
	}
	if (a->backend && (rc = index_job_set_runner(&j, a->backend, a->model)) != 0) {
		job_release(&j);
		return rc;
	}
	rc = index_put_job(ix, txn, &j);
	job_release(&j);
	return rc;
}

int index_job_log_start(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *line,
			size_t len, const char *backend, const char *model)
{
	struct log_arg a = {id, line, len, backend, model};
	int rc = index_log_line_check(line, len);

	return rc ? rc : index_write(ix, log_fn, &a);
}

int index_job_log(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *line, size_t len)
{
	return index_job_log_start(ix, id, line, len, NULL, NULL);
}

struct logread_arg {
	const uint8_t *id;
	uint64_t off;
	uint8_t *buf;
	size_t len, got;
};

static int logread_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct logread_arg *a = arg;
	uint8_t key[JOB_ID_LEN + 8];
	MDB_cursor *cur;
	MDB_val k = {sizeof(key), key}, v;
	int rc;

	memcpy(key, a->id, JOB_ID_LEN);
	be64_put(key + JOB_ID_LEN, a->off);
	if ((rc = mdb_cursor_open(txn, ix->logs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read log");
	rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	/* Unless a line starts exactly at off, the line holding off is the
	 * previous key. */
	if (rc == MDB_NOTFOUND ||
	    (rc == 0 && (k.mv_size != sizeof(key) || memcmp(k.mv_data, a->id, JOB_ID_LEN) != 0 ||
			 be64_get((uint8_t *)k.mv_data + JOB_ID_LEN) > a->off)))
		rc = mdb_cursor_get(cur, &k, &v, rc == MDB_NOTFOUND ? MDB_LAST : MDB_PREV);
	while (rc == 0 && a->got < a->len) {
		if (k.mv_size != sizeof(key) || memcmp(k.mv_data, a->id, JOB_ID_LEN) != 0)
			break;
		uint64_t line_off = be64_get((uint8_t *)k.mv_data + JOB_ID_LEN);
		uint64_t pos = a->off + a->got;
		if (pos >= line_off && pos < line_off + v.mv_size) {
			size_t skip = (size_t)(pos - line_off), take = v.mv_size - skip;
			if (take > a->len - a->got)
				take = a->len - a->got;
			memcpy(a->buf + a->got, (uint8_t *)v.mv_data + skip, take);
			a->got += take;
		}
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "read log");
}

int index_job_log_read(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t off, void *buf,
		       size_t len, size_t *got)
{
	struct logread_arg a = {id, off, buf, len, 0};
	int rc = index_read(ix, logread_fn, &a);

	*got = a.got;
	return rc;
}

/* ---- metadata, statistics, iteration ---- */

struct meta_arg {
	const char *key;
	void *buf;
	size_t len;
};

static int metaget_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct meta_arg *a = arg;
	MDB_val v;
	int rc = index_meta_get(ix, txn, a->key, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read metadata");
	if (v.mv_size != a->len)
		return store_seterr(STORE_E_INDEX, "damaged '%s' in '%s/data.mdb'", a->key,
				    ix->dir);
	memcpy(a->buf, v.mv_data, a->len);
	return 0;
}

static int metaput_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct meta_arg *a = arg;
	int rc = index_meta_put(ix, txn, a->key, a->buf, a->len);

	return rc ? index_lmdb_err(ix, rc, "write metadata") : 0;
}

int index_store_id(struct index *ix, uint8_t out[16])
{
	struct meta_arg a = {"store_id", out, 16};
	return index_read(ix, metaget_fn, &a);
}

int index_signing_key_get(struct index *ix, uint8_t keynum[8])
{
	struct meta_arg a = {"signing_key", keynum, 8};
	return index_read(ix, metaget_fn, &a);
}

int index_signing_key_set(struct index *ix, const uint8_t keynum[8])
{
	struct meta_arg a = {"signing_key", (void *)keynum, 8};
	return index_write(ix, metaput_fn, &a);
}

static int stats_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct index_stats *s = arg;
	MDB_stat st;
	int rc = mdb_stat(txn, ix->jobs, &st);

	if (rc)
		return index_lmdb_err(ix, rc, "stat");
	s->jobs = st.ms_entries;
	if ((rc = mdb_stat(txn, ix->blobs, &st)) != 0)
		return index_lmdb_err(ix, rc, "stat");
	s->blobs = st.ms_entries;
	return 0;
}

int index_stats(struct index *ix, struct index_stats *s)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_lock(&ix->wmu);
	s->commits = ix->commits;
	s->writes = ix->writes;
	s->queue_ns = ix->op_queue_ns;
	s->batch_ns = ix->op_batch_ns;
	s->wake_ns = ix->op_wake_ns;
	s->apply_ns = ix->batch_apply_ns;
	s->sync_ns = ix->batch_sync_ns;
	pthread_mutex_unlock(&ix->wmu);
	return index_read(ix, stats_fn, s);
}
