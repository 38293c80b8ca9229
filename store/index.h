/*
 * index.h - the LMDB index of the store: jobs, the run queue, blobs, names,
 * request digests, job logs and store metadata.
 *
 * One LMDB environment (<store>/index) with named databases. Every index
 * lives here, nothing in RAM, so the daemon's memory does not depend on
 * the number of jobs or blobs. Every mutating call is durable when it
 * returns 0: writes from concurrent callers are grouped into one LMDB
 * transaction committed with one sync (group commit), each caller's change
 * in its own nested transaction so that one caller's failure never undoes
 * another's.
 *
 * Thread safety: every function may be called from any thread. Returned
 * struct job values are copies owned by the caller (job_release()).
 *
 * DATABASES (keys and values; integers big-endian in keys so that byte
 * order is numeric order, little-endian in values). "Sets" are LMDB
 * MDB_DUPSORT | MDB_DUPFIXED databases: one key, many fixed-size sorted
 * values, stored packed (no per-entry header), about 16-25 bytes a job:
 *   meta     "version" -> u32 format version (INDEX_FORMAT_VERSION)
 *            "store_id" -> 16 random bytes (inode generation)
 *            "next_seq" -> u64 next job sequence number
 *            "signing_key" -> 8-byte key number of the current key
 *   jobs     id (16) -> job record (below)
 *   requests id (16) -> normalized request JSON
 *   queue    set: group (1) -> 255 - priority (1) | round (8) | id (16)
 *   fair     group (1) -> u64 queued jobs in the group
 *            uid (4) -> u64 queued jobs of the owner, all groups
 *            group (1) | priority (1) -> u64 round of the last claimed job
 *            group (1) | priority (1) | uid (4) -> u64 owner's next round
 *   running  id (16) -> empty: jobs claimed and not finished
 *   byroute  set: route -> id (16)
 *   byowner  set: uid (4) -> id (16)
 *   byseq    set: seq >> 16 (8) -> seq & 0xffff (2) | id (16)
 *   names    route | NUL | name | NUL | owner uid (4) -> id (16)
 *   blobusers BLAKE3 (32) | uid (4) -> u64 jobs of that owner whose
 *            output it is (lets `private` mounts answer "may this user
 *            read this blob" without walking the user's jobs)
 *   handles  id (16) -> a backend's durable handle for the job (what it
 *            needs to find its remote work again after a restart: a
 *            request id, status URLs), at most INDEX_HANDLE_MAX bytes;
 *            dropped when the job reaches a final state
 *   creds    id (16) -> the job's credentials sealed (store_seal: nonce and
 *            secretbox of a JSON object), written with the job and wiped
 *            when it reaches a final state; nothing else holds them
 *   extras   id (16) | n (2, BE, from 1) -> output n after the first
 *            (output.n.<ext>, SPEC §3): BLAKE3 (32), size (8 LE), hidden
 *            (1: bit 0 the file, bit 1 its signature, unlinked by the
 *            owner), media type; a blob reference each, like the first
 *            output's (kept until the job is deleted)
 *   results  id (16) -> result.json: the service's whole result, file
 *            URLs replaced by cas:<hex> (at most INDEX_RESULT_MAX bytes)
 *   inputs   id (16) -> the blobs its request names (cas:<hex>, SPEC §3),
 *            each a reference on the blob (its count and its owner's user
 *            count, as an output's) until the job is deleted: a count (1),
 *            then per input: BLAKE3 (32), size (8 LE), field length (1),
 *            field (where in the request: "image_url", "frames[2]");
 *            then (format 13) per input the id (16) of the job whose
 *            output made the blob (zero: unknown)
 *   made     BLAKE3 (32) -> id (16) of the job whose output first made
 *            the blob (the chain of a pipeline); forgotten when that job
 *            lets go of it or the blob goes
 *   remote   id (16) -> what a remote service said of the job, as JSON
 *            (request_id, model_version, position): kept with the job,
 *            for position, status.json and the manifest
 *   rgroups  route -> group (1): the queue group of a remote route, given
 *            once and kept, so that each remote route has its own queue
 *            (its concurrency and circuit breaker hold back only its jobs)
 *   delayed  not_before ms (8) | id (16) -> empty: queued jobs that may
 *            not run before that time (retries after transient failures)
 *   counts   route -> INDEX_STATUSES u64: its jobs in each status, kept by
 *            every write of a job record (index_put_job) and its delete,
 *            so that no mount counts jobs (start-up is not O(jobs))
 *   digests  request digest (32) -> id (16) of a complete job
 *   logs     id (16) | byte offset of the line (8) -> line bytes
 *   blobs    BLAKE3 (32) -> blob record (below)
 *   hooks    id (16) -> a job's webhook (SPEC §13): events (1, bit per
 *            enum hook_event), time of the last progress delivery (8 LE),
 *            the URL
 *   deliveries  webhook-id (16, a ULID) -> delivery record (below)
 *   hookdue  next attempt ms (8) | webhook-id (16) -> empty: pending
 *            deliveries in the order they are due
 *   jobhooks set: job id (16) -> webhook-id (16): a job's deliveries
 *   hookatt  webhook-id (16) | n (2, BE) -> attempt n: at ms (8 LE),
 *            duration ms (4 LE), HTTP status (2 LE, 0: no answer), what
 *            happened in words (the last HOOK_ATTEMPTS_KEPT are kept)
 *   usersecrets uid (4) -> the owner's webhook secret, sealed (store_seal)
 *   journal  completed ms (8) | id (16) -> ledger entry (below): one per
 *            job that reached a final state, written in the transaction
 *            of that state (SPEC §14); kept when the job is deleted or
 *            retried (its usage happened)
 *   usage    uid (4) | day (4, days since the epoch, UTC) | kind (1) |
 *            name -> u64 LE: the journal's totals per owner and day, kind
 *            'j' jobs (name: route NUL outcome), 's' milliseconds run
 *            (name: device kind), 'b' output bytes, 'c' cache hits
 *   ledger   end ms (8) -> attestation record (below): signed period
 *            totals, in chain order
 *   outbox   seq (8) -> outbox record (below): an object to put in the
 *            replica bucket (SPEC §12), written in the transaction that
 *            made what it copies, removed once the bucket has it
 *   replicated BLAKE3 (32) -> confirmed ms (8 LE), last read ms (8 LE),
 *            flags (1: bit 0 the file is here, bit 1 the cache's own
 *            reference holds the record, bit 2 its signature is in the
 *            bucket too), checksum: blobs the bucket has
 *   lru      last read ms (8) | BLAKE3 (32) -> empty: confirmed and signed
 *            blobs whose files are here, in the order the cache drops them
 *   pins     BLAKE3 (32) -> u64 LE: jobs not finished that name the blob
 *            as an input, and attestations whose file it is (the cache
 *            never drops it while any do)
 *   meta also holds "outbox_next", "outbox_n", "outbox_bytes" (u64 LE:
 *            the outbox's next seq, entries and blob bytes) and
 *            "local_bytes" (bytes of the blob files here)
 *
 * The request digest (index_request_digest()) is not stored with the job:
 * it is computed from the route and the stored request (and the owner,
 * with memoization per owner) when needed.
 *
 * JOB RECORD (value in "jobs"):
 *   OFFSET SIZE DESCRIPTION
 *   0      4    magic "RJ3\0"
 *   4      1    status (enum job_status)
 *   5      1    priority (enum job_priority)
 *   6      1    worker group
 *   7      1    flags (JOB_F_*)
 *   8      4    owner uid
 *   12     4    owner gid
 *   16     4    attempts: runs started
 *   20     2    progress in thousandths, 0..1000
 *   22     2    hidden: job files the owner unlinked (bit n: file n of fs/)
 *   24     8    seq: persistent job number (for inode numbers)
 *   32     8    created_at, milliseconds since the epoch
 *   40     8    started_at (0: never started)
 *   48     8    completed_at (0: not finished)
 *   56     8    updated_at: last change of status, progress or log
 *   64     8    timeout in milliseconds (0: the route's default)
 *   72     8    log size in bytes
 *   80     8    fair-share round of its queue entry (while queued), or
 *               with JOB_F_DELAYED the time it may run from (ms)
 *   88     32   output BLAKE3 (zero without output)
 *   120    8    output size
 *   128    ...  strings, each a length (LEB128: one byte below 128, two
 *               up to INDEX_STR_MAX) then the bytes, in this order:
 *               route, name, media type, device, error code, error message,
 *               backend, model
 *   ...    (RJ4) run_ms (8 LE), then the string ran_on
 *   end-8  8    checksum: the first 8 bytes of the BLAKE3 of all before it
 *
 * Records are "RJ4\0" since index format 15 (RJ3 read: run_ms 0,
 * ran_on ""), "RJ3\0" from format 6; "RJ2\0" (format 2 to 5) has
 * the same layout without the last two strings and is read as is (they
 * are then empty); a record is rewritten as RJ3 when next written.
 *
 * NAMES: a job's name is unique per route, or per route and owner when
 * the index is told so (index_set_names_per_owner(), `private` mounts);
 * the owner in the key serves both, so one store may be mounted either
 * way. Mounted shared after a private mount, a name several owners hold
 * resolves to the lowest uid's job (index_name_lookup()).
 *
 * DELIVERY RECORD (value in "deliveries"):
 *   0      4    magic "RW1\0"
 *   4      1    state (enum hook_state)
 *   5      1    event (enum hook_event)
 *   6      2    attempts in all (LE)
 *   8      2    attempts in the current schedule (LE; redeliver resets it)
 *   10     2    HTTP status of the last attempt (LE; 0: none, no answer)
 *   12     4    owner uid (LE)
 *   16     16   job id
 *   32     8    event time, ms
 *   40     8    next attempt, ms (pending only)
 *   48     2    URL length (LE)
 *   50     4    snapshot length (LE)
 *   54     ...  URL, then the job record as the change left it (what
 *               the delivery's body says, whatever happens to the job
 *               later)
 *   end-8  8    checksum, as in job records
 * A delivery is written in the transaction of the job change it reports
 * (index_put_job); it outlives its job while it is pending, and goes
 * with it once it has ended.
 *
 * LEDGER ENTRY (value in "journal"):
 *   0      4    owner uid (LE)
 *   4      1    outcome (enum job_status, final)
 *   5      1    flags: bit 0 served from the cache
 *   6      8    run ms (LE)
 *   14     8    output bytes (LE)
 *   22     ...  strings as in job records: route, device kind
 *   end-8  8    checksum
 *
 * ATTESTATION RECORD (value in "ledger"):
 *   0      8    period start ms (LE; the period is start < t <= end)
 *   8      32   BLAKE3 of the attestation (a blob: its JSON)
 *   40     8    its size (LE)
 *   48     ...  strings: name (<period>), signature file text (.minisig)
 *   end-8  8    checksum
 * Each attestation holds a reference on its blob (owner uid 0).
 *
 * OUTBOX RECORD: kind (1, enum outbox_kind), id (32), size (8 LE),
 * enqueued ms (8 LE), not before ms (8 LE), attempts (4 LE), checksum.
 *
 * FORMAT 15 had no replication (outbox, replicated, lru, local_bytes,
 * which its upgrade sums from the blob records); FORMAT 14 had no usage ledger (journal, usage, ledger; its final jobs
 * enter the journal at the upgrade); FORMAT 13 had no webhooks (hooks, deliveries, hookdue, jobhooks,
 * hookatt, usersecrets); FORMAT 12 had no made (input records had no producers); FORMAT 11 had no extras or results; FORMAT 10 had no inputs; FORMAT 9 had no remote; FORMAT 8 had no creds; FORMAT 7 had no rgroups (remote jobs shared group 1); FORMAT 6 had no handles; FORMAT 5 wrote RJ2 records only; FORMAT 4 had no delayed set; FORMAT 3 no counts; FORMAT 2 (renderfs before index format 3) keyed
 * names by route and name only and had no blobusers. A read-write open
 * runs the migration steps from the index's format on (index.c,
 * migrations[]), each rebuilding what it adds from the job records, all
 * in one transaction.
 *
 * FORMAT 1 (renderfs before index format 2) had the same databases with
 * one entry per job in queue, byroute (route | NUL | id), byowner (uid |
 * id) and byseq (seq -> id), and job records "RJ1\0" with the request
 * digest at 88, the output at 120 and 152, strings from 160 with u32
 * lengths: about 520 bytes a queued job against about 400. A read-write
 * open upgrades a format-1 index in one transaction (index_open()).
 *
 * BLOB RECORD (value in "blobs"):
 *   0      8    size in bytes
 *   8      8    reference count (jobs whose output it is)
 *   16     8    created_at, ms
 *   24     ...  media type (no NUL, at most 127 bytes)
 *   end-8  8    checksum, as in job records
 *
 * LMDB has no checksums of its own: the record checksums turn a damaged
 * value into an error (STORE_E_INDEX) instead of wrong data.
 *
 * SCHEDULING: claims take the smallest queue item of a group: highest
 * priority first, then the smallest fair-share round, then the oldest id.
 * A job enqueued by uid u gets round max(last claimed round, u's next
 * round) and advances u's next round, so owners alternate round-robin:
 * one owner's 10,000 queued jobs take rounds 0..9999, and another owner's
 * single job, submitted when round 5 is running, gets round 5.
 */
