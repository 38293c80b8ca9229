/*
 * store_i.h - struct store, shared by store.c and blob.c.
 */
#ifndef RENDERFS_STORE_I_H
#define RENDERFS_STORE_I_H

#include <pthread.h>
#include <sys/stat.h>
#include <stdatomic.h>

#include "store.h"

#define CV_CACHE 64 /* blobs whose group values are kept */

int store_seal_key_load(struct store *st);

struct store {
	char dir[4096];
	struct index *ix;
	struct store_options opt;
	struct store_recovery recovery;
	int lock_fd; /* <store>/lock, flock()ed exclusively while open read-write */
	/* How a sink's unnamed file (O_TMPFILE) is linked into blobs/, as
	 * store_link_probe() found at open; NONE: sinks use named files. */
	enum { STORE_LINK_NONE, STORE_LINK_EMPTY_PATH, STORE_LINK_PROC } link_mode;

	/*
	 * Serialize changes to the blobs/ namespace with the index entries
	 * that justify them, one lock per stripe of hashes (blob_lock(): the
	 * hash's first byte): a commit holds its blob's from the index check
	 * through rename to index commit, a removal (drop) from index change
	 * to unlink, so a file is never removed between being renamed in and
	 * being referenced. What can free blobs it learns of only inside the
	 * index write (a job's hide or delete) and collection take them all,
	 * in order (blob_lock_all). Commits of different blobs go on side by
	 * side, so their index writes meet in one group commit; a new blob's
	 * bytes are flushed before its lock is taken.
	 */
#define BLOB_LOCKS 64
	pthread_mutex_t blob_mu[BLOB_LOCKS];

	/* Protected by key_mu (readers sign; rotation writes): sk, pk. */
	pthread_rwlock_t key_mu;
	struct sign_seckey sk;
	struct sign_pubkey pk;

	/* seal.c: keys/credentials.seal, read or made at open, read-only after. */
	uint8_t seal_key[32];
	bool have_seal_key;
	uint8_t hook_pk[32], hook_sk[64]; /* webhook key (keys/webhook.seed) */
	bool have_hook_key;

	atomic_uint_fast64_t blobs_written, dedup_hits, integrity_failures, bytes_written;

	/* The group cache of blob.c (verified reads). Protected by cv_mu. */
	pthread_mutex_t cv_mu;
	struct cv_entry {
		uint8_t hash[B3_OUT_LEN];
		uint64_t ino, size, used;
		int64_t ctime_ns; /* with ino: the file checked; a change makes a miss */
		uint8_t (*cvs)[B3_OUT_LEN]; /* NULL: a free slot */
		size_t n;
	} cv_cache[CV_CACHE];
	uint64_t cv_clock;
};

void cv_cache_put(struct store *st, const uint8_t hash[B3_OUT_LEN], const struct stat *sb,
		  uint64_t size, const uint8_t (*cvs)[B3_OUT_LEN], size_t n);
void cv_cache_release(struct store *st);

/* blob.c: remove every file in tmp/, counting them. */
int store_clear_tmp(struct store *st, uint64_t *removed);
/* blob.c: set st->link_mode by trying it in tmp/ (at open, tmp/ cleared). */
void store_link_probe(struct store *st);

#endif
