/*
 * store.h - the signed content-addressed store: the public face of store/.
 *
 * LAYOUT (SPEC §5):
 *   <store>/index/              LMDB environment (index.h)
 *   <store>/blobs/ab/<64 hex>   one immutable file per blob, mode 0444,
 *                               named by the BLAKE3 of its content
 *   <store>/tmp/                outputs being written
 *   <store>/keys/<KEYID>.key    minisign secret keys, 0600 (sign.h)
 *   <store>/keys/<KEYID>.pub    minisign public keys, kept across rotation
 *
 * WRITE PATH: a sink hashes bytes as they come, holding up to 1 MiB in
 * memory and streaming more into a file of tmp/ (unnamed where the file
 * system allows: blob.c); committing it fsyncs the file (written now if
 * it was held), links or renames it to blobs/xx/<hex> (or drops it when
 * that content is already stored), fsyncs the directory, then commits the
 * index transaction that gives the job its output (waited for, or queued under
 * the blob's lock and committed before or with the job's end). A crash at
 * any point leaves either no trace or an unreferenced file that the next
 * store_open() collects; never a job pointing at a missing or partial
 * blob.
 *
 * READ PATH: store_blob_open() verifies the content against its name
 * before handing out a descriptor; a mismatch (bit rot, tampering) or a
 * missing file is STORE_E_CORRUPT, logged and counted, never data. For
 * large blobs, store_reader_*() verify each 1 MiB group as it is read
 * against group chaining values that were checked against the name once
 * (blake3.h, groups), so reopening a large blob costs no full pass.
 *
 * Thread safety: every function may be called from any thread once
 * store_open() has returned. A struct store_sink belongs to one thread.
 * A process opens a given store once: LMDB's locks are per process, so a
 * second open of the same environment in one process (including
 * store_fsck() or a read-only open) is not allowed; use another process,
 * as `renderctl fsck` does. Two processes can never both open a store
 * read-write (-EBUSY): recovery assumes it is alone.
 */
#ifndef RENDERFS_STORE_H
#define RENDERFS_STORE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "blake3.h"
#include "err.h"
#include "index.h"
#include "sign.h"

struct store;
struct store_sink;

struct store_options {
	uint32_t max_attempts; /* recovery: runs before "interrupted"; 0: 3 */
	uint64_t map_size;     /* LMDB map size; 0: default */
	const char *keyfile;   /* sign with this secret key instead of keys/ */
	unsigned hash_threads; /* threads for verifying blobs; 0: 2 */
	bool read_only;	       /* no recovery, no key creation, no writes */
};

struct store_recovery {
	uint64_t requeued, interrupted, completed; /* running jobs at the crash */
	uint64_t tmp_removed;		/* partial outputs in tmp/ */
	uint64_t blobs_collected;	/* blob files no index entry refers to,
					   moved to lost+found/ */
};

/*
 * Open the store in dir, creating it if needed. Unless read_only, recover
 * from a crash first (see struct store_recovery) and make a signing key if
 * the store has none. Errors name the file at fault (store_lasterr()).
 */
int store_open(const char *dir, const struct store_options *opt, struct store **out);
void store_close(struct store *st);

struct index *store_index(struct store *st);
const char *store_dir(struct store *st);
void store_get_recovery(struct store *st, struct store_recovery *r);

/* ---- blobs ---- */

int store_sink_open(struct store *st, struct store_sink **out);
int store_sink_write(struct store_sink *s, const void *buf, size_t len);
/*
 * For writers that need a file of their own (encoders that seek): the
 * sink's file in tmp/, made by name now, which the writer may fill or
 * recreate by path instead of calling store_sink_write(); then
 * store_sink_adopt_file() hashes what the file holds, and the sink
 * commits it as usual. *path lives as long as the sink. Fails if the file
 * cannot be made or the sink was written to.
 */
int store_sink_path(struct store_sink *s, const char **path);
int store_sink_adopt_file(struct store_sink *s);
/* Drop a sink without storing anything. */
void store_sink_abort(struct store_sink *s);

/*
 * Store the sink's content as job's output (see WRITE PATH) and free the
 * sink, whatever the result. hash_out (may be NULL) receives the blob id.
 */
int store_job_commit_output(struct store *st, const uint8_t job[JOB_ID_LEN],
			    struct store_sink *s, const char *media_type, const char *device,
			    uint8_t hash_out[B3_OUT_LEN]);
/*
 * The same with the index write that attaches the blob queued, not waited
 * for (index_job_attach_output_async): for a run whose end is written
 * next, in the write it waits for. The blob file is durable when this
 * returns 0; failed(job, why) is called if the reference cannot be
 * written (then the job's end cannot complete it), by the thread that
 * tried to commit it.
 */
int store_job_commit_output_queued(struct store *st, const uint8_t job[JOB_ID_LEN],
				   struct store_sink *s, const char *media_type,
				   const char *device, uint8_t hash_out[B3_OUT_LEN],
				   void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err));
/* The same for output n (>= 1) after the first (output.n.<ext>). */
int store_job_commit_extra(struct store *st, const uint8_t job[JOB_ID_LEN], unsigned n,
			   struct store_sink *s, const char *media_type, uint8_t hash_out[B3_OUT_LEN]);

/*
 * Write data as a blob file (durable), without an index entry: the
 * caller's index write that follows references it (an attestation;
 * until then store_gc() would take it to lost+found). hash: its BLAKE3.
 */
int store_blob_write(struct store *st, const void *data, size_t len, uint8_t hash[B3_OUT_LEN]);