#ifndef RENDERFS_INDEX_H
#define RENDERFS_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define INDEX_FORMAT_VERSION 16
#define INDEX_HANDLE_MAX 4096 /* bytes of a job's durable handle */
#define INDEX_LOG_LINE_MAX 16384 /* bytes of one log line, without its newline */
#define INDEX_STATUSES 5 /* enum job_status values */
#define JOB_ID_LEN 16
#define JOB_ID_STR_LEN 26 /* ULID text, without NUL */
#define INDEX_HASH_LEN 32
#define INDEX_ROUTE_MAX 255
#define INDEX_NAME_MAX 64
#define INDEX_STR_MAX 4096 /* error messages and other strings */
#define INDEX_GROUPS 256

enum job_status {
	JOB_QUEUED = 0,
	JOB_RUNNING = 1,
	JOB_COMPLETE = 2,
	JOB_ERROR = 3,
	JOB_CANCELLED = 4,
};

enum job_priority {
	JOB_PRIO_LOW = 0,
	JOB_PRIO_NORMAL = 1,
	JOB_PRIO_HIGH = 2,
};

enum {
	JOB_F_CACHED = 1,	   /* output served from an earlier identical job */
	JOB_F_HAS_OUTPUT = 2,
	JOB_F_CANCEL_REQUESTED = 4, /* a running job was asked to stop */
	JOB_F_OUTPUT_RELEASED = 8,  /* complete, but its owner released the output */
	JOB_F_DELAYED = 16,	   /* queued, waiting in "delayed" until `round` (ms) */
	JOB_F_EXTRAS = 32,	   /* has outputs after the first (extras) */
	JOB_F_RESULT = 64,	   /* has a result.json (results) */
	JOB_F_WEBHOOK = 128,	   /* its changes are delivered to a webhook (hooks) */
};

