/*
 * fsck.c - offline consistency check of a store.
 *
 * DESIGN
 * One read-only pass over each database and each blob file, so the check
 * can run beside a mounted daemon. Problems are what a crash must never
 * cause: a job pointing at a missing or wrong blob, reference counts that
 * disagree with the jobs, queue entries that disagree with job states,
 * blob files whose content does not hash to their name, unusable keys.
 * Leftovers a crash may legitimately leave (partial files in tmp/, blob
 * files not yet or no longer referenced, running jobs) are notes: the next
 * store_open() cleans them up.
 *
 * Memory: one table of output hashes with their job counts, to cross-check
 * reference counts; this offline tool, unlike the daemon, may use memory
 * proportional to the number of distinct outputs.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileutil.h"
#include "index_i.h"
#include "store.h"

/* Keyed by hash | uid (big-endian): a blob's jobs with uid NO_UID, one
 * owner's jobs with that owner's uid. */
#define REF_KEY_LEN (B3_OUT_LEN + 4)
#define NO_UID UINT32_MAX
/* ... and with uid PIN_UID, what keeps it pinned for the cache: inputs of
 * unfinished jobs, attestations (index `pins`). */
#define PIN_UID (UINT32_MAX - 1)
struct refcount_entry {
	uint8_t key[REF_KEY_LEN];
	uint64_t count;
	bool used;
};

/* Jobs per route and status, counted from the records (routes are few). */
struct route_count {
	char route[INDEX_ROUTE_MAX + 1];
	uint64_t n[INDEX_STATUSES];
	bool seen;
};

struct fsck {
	const char *dir;
	FILE *out;
	struct index *ix;
	long problems;
	struct refcount_entry *tab;
	size_t cap, len;
	struct route_count *routes;
	size_t nroutes;
	uint64_t remote_only;	   /* blobs only the bucket has */
	uint64_t local_bytes_seen; /* bytes of the blobs whose files are here */
};

static struct route_count *route_count(struct fsck *f, const char *route, bool insert)
{
	struct route_count *r;

	for (size_t i = 0; i < f->nroutes; i++)
		if (strcmp(f->routes[i].route, route) == 0)
			return &f->routes[i];
	if (!insert || strlen(route) > INDEX_ROUTE_MAX ||
	    !(r = realloc(f->routes, (f->nroutes + 1) * sizeof(*r))))
		return NULL;
	f->routes = r;
	r = &f->routes[f->nroutes++];
	memset(r, 0, sizeof(*r));
	memcpy(r->route, route, strlen(route) + 1);
	return r;
}

static void vreport(struct fsck *f, const char *kind, const char *fmt, va_list ap)
{
	fprintf(f->out, "%s: ", kind);
	vfprintf(f->out, fmt, ap);
	fputc('\n', f->out);
}

/* Something a crash must never cause: counted, and fsck exits 1. */
static void problem(struct fsck *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct fsck *f, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vreport(f, "problem", fmt, ap);
	va_end(ap);
	f->problems++;
}

/* A harmless leftover that the next store_open() cleans up. */
static void note(struct fsck *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct fsck *f, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vreport(f, "note", fmt, ap);
	va_end(ap);
}

static struct refcount_entry *tab_find_key(struct fsck *f, const uint8_t *key, bool insert)
{
	if (insert && (f->len + 1) * 2 > f->cap) {
		size_t ncap = f->cap ? f->cap * 2 : 1024;
		struct refcount_entry *n = calloc(ncap, sizeof(*n)), *old = f->tab;

		if (!n)
			return NULL;
		f->tab = n;
		f->cap = ncap;
		f->len = 0;
		for (size_t i = 0; old && i < ncap / 2; i++)
			if (old[i].used) {
				struct refcount_entry *e = tab_find_key(f, old[i].key, true);
				*e = old[i];
			}
		free(old);
	}
	if (!f->cap)
		return NULL;
	size_t i = (size_t)(le64_get(key) ^ le32_get(key + B3_OUT_LEN)) & (f->cap - 1);
	while (f->tab[i].used) {
		if (memcmp(f->tab[i].key, key, REF_KEY_LEN) == 0)
			return &f->tab[i];
		i = (i + 1) & (f->cap - 1);
	}
	if (!insert)
		return NULL;
	f->tab[i].used = true;
	memcpy(f->tab[i].key, key, REF_KEY_LEN);
	f->len++;
	return &f->tab[i];
}

static struct refcount_entry *tab_find_user(struct fsck *f, const uint8_t *hash, uint32_t uid,
					    bool insert)
{
	uint8_t key[REF_KEY_LEN];

	memcpy(key, hash, B3_OUT_LEN);
	be32_put(key + B3_OUT_LEN, uid);
	return tab_find_key(f, key, insert);
}

static struct refcount_entry *tab_find(struct fsck *f, const uint8_t *hash, bool insert)
{
	return tab_find_user(f, hash, NO_UID, insert);
}

static bool key_exists(MDB_txn *txn, MDB_dbi dbi, const void *key, size_t len)
{
	MDB_val k = {len, (void *)key}, v;
	return mdb_get(txn, dbi, &k, &v) == 0;
}

/* The references a job's inputs hold (index `inputs`): counted like an
 * output's, per blob and per blob and owner. */
