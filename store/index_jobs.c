/*
 * index_jobs.c - creating jobs (one or a batch in one commit: the record,
 * its queue entry, request, listings, name, sealed credentials, inputs)
 * and the per-job records a run keeps beside the job record: the
 * durable handle of a backend, what a remote service said (remote), the
 * sealed credentials (creds), and the normalized request.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

size_t index_name_key(const char *route, const char *name, uint32_t uid,
		      uint8_t buf[INDEX_NAME_KEY_MAX])
{
	size_t rl = strlen(route), nl = strlen(name);

	if (rl > INDEX_ROUTE_MAX || nl > INDEX_NAME_MAX)
		return 0;
	memcpy(buf, route, rl + 1);
	memcpy(buf + rl + 1, name, nl + 1);
	be32_put(buf + rl + 1 + nl + 1, uid);
	return rl + 1 + nl + 1 + 4;
}

/*
 * The job named (route, name): uid's own, or with any_owner the lowest
 * uid's (the first key after the prefix). STORE_E_NOTFOUND if none.
 */
int index_name_find(struct index *ix, MDB_txn *txn, const char *route, const char *name,
		     uint32_t uid, bool any_owner, uint8_t id[JOB_ID_LEN])
{
	uint8_t key[INDEX_NAME_KEY_MAX];
	size_t len = index_name_key(route, name, uid, key);
	MDB_cursor *cur;
	MDB_val k = {len, key}, v;
	int rc;

	if (!len)
		return STORE_E_NOTFOUND; /* no such name can be stored */
	if (!any_owner) {
		rc = mdb_get(txn, ix->names, &k, &v);
	} else {
		be32_put(key + len - 4, 0);
		if ((rc = mdb_cursor_open(txn, ix->names, &cur)) != 0)
			return index_lmdb_err(ix, rc, "read name");
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		mdb_cursor_close(cur);
		if (rc == 0 && (k.mv_size != len || memcmp(k.mv_data, key, len - 4) != 0))
			rc = MDB_NOTFOUND;
	}
	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read name");
	if (v.mv_size != JOB_ID_LEN)
		return store_seterr(STORE_E_INDEX, "damaged name entry in '%s/data.mdb'", ix->dir);
	memcpy(id, v.mv_data, JOB_ID_LEN);
	return 0;
}

struct create_arg {
	const struct job_create *c;
	uint8_t id[JOB_ID_LEN];
	bool existed;
};