const char *job_status_name(enum job_status s);
const char *job_priority_name(enum job_priority p);
/* Returns 0 and sets *p, or -EINVAL. */
int job_priority_parse(const char *s, enum job_priority *p);

/* A decoded job record. Strings are NUL-terminated, never NULL ("" when
 * absent), and owned by the struct: release with job_release(). */
struct job {
	uint8_t id[JOB_ID_LEN];
	enum job_status status;
	enum job_priority priority;
	uint8_t group;
	uint8_t flags;
	uint32_t uid, gid;
	uint32_t attempts;
	uint16_t progress; /* thousandths */
	uint16_t hidden;   /* files removed from the job's view (bit per file) */
	uint64_t seq;
	uint64_t created_ms, started_ms, completed_ms, updated_ms;
	uint64_t timeout_ms;
	uint64_t log_size;
	uint64_t round;
	uint8_t output_hash[INDEX_HASH_LEN];
	uint64_t output_size;
	char *route, *name, *media_type, *device, *error_code, *error_message;
	/* What ran it, recorded when it started (empty before, and for jobs
	 * run by a renderfs before index format 6). */
	char *backend, *model;
	/* What its attempts used (format 15; 0 and "" before): milliseconds
	 * of the attempts since it was last submitted or retried (as the
	 * service measured them where it said, else wall time), and the
	 * device kind that ran the last one: "cpu", "gpu:<model>",
	 * "remote:<backend>" ("" when nothing ran: cancelled while queued,
	 * served from the cache). The usage ledger counts them. */
	uint64_t run_ms;
	char *ran_on;
};

void job_release(struct job *j);

struct blob_info {
	uint64_t size;
	uint64_t refcount;
	uint64_t created_ms;
	char media_type[128];
};

struct index;

struct index_options {
	uint64_t map_size; /* bytes of address space for the map; 0: 64 GiB */
	bool read_only;	   /* for fsck: open without creating or writing */
};

/*
 * Open (creating if needed, unless read_only) the environment in dir.
 * Refuses foreign or damaged files and unknown format versions with a
 * message naming the file. An index of an older format is upgraded in one
 * transaction (a crash leaves it as it was) when opened read-write, and
 * refused with STORE_E_VERSION when opened read-only; an empty environment
 * (a first open that died before its first commit) opened read-only is
 * STORE_E_NOTFOUND. *out is freed with index_close().
 */
int index_open(const char *dir, const struct index_options *opt, struct index **out);
void index_close(struct index *ix);
/* The format index_open() upgraded from (0: none) and its job count. */
uint32_t index_upgraded(struct index *ix, uint64_t *njobs);

int index_store_id(struct index *ix, uint8_t out[16]);
/* Current signing key number: 0, or STORE_E_NOTFOUND if none recorded. */
int index_signing_key_get(struct index *ix, uint8_t keynum[8]);
int index_signing_key_set(struct index *ix, const uint8_t keynum[8]);

/* ---- jobs ---- */

/* A blob a request names (cas:<hex>): where, and which. */
#define INDEX_INPUTS_MAX 16
#define INDEX_FIELD_MAX 128
struct job_input {
	char field[INDEX_FIELD_MAX];
	uint8_t hash[INDEX_HASH_LEN];
	uint64_t size;
	/* The job whose output made the blob, as the store knew when this
	 * job was created (the chain of a pipeline); all zero: unknown.
	 * Filled by the index at creation, not by the caller. */
	uint8_t made_by[JOB_ID_LEN];
};

struct job_create {
	const char *route;
	const char *name; /* NULL or "": no client-chosen name */
	uint32_t uid, gid;
	enum job_priority priority;
	uint8_t group;
	uint64_t timeout_ms;
	const char *request; /* normalized request JSON */
	size_t request_len;
	const void *sealed; /* sealed credentials (creds), or NULL */
	size_t sealed_len;
	const struct job_input *inputs; /* blobs the request names (inputs) */
	size_t ninputs;
	const char *webhook;	/* URL changes are delivered to (hooks), or NULL */
	uint8_t webhook_events; /* bit per enum hook_event */
};

