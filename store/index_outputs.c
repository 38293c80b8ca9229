/*
 * index_outputs.c - what a job has besides its first output: outputs
 * after the first (extras: attach, hide one, list), the service's result
 * (results), and the blobs its request names (inputs: decode, list; they
 * are written with the job, index.c, and given back by delete,
 * index_queue.c). Each change is one durable write (index_write), as in
 * index_queue.c.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

struct extra_arg {
	unsigned n;
	const uint8_t *hash;
	uint64_t size;
	const char *media_type;
	const char *text; /* or a result.json */
	size_t len;
};

void index_extra_key(const uint8_t id[JOB_ID_LEN], unsigned n, uint8_t key[JOB_ID_LEN + 2])
{
	memcpy(key, id, JOB_ID_LEN);
	key[JOB_ID_LEN] = (uint8_t)(n >> 8);
	key[JOB_ID_LEN + 1] = (uint8_t)n;
}

static int extra_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct extra_arg *a = arg;
	uint8_t key[JOB_ID_LEN + 2], val[INDEX_HASH_LEN + 9 + 128];
	MDB_val k = {sizeof(key), key}, v;
	bool freed = false;
	size_t ml = strlen(a->media_type);
	int rc;

	if (j->status != JOB_RUNNING && j->status != JOB_QUEUED)
		return index_state_err(j, "attach an output to");
	index_extra_key(j->id, a->n, key);
	if ((rc = mdb_get(txn, ix->extras, &k, &v)) == 0) {
		/* From an earlier attempt that failed after it: the same one
		 * stays; another replaces it (the old blob, if now unused,
		 * is collected as a stray). */
		if (v.mv_size >= INDEX_HASH_LEN + 9 &&
		    memcmp(v.mv_data, a->hash, INDEX_HASH_LEN) == 0)
			return 0;
		if (v.mv_size < INDEX_HASH_LEN + 9)
			return store_seterr(STORE_E_INDEX, "damaged output record in '%s'",
					    ix->dir);
		uint8_t old[INDEX_HASH_LEN];
		memcpy(old, v.mv_data, INDEX_HASH_LEN);
		if ((rc = index_blob_ref(ix, txn, old,
					 le64_get((const uint8_t *)v.mv_data + INDEX_HASH_LEN), "",
					 j->uid, j->id, -1, &freed)) != 0)
			return rc;
	} else if (rc != MDB_NOTFOUND) {
		return index_lmdb_err(ix, rc, "read outputs");
	}
	if ((rc = index_blob_ref(ix, txn, a->hash, a->size, a->media_type, j->uid, j->id, 1,
				 &freed)) != 0)
		return rc;
	memcpy(val, a->hash, INDEX_HASH_LEN);
	le64_put(val + INDEX_HASH_LEN, a->size);
	val[INDEX_HASH_LEN + 8] = 0;
	memcpy(val + INDEX_HASH_LEN + 9, a->media_type, ml);
	v.mv_size = INDEX_HASH_LEN + 9 + ml;
	v.mv_data = val;
	if ((rc = mdb_put(txn, ix->extras, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write outputs");
	j->flags |= JOB_F_EXTRAS;
	j->updated_ms = now_ms();
	return 0;
}

int index_job_attach_extra(struct index *ix, const uint8_t id[JOB_ID_LEN], unsigned n,
			   const uint8_t hash[INDEX_HASH_LEN], uint64_t size, const char *media_type)
{
	struct extra_arg a = {n, hash, size, media_type, NULL, 0};

	if (n < 1 || n > INDEX_EXTRAS_MAX)
		return store_seterr(-E2BIG, "outputs are numbered from 1 to %d", INDEX_EXTRAS_MAX);
	if (strlen(media_type) > 127)
		return store_seterr(-EINVAL, "media type longer than 127 bytes");
	return index_change_job(ix, id, extra_change, &a);
}

int index_result_store(struct index *ix, MDB_txn *txn, struct job *j, const char *text,
		       size_t len)
{
	MDB_val k = {JOB_ID_LEN, j->id}, v = {len, (void *)text};
	int rc;

	if ((rc = mdb_put(txn, ix->results, &k, &v, 0)) != 0)
		return index_lmdb_err(ix, rc, "write result");
	j->flags |= JOB_F_RESULT;
	j->updated_ms = now_ms();
	return 0;
}

static int result_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct extra_arg *a = arg;

	if (j->status != JOB_RUNNING && j->status != JOB_QUEUED)
		return index_state_err(j, "attach a result to");
	return index_result_store(ix, txn, j, a->text, a->len);
}

int index_job_result_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *text,
			 size_t len)
{
	struct extra_arg a = {0, NULL, 0, NULL, text, len};

	if (len > INDEX_RESULT_MAX)
		return store_seterr(-EFBIG, "a result of %zu bytes is over %d", len,
				    INDEX_RESULT_MAX);
	return index_change_job(ix, id, result_change, &a);
}

struct hide_extra_arg {
	unsigned n;
	uint8_t mask;
};