static void count_inputs(struct fsck *f, MDB_txn *txn, const struct job *j, bool users)
{
	MDB_val k = {JOB_ID_LEN, (void *)j->id}, v;
	struct job_input in[INDEX_INPUTS_MAX];
	char id[JOB_ID_STR_LEN + 1];
	size_t n = 0;

	if (mdb_get(txn, f->ix->inputs, &k, &v) != 0)
		return;
	if (index_inputs_decode(&v, in, INDEX_INPUTS_MAX, &n) != 0) {
		ulid_format(j->id, id);
		problem(f, "job %s: damaged inputs record", id);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		struct refcount_entry *e = tab_find(f, in[i].hash, true);
		if (e)
			e->count++;
		if (users && (e = tab_find_user(f, in[i].hash, j->uid, true)) != NULL)
			e->count++;
		if (users && j->status < JOB_COMPLETE &&
		    (e = tab_find_user(f, in[i].hash, PIN_UID, true)) != NULL)
			e->count++;
	}
}

/* The references a job's outputs after the first hold (index `extras`). */
static void count_extras(struct fsck *f, MDB_txn *txn, const struct job *j, bool users)
{
	uint8_t key[JOB_ID_LEN + 2];
	MDB_cursor *cur;
	MDB_val k = {sizeof(key), key}, v;
	unsigned expect = 1;
	char id[JOB_ID_STR_LEN + 1];
	int rc;

	memcpy(key, j->id, JOB_ID_LEN);
	key[JOB_ID_LEN] = 0;
	key[JOB_ID_LEN + 1] = 1;
	if (mdb_cursor_open(txn, f->ix->extras, &cur) != 0)
		return;
	ulid_format(j->id, id);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT), expect++) {
		const uint8_t *kb = k.mv_data;
		struct refcount_entry *e;
		if (k.mv_size != JOB_ID_LEN + 2 || memcmp(kb, j->id, JOB_ID_LEN) != 0)
			break;
		if (v.mv_size < INDEX_HASH_LEN + 9 ||
		    ((unsigned)kb[JOB_ID_LEN] << 8 | kb[JOB_ID_LEN + 1]) != expect) {
			problem(f, "job %s: damaged or out-of-order output record", id);
			continue;
		}
		if (!(j->flags & JOB_F_EXTRAS))
			problem(f, "job %s: outputs after the first, but no flag for them", id);
		if ((e = tab_find(f, v.mv_data, true)) != NULL)
			e->count++;
		if (users && (e = tab_find_user(f, v.mv_data, j->uid, true)) != NULL)
			e->count++;
	}
	mdb_cursor_close(cur);
}

/* A final job's usage is in the ledger as its record says (SPEC §14). */
static void check_ledger_entry(struct fsck *f, MDB_txn *txn, const struct job *j, const char *id)
{
	struct ledger_entry want, got;
	int rc;

	if (index_usage_entry(f->ix, txn, j, &want) != 0) {
		problem(f, "job %s: %s", id, store_lasterr());
		return;
	}
	rc = index_journal_get(f->ix, txn, j->completed_ms, j->id, &got);
	if (rc == STORE_E_NOTFOUND) {
		problem(f, "job %s (%s) is missing from the usage ledger", id,
			job_status_name(j->status));
		return;
	}
	if (rc) {
		problem(f, "job %s: %s", id, store_lasterr());
		return;
	}
	if (got.uid != want.uid || got.outcome != want.outcome || got.cached != want.cached ||
	    got.run_ms != want.run_ms || got.bytes != want.bytes ||
	    strcmp(got.route, want.route) != 0 || strcmp(got.kind, want.kind) != 0)
		problem(f,
			"job %s: its usage ledger entry (uid %u, %s, %llu ms on '%s', %llu bytes%s) "
			"differs from its record (uid %u, %s, %llu ms on '%s', %llu bytes%s)",
			id, got.uid, job_status_name(got.outcome), (unsigned long long)got.run_ms,
			got.kind, (unsigned long long)got.bytes, got.cached ? ", cached" : "",
			want.uid, job_status_name(want.outcome), (unsigned long long)want.run_ms,
			want.kind, (unsigned long long)want.bytes, want.cached ? ", cached" : "");
}