/*
 * Create a queued job, durably. With a name already used on the route:
 * the same request returns the existing job with *existed = true;
 * a different one fails with STORE_E_EXISTS.
 */
int index_job_create(struct index *ix, const struct job_create *c, uint8_t id_out[JOB_ID_LEN],
		     bool *existed);

/*
 * Create n jobs in one durable commit (a batch submission), in order, up
 * to the first that is refused: rcs[i] gets each result (those after the
 * first refusal -ECANCELED: not tried), ids[i] its id and existed[i] (may
 * be NULL) whether a named job was found. Returns 0 when the commit itself
 * succeeded, whatever the rcs.
 */
int index_job_create_batch(struct index *ix, size_t n, const struct job_create *c,
			   uint8_t (*ids)[JOB_ID_LEN], bool *existed, int *rcs);

int index_job_get(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job *out);
/* The stored request: *out is malloc'ed, NUL-terminated, freed by the caller. */
int index_job_request(struct index *ix, const uint8_t id[JOB_ID_LEN], char **out, size_t *len);

/*
 * A backend's durable handle for a job: put before acting on it (a remote
 * submission), so that after a restart the job is followed, never
 * submitted again. Replaces the previous one; kept until the job is
 * deleted. get: *out malloc'ed (freed by the caller), STORE_E_NOTFOUND if
 * none.
 */
/* Append log lines (len bytes, each line ending in '\n') and put the
 * handle, in one durable write: a backend that counts in its handle the
 * service's lines it logged can never log one twice, or lose one, across
 * a crash. handle NULL: the lines only. */
int index_job_log_handle(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *lines,
			 size_t len, const void *handle, size_t hlen);
/*
 * A run's changes of its job in one durable write, each optional: log
 * lines (len bytes, each ending in '\n'), progress (thousandths, -1: none;
 * left out if the job is no longer running), what runs it (backend, model;
 * NULL: unchanged), its handle and its remote record (NULL: unchanged).
 */
struct index_update {
	const char *lines;
	size_t len;
	int progress;
	const char *backend, *model;
	const void *handle;
	size_t hlen;
	const void *remote;
	size_t rlen;
};
int index_job_update(struct index *ix, const uint8_t id[JOB_ID_LEN], const struct index_update *u);
/*
 * The same write without waiting for it (its data copied): committed
 * after every write queued before it, and with or before any queued
 * after it; done(arg, rc, err) is called once it is durable or has
 * failed, on the thread that commits it (index_i.h, index_write_async:
 * done may not write to the index, and takes no lock held across index
 * writes). Returns 0 (done will be called) or an error (it will not).
 */
int index_job_update_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
			   const struct index_update *u,
			   void (*done)(void *arg, int rc, const char *err), void *arg);
/* Returns once every write queued before the call (async ones too) is
 * durable or has failed: 0, or an error of the wait itself. */
int index_writes_settle(struct index *ix);
int index_job_handle_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const void *data,
			 size_t len);
int index_job_handle_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len);
/* What a remote service said of the job (remote): put replaces it; get:
 * *out malloc'ed, STORE_E_NOTFOUND when there is nothing. */
int index_job_remote_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const void *data,
			 size_t len);
int index_job_remote_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len);
/* The job's sealed credentials (creds): *out malloc'ed; STORE_E_NOTFOUND
 * when it has none (never given, or wiped at its final state). */
int index_job_creds_get(struct index *ix, const uint8_t id[JOB_ID_LEN], void **out, size_t *len);

/* Take the next job of the group (queued -> running, attempts + 1,
 * started_at set). STORE_E_NOTFOUND when the group's queue is empty. */
int index_job_claim(struct index *ix, uint8_t group, struct job *out);
/* The same for up to max jobs in one durable write (in queue order): *n
 * of them, at least 1 when it returns 0 (STORE_E_NOTFOUND: none). */
int index_job_claim_many(struct index *ix, uint8_t group, size_t max, struct job *out,
			 size_t *n);

int index_job_progress(struct index *ix, const uint8_t id[JOB_ID_LEN], uint16_t thousandths);

/* Append one line (a newline is added) to the job's log. */
int index_job_log(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *line,
		  size_t len);
/* The same, for the line that starts an attempt, recording in the same
 * write what runs the job (backend name, model; "" for none). */
int index_job_log_start(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *line,
			size_t len, const char *backend, const char *model);
/* Read log bytes [off, off + len) into buf; *got receives the count. */
int index_job_log_read(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t off,
		       void *buf, size_t len, size_t *got);

/*
 * Record the output of a running job: the blob (already renamed into
 * blobs/) gets a record or one more reference, and the job points at it.
 */
int index_job_attach_output(struct index *ix, const uint8_t id[JOB_ID_LEN],
			    const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
			    const char *media_type, const char *device, bool cached);
/* The same without waiting for it (index_job_update_async says how;
 * failed, if not NULL, is called instead of done, and only if it fails):
 * the job's end, written after it, cannot complete the job then. */
int index_job_attach_output_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
				  const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
				  const char *media_type, const char *device,
				  void (*failed)(const uint8_t id[JOB_ID_LEN], const char *err));

/* running -> complete (needs an output), error or cancelled. error_code and
 * error_message are used for JOB_ERROR and may be NULL otherwise. */
int index_job_finish(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_status final,
		     const char *error_code, const char *error_message);
/* What an attempt used, for the ledger: the device kind that ran it
 * (struct job's ran_on) and the service's measure of its run in ms (< 0:
 * none; wall time counts). */
struct job_usage {
	const char *kind;
	int64_t reported_ms;
};
/* index_job_finish with what the attempt used added to the job's run_ms;
 * without (used NULL) the attempt counts its wall time on kind "". */
int index_job_finish_used(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_status final,
			  const char *error_code, const char *error_message,
			  const struct job_usage *used);
/* index_job_finish_used with a last log line (len bytes, no newline)
 * appended in the same write: the log never says a job ended that did
 * not, and the end costs one commit, not two. With result (NULL: none),
 * the job's result.json too, as index_job_result_put. */