/* Is the stored request of job id the same as c's? */
static int same_request(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN],
			const struct job_create *c, bool *same)
{
	MDB_val k = {JOB_ID_LEN, (void *)id}, v;
	int rc = mdb_get(txn, ix->requests, &k, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read request");
	*same = v.mv_size == c->request_len && memcmp(v.mv_data, c->request, v.mv_size) == 0;
	return 0;
}

/* The job whose output made blob hash, as job j may know it (its own
 * job's, or anyone's on a mount where owners see each other's jobs);
 * zero when none is known. */
static int made_by(struct index *ix, MDB_txn *txn, const struct job *j, const uint8_t *hash,
		   uint8_t out[JOB_ID_LEN])
{
	MDB_val k = {INDEX_HASH_LEN, (void *)hash}, v;
	struct job m = {0};
	int rc = mdb_get(txn, ix->made, &k, &v);

	memset(out, 0, JOB_ID_LEN);
	if (rc == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read made");
	if (v.mv_size != JOB_ID_LEN)
		return store_seterr(STORE_E_INDEX, "damaged made record in '%s'", ix->dir);
	memcpy(out, v.mv_data, JOB_ID_LEN);
	if (!ix->names_per_owner)
		return 0;
	if ((rc = index_get_job(ix, txn, out, &m)) == STORE_E_NOTFOUND) {
		memset(out, 0, JOB_ID_LEN); /* a record fsck names; no link */
		return 0;
	}
	if (rc)
		return rc;
	if (m.uid != j->uid)
		memset(out, 0, JOB_ID_LEN); /* another owner's: not named */
	job_release(&m);
	return 0;
}

/* The blobs the request names: each referenced for as long as the job
 * exists (index_job_delete gives them back). A blob deleted since the
 * caller looked fails the creation (STORE_E_NOTFOUND). */
static int put_inputs(struct index *ix, MDB_txn *txn, const struct job *j,
		      const struct job_create *c)
{
	uint8_t buf[1 + INDEX_INPUTS_MAX * (INDEX_HASH_LEN + 9 + INDEX_FIELD_MAX + JOB_ID_LEN)];
	uint8_t made[INDEX_INPUTS_MAX][JOB_ID_LEN], *p = buf;
	MDB_val k = {JOB_ID_LEN, (void *)j->id}, v;
	int rc;

	if (c->ninputs > INDEX_INPUTS_MAX)
		return store_seterr(-E2BIG, "more than %d inputs", INDEX_INPUTS_MAX);
	*p++ = (uint8_t)c->ninputs;
	for (size_t i = 0; i < c->ninputs; i++) {
		const struct job_input *in = &c->inputs[i];
		MDB_val bk = {INDEX_HASH_LEN, (void *)in->hash}, bv;
		size_t fl = strnlen(in->field, INDEX_FIELD_MAX - 1);
		bool freed = false;

		rc = mdb_get(txn, ix->blobs, &bk, &bv);
		if (rc == MDB_NOTFOUND)
			return store_seterr(STORE_E_NOTFOUND, "'%s' names a blob that is gone",
					    in->field);
		if (rc)
			return index_lmdb_err(ix, rc, "read blob");
		if ((rc = index_blob_ref(ix, txn, in->hash, in->size, "", j->uid, NULL, 1, &freed)) !=
		    0)
			return rc;
		if ((rc = made_by(ix, txn, j, in->hash, made[i])) != 0)
			return rc;
		memcpy(p, in->hash, INDEX_HASH_LEN);
		le64_put(p + INDEX_HASH_LEN, in->size);
		p[INDEX_HASH_LEN + 8] = (uint8_t)fl;
		memcpy(p + INDEX_HASH_LEN + 9, in->field, fl);
		p += INDEX_HASH_LEN + 9 + fl;
	}
	memcpy(p, made, c->ninputs * JOB_ID_LEN);
	p += c->ninputs * JOB_ID_LEN;
	v.mv_size = (size_t)(p - buf);
	v.mv_data = buf;
	rc = mdb_put(txn, ix->inputs, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write inputs") : 0;
}

static int create_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct create_arg *a = arg;
	const struct job_create *c = a->c;
	struct job j;
	MDB_val k, v;
	uint8_t seqkey[8], nk[INDEX_NAME_KEY_MAX];
	size_t nklen = 0;
	int rc;

	if (c->name && *c->name) {
		if (!(nklen = index_name_key(c->route, c->name, c->uid, nk)))
			return store_seterr(-EINVAL, "name too long");
		/* Per owner: only the caller's own name counts (another
		 * owner's is not even seen). Per route: anyone's. */
		rc = index_name_find(ix, txn, c->route, c->name, c->uid, !ix->names_per_owner,
			       a->id);
		if (rc == 0) {
			bool same = false;

			rc = same_request(ix, txn, a->id, c, &same);
			if (rc == 0 && same)
				a->existed = true;
			else if (rc == 0)
				rc = store_seterr(STORE_E_EXISTS,
						  "name '%s' is already used on '%s' by a "
						  "different request",
						  c->name, c->route);
			return rc;
		}
		if (rc != STORE_E_NOTFOUND)
			return rc;
	}

	memset(&j, 0, sizeof(j));
	ulid_new(j.id);
	memcpy(a->id, j.id, JOB_ID_LEN);
	rc = index_meta_get(ix, txn, "next_seq", &v);
	if (rc || v.mv_size != 8) {
		rc = rc ? index_lmdb_err(ix, rc, "read next_seq")
			: store_seterr(STORE_E_INDEX, "damaged next_seq in '%s'", ix->dir);
		goto out;
	}
	j.seq = le64_get(v.mv_data);
	le64_put(seqkey, j.seq + 1);
	if ((rc = index_meta_put(ix, txn, "next_seq", seqkey, 8)) != 0)
		goto lmdb;
	j.status = JOB_QUEUED;
	j.priority = c->priority;
	j.group = c->group;
	j.uid = c->uid;
	j.gid = c->gid;
	j.created_ms = j.updated_ms = now_ms();
	j.timeout_ms = c->timeout_ms;
	j.route = (char *)c->route;
	j.name = (char *)(c->name ? c->name : "");
	if (c->webhook && *c->webhook)
		j.flags |= JOB_F_WEBHOOK;
	if ((rc = index_enqueue(ix, txn, &j)) != 0)
		goto out;
	if ((rc = index_put_job(ix, txn, &j)) != 0)
		goto out;

	k.mv_size = JOB_ID_LEN;
	k.mv_data = j.id;
	v.mv_size = c->request_len;
	v.mv_data = (void *)c->request;
	if ((rc = mdb_put(txn, ix->requests, &k, &v, 0)) != 0)
		goto lmdb;
	if (c->sealed && c->sealed_len) {
		v.mv_size = c->sealed_len;
		v.mv_data = (void *)c->sealed;
		if ((rc = mdb_put(txn, ix->creds, &k, &v, 0)) != 0)
			goto lmdb;
	}
	if (c->ninputs && (rc = put_inputs(ix, txn, &j, c)) != 0)
		goto out;
	if (c->ninputs && j.status < JOB_COMPLETE && (rc = index_pins_move(ix, txn, j.id, 1)) != 0)
		goto out;
	if ((j.flags & JOB_F_WEBHOOK) &&
	    (rc = index_hooks_create(ix, txn, j.id, c->webhook, c->webhook_events)) != 0)
		goto out;
	if ((rc = index_job_entries(ix, txn, &j, true)) != 0)
		goto out;
	if (nklen) {
		k.mv_size = nklen;
		k.mv_data = nk;
		v.mv_size = JOB_ID_LEN;
		v.mv_data = j.id;
		if ((rc = mdb_put(txn, ix->names, &k, &v, 0)) != 0)
			goto lmdb;
	}
	rc = 0;
	goto out;
lmdb:
	rc = index_lmdb_err(ix, rc, "create job");
out:
	return rc;
}

static int create_check(const struct job_create *c)
{
	size_t rlen = strlen(c->route);

	if (rlen == 0 || rlen > INDEX_ROUTE_MAX || memchr(c->route, '\0', rlen))
		return store_seterr(-EINVAL, "route must be 1 to %d bytes", INDEX_ROUTE_MAX);
	if (c->name && strlen(c->name) > INDEX_NAME_MAX)
		return store_seterr(-EINVAL, "name must be at most %d bytes", INDEX_NAME_MAX);
	if (c->priority > JOB_PRIO_HIGH)
		return store_seterr(-EINVAL, "invalid priority %d", (int)c->priority);
	return 0;
}

struct batch_arg {
	size_t n;
	const struct job_create *c;
	uint8_t (*ids)[JOB_ID_LEN];
	bool *existed;
	int *rcs;
};

static int batch_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct batch_arg *a = arg;

	for (size_t i = 0; i < a->n; i++) {
		struct create_arg ca = {&a->c[i], {0}, false};
		MDB_txn *child;
		int rc;

		if (a->rcs[i] == 0) {
			rc = mdb_txn_begin(ix->env, txn, 0, &child);
			if (rc)
				return index_lmdb_err(ix, rc, "begin nested");
			a->rcs[i] = create_fn(ix, child, &ca);
			if (a->rcs[i])
				mdb_txn_abort(child);
		}
		if (a->rcs[i]) {
			/* The first refusal ends the batch: the rest is not tried. */
			for (size_t k = i + 1; k < a->n; k++)
				a->rcs[k] = -ECANCELED;
			return 0;
		}
		if ((rc = mdb_txn_commit(child)) != 0)
			return index_lmdb_err(ix, rc, "commit nested");
		memcpy(a->ids[i], ca.id, JOB_ID_LEN);
		if (a->existed)
			a->existed[i] = ca.existed;
	}
	return 0;
}

int index_job_create_batch(struct index *ix, size_t n, const struct job_create *c,
			   uint8_t (*ids)[JOB_ID_LEN], bool *existed, int *rcs)
{
	struct batch_arg a = {n, c, ids, existed, rcs};
	int rc;

	for (size_t i = 0; i < n; i++)
		rcs[i] = create_check(&c[i]);
	rc = index_write(ix, batch_fn, &a);
	if (rc)
		for (size_t i = 0; i < n; i++)
			if (rcs[i] == 0)
				rcs[i] = rc;
	return rc;
}

int index_job_create(struct index *ix, const struct job_create *c, uint8_t id_out[JOB_ID_LEN],
		     bool *existed)
{
	struct create_arg a = {c, {0}, false};
	int rc = create_check(c);

	if (rc)
		return rc;
	rc = index_write(ix, create_fn, &a);
	if (rc == 0) {
		memcpy(id_out, a.id, JOB_ID_LEN);
		if (existed)
			*existed = a.existed;
	}
	return rc;
}

struct request_arg {
	const uint8_t *id;
	char *out;
	size_t len;
};

static int request_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct request_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	int rc = mdb_get(txn, ix->requests, &k, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read request");
	a->out = malloc(v.mv_size + 1);
	if (!a->out)
		return -ENOMEM;
	memcpy(a->out, v.mv_data, v.mv_size);
	a->out[v.mv_size] = '\0';
	a->len = v.mv_size;
	return 0;
}

struct handle_arg {
	const uint8_t *id;
	const void *data;
	size_t len;
	void **out;
	size_t *outlen;
	int db; /* 0 handles, 1 creds, 2 remote */
};

static MDB_dbi handle_db(struct index *ix, int db)
{
	return db == 1 ? ix->creds : db == 2 ? ix->remote : ix->handles;
}

static int handle_put_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct handle_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v = {a->len, (void *)a->data};
	int rc = mdb_get(txn, ix->jobs, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read job");
	v.mv_size = a->len;
	v.mv_data = (void *)a->data;
	rc = mdb_put(txn, handle_db(ix, a->db), &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write handle") : 0;
}

static int handle_get_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct handle_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	int rc = mdb_get(txn, handle_db(ix, a->db), &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read handle");
	if (v.mv_size > INDEX_HANDLE_MAX)
		return store_seterr(STORE_E_INDEX, "damaged job handle in '%s/data.mdb'", ix->dir);
	if (!(*a->out = malloc(v.mv_size ? v.mv_size : 1)))
		return -ENOMEM;
	memcpy(*a->out, v.mv_data, v.mv_size);
	*a->outlen = v.mv_size;
	return 0;
}

static int put_side(struct index *ix, MDB_txn *txn, const uint8_t *id, int db,
		    const void *data, size_t len)
{
	MDB_val k = {JOB_ID_LEN, (void *)id}, v = {len, (void *)data};
	int rc = mdb_put(txn, handle_db(ix, db), &k, &v, 0);

	return rc ? index_lmdb_err(ix, rc, db == 2 ? "write remote record" : "write handle") : 0;
}

/* index_job_update's change (index_change_job: the job read and put). */
static int update_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	const struct index_update *u = arg;
	uint8_t key[JOB_ID_LEN + 8];
	MDB_val k = {sizeof(key), key}, v;
	int rc;

	memcpy(key, j->id, JOB_ID_LEN);
	for (const char *p = u->lines, *end = u->len ? u->lines + u->len : p; p < end;) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n = (size_t)(nl - p) + 1; /* checked: every line ends so */
		be64_put(key + JOB_ID_LEN, j->log_size);
		v.mv_size = n;
		v.mv_data = (void *)p;
		if ((rc = mdb_put(txn, ix->logs, &k, &v, 0)) != 0)
			return index_lmdb_err(ix, rc, "append log");
		j->log_size += n;
		p += n;
	}
	/* Progress is a running job's only (as index_job_progress); for one
	 * that ended meanwhile it is left out, the rest still written. */
	if (u->progress >= 0 && j->status == JOB_RUNNING)
		j->progress = (uint16_t)u->progress;
	if (u->backend && (rc = index_job_set_runner(j, u->backend, u->model)) != 0)
		return rc;
	j->updated_ms = now_ms();
	if (u->handle && (rc = put_side(ix, txn, j->id, 0, u->handle, u->hlen)) != 0)
		return rc;
	return u->remote ? put_side(ix, txn, j->id, 2, u->remote, u->rlen) : 0;
}