/*
 * Replication (SPEC §12). fetched: a blob fetched from the bucket into a
 * sink is kept when it hashes to want (else STORE_E_CORRUPT, nothing
 * kept) and check (may be NULL; its signature) returns 0 for it, durably,
 * and the index knows its file is here (index_replica_fetched); frees
 * the sink. drop: the cache lets go of a confirmed blob's file
 * (index_replica_drop, then the file goes).
 */
int store_blob_fetched(struct store *st, struct store_sink *s, const uint8_t want[B3_OUT_LEN],
		       const char *media_type, int (*check)(void *arg, uint64_t size), void *arg);
int store_blob_drop(struct store *st, const uint8_t hash[B3_OUT_LEN], uint64_t *size);
/* The trusted comment of a blob's own signature (cas/<hex>.minisig). */
void store_blob_trusted(const uint8_t hash[B3_OUT_LEN], uint64_t size, char *buf, size_t len);

/* Path of a blob file: <store>/blobs/ab/<hex>. */
void store_blob_path(struct store *st, const uint8_t hash[B3_OUT_LEN], char *buf,
		     size_t bufsz);

/*
 * Open a blob for reading after verifying that its content hashes to its
 * name. *fd_out is the caller's to close. STORE_E_NOTFOUND: no such blob in
 * the index; STORE_E_CORRUPT: the file is missing, has the wrong size, or
 * its content does not match.
 */
int store_blob_open(struct store *st, const uint8_t hash[B3_OUT_LEN], int *fd_out,
		    uint64_t *size_out);

/*
 * Verified reads without a full pass per open (READ PATH): a reader checks
 * each 1 MiB group it serves against the group values of the blob, which
 * were checked against its hash once (blake3.h, groups). The first open
 * of a large blob since the store opened makes that one full pass, unless
 * the blob was committed since; so does the first open after the file
 * changed (another inode, or a new ctime). pread returns the bytes read (0 at the
 * end) or a negative code: STORE_E_CORRUPT for content that does not
 * match (logged, counted), never data. A reader may be used by several
 * threads (reads are serialized); close it with store_reader_close().
 */
struct store_reader;
int store_reader_open(struct store *st, const uint8_t hash[B3_OUT_LEN], struct store_reader **out,
		      uint64_t *size_out);
ssize_t store_reader_pread(struct store_reader *r, void *buf, size_t len, uint64_t off);
void store_reader_close(struct store_reader *r);
/* The reader's blob file (read only), for a caller that hands it on. */
int store_reader_fd(const struct store_reader *r);

/* Delete a job (index_job_delete) and the blob file it was the last user of. */
int store_job_delete(struct store *st, const uint8_t job[JOB_ID_LEN]);

/* index_job_hide(), unlinking the blob file when it was the last user. */
int store_job_hide(struct store *st, const uint8_t job[JOB_ID_LEN], uint16_t mask,
		   bool release_output);

/* Where stray files of blobs/ go: never deleted, since a damaged index
 * may have lost the entry of a blob a job still names. */
#define STORE_LOST_FOUND "lost+found"

/* Move blob files that no index entry refers to (and anything else in
 * blobs/ that is not a blob) into <store>/lost+found/. */
int store_gc(struct store *st, uint64_t *collected);

/*
 * Put back into blobs/ the files of lost+found/ that are named by the
 * hash of their content and by the output of at least one job, entering
 * them in the index with the number of jobs naming them as their
 * reference count (for `renderctl fsck --adopt`, store not mounted).
 * *adopted counts them; each is reported on out.
 */
int store_adopt(struct store *st, FILE *out, uint64_t *adopted);

/* ---- signatures ---- */

/* The current signing key's public half. */
void store_pubkey(struct store *st, struct sign_pubkey *pk);

/*
 * Signature file text for the content of fd, made with the current key and
 * the given trusted comment. Returns the length or a negative code.
 */
int store_sign_fd(struct store *st, int fd, const char *trusted, char *buf, size_t bufsz);

/* The same for content in memory. */
int store_sign_buf(struct store *st, const void *data, size_t len, const char *trusted,
		   char *buf, size_t bufsz);

/* Make a new signing key; older public keys stay in keys/. */
int store_key_rotate(struct store *st);

/*
 * Credentials sealed at rest (seal.c): *out malloc'ed (store_seal) or a
 * locked, wiped-on-free buffer, NUL-terminated (store_unseal; free with
 * store_unsealed_free).
 */
int store_seal(struct store *st, const void *plain, size_t len, uint8_t **out, size_t *outlen);
int store_unseal(struct store *st, const void *sealed, size_t len, uint8_t **out,
		 size_t *outlen);
void store_unsealed_free(uint8_t *p);

/* The store's webhook key (SPEC §13, v1a): its Ed25519 public key, and a
 * signature of msg. -EROFS for a read-only store that never made one. */
int store_webhook_pubkey(struct store *st, uint8_t pk[32]);
int store_webhook_sign(struct store *st, const void *msg, size_t len, uint8_t sig[64]);
/* Owner uid's webhook secret (v1, HMAC-SHA256), made on first use. */
int store_user_secret(struct store *st, uint32_t uid, uint8_t secret[32]);

/* ---- statistics ---- */

struct store_stats {
	uint64_t blobs_written;	     /* new blob files */
	uint64_t dedup_hits;	     /* commits whose content was already stored */
	uint64_t integrity_failures; /* verifications that failed */
	uint64_t bytes_written;
};
void store_get_stats(struct store *st, struct store_stats *s);

/* ---- checking ---- */

/*
 * Check a store offline: rehash every blob, cross-check blobs, jobs, queue
 * and key files. Writes one line per problem to out ("problem: ...") and
 * per harmless leftover ("note: ..."). Returns the number of problems, or
 * a negative code if the store cannot be examined at all.
 */
long store_fsck(const char *dir, FILE *out);

#endif