int index_job_finish_logged(struct index *ix, const uint8_t id[JOB_ID_LEN],
			    enum job_status final, const char *error_code,
			    const char *error_message, const struct job_usage *used,
			    const char *line, size_t len, const char *result, size_t result_len);
/* The same without waiting for it (index_job_update_async says how; its
 * arguments are checked, and copied, before it is queued). */
int index_job_finish_logged_async(struct index *ix, const uint8_t id[JOB_ID_LEN],
				  enum job_status final, const char *error_code,
				  const char *error_message, const struct job_usage *used,
				  const char *line, size_t len, const char *result,
				  size_t result_len,
				  void (*done)(void *arg, int rc, const char *err), void *arg);

/*
 * running -> queued again (an automatic retry): keeps attempts, and adds
 * what the attempt used to run_ms as index_job_finish_used does. With
 * not_before_ms (0: none), claimable only from then on (a retry after a
 * transient failure): the job waits in "delayed", not in the queue,
 * until index_promote_due() moves it there. It is `queued` to every
 * reader, with JOB_F_DELAYED and its time in `round`; cancel, delete and
 * priority changes work on it as on any queued job.
 */
int index_job_requeue(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t not_before_ms,
		      const struct job_usage *used);
/* index_job_requeue with a last log line, as index_job_finish_logged. */
int index_job_requeue_logged(struct index *ix, const uint8_t id[JOB_ID_LEN],
			     uint64_t not_before_ms, const struct job_usage *used,
			     const char *line, size_t len);
/*
 * running -> queued with the attempt not counted (attempts - 1): the run
 * was held back before it reached the service (a circuit breaker opened
 * while it waited), so it costs the job nothing.
 */
int index_job_return(struct index *ix, const uint8_t id[JOB_ID_LEN]);

/*
 * The queue group of each of n remote routes (rgroups): the one it was
 * given before, else the lowest group from `first` on that no route has,
 * else one whose route is not among these and whose queue is empty.
 * -ENOSPC when none is left.
 */
int index_route_groups(struct index *ix, const char *const *routes, size_t n, uint8_t first,
		       uint8_t *groups);
/*
 * Move the queued and delayed jobs of every group for which stale(group)
 * says so into group_of(route) (a mount whose routes changed backend, or
 * jobs from a format that shared one remote group). Costs what is moved
 * and the delayed set, not the jobs. *moved: how many.
 */
int index_regroup(struct index *ix, bool (*stale)(uint8_t group, void *arg),
		  uint8_t (*group_of)(const char *route, void *arg), void *arg, uint64_t *moved);

/* Move every delayed job due at now_ms into the queue; *next_ms: the time
 * of the next one still waiting (0: none). */
int index_promote_due(struct index *ix, uint64_t now_ms, uint64_t *next_ms);
/* The time of the first delayed job (0: none). */
int index_delayed_next(struct index *ix, uint64_t *next_ms);

/* queued -> cancelled at once; running -> JOB_F_CANCEL_REQUESTED for the
 * worker to see. STORE_E_STATE for finished jobs. */
int index_job_cancel(struct index *ix, const uint8_t id[JOB_ID_LEN]);
/* error or cancelled -> queued, attempts reset. */
int index_job_retry(struct index *ix, const uint8_t id[JOB_ID_LEN]);
int index_job_set_priority(struct index *ix, const uint8_t id[JOB_ID_LEN], enum job_priority p);

/* Outputs after the first (extras): n from 1 to INDEX_EXTRAS_MAX. */
#define INDEX_EXTRAS_MAX 32
#define INDEX_RESULT_MAX (1 << 20)
/* Blobs a delete took the last reference of. */
struct index_freed {
	size_t n;
	uint8_t hash[INDEX_INPUTS_MAX + 1 + INDEX_EXTRAS_MAX][INDEX_HASH_LEN];
};
/*
 * Delete a job that is not running and every index entry for it. Each blob
 * it held (its output, outputs after the first, inputs) that loses its
 * last reference loses its record too and is listed in freed (the output
 * first): the caller unlinks the files (store_job_delete() does).
 */
int index_job_delete(struct index *ix, const uint8_t id[JOB_ID_LEN], struct index_freed *freed);
struct job_output {
	uint8_t hash[INDEX_HASH_LEN];
	uint64_t size;
	uint8_t hidden; /* bit 0: the file, bit 1: its signature (unlinked) */
	char media_type[128];
};
/* Hide output n's file (bit 0) or signature (bit 1) from the job's view. */
int index_job_hide_extra(struct index *ix, const uint8_t id[JOB_ID_LEN], unsigned n,
			 uint8_t mask);
/* Attach output n (>= 1) to a running job (JOB_F_EXTRAS), a blob
 * reference as for the first; copying (cached) from another job's too. */
int index_job_attach_extra(struct index *ix, const uint8_t id[JOB_ID_LEN], unsigned n,
			   const uint8_t hash[INDEX_HASH_LEN], uint64_t size, const char *media_type);
/* Outputs 1.. of a job in order: *n of them (at most max). */
int index_job_extras(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job_output *out,
		     size_t max, size_t *n);
/* result.json of a running job (JOB_F_RESULT); get: *out malloc'ed. */
int index_job_result_put(struct index *ix, const uint8_t id[JOB_ID_LEN], const char *text,
			 size_t len);
int index_job_result_get(struct index *ix, const uint8_t id[JOB_ID_LEN], char **out, size_t *len);
/* The job's inputs (at most max): *n of them; 0 when it has none. */
int index_job_inputs(struct index *ix, const uint8_t id[JOB_ID_LEN], struct job_input *in,
		     size_t max, size_t *n);

/*
 * List job ids in id (= creation) order, strictly after `after` (NULL:
 * from the start), at most max of them into ids; *n receives the count.
 * A route or owner with no jobs gives *n = 0.
 */
int index_list_by_route(struct index *ix, const char *route, const uint8_t *after, size_t max,
			uint8_t (*ids)[JOB_ID_LEN], size_t *n);
int index_list_by_owner(struct index *ix, uint32_t uid, const uint8_t *after, size_t max,
			uint8_t (*ids)[JOB_ID_LEN], size_t *n);
/* All jobs, in id order. */
int index_list_all(struct index *ix, const uint8_t *after, size_t max,
		   uint8_t (*ids)[JOB_ID_LEN], size_t *n);

int index_job_by_seq(struct index *ix, uint64_t seq, uint8_t id[JOB_ID_LEN]);
/* The job with the lowest seq >= *seq (which it updates); STORE_E_NOTFOUND
 * past the last. Seq order is creation order, which is also id order. */
