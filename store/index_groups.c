/*
 * index_groups.c - the queue group of each remote route (rgroups), given
 * once and kept, and moving queued and delayed jobs out of groups no
 * route has any more (index_regroup): what lets each remote route have a
 * queue of its own.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

#define ROUTE_KEY_MAX 255 /* route.h's ROUTE_PATH_MAX */

struct rgroups_arg {
	const char *const *routes;
	size_t n;
	uint8_t first;
	uint8_t *groups;
};

static int rgroups_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct rgroups_arg *a = arg;
	bool used[256] = {false}, mine[256] = {false};
	char owner[256][ROUTE_KEY_MAX + 1];
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	/* Who holds which group now. */
	memset(owner, 0, sizeof(owner));
	if ((rc = mdb_cursor_open(txn, ix->rgroups, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read route groups");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		uint8_t g;
		if (v.mv_size != 1 || k.mv_size == 0 || k.mv_size > ROUTE_KEY_MAX) {
			mdb_cursor_close(cur);
			return store_seterr(STORE_E_INDEX, "damaged route group in '%s/data.mdb'",
					    ix->dir);
		}
		g = *(uint8_t *)v.mv_data;
		used[g] = true;
		memcpy(owner[g], k.mv_data, k.mv_size);
		owner[g][k.mv_size] = '\0';
	}
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read route groups");
	for (size_t i = 0; i < a->n; i++) {
		k.mv_size = strlen(a->routes[i]);
		k.mv_data = (void *)a->routes[i];
		if (k.mv_size == 0 || k.mv_size > ROUTE_KEY_MAX)
			return store_seterr(-EINVAL, "a route name of %zu bytes", k.mv_size);
		rc = mdb_get(txn, ix->rgroups, &k, &v);
		if (rc == 0 && v.mv_size == 1 && *(uint8_t *)v.mv_data >= a->first) {
			a->groups[i] = *(uint8_t *)v.mv_data;
			mine[a->groups[i]] = true;
		} else if (rc == 0 || rc == MDB_NOTFOUND) {
			a->groups[i] = 0; /* to give below */
		} else {
			return index_lmdb_err(ix, rc, "read route groups");
		}
	}
	for (size_t i = 0; i < a->n; i++) {
		int g, pick = -1;
		uint8_t buf;

		if (a->groups[i])
			continue;
		for (g = a->first; g < 256 && pick < 0; g++)
			if (!used[g])
				pick = g;
		/* None free: one whose route is gone and whose queue is empty
		 * (a delayed job of it that comes back runs as its own route
		 * says, counted against this one's concurrency once). */
		for (g = a->first; g < 256 && pick < 0; g++) {
			uint64_t depth;
			uint8_t key = (uint8_t)g;
			if (mine[g] || (rc = index_fair_get(ix, txn, &key, 1, &depth)) != 0)
				continue;
			if (depth == 0) {
				MDB_val ok = {strlen(owner[g]), owner[g]};
				if ((rc = mdb_del(txn, ix->rgroups, &ok, NULL)) != 0)
					return index_lmdb_err(ix, rc, "write route groups");
				pick = g;
			}
		}
		if (pick < 0)
			return store_seterr(-ENOSPC,
					    "more than %d remote routes with queued jobs: no queue "
					    "group is left for '%s'",
					    256 - a->first, a->routes[i]);
		used[pick] = mine[pick] = true;
		buf = (uint8_t)pick;
		k.mv_size = strlen(a->routes[i]);
		k.mv_data = (void *)a->routes[i];
		v.mv_size = 1;
		v.mv_data = &buf;
		if ((rc = mdb_put(txn, ix->rgroups, &k, &v, 0)) != 0)
			return index_lmdb_err(ix, rc, "write route groups");
		a->groups[i] = buf;
	}
	return 0;
}

int index_route_groups(struct index *ix, const char *const *routes, size_t n, uint8_t first,
		       uint8_t *groups)
{
	struct rgroups_arg a = {routes, n, first, groups};

	if (first == 0)
		return store_seterr(-EINVAL, "group 0 is the CPU's");
	return index_write(ix, rgroups_fn, &a);
}

struct regroup_arg {
	bool (*stale)(uint8_t group, void *arg);
	uint8_t (*group_of)(const char *route, void *arg);
	void *arg;
	uint64_t moved;
	bool more;
};

/* Move one job to its route's group (queued: out of one queue, into the
 * other; delayed: the record's group, used when it is promoted). */
static int regroup_job(struct index *ix, MDB_txn *txn, struct regroup_arg *a,
		       const uint8_t id[JOB_ID_LEN])
{
	struct job j;
	uint8_t to;
	int rc = index_get_job(ix, txn, id, &j);

	if (rc)
		return rc;
	to = a->group_of(j.route, a->arg);
	if (j.status != JOB_QUEUED || to == j.group) {
		job_release(&j);
		return 0;
	}
	if (j.flags & JOB_F_DELAYED) {
		j.group = to;
	} else if ((rc = index_dequeue(ix, txn, &j)) == 0) {
		j.group = to;
		rc = index_enqueue(ix, txn, &j);
	}
	if (rc == 0)
		rc = index_put_job(ix, txn, &j);
	if (rc == 0)
		a->moved++;
	job_release(&j);
	return rc;
}

/* Up to 256 jobs per transaction; a->more when some may remain. */
static int regroup_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct regroup_arg *a = arg;
	uint8_t ids[256][JOB_ID_LEN];
	size_t n = 0;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	a->more = false;
	/* Queued: the groups with a depth (one-byte keys of fair). */
	for (int g = 0; g < 256 && n < 256; g++) {
		uint8_t key = (uint8_t)g;
		uint64_t depth;

		if (!a->stale(key, a->arg))
			continue;
		if ((rc = index_fair_get(ix, txn, &key, 1, &depth)) != 0)
			return rc;
		if (depth == 0)
			continue;
		if ((rc = mdb_cursor_open(txn, ix->queue, &cur)) != 0)
			return index_lmdb_err(ix, rc, "regroup");
		k.mv_size = 1;
		k.mv_data = &key;
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY); rc == 0 && n < 256;
		     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP)) {
			if (v.mv_size != QUEUE_ITEM_LEN) {
				mdb_cursor_close(cur);
				return store_seterr(STORE_E_INDEX, "damaged queue entry in '%s'",
						    ix->dir);
			}
			memcpy(ids[n++], (uint8_t *)v.mv_data + 9, JOB_ID_LEN);
		}
		mdb_cursor_close(cur);
		if (rc != 0 && rc != MDB_NOTFOUND)
			return index_lmdb_err(ix, rc, "regroup");
	}
	a->more = n == 256;
	for (size_t i = 0; i < n; i++)
		if ((rc = regroup_job(ix, txn, a, ids[i])) != 0)
			return rc;
	return 0;
}