static int update_check(const struct index_update *u)
{
	size_t at = 0;

	if (u->hlen > INDEX_HANDLE_MAX || u->rlen > INDEX_HANDLE_MAX)
		return store_seterr(-EFBIG, "a job's handle or remote record of %zu bytes is over %d",
				    u->hlen > u->rlen ? u->hlen : u->rlen, INDEX_HANDLE_MAX);
	if (u->progress > 1000)
		return store_seterr(-EINVAL, "progress %d is above 1000 thousandths", u->progress);
	if (u->len && (memchr(u->lines, '\0', u->len) || u->lines[u->len - 1] != '\n'))
		return store_seterr(-EINVAL, "log lines end with a newline and hold no NUL");
	while (at < u->len) {
		const char *nl = memchr(u->lines + at, '\n', u->len - at);
		if ((size_t)(nl - (u->lines + at)) > INDEX_LOG_LINE_MAX)
			return store_seterr(-EINVAL, "a log line is at most %d bytes",
					    INDEX_LOG_LINE_MAX);
		at = (size_t)(nl - u->lines) + 1;
	}
	return 0;
}

int index_job_update(struct index *ix, const uint8_t id[JOB_ID_LEN], const struct index_update *u)
{
	int rc = update_check(u);

	return rc ? rc : index_change_job(ix, id, update_change, (void *)u);
}