int index_job_seq_at_or_after(struct index *ix, uint64_t *seq, uint8_t id[JOB_ID_LEN]);
/* The seq the next created job will get: jobs so far have 0 .. *seq - 1. */
int index_next_seq(struct index *ix, uint64_t *seq);
/*
 * Names per route and owner (true) or per route (false, the default). Set
 * once after index_open(), before any other thread uses the index.
 */
void index_set_names_per_owner(struct index *ix, bool per_owner);
/*
 * The job named `name` on `route` for a caller of uid `uid`: with names
 * per owner, the caller's own, or for root (uid 0) without one of its
 * own, the lowest uid's; with names per route, the lowest uid's (the
 * only one unless a per-owner mount made more).
 */
int index_name_lookup(struct index *ix, const char *route, const char *name, uint32_t uid,
		      uint8_t id[JOB_ID_LEN]);
/* The memoization key of a request: BLAKE3 of route, NUL, request; with
 * owner other than INDEX_ANY_OWNER (memoization per owner, `private`),
 * then NUL and the owner's uid (4 bytes, big-endian). */
#define INDEX_ANY_OWNER UINT32_MAX
void index_request_digest(const char *route, const char *request, size_t len, uint32_t owner,
			  uint8_t out[INDEX_HASH_LEN]);
int index_digest_lookup(struct index *ix, const uint8_t digest[INDEX_HASH_LEN],
			uint8_t id[JOB_ID_LEN]);
int index_digest_put(struct index *ix, const uint8_t digest[INDEX_HASH_LEN],
		     const uint8_t id[JOB_ID_LEN]);

/* Number of queued jobs in a group. */
int index_queue_depth(struct index *ix, uint8_t group, uint64_t *n);
/* Number of queued jobs in every group, in one read. */
int index_queue_total(struct index *ix, uint64_t *n);
/* Queued jobs of each group (INDEX_GROUPS), in one read. */
int index_queue_depths(struct index *ix, uint64_t *depth);
/* Number of queued jobs of one owner, in every group. */
int index_user_queued(struct index *ix, uint32_t uid, uint64_t *n);

/*
 * How many jobs will start before this queued one in its group (SPEC §3
 * `position`). Counts queue entries ahead of it, so it costs time in
 * proportion to the answer. STORE_E_STATE when the job is not queued.
 */
int index_queue_position(struct index *ix, const uint8_t id[JOB_ID_LEN], uint64_t *pos);

/*
 * Hide files of a job's directory from its view (the owner unlinked them):
 * hidden |= mask. With release_output, a complete job also gives up its
 * output blob (JOB_F_OUTPUT_RELEASED; the output record stays in the job
 * for status.json); *freed and freed_hash as for index_job_delete().
 */
int index_job_hide(struct index *ix, const uint8_t id[JOB_ID_LEN], uint16_t mask,
		   bool release_output, bool *freed, uint8_t freed_hash[INDEX_HASH_LEN]);

/* ---- blobs ---- */

/* The blob whose hash starts with the plen bytes of prefix (the first
 * one in hash order); STORE_E_NOTFOUND if none. */
int index_blob_find_prefix(struct index *ix, const uint8_t *prefix, size_t plen,
			   uint8_t hash[INDEX_HASH_LEN]);
int index_blob_get(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], struct blob_info *out);
/* Jobs of route in each status (zeros for a route without jobs). */
int index_route_counts(struct index *ix, const char *route, uint64_t out[INDEX_STATUSES]);
/* 0 if a job of uid's has the blob as its output, else STORE_E_NOTFOUND. */
int index_blob_used_by(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint32_t uid);
/* Iterate blobs in hash order after `after` (NULL: from the start). */
int index_blob_list(struct index *ix, const uint8_t *after, size_t max,
		    uint8_t (*hashes)[INDEX_HASH_LEN], size_t *n);

/* ---- recovery and statistics ---- */

struct index_recovery {
	uint64_t requeued;    /* running -> queued */
	uint64_t interrupted; /* running -> error "interrupted" (max attempts) */
	uint64_t completed;   /* running with its output committed -> complete */
};

/* After a crash: every running job goes back to the queue, or to error
 * with code "interrupted" once it has started max_attempts times; one
 * whose output was already committed is complete. */
int index_recover(struct index *ix, uint32_t max_attempts, struct index_recovery *r);

struct index_stats {
	uint64_t commits;	/* durable LMDB commits (each one sync) */
	uint64_t writes;	/* mutating calls */
	/* Nanoseconds, summed over writes: waiting for a leader to take them
	 * (the commit before and the gathering), in the batch (its ops and
	 * its commit), and from the commit to the caller running again;
	 * summed over batches: applying the ops, committing (the sync). */
	uint64_t queue_ns, batch_ns, wake_ns, apply_ns, sync_ns;
	uint64_t jobs;
	uint64_t blobs;
};
int index_stats(struct index *ix, struct index_stats *s);

/* ---- webhooks (SPEC §13) ---- */

#define INDEX_HOOK_URL_MAX 2048
#define HOOK_ATTEMPTS_KEPT 64  /* attempt records kept per delivery */
#define HOOK_MSG_MAX 200       /* bytes of an attempt's words */

enum hook_event {
	HOOK_START = 0,	/* the job started running (each attempt) */
	HOOK_PROGRESS = 1, /* its progress moved (at most one per 2 s) */
	HOOK_OUTPUT = 2,   /* its output is there */
	HOOK_COMPLETED = 3, /* it reached a final state */
	HOOK_EVENTS = 4,
};
enum hook_state {
	HOOK_PENDING = 0,
	HOOK_DELIVERED = 1, /* a 2xx answer */
	HOOK_GONE = 2,	    /* 410: the receiver wants no more */
	HOOK_GIVEN_UP = 3,  /* the schedule ran out */
};
const char *hook_event_name(enum hook_event ev);
const char *hook_state_name(enum hook_state st);
/* "start,progress" -> mask; -EINVAL for an unknown name. */
int hook_events_parse(const char *name, uint8_t *mask);

struct hook_delivery {
	uint8_t id[JOB_ID_LEN]; /* the webhook-id's ULID */
	uint8_t job[JOB_ID_LEN];
	enum hook_event event;
	enum hook_state state;
	uint16_t attempts, tries, last_status;
	uint32_t uid;
	uint64_t event_ms, next_ms;
	char url[INDEX_HOOK_URL_MAX + 1];
	struct job snap; /* the job as the change left it */
};
void hook_delivery_release(struct hook_delivery *d);

