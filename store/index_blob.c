/*
 * index_blob.c - blob records (BLAKE3 -> size, references, creation time,
 * media type): lookups, listing in hash order, prefix search. References
 * move with the jobs that hold them (index_blob_ref, index_queue.c).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "index.h"
#include "index_i.h"

struct blobget_arg {
	const uint8_t *hash;
	struct blob_info *out;
};

static int blobget_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct blobget_arg *a = arg;
	MDB_val k = {INDEX_HASH_LEN, (void *)a->hash}, v;
	int rc = mdb_get(txn, ix->blobs, &k, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read blob");
	return index_blob_decode(ix, &v, a->out);
}

int index_blob_get(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], struct blob_info *out)
{
	struct blobget_arg a = {hash, out};
	return index_read(ix, blobget_fn, &a);
}

struct bloblist_arg {
	const uint8_t *after;
	size_t max;
	uint8_t (*hashes)[INDEX_HASH_LEN];
	size_t n;
};

static int bloblist_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct bloblist_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k = {INDEX_HASH_LEN, (void *)a->after}, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->blobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "list blobs");
	rc = mdb_cursor_get(cur, &k, &v, a->after ? MDB_SET_RANGE : MDB_FIRST);
	while (rc == 0 && a->n < a->max) {
		if (k.mv_size == INDEX_HASH_LEN &&
		    (!a->after || memcmp(k.mv_data, a->after, INDEX_HASH_LEN) > 0))
			memcpy(a->hashes[a->n++], k.mv_data, INDEX_HASH_LEN);
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : index_lmdb_err(ix, rc, "list blobs");
}

int index_blob_list(struct index *ix, const uint8_t *after, size_t max,
		    uint8_t (*hashes)[INDEX_HASH_LEN], size_t *n)
{
	struct bloblist_arg a = {after, max, hashes, 0};
	int rc = index_read(ix, bloblist_fn, &a);

	*n = a.n;
	return rc;
}

struct prefix_arg {
	const uint8_t *prefix;
	size_t plen;
	uint8_t *hash;
};

static int prefix_fn(struct index *ix, MDB_txn *txn, void *arg)
{
	struct prefix_arg *a = arg;
	MDB_cursor *cur;
	MDB_val k = {a->plen, (void *)a->prefix}, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, ix->blobs, &cur)) != 0)
		return index_lmdb_err(ix, rc, "find blob");
	rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	if (rc == 0 && k.mv_size == INDEX_HASH_LEN && memcmp(k.mv_data, a->prefix, a->plen) == 0)
		memcpy(a->hash, k.mv_data, INDEX_HASH_LEN);
	else if (rc == 0 || rc == MDB_NOTFOUND)
		rc = STORE_E_NOTFOUND;
	else
		rc = index_lmdb_err(ix, rc, "find blob");
	mdb_cursor_close(cur);
	return rc;
}

int index_blob_find_prefix(struct index *ix, const uint8_t *prefix, size_t plen,
			   uint8_t hash[INDEX_HASH_LEN])
{
	struct prefix_arg a = {prefix, plen, hash};

	if (plen == 0 || plen > INDEX_HASH_LEN)
		return store_seterr(-EINVAL, "blob prefix of %zu bytes", plen);
	return index_read(ix, prefix_fn, &a);
}