static void check_job(struct fsck *f, MDB_txn *txn, const struct job *j, uint64_t *depth)
{
	char id[JOB_ID_STR_LEN + 1];
	int missing;

	ulid_format(j->id, id);
	struct route_count *rc = route_count(f, j->route, true);
	if (rc && (unsigned)j->status < INDEX_STATUSES)
		rc->n[j->status]++;
	if (j->flags & JOB_F_HAS_OUTPUT) {
		struct refcount_entry *e = tab_find(f, j->output_hash, true);
		if (e)
			e->count++;
		if ((e = tab_find_user(f, j->output_hash, j->uid, true)) != NULL)
			e->count++;
	}
	count_inputs(f, txn, j, true);
	count_extras(f, txn, j, true);
	if (j->name[0]) {
		uint8_t key[INDEX_NAME_KEY_MAX];
		size_t kl = index_name_key(j->route, j->name, j->uid, key);
		MDB_val k = {kl, key}, v;
		if (!kl || mdb_get(txn, f->ix->names, &k, &v) != 0 || v.mv_size != JOB_ID_LEN ||
		    memcmp(v.mv_data, j->id, JOB_ID_LEN) != 0)
			problem(f, "job %s is named '%s' but the name does not lead to it", id,
				j->name);
	}
	if (j->status == JOB_COMPLETE &&
	    !(j->flags & (JOB_F_HAS_OUTPUT | JOB_F_OUTPUT_RELEASED)))
		problem(f, "job %s is complete but has no output", id);
	if (j->status == JOB_QUEUED && (j->flags & JOB_F_DELAYED)) {
		uint8_t key[8 + JOB_ID_LEN];
		be64_put(key, j->round);
		memcpy(key + 8, j->id, JOB_ID_LEN);
		if (!key_exists(txn, f->ix->delayed, key, sizeof(key)))
			problem(f, "job %s is delayed but not in the delayed set", id);
	} else if (j->status == JOB_QUEUED) {
		uint8_t item[QUEUE_ITEM_LEN];
		index_queue_item(j, item);
		if (!index_set_has(txn, f->ix->queue, &j->group, 1, item, sizeof(item)))
			problem(f, "job %s is queued but not in the queue", id);
		depth[j->group]++;
	}
	if (j->status == JOB_RUNNING) {
		if (!key_exists(txn, f->ix->running, j->id, JOB_ID_LEN))
			problem(f, "job %s is running but not in the running set", id);
		else
			note(f, "job %s was running; it is requeued when the store is opened", id);
	}
	if (!key_exists(txn, f->ix->requests, j->id, JOB_ID_LEN))
		problem(f, "job %s has no stored request", id);
	if (j->status >= JOB_COMPLETE)
		check_ledger_entry(f, txn, j, id);
	missing = index_job_listed(f->ix, txn, j);
	if (missing & 1)
		problem(f, "job %s is missing from the route listing", id);
	if (missing & 2)
		problem(f, "job %s is missing from its owner's listing", id);
	if (missing & 4)
		problem(f, "job %s is missing from the sequence map", id);
}

/* Each attestation of the usage ledger holds a reference on its blob
 * (owner uid 0); the attestations themselves are checked by renderctl
 * (ledger_fsck, which reads their JSON). */
static void count_attestations(struct fsck *f)
{
	struct attestation a[16];
	uint64_t after = 0;
	size_t n;

	do {
		if (index_ledger_list(f->ix, after, a, 16, &n) != 0) {
			problem(f, "cannot read the usage attestations: %s", store_lasterr());
			return;
		}
		for (size_t i = 0; i < n; i++) {
			struct refcount_entry *e = tab_find(f, a[i].hash, true);
			if (e)
				e->count++;
			if ((e = tab_find_user(f, a[i].hash, 0, true)) != NULL)
				e->count++;
			if ((e = tab_find_user(f, a[i].hash, PIN_UID, true)) != NULL)
				e->count++;
			after = a[i].end_ms;
		}
	} while (n == 16);
}

/* Replication (index_replica.c): the cache's own references (owner uid
 * 0) count like jobs'; blobs whose files only the bucket has are noted,
 * not missing. */