struct hook_attempt {
	uint64_t at_ms;
	uint32_t ms;	 /* how long it took */
	uint16_t status; /* HTTP status; 0: no answer */
	char msg[HOOK_MSG_MAX + 1];
};

/*
 * Pending deliveries due at now_ms, in due order, leaving out the nskip
 * ids of skip (those in flight): at most max into ids, *n of them;
 * *next_ms: when the first pending one not taken is due (0: none).
 */
int index_hook_due(struct index *ix, uint64_t now_ms, const uint8_t (*skip)[JOB_ID_LEN],
		   size_t nskip, size_t max, uint8_t (*ids)[JOB_ID_LEN], size_t *n,
		   uint64_t *next_ms);
/* A delivery; STORE_E_NOTFOUND if there is none. Release with
 * hook_delivery_release(). */
int index_hook_get(struct index *ix, const uint8_t id[JOB_ID_LEN], struct hook_delivery *out);
/*
 * Record an attempt of a pending delivery and what follows it: state
 * HOOK_PENDING with the next attempt at next_ms, or an end. A delivery
 * whose job is gone goes once it ends. STORE_E_STATE if it is not pending.
 */
int index_hook_attempt(struct index *ix, const uint8_t id[JOB_ID_LEN],
		       const struct hook_attempt *a, enum hook_state state, uint64_t next_ms);
/* A job's deliveries in order: after `after` (NULL: from the first), at
 * most max, *n of them. */
int index_hook_list(struct index *ix, const uint8_t job[JOB_ID_LEN], const uint8_t *after,
		    size_t max, uint8_t (*ids)[JOB_ID_LEN], size_t *n);
/* A delivery's attempt records kept, oldest first: at most max, *n. */
int index_hook_attempts(struct index *ix, const uint8_t id[JOB_ID_LEN], struct hook_attempt *out,
			size_t max, size_t *n);
/* The job's given-up and gone deliveries pending again, due at now_ms
 * with a new schedule: *n of them. */
int index_hook_redeliver(struct index *ix, const uint8_t job[JOB_ID_LEN], uint64_t now_ms,
			 uint64_t *n);
/* Pending deliveries in all (the backlog). */
int index_hook_backlog(struct index *ix, uint64_t *n);
/* The events the job's webhook asks for (bit per enum hook_event);
 * STORE_E_NOTFOUND if it has none. */
int index_hook_events(struct index *ix, const uint8_t job[JOB_ID_LEN], uint8_t *events);
/*
 * Owner uid's sealed webhook secret: get (STORE_E_NOTFOUND: none yet;
 * *out malloc'ed), or put if there is none yet (*existed then: another
 * was put first, which the caller reads back).
 */
int index_user_secret_get(struct index *ix, uint32_t uid, void **out, size_t *len);
int index_user_secret_put(struct index *ix, uint32_t uid, const void *sealed, size_t len,
			  bool *existed);
/*
 * fn(arg) after each commit that added a delivery, by the committing
 * thread: it must not block. Set once, before other threads use the index.
 */
void index_set_hook_wake(struct index *ix, void (*fn)(void *), void *arg);

/* ---- usage ledger (SPEC §14) ---- */

#define USAGE_NAME_MAX (INDEX_ROUTE_MAX + 16)
enum usage_kind {
	USAGE_JOBS = 'j',    /* name: route NUL outcome */
	USAGE_MS = 's',	     /* name: device kind */
	USAGE_BYTES = 'b',   /* name: "" */
	USAGE_CACHED = 'c',  /* name: "" */
};
/* One total: owner, UTC day (days since the epoch), kind, name (nlen
 * bytes, not NUL-terminated for USAGE_JOBS' NUL), value. */
struct usage_row {
	uint32_t uid, day;
	char kind;
	size_t nlen;
	char name[USAGE_NAME_MAX + 1];
	uint64_t value;
};
/*
 * The usage totals of uid (INDEX_ANY_OWNER: every owner) from day on, in
 * (uid, day) order: fn for each; a non-zero return from fn stops the
 * walk and is returned.
 */
int index_usage_rows(struct index *ix, uint32_t uid, uint32_t day,
		     int (*fn)(const struct usage_row *r, void *arg), void *arg);

struct ledger_entry {
	uint64_t at_ms;	/* completed_ms of the job */
	uint8_t id[JOB_ID_LEN];
	uint32_t uid;
	enum job_status outcome;
	bool cached;
	uint64_t run_ms, bytes;
	char route[INDEX_ROUTE_MAX + 1];
	char kind[INDEX_ROUTE_MAX + 1];
};
/* The journal's entries with from_ms < at_ms <= to_ms, in time order:
 * fn for each; its first non-zero return stops the walk and is returned. */
int index_journal_walk(struct index *ix, uint64_t from_ms, uint64_t to_ms,
		       int (*fn)(const struct ledger_entry *e, void *arg), void *arg);

#define LEDGER_SIG_MAX 1024
struct attestation {
	uint64_t from_ms, end_ms;
	uint8_t hash[INDEX_HASH_LEN];
	uint64_t size;
	char name[64];
	char sig[LEDGER_SIG_MAX + 1];
};
/* Attestations in chain order after end ms `after` (0: from the first):
 * at most max into out, *n of them. */
int index_ledger_list(struct index *ix, uint64_t after, struct attestation *out, size_t max,
		      size_t *n);
/* The last attestation; STORE_E_NOTFOUND if there is none. */
int index_ledger_last(struct index *ix, struct attestation *out);
/* The attestation named name; STORE_E_NOTFOUND if none. */
int index_ledger_find(struct index *ix, const char *name, struct attestation *out);
/* What makes an attestation: called by index_ledger_attest inside the
 * index's write lock (no index calls; the blob file and signature only). */
struct ledger_maker {
	/* The period from_ms < t <= end_ms; prev: the last attestation. */
	int (*begin)(void *arg, uint64_t from_ms, uint64_t end_ms, const struct attestation *prev);
	int (*entry)(void *arg, const struct ledger_entry *e); /* each, in order */
	/* The blob file is written (store_blob_write): name, hash, size, sig. */
	int (*finish)(void *arg, struct attestation *a);
	void *arg;
};
/*
 * Attest the period from the last attestation's end (0: the first) to
 * end_ms (0: now, read in the write lock, so that no job finishing in the
 * period can commit after it): the maker sees its journal entries, and
 * the record and a reference on its blob (owner uid 0) are written in
 * that transaction. STORE_E_STATE when the period is empty (attested).
 */