/* An update queued without waiting: its own copy of everything. */
struct update_async {
	struct index_update u;
	char *lines, *backend, *model, *handle, *remote; /* the copies u points to */
};

static void update_async_free(void *arg)
{
	struct update_async *x = arg;

	free(x->lines);
	free(x->backend);
	free(x->model);
	free(x->handle);
	free(x->remote);
	free(x);
}

static int update_async_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	return update_change(ix, txn, j, &((struct update_async *)arg)->u);
}

int index_job_update_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
			   const struct index_update *u,
			   void (*done)(void *arg, int rc, const char *err), void *arg)
{
	struct update_async *x;
	bool bad = false;
	int rc = update_check(u);

	if (rc)
		return rc;
	if (!(x = calloc(1, sizeof(*x))))
		return store_seterr(-ENOMEM, "out of memory");
	x->u = *u;
	x->u.lines = x->lines = index_copy(u->lines, u->len, &bad);
	x->u.backend = x->backend = index_copy(u->backend, u->backend ? strlen(u->backend) : 0, &bad);
	x->u.model = x->model = index_copy(u->model, u->model ? strlen(u->model) : 0, &bad);
	x->u.handle = x->handle = index_copy(u->handle, u->hlen, &bad);
	x->u.remote = x->remote = index_copy(u->remote, u->rlen, &bad);
	if (bad) {
		update_async_free(x);
		return store_seterr(-ENOMEM, "out of memory");
	}
	return index_change_job_async(ix, id, update_async_change, x, update_async_free, done,
				      arg);
}