/* The delayed set, whole (it holds only jobs waiting for a retry). */
static int regroup_delayed_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct regroup_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->delayed, &cur)) != 0)
		return index_lmdb_err(ix, rc, "regroup");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job j;
		uint8_t id[JOB_ID_LEN];

		if (k.mv_size != 8 + JOB_ID_LEN) {
			rc = store_seterr(STORE_E_INDEX, "damaged delayed entry in '%s'", ix->dir);
			break;
		}
		memcpy(id, (uint8_t *)k.mv_data + 8, JOB_ID_LEN);
		if ((rc = index_get_job(ix, txn, id, &j)) != 0)
			break;
		bool move = a->stale(j.group, a->arg) && a->group_of(j.route, a->arg) != j.group;
		if (move) {
			j.group = a->group_of(j.route, a->arg);
			rc = index_put_job(ix, txn, &j); /* the key does not change */
			a->moved++;
		}
		job_release(&j);
		if (rc)
			break;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : rc;
}

int index_regroup(struct index *ix, bool (*stale)(uint8_t group, void *arg),
		  uint8_t (*group_of)(const char *route, void *arg), void *arg, uint64_t *moved)
{
	struct regroup_arg a = {stale, group_of, arg, 0, false};
	int rc;

	do
		rc = index_write(ix, regroup_fn, &a);
	while (rc == 0 && a.more);
	if (rc == 0)
		rc = index_write(ix, regroup_delayed_fn, &a);
	*moved = a.moved;
	return rc;
}