int index_ledger_attest(struct index *ix, uint64_t end_ms, const struct ledger_maker *m,
			struct attestation *out);

/* ---- replication to a bucket (SPEC §12) ---- */

/* What the outbox holds: objects to put in the bucket. */
enum outbox_kind {
	OUT_BLOB = 'b',	       /* blobs/ab/<hex>: id is the BLAKE3 */
	OUT_BLOBSIG = 's',     /* blobs/ab/<hex>.minisig */
	OUT_MANIFEST = 'm',    /* manifests/<job id>.json: id is the job's (16) */
	OUT_MANIFESTSIG = 'n', /* manifests/<job id>.json.minisig */
	OUT_KEY = 'k',	       /* keys/<KEYID>.pub: id is the key number (8) */
};
struct outbox_entry {
	uint64_t seq; /* its place in the outbox (enqueue order) */
	char kind;
	uint8_t id[INDEX_HASH_LEN];
	uint64_t size; /* bytes (blobs; 0 for the others) */
	uint64_t enqueued_ms, not_before_ms;
	uint32_t attempts;
};
/*
 * Replication on (a mount with replica=): from now on each new blob
 * record puts the blob in the outbox (its signature follows once the
 * bucket has it), and each job
 * that completes with an output its manifest, in the transaction that
 * makes them. Set once after index_open(), before other threads use it.
 */
void index_set_replica(struct index *ix, bool on);
/* Put one object in the outbox (a key at start, `renderctl replica push`). */
int index_outbox_put(struct index *ix, char kind, const uint8_t *id, size_t idlen, uint64_t size);
/* Entries due at now_ms, in outbox order, leaving out the nskip seqs of
 * skip (in flight): at most max into out, *n of them. Looks at the first
 * `scan` entries only (a bound on the work of one call). */
int index_outbox_due(struct index *ix, uint64_t now_ms, const uint64_t *skip, size_t nskip,
		     size_t scan, struct outbox_entry *out, size_t max, size_t *n);
/* The object is in the bucket (or there is nothing to put any more: its
 * blob or job is gone): the entry goes; an OUT_BLOB is confirmed
 * (index_replica_get) and its OUT_BLOBSIG enters the outbox; a confirmed
 * OUT_BLOBSIG lets the cache drop the blob's file. */
int index_outbox_done(struct index *ix, uint64_t seq, bool confirmed);
/* An attempt failed: attempts + 1, not before not_before_ms. */
int index_outbox_retry(struct index *ix, uint64_t seq, uint64_t not_before_ms);
struct outbox_stats {
	uint64_t objects, bytes, oldest_ms; /* oldest_ms: enqueue time (0: empty) */
};
int index_outbox_stats(struct index *ix, struct outbox_stats *s);

/* A blob's replication state (replicated): confirmed in the bucket,
 * when last read, whether its file is here, whether only the cache
 * holds it (a reference of its own, owner uid 0: fetched, no job's). */
struct replica_state {
	uint64_t confirmed_ms, read_ms;
	bool local, cache_ref;
	bool signed_; /* its signature is in the bucket too (or it came from there) */
};
/* STORE_E_NOTFOUND: not confirmed in the bucket. */
int index_replica_get(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], struct replica_state *s);
/* Bytes of the blob files in blobs/ (every blob record whose file is here). */
int index_local_bytes(struct index *ix, uint64_t *bytes);
/* The n blobs were read at now_ms (least recently read go first). */
int index_replica_touch(struct index *ix, const uint8_t (*hashes)[INDEX_HASH_LEN], size_t n,
			uint64_t now_ms);
/* Confirmed blobs whose files are here, least recently read first: at
 * most max, *n of them. */
int index_replica_lru(struct index *ix, size_t max, uint8_t (*hashes)[INDEX_HASH_LEN], size_t *n);
/*
 * Drop a confirmed blob's file from the cache's accounting (the caller
 * unlinks it after this commits): *size its bytes; *freed when the
 * cache's reference was the last (its record is gone too).
 * STORE_E_STATE when it is not confirmed or not here.
 */
int index_replica_drop(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint64_t *size,
		       bool *freed);
/*
 * A blob fetched from the bucket is in its place in blobs/ (verified):
 * a record is made for one the index does not know (the cache's own
 * reference, owner uid 0), or the confirmed blob is here again.
 */
int index_replica_fetched(struct index *ix, const uint8_t hash[INDEX_HASH_LEN], uint64_t size,
			  const char *media_type);
/* Confirmed blobs in hash order after `after` (NULL: from the first): at
 * most max into hashes (and states, may be NULL), *n of them. */
int index_replica_list(struct index *ix, const uint8_t *after, size_t max,
		       uint8_t (*hashes)[INDEX_HASH_LEN], struct replica_state *states, size_t *n);
/* The replica= a mount last used the store with (its text, at most
 * len - 1 bytes: lines s3://BUCKET/PREFIX, endpoint or "-", 0 or 1 for
 * path-style): put at each
 * such mount, for `renderctl replica`; get: STORE_E_NOTFOUND if none. */
int index_replica_config_put(struct index *ix, const char *text);
int index_replica_config_get(struct index *ix, char *out, size_t len);
/* Put every blob not confirmed (their signatures follow), and every
 * complete job's manifest, in the outbox (`renderctl replica push`): *n
 * entries. */
int index_replica_push_all(struct index *ix, uint64_t *n);

/* ---- ULIDs ---- */

/* A new ULID: 48-bit millisecond time, 80 random bits, monotonic within
 * this process. */
void ulid_new(uint8_t id[JOB_ID_LEN]);
void ulid_format(const uint8_t id[JOB_ID_LEN], char out[JOB_ID_STR_LEN + 1]);
int ulid_parse(const char *s, uint8_t id[JOB_ID_LEN]);
uint64_t ulid_time_ms(const uint8_t id[JOB_ID_LEN]);
uint64_t now_ms(void);
/* CLOCK_MONOTONIC in nanoseconds, for measuring intervals. */
uint64_t mono_ns(void);

#endif