int index_job_log_handle(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *lines,
			 size_t len, const void *handle, size_t hlen)
{
	struct index_update u = {.lines = lines, .len = len, .progress = -1, .handle = handle,
				 .hlen = hlen};

	return index_job_update(ix, id, &u);
}

/* A side record of db (0 handles, 1 creds, 2 remote): put and get. */
static int side_put(struct index *ix, const uint8_t id[JOB_ID_LEN], int db, const void *data,
		    size_t len)
{
	struct handle_arg a = {id, data, len, NULL, NULL, db};

	if (len > INDEX_HANDLE_MAX)
		return store_seterr(-EFBIG, "a job's %s record of %zu bytes is over %d",
				    db == 2 ? "remote" : "handle", len, INDEX_HANDLE_MAX);
	return index_write(ix, handle_put_fn, &a);
}

static int side_get(struct index *ix, const uint8_t id[JOB_ID_LEN], int db, void **out,
		    size_t *len)
{
	struct handle_arg a = {id, NULL, 0, out, len, db};

	*out = NULL;
	*len = 0;
	return index_read(ix, handle_get_fn, &a);
}

int index_job_handle_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const void *data,
			 size_t len)
{
	return side_put(ix, id, 0, data, len);
}

int index_job_handle_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len)
{
	return side_get(ix, id, 0, out, len);
}

int index_job_remote_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const void *data,
			 size_t len)
{
	return side_put(ix, id, 2, data, len);
}

int index_job_remote_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len)
{
	return side_get(ix, id, 2, out, len);
}

int index_job_creds_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len)
{
	return side_get(ix, id, 1, out, len);
}

int index_job_request(struct index *ix, const uint8_t id[JOB_ID_LEN], char **out, size_t *len)
{
	struct request_arg a = {id, NULL, 0};
	int rc = index_read(ix, request_fn, &a);

	if (rc == 0) {
		*out = a.out;
		*len = a.len;
	}
	return rc;
}