static int hide_extra_change(struct index *ix, MDB_txn *txn, struct job *j, void *arg)
{
	struct hide_extra_arg *a = arg;
	uint8_t key[JOB_ID_LEN + 2], *val;
	MDB_val k = {sizeof(key), key}, v;
	int rc;

	index_extra_key(j->id, a->n, key);
	if ((rc = mdb_get(txn, ix->extras, &k, &v)) == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read outputs");
	if (v.mv_size < INDEX_HASH_LEN + 9)
		return store_seterr(STORE_E_INDEX, "damaged output record in '%s'", ix->dir);
	if (!(val = malloc(v.mv_size)))
		return -ENOMEM;
	memcpy(val, v.mv_data, v.mv_size);
	val[INDEX_HASH_LEN + 8] |= a->mask;
	v.mv_data = val;
	rc = mdb_put(txn, ix->extras, &k, &v, 0);
	free(val);
	if (rc)
		return index_lmdb_err(ix, rc, "write outputs");
	j->updated_ms = now_ms();
	return 0;
}

int index_job_hide_extra(struct index *ix, const uint8_t id[JOB_ID_LEN], unsigned n,
			 uint8_t mask)
{
	struct hide_extra_arg a = {n, mask};

	return index_change_job(ix, id, hide_extra_change, &a);
}

struct extras_arg {
	const uint8_t *id;
	struct job_output *out;
	size_t max, *n;
	char **text;
	size_t *len;
};

static int extras_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct extras_arg *a = arg;
	uint8_t key[JOB_ID_LEN + 2];
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	*a->n = 0;
	index_extra_key(a->id, 1, key);
	k.mv_size = sizeof(key);
	k.mv_data = key;
	if ((rc = mdb_cursor_open(txn, ix->extras, &cur)) != 0)
		return index_lmdb_err(ix, rc, "read outputs");
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && *a->n < a->max;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct job_output *o = &a->out[*a->n];
		size_t ml;
		if (k.mv_size != JOB_ID_LEN + 2 || memcmp(k.mv_data, a->id, JOB_ID_LEN) != 0)
			break;
		if (v.mv_size < INDEX_HASH_LEN + 9 || (ml = v.mv_size - INDEX_HASH_LEN - 9) > 127) {
			mdb_cursor_close(cur);
			return store_seterr(STORE_E_INDEX, "damaged output record in '%s'",
					    ix->dir);
		}
		memcpy(o->hash, v.mv_data, INDEX_HASH_LEN);
		o->size = le64_get((const uint8_t *)v.mv_data + INDEX_HASH_LEN);
		o->hidden = ((const uint8_t *)v.mv_data)[INDEX_HASH_LEN + 8];
		memcpy(o->media_type, (const uint8_t *)v.mv_data + INDEX_HASH_LEN + 9, ml);
		o->media_type[ml] = '\0';
		(*a->n)++;
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "read outputs");
}

int index_job_extras(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job_output *out,
		     size_t max, size_t *n)
{
	struct extras_arg a = {id, out, max, n, NULL, NULL};

	*n = 0;
	return index_read(ix, extras_fn, &a);
}

static int result_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct extras_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	int rc = mdb_get(txn, ix->results, &k, &v);

	if (rc == MDB_NOTFOUND)
		return STORE_E_NOTFOUND;
	if (rc)
		return index_lmdb_err(ix, rc, "read result");
	if (!(*a->text = malloc(v.mv_size + 1)))
		return -ENOMEM;
	memcpy(*a->text, v.mv_data, v.mv_size);
	(*a->text)[v.mv_size] = '\0';
	*a->len = v.mv_size;
	return 0;
}

int index_job_result_get(struct index *ix, const uint8_t id[JOB_ID_LEN], char **out, size_t *len)
{
	struct extras_arg a = {id, NULL, 0, NULL, out, len};

	*out = NULL;
	*len = 0;
	return index_read(ix, result_fn, &a);
}


int index_inputs_decode(const MDB_val *v, struct job_input *in, size_t max, size_t *n)
{
	const uint8_t *p = v->mv_data, *end = p + v->mv_size;
	size_t count;

	*n = 0;
	if (v->mv_size < 1)
		return STORE_E_INDEX;
	count = *p++;
	if (count > INDEX_INPUTS_MAX)
		return STORE_E_INDEX;
	for (size_t i = 0; i < count; i++) {
		size_t fl;
		if (end - p < INDEX_HASH_LEN + 8 + 1)
			return STORE_E_INDEX;
		struct job_input x;
		memcpy(x.hash, p, INDEX_HASH_LEN);
		x.size = le64_get(p + INDEX_HASH_LEN);
		fl = p[INDEX_HASH_LEN + 8];
		p += INDEX_HASH_LEN + 9;
		if (fl >= INDEX_FIELD_MAX || (size_t)(end - p) < fl)
			return STORE_E_INDEX;
		memcpy(x.field, p, fl);
		x.field[fl] = '\0';
		p += fl;
		memset(x.made_by, 0, sizeof(x.made_by));
		if (i < max)
			in[i] = x;
	}
	*n = count < max ? count : max;
	if (p == end)
		return 0; /* format 12: no producers */
	if ((size_t)(end - p) != count * JOB_ID_LEN)
		return STORE_E_INDEX;
	for (size_t i = 0; i < count && i < max; i++)
		memcpy(in[i].made_by, p + i * JOB_ID_LEN, JOB_ID_LEN);
	return 0;
}

struct inputs_arg {
	const uint8_t *id;
	struct job_input *in;
	size_t max, *n;
};

static int inputs_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct inputs_arg *a = arg;
	MDB_val k = {JOB_ID_LEN, (void *)a->id}, v;
	int rc = mdb_get(txn, ix->inputs, &k, &v);

	if (rc == MDB_NOTFOUND)
		return 0;
	if (rc)
		return index_lmdb_err(ix, rc, "read inputs");
	if (index_inputs_decode(&v, a->in, a->max, a->n) != 0)
		return store_seterr(STORE_E_INDEX, "damaged inputs of a job in '%s'", ix->dir);
	return 0;
}

int index_job_inputs(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job_input *in,
		     size_t max, size_t *n)
{
	struct inputs_arg a = {id, in, max, n};

	*n = 0;
	return index_read(ix, inputs_fn, &a);
}