static void count_cache_refs(struct fsck *f, MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if (mdb_cursor_open(txn, f->ix->replicated, &cur) != 0) {
		problem(f, "cannot read the replicated database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct replica_state s;
		struct refcount_entry *e;
		char hex[B3_HEX_LEN + 1];

		if (k.mv_size != B3_OUT_LEN) {
			problem(f, "a replicated key has %zu bytes", k.mv_size);
			continue;
		}
		b3_to_hex(k.mv_data, hex);
		if (index_replica_get(f->ix, k.mv_data, &s) != 0) {
			problem(f, "blob %s: %s", hex, store_lasterr());
			continue;
		}
		if (!s.cache_ref)
			continue;
		if ((e = tab_find(f, k.mv_data, true)) != NULL)
			e->count++;
		if ((e = tab_find_user(f, k.mv_data, 0, true)) != NULL)
			e->count++;
	}
	mdb_cursor_close(cur);
}

static void check_jobs(struct fsck *f, MDB_txn *txn)
{
	uint64_t depth[INDEX_GROUPS] = {0}; /* queued jobs per group, counted here */
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if (mdb_cursor_open(txn, f->ix->jobs, &cur) != 0) {
		problem(f, "cannot read the jobs database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job j;

		if (k.mv_size != JOB_ID_LEN) {
			problem(f, "a job key has %zu bytes, not %d", k.mv_size, JOB_ID_LEN);
			continue;
		}
		if (index_get_job(f->ix, txn, k.mv_data, &j) != 0) {
			problem(f, "%s", store_lasterr());
			continue;
		}
		check_job(f, txn, &j, depth);
		job_release(&j);
	}
	if (rc != MDB_NOTFOUND)
		problem(f, "reading jobs stopped: %s", mdb_strerror(rc));
	mdb_cursor_close(cur);

	/* Every queue entry names a queued job; depths match. */
	if (mdb_cursor_open(txn, f->ix->queue, &cur) != 0)
		return;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job j;
		char id[JOB_ID_STR_LEN + 1];

		if (k.mv_size != 1 || v.mv_size != QUEUE_ITEM_LEN) {
			problem(f, "a queue entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		ulid_format((uint8_t *)v.mv_data + 9, id);
		if (index_get_job(f->ix, txn, (uint8_t *)v.mv_data + 9, &j) != 0) {
			problem(f, "queue entry for job %s, which does not exist", id);
			continue;
		}
		if (j.status != JOB_QUEUED)
			problem(f, "queue entry for job %s, which is %s", id,
				job_status_name(j.status));
		job_release(&j);
	}
	mdb_cursor_close(cur);
	for (int g = 0; g < INDEX_GROUPS; g++) {
		uint8_t gk = (uint8_t)g;
		MDB_val dk = {1, &gk}, dv;
		uint64_t recorded = 0;

		if (mdb_get(txn, f->ix->fair, &dk, &dv) == 0 && dv.mv_size == 8)
			recorded = le64_get(dv.mv_data);
		if (recorded != depth[g])
			problem(f, "group %d queue depth is recorded as %llu but %llu jobs are queued",
				g, (unsigned long long)recorded, (unsigned long long)depth[g]);
	}

	/* Every delayed entry names a delayed job, at its time. */
	if (mdb_cursor_open(txn, f->ix->delayed, &cur) != 0) {
		problem(f, "cannot read the delayed set");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job j;
		char id[JOB_ID_STR_LEN + 1];

		if (k.mv_size != 8 + JOB_ID_LEN) {
			problem(f, "a delayed entry has %zu bytes", k.mv_size);
			continue;
		}
		ulid_format((uint8_t *)k.mv_data + 8, id);
		if (index_get_job(f->ix, txn, (uint8_t *)k.mv_data + 8, &j) != 0) {
			problem(f, "delayed entry for job %s, which does not exist", id);
			continue;
		}
		if (j.status != JOB_QUEUED || !(j.flags & JOB_F_DELAYED) ||
		    j.round != be64_get(k.mv_data))
			problem(f, "delayed entry for job %s, which is %s%s", id,
				job_status_name(j.status),
				j.flags & JOB_F_DELAYED ? " (delayed to another time)" : "");
		job_release(&j);
	}
	mdb_cursor_close(cur);

	/* Every handle belongs to a job. */
	if (mdb_cursor_open(txn, f->ix->handles, &cur) != 0) {
		problem(f, "cannot read the handles database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char id[JOB_ID_STR_LEN + 1];

		if (k.mv_size != JOB_ID_LEN || v.mv_size > INDEX_HANDLE_MAX) {
			problem(f, "a handle entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		ulid_format(k.mv_data, id);
		if (!key_exists(txn, f->ix->jobs, k.mv_data, JOB_ID_LEN))
			problem(f, "a handle for job %s, which does not exist", id);
	}
	mdb_cursor_close(cur);

	/* Every remote record belongs to a job. */
	if (mdb_cursor_open(txn, f->ix->remote, &cur) != 0) {
		problem(f, "cannot read the remote database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char id[JOB_ID_STR_LEN + 1];

		if (k.mv_size != JOB_ID_LEN || v.mv_size > INDEX_HANDLE_MAX) {
			problem(f, "a remote entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		ulid_format(k.mv_data, id);
		if (!key_exists(txn, f->ix->jobs, k.mv_data, JOB_ID_LEN))
			problem(f, "a remote record for job %s, which does not exist", id);
	}
	mdb_cursor_close(cur);

	/* Who made a blob: a blob of the store, and a job that exists. */
	if (mdb_cursor_open(txn, f->ix->made, &cur) != 0) {
		problem(f, "cannot read the made database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char id[JOB_ID_STR_LEN + 1], hex[B3_HEX_LEN + 1];

		if (k.mv_size != B3_OUT_LEN || v.mv_size != JOB_ID_LEN) {
			problem(f, "a made entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		ulid_format(v.mv_data, id);
		b3_to_hex(k.mv_data, hex);
		if (!key_exists(txn, f->ix->blobs, k.mv_data, B3_OUT_LEN))
			problem(f, "blob %s is said to be made by job %s, but the store has no such blob",
				hex, id);
		else if (!key_exists(txn, f->ix->jobs, v.mv_data, JOB_ID_LEN))
			problem(f, "blob %s is said to be made by job %s, which does not exist", hex,
				id);
	}
	mdb_cursor_close(cur);

	/* Sealed credentials: only for jobs not yet final (wiped then). */
	if (mdb_cursor_open(txn, f->ix->creds, &cur) != 0) {
		problem(f, "cannot read the credentials database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char id[JOB_ID_STR_LEN + 1];
		struct job j;

		if (k.mv_size != JOB_ID_LEN) {
			problem(f, "a credentials entry has a %zu-byte key", k.mv_size);
			continue;
		}
		ulid_format(k.mv_data, id);
		if (index_get_job(f->ix, txn, k.mv_data, &j) != 0) {
			problem(f, "credentials for job %s, which does not exist", id);
			continue;
		}
		if (j.status >= JOB_COMPLETE)
			problem(f, "credentials kept for job %s, which is %s (they are wiped then)",
				id, job_status_name(j.status));
		job_release(&j);
	}
	mdb_cursor_close(cur);

	/* Remote routes' queue groups: a route each, no group twice. */
	if (mdb_cursor_open(txn, f->ix->rgroups, &cur) != 0) {
		problem(f, "cannot read the route groups database");
		return;
	}
	{
		bool given[INDEX_GROUPS] = {false};
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
		     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			uint8_t g;
			if (k.mv_size == 0 || k.mv_size > INDEX_ROUTE_MAX || v.mv_size != 1) {
				problem(f, "a route group entry has %zu + %zu bytes", k.mv_size,
					v.mv_size);
				continue;
			}
			g = *(const uint8_t *)v.mv_data;
			if (given[g])
				problem(f, "queue group %u is given to two routes", g);
			given[g] = true;
		}
	}
	mdb_cursor_close(cur);

	/* Jobs per route and status, as counted in the records. */
	if (mdb_cursor_open(txn, f->ix->counts, &cur) != 0) {
		problem(f, "cannot read the counts database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char route[INDEX_ROUTE_MAX + 1];
		struct route_count *r;

		if (k.mv_size == 0 || k.mv_size > INDEX_ROUTE_MAX ||
		    v.mv_size != INDEX_STATUSES * 8) {
			problem(f, "a counts entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		memcpy(route, k.mv_data, k.mv_size);
		route[k.mv_size] = '\0';
		r = route_count(f, route, false);
		for (int s = 0; s < INDEX_STATUSES; s++) {
			uint64_t n = le64_get((const uint8_t *)v.mv_data + 8 * s);
			if (n != (r ? r->n[s] : 0))
				problem(f, "route %s has %llu %s jobs counted but %llu recorded", route,
					(unsigned long long)n, job_status_name((enum job_status)s),
					(unsigned long long)(r ? r->n[s] : 0));
		}
		if (r)
			r->seen = true;
	}
	mdb_cursor_close(cur);
	for (size_t i = 0; i < f->nroutes; i++)
		if (!f->routes[i].seen)
			problem(f, "route %s has jobs but no counts", f->routes[i].route);
}

static void check_blob_file(struct fsck *f, const uint8_t *hash, const struct blob_info *bi)
{
	char path[4200], hex[B3_HEX_LEN + 1];
	uint8_t got[B3_OUT_LEN];
	uint64_t size;
	struct stat sb;
	int fd, rc;

	b3_to_hex(hash, hex);
	snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", f->dir, hex, hex);
	if ((rc = file_open_regular(path, &fd, &sb)) != 0) {
		problem(f, "blob %s: cannot open '%s': %s", hex, path,
			rc == -EINVAL || rc == -ELOOP ? "not a regular file" : strerror(-rc));
		return;
	}
	if (sb.st_mode & 0222)
		problem(f, "blob file '%s' is writable (mode %04o); blobs are 0444", path,
			(unsigned)(sb.st_mode & 07777));
	if (b3_hash_fd(fd, 2, got, &size) != 0)
		problem(f, "blob file '%s' cannot be read", path);
	else if (size != bi->size)
		problem(f, "blob file '%s' has %llu bytes; the index says %llu", path,
			(unsigned long long)size, (unsigned long long)bi->size);
	else if (memcmp(got, hash, B3_OUT_LEN) != 0)
		problem(f, "blob file '%s' does not match its hash (damaged or modified)", path);
	close(fd);
}

static void check_blobs(struct fsck *f, MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if (mdb_cursor_open(txn, f->ix->blobs, &cur) != 0) {
		problem(f, "cannot read the blobs database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct blob_info bi;
		struct refcount_entry *e;
		char hex[B3_HEX_LEN + 1];

		if (k.mv_size != B3_OUT_LEN) {
			problem(f, "a blob key has %zu bytes", k.mv_size);
			continue;
		}
		b3_to_hex(k.mv_data, hex);
		if (index_blob_decode(f->ix, &v, &bi) != 0) {
			problem(f, "blob %s: %s", hex, store_lasterr());
			continue;
		}
		e = tab_find(f, k.mv_data, false);
		if (!e || e->count != bi.refcount)
			problem(f, "blob %s has reference count %llu but %llu jobs use it", hex,
				(unsigned long long)bi.refcount,
				(unsigned long long)(e ? e->count : 0));
		if (e)
			e->count = UINT64_MAX; /* seen: not reported below */
		f->local_bytes_seen += bi.size;
		{
			struct replica_state s;
			if (index_replica_get(f->ix, k.mv_data, &s) == 0 && !s.local) {
				f->remote_only++; /* the bucket has it, the cache dropped it */
				f->local_bytes_seen -= bi.size;
				continue;
			}
		}
		check_blob_file(f, k.mv_data, &bi);
	}
	mdb_cursor_close(cur);
	/* Each owner's count of jobs using a blob (private mounts' access). */
	if (mdb_cursor_open(txn, f->ix->blobusers, &cur) != 0) {
		problem(f, "cannot read the blobusers database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct refcount_entry *e;
		char hex[B3_HEX_LEN + 1];
		uint64_t n;

		if (k.mv_size != REF_KEY_LEN || v.mv_size != 8) {
			problem(f, "a blobusers entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		b3_to_hex(k.mv_data, hex);
		n = le64_get(v.mv_data);
		e = tab_find_key(f, k.mv_data, false);
		if (!e || e->count != n)
			problem(f, "blob %s is recorded as used by %llu job(s) of uid %u but %llu are",
				hex, (unsigned long long)n,
				(unsigned)be32_get((const uint8_t *)k.mv_data + B3_OUT_LEN),
				(unsigned long long)(e ? e->count : 0));
		if (e)
			e->count = UINT64_MAX;
	}
	mdb_cursor_close(cur);
	for (size_t i = 0; i < f->cap; i++)
		if (f->tab[i].used && f->tab[i].count != UINT64_MAX) {
			char hex[B3_HEX_LEN + 1];
			uint32_t uid = be32_get(f->tab[i].key + B3_OUT_LEN);
			b3_to_hex(f->tab[i].key, hex);
			if (uid == NO_UID)
				problem(f, "%llu job(s) have output %s, which is not in the index",
					(unsigned long long)f->tab[i].count, hex);
			else
				problem(f, "%llu job(s) of uid %u have output %s, which blobusers "
					   "does not record",
					(unsigned long long)f->tab[i].count, (unsigned)uid, hex);
		}
}

static void check_blob_files(struct fsck *f, MDB_txn *txn)
{
	char path[4200];
	struct dirent *de, *fe;
	DIR *d, *sd;

	snprintf(path, sizeof(path), "%s/blobs", f->dir);
	if (!(d = opendir(path))) {
		problem(f, "cannot open '%s': %s", path, strerror(errno));
		return;
	}
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/blobs/%s", f->dir, de->d_name);
		if (!(sd = opendir(path))) {
			note(f, "'%s' is not a blob folder", path);
			continue;
		}
		while ((fe = readdir(sd)) != NULL) {
			uint8_t hash[B3_OUT_LEN];

			if (fe->d_name[0] == '.')
				continue;
			if (b3_from_hex(fe->d_name, hash) != 0 ||
			    strncmp(fe->d_name, de->d_name, 2) != 0)
				note(f, "'%s/%s' is not a blob name; it is moved to lost+found at the "
					"next open",
				     path, fe->d_name);
			else if (!key_exists(txn, f->ix->blobs, hash, B3_OUT_LEN))
				note(f, "blob file '%s/%s' is not referenced; it is moved to "
					"lost+found at the next open",
				     path, fe->d_name);
		}
		closedir(sd);
	}
	closedir(d);
	snprintf(path, sizeof(path), "%s/tmp", f->dir);
	if ((d = opendir(path)) != NULL) {
		while ((de = readdir(d)) != NULL)
			if (de->d_name[0] != '.')
				note(f, "partial output '%s/%s' is removed at the next open", path,
				     de->d_name);
		closedir(d);
	}
}

/* lost+found/ holds what the daemon would not delete: say so. */
static void check_lost_found(struct fsck *f)
{
	char path[4200];
	struct dirent *de;
	uint64_t n = 0;
	DIR *d;

	snprintf(path, sizeof(path), "%s/" STORE_LOST_FOUND, f->dir);
	if (!(d = opendir(path)))
		return;
	while ((de = readdir(d)) != NULL)
		n += de->d_name[0] != '.';
	closedir(d);
	if (n)
		note(f, "%llu file(s) in '%s': stray blob files moved aside at open; "
			"'renderctl fsck --adopt' puts back those a job names",
		     (unsigned long long)n, path);
}

static void check_keys(struct fsck *f, MDB_txn *txn)
{
	char path[4200], keyid[SIGN_KEYID_LEN + 1];
	MDB_val k = {11, "signing_key"}, v;
	struct sign_seckey sk;
	struct sign_pubkey pk;
	struct dirent *de;
	DIR *d;

	if (mdb_get(txn, f->ix->meta, &k, &v) != 0 || v.mv_size != SIGN_KEYNUM_LEN) {
		note(f, "the store has no signing key yet");
	} else {
		sign_keyid(v.mv_data, keyid);
		snprintf(path, sizeof(path), "%s/keys/%s.pub", f->dir, keyid);
		if (sign_pubkey_load(path, &pk) != 0)
			problem(f, "signing key %s: %s", keyid, store_lasterr());
		snprintf(path, sizeof(path), "%s/keys/%s.key", f->dir, keyid);
		if (access(path, F_OK) != 0)
			problem(f, "signing key %s: '%s' is missing", keyid, path);
	}
	snprintf(path, sizeof(path), "%s/keys", f->dir);
	if (!(d = opendir(path)))
		return;
	while ((de = readdir(d)) != NULL) {
		size_t n = strlen(de->d_name);

		if (n > 4 && strcmp(de->d_name + n - 4, ".key") == 0) {
			snprintf(path, sizeof(path), "%s/keys/%s", f->dir, de->d_name);
			if (sign_seckey_load(path, &sk) != 0)
				problem(f, "%s", store_lasterr());
			sign_seckey_wipe(&sk);
		} else if (strcmp(de->d_name, "credentials.seal") == 0 ||
			   strcmp(de->d_name, "webhook.seed") == 0) {
			struct stat sb;
			snprintf(path, sizeof(path), "%s/keys/%s", f->dir, de->d_name);
			if (lstat(path, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size != 32 ||
			    (sb.st_mode & 077))
				problem(f, "'%s' must be a file of 32 bytes with mode 0600", path);
		} else if (n > 4 && strcmp(de->d_name + n - 4, ".pub") == 0) {
			snprintf(path, sizeof(path), "%s/keys/%s", f->dir, de->d_name);
			if (sign_pubkey_load(path, &pk) != 0)
				problem(f, "%s", store_lasterr());
		}
	}
	closedir(d);
}

/* ---- adopting files of lost+found/ ---- */

struct adopt_arg {
	const uint8_t *hash;
	struct blob_info bi;
	bool present; /* out: the index had it already */
};

static int adopt_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct adopt_arg *a = arg;
	uint8_t rec[BLOB_REC_MAX];
	MDB_val k = {B3_OUT_LEN, (void *)a->hash}, v;
	int rc;

	if (mdb_get(txn, ix->blobs, &k, &v) == 0) {
		a->present = true;
		return 0;
	}
	v.mv_size = index_blob_encode(&a->bi, rec);
	v.mv_data = rec;
	if ((rc = mdb_put(txn, ix->blobs, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "adopt blob");
	return 0;
}

/* Count, per output hash, the jobs that name it (the media type of one). */
static int count_outputs(struct fsck *f, struct index *ix)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn)) != 0)
		return index_lmdb_err(ix, rc, "read");
	if ((rc = mdb_cursor_open(txn, ix->jobs, &cur)) != 0) {
		mdb_txn_abort(txn);
		return index_lmdb_err(ix, rc, "read jobs");
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job j;
		if (k.mv_size != JOB_ID_LEN || index_get_job(ix, txn, k.mv_data, &j) != 0)
			continue; /* fsck reports it */
		if (j.flags & JOB_F_HAS_OUTPUT) {
			struct refcount_entry *e = tab_find(f, j.output_hash, true);
			if (!e) {
				job_release(&j);
				rc = -ENOMEM;
				break;
			}
			e->count++;
		}
		count_inputs(f, txn, &j, false);
		count_extras(f, txn, &j, false);
		job_release(&j);
	}
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

int store_adopt(struct store *st, FILE *out, uint64_t *adopted)
{
	struct fsck f = {store_dir(st), out, store_index(st), 0, NULL, 0, 0};
	char lfpath[4200], path[4600], dst[4600];
	struct dirent *de;
	DIR *d;
	int rc, lf;

	*adopted = 0;
	snprintf(lfpath, sizeof(lfpath), "%s/" STORE_LOST_FOUND, f.dir);
	lf = open(lfpath, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (lf < 0)
		return errno == ENOENT ? 0
				       : store_seterr(-errno, "cannot open '%s': %s", lfpath,
						      strerror(errno));
	if (!(d = fdopendir(lf))) {
		close(lf);
		return store_seterr(-errno, "cannot read '%s': %s", lfpath, strerror(errno));
	}
	if ((rc = count_outputs(&f, f.ix)) != 0)
		goto out;
	while ((de = readdir(d)) != NULL) {
		struct adopt_arg a = {0};
		struct refcount_entry *e;
		uint8_t hash[B3_OUT_LEN], got[B3_OUT_LEN];
		char hex[B3_HEX_LEN + 1];
		uint64_t size;
		struct stat sb;
		int fd;

		if (b3_from_hex(de->d_name, hash) != 0 || !(e = tab_find(&f, hash, false)))
			continue; /* no job names it: it stays */
		snprintf(path, sizeof(path), "%s/%s", lfpath, de->d_name);
		if (file_open_regular(path, &fd, &sb) != 0)
			continue;
		rc = b3_hash_fd(fd, 2, got, &size);
		close(fd);
		if (rc || memcmp(got, hash, B3_OUT_LEN) != 0) {
			fprintf(out, "note: '%s' does not match its name; left where it is\n", path);
			rc = 0;
			continue;
		}
		b3_to_hex(hash, hex);
		snprintf(dst, sizeof(dst), "%s/blobs/%.2s", f.dir, hex);
		if (mkdir(dst, 0755) != 0 && errno != EEXIST) {
			rc = store_seterr(-errno, "cannot create '%s': %s", dst, strerror(errno));
			break;
		}
		snprintf(dst, sizeof(dst), "%s/blobs/%.2s/%s", f.dir, hex, hex);
		if (renameat2(AT_FDCWD, path, AT_FDCWD, dst, RENAME_NOREPLACE) != 0) {
			fprintf(out, "note: cannot put '%s' back as '%s': %s\n", path, dst,
				strerror(errno));
			continue;
		}
		snprintf(path, sizeof(path), "%s/blobs/%.2s", f.dir, hex);
		if ((rc = dir_fsync(path)) != 0)
			break;
		a.hash = hash;
		a.bi.size = size;
		a.bi.refcount = e->count;
		a.bi.created_ms = (uint64_t)sb.st_mtime * 1000;
		if ((rc = index_write(f.ix, adopt_fn, &a)) != 0)
			break;
		fprintf(out, "adopted blob %s (%llu bytes, named by %llu job%s)%s\n", hex,
			(unsigned long long)size, (unsigned long long)e->count,
			e->count == 1 ? "" : "s", a.present ? "; the index had it already" : "");
		(*adopted)++;
	}
out:
	closedir(d);
	free(f.tab);
	return rc;
}

/* Blob files under blobs/ (0 when there is no such folder). */
static uint64_t count_blob_files(const char *dir)
{
	char path[4200];
	struct dirent *de, *de2;
	uint64_t n = 0;
	DIR *d, *d2;

	snprintf(path, sizeof(path), "%s/blobs", dir);
	if (!(d = opendir(path)))
		return 0;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/blobs/%s", dir, de->d_name);
		if (!(d2 = opendir(path)))
			continue;
		while ((de2 = readdir(d2)) != NULL)
			n += de2->d_name[0] != '.';
		closedir(d2);
	}
	closedir(d);
	return n;
}

/* pins against what should pin (before check_blobs, which reports what
 * is left unseen in the table). */
static void check_pins(struct fsck *f, MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if (mdb_cursor_open(txn, f->ix->pins, &cur) != 0) {
		problem(f, "cannot read the pins database");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct refcount_entry *e;
		char hex[B3_HEX_LEN + 1];
		uint64_t n;

		if (k.mv_size != B3_OUT_LEN || v.mv_size != 8) {
			problem(f, "a pins entry has %zu + %zu bytes", k.mv_size, v.mv_size);
			continue;
		}
		b3_to_hex(k.mv_data, hex);
		n = le64_get(v.mv_data);
		e = tab_find_user(f, k.mv_data, PIN_UID, false);
		if (!e || e->count != n)
			problem(f, "blob %s is pinned %llu time(s) for the cache; unfinished jobs' "
				   "inputs and attestations make %llu",
				hex, (unsigned long long)n, (unsigned long long)(e ? e->count : 0));
		if (e)
			e->count = UINT64_MAX;
	}
	mdb_cursor_close(cur);
	for (size_t i = 0; i < f->cap; i++)
		if (f->tab[i].used && be32_get(f->tab[i].key + B3_OUT_LEN) == PIN_UID) {
			if (f->tab[i].count != UINT64_MAX) {
				char hex[B3_HEX_LEN + 1];
				b3_to_hex(f->tab[i].key, hex);
				problem(f, "blob %s is needed by %llu unfinished job(s) or attestation(s) "
					   "but not pinned for the cache",
					hex, (unsigned long long)f->tab[i].count);
			}
			f->tab[i].count = UINT64_MAX;
		}
}

/* The replication records against the blobs (index_replica.c). */
static void check_replica(struct fsck *f, MDB_txn *txn)
{
	struct outbox_stats os;
	uint64_t local = 0, n = 0;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if (index_local_bytes(f->ix, &local) == 0 && local != f->local_bytes_seen)
		problem(f, "the index counts %llu bytes of blob files here; its blobs add up to "
			   "%llu",
			(unsigned long long)local, (unsigned long long)f->local_bytes_seen);
	if (mdb_cursor_open(txn, f->ix->replicated, &cur) == 0) {
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
		     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			MDB_val bv;
			char hex[B3_HEX_LEN + 1];
			if (k.mv_size != B3_OUT_LEN)
				continue;
			b3_to_hex(k.mv_data, hex);
			if (mdb_get(txn, f->ix->blobs, &k, &bv) != 0)
				problem(f, "blob %s is recorded as in the bucket but not in the index",
					hex);
			n++;
		}
		mdb_cursor_close(cur);
	}
	if (index_outbox_stats(f->ix, &os) == 0 && (os.objects || n || f->remote_only))
		fprintf(f->out,
			"replica: %llu blob(s) confirmed in the bucket, %llu of them only there; "
			"%llu object(s) waiting to be put\n",
			(unsigned long long)n, (unsigned long long)f->remote_only,
			(unsigned long long)os.objects);
}

long store_fsck(const char *dir, FILE *out)
{
	struct index_options opt = {0, true};
	struct fsck f = {dir, out, NULL, 0, NULL, 0, 0};
	char path[4200];
	struct stat sb;
	MDB_txn *txn;
	int rc;

	/* A store folder whose first open never made its index (the daemon
	 * died first: no data.mdb, or LMDB's file before its first commit)
	 * holds nothing to lose; one with blobs but no index does; no folder
	 * at all is no store (index_open says so). */
	snprintf(path, sizeof(path), "%s/index/data.mdb", dir);
	rc = lstat(dir, &sb) == 0 && S_ISDIR(sb.st_mode) && lstat(path, &sb) != 0 && errno == ENOENT
		     ? STORE_E_NOTFOUND
		     : 0;
	if (rc == 0) {
		snprintf(path, sizeof(path), "%s/index", dir);
		rc = index_open(path, &opt, &f.ix);
		if (rc && rc != STORE_E_NOTFOUND) {
			fprintf(out, "problem: %s\n", store_lasterr());
			return 1;
		}
	}
	if (rc == STORE_E_NOTFOUND) {
		uint64_t blobs = count_blob_files(dir);
		snprintf(path, sizeof(path), "%s/index/data.mdb", dir);
		if (blobs) {
			fprintf(out, "problem: '%s' is missing or empty, and %llu blob file%s no "
				     "index names are in '%s/blobs'\n",
				path, (unsigned long long)blobs, blobs == 1 ? "" : "s", dir);
			return 1;
		}
		fprintf(out, "note: '%s' has no index yet (its first open did not finish): "
			     "nothing to check\n",
			dir);
		return 0;
	}
	if ((rc = mdb_txn_begin(f.ix->env, NULL, MDB_RDONLY, &txn)) != 0) {
		fprintf(out, "problem: cannot read '%s': %s\n", path, mdb_strerror(rc));
		index_close(f.ix);
		return 1;
	}
	check_jobs(&f, txn);
	count_attestations(&f);
	count_cache_refs(&f, txn);
	check_pins(&f, txn);
	check_blobs(&f, txn);
	check_replica(&f, txn);
	check_blob_files(&f, txn);
	check_lost_found(&f);
	check_keys(&f, txn);
	mdb_txn_abort(txn);
	index_close(f.ix);
	free(f.tab);
	free(f.routes);
	return f.problems;
}
