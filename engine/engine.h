/*
 * engine.h - submitting, scheduling and running jobs (SPEC §2, §8).
 *
 * The engine owns the worker groups (one CPU group, one group per CUDA
 * device, one group for remote backends), the route table, per-uid rate
 * limits and quotas, and every job state change after creation. fs/ calls
 * it from FUSE request threads; every function here may be called from
 * any thread and none touches the mountpoint.
 */
#ifndef RENDERFS_ENGINE_H
#define RENDERFS_ENGINE_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "route.h"
#include "store.h"

#define RENDERFS_VERSION "0.1.0"
#define ENGINE_VERSION "renderfs-" RENDERFS_VERSION
#define ENGINE_ERR_MAX 512
#define ENGINE_HOOK_RETRY_MAX 24

struct engine_options {
	int workers;		 /* CPU workers; -1: one per core; 0: run nothing */
	bool gpus_all;		 /* use every CUDA device */
	uint64_t gpu_mask;	 /* without gpus_all: devices to use (bit n: device n) */
	uint64_t queue_max;	 /* queued jobs in all, at most */
	uint64_t user_queue_max; /* queued jobs per uid, at most */
	uint32_t rate, burst;	 /* submissions per second per uid; rate 0: no limit */
	uint64_t max_request;	 /* bytes of one request object */
	uint32_t max_attempts;	 /* runs of a job before a transient failure is final */
	uint64_t retain_ms;	 /* finished jobs older than this are deleted; 0: never */
	const char *models;	 /* models file, or NULL */
	const char *deny_net;	 /* CIDR,... no service connection goes to (NULL:
				    HTTP_DENY_DEFAULT, "": none) */
	bool private_;		 /* `private`: a request may name (cas:) only blobs
				    its owner can read */
	/* Webhook retry schedule (SPEC §13): the delays after each failed
	 * attempt; none: the spec's (5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
	 * 14 h, 20 h, 24 h). */
	uint64_t webhook_retry_ms[ENGINE_HOOK_RETRY_MAX];
	size_t webhook_retries;
	/* Replication (SPEC §12): s3://BUCKET/PREFIX (NULL: none), its
	 * endpoint (NULL: AWS's), path-style addressing, a credentials file
	 * (NULL: the AWS_* environment), and the bytes of blob files kept
	 * here at most (0: no limit). */
	const char *replica, *replica_endpoint, *replica_credentials;
	bool replica_path_style;
	uint64_t cache_max;
	bool memo_per_owner;	 /* reuse only outputs of the same uid's jobs
				    (`private`: a hit would tell of another
				    user's job) */
};

void engine_options_default(struct engine_options *o);

struct engine;
/* What a queued job of route waits for beyond its turn (a circuit breaker
 * open, the route's concurrency), in words, or "" (status.json). */
void engine_waiting_for(struct engine *e, const char *route, char *buf, size_t len);

enum engine_event {
	EV_CREATED,
	EV_STATUS,   /* status, error, position or status.json changed */
	EV_PROGRESS,
	EV_LOG,
	EV_OUTPUT,   /* output.<ext> appeared (before EV_STATUS "complete") */
	EV_DELETED,  /* gone from the index (retain, or deleted by the engine) */
	EV_RMDIR,    /* gone by rmdir of its directory through the mount */
};

/*
 * Called from engine threads and from FUSE handler threads (submissions,
 * ctl, rmdir) after each change, sometimes under the engine's state lock:
 * it must not block (queue a notification and return). For EV_DELETED and
 * EV_RMDIR, gone is the job as it was (it can no longer be read from the
 * index); NULL for the others.
 */
typedef void (*engine_observer_fn)(void *arg, const uint8_t id[JOB_ID_LEN], const char *route,
				   enum engine_event ev, const struct job *gone);

struct engine;

/*
 * Load the routes (err names a bad models file) and prepare the groups.
 * Workers start with engine_start(). *out is freed with engine_close().
 */
int engine_open(struct store *st, const struct engine_options *opt, struct engine **out,
		char *err, size_t errlen);
void engine_set_observer(struct engine *e, engine_observer_fn fn, void *arg);
int engine_start(struct engine *e);
/* Stop the workers: running jobs go back to the queue for the next start. */
void engine_stop(struct engine *e);
void engine_close(struct engine *e);

const struct route_table *engine_routes(struct engine *e);
const struct engine_options *engine_options(struct engine *e);
struct store *engine_store(struct engine *e);

/* ---- submission ---- */

struct engine_submission {
	json_object *obj; /* in: one parsed request object (borrowed) */
	int rc;		  /* out: 0, -EINVAL, -EAGAIN, -EEXIST, -ENOSPC, ... */
	char id[INDEX_NAME_MAX + 1]; /* the job id: its name, or its ULID */
	bool existed;	  /* a named job that already existed */
	char err[ENGINE_ERR_MAX];
};

/*
 * Validate, normalize and durably create n jobs on route for uid/gid, in
 * one commit, in order up to the first that fails: that one gets its rc
 * and err, the ones after it rc -ECANCELED (not tried: no job, no rate
 * token). Returns 0, or a negative code when nothing could be attempted.
 * The caller counts what it refuses, the engine's refusals included, with
 * engine_count_rejected().
 */
int engine_submit(struct engine *e, const char *route, uint32_t uid, uint32_t gid,
		  struct engine_submission *subs, size_t n);

/* Count n refused request objects in renderfs_submissions_rejected_total. */
void engine_count_rejected(struct engine *e, uint64_t n);

/* ---- control (SPEC §3 ctl, rm) ---- */

/* queued -> cancelled; running: stopped within a second. */
int engine_cancel(struct engine *e, const uint8_t id[JOB_ID_LEN]);
int engine_retry(struct engine *e, const uint8_t id[JOB_ID_LEN]);
int engine_set_priority(struct engine *e, const uint8_t id[JOB_ID_LEN], enum job_priority p);
/*
 * Delete a job. by_rmdir: the caller is an rmdir of its directory
 * (observers get EV_RMDIR, not EV_DELETED). A job no run holds goes now:
 * 0 or the error. A running job is cancelled first and goes once its run
 * has let go (a remote run: once the service has answered the cancel):
 * with done, ENGINE_LATER is returned and done(arg, rc) is called once,
 * later, on the engine's deleting thread or in engine_stop: 0, the
 * error, or -EBUSY when the run still held the job after
 * ENGINE_DELETE_WAIT_MS. Nothing waits meanwhile (a FUSE handler goes on
 * to other requests). Without done: -EBUSY at once (the job cancelled).
 */
#define ENGINE_LATER 1
#define ENGINE_DELETE_WAIT_MS 2000
typedef void (*engine_done_fn)(void *arg, int rc);
int engine_delete(struct engine *e, const uint8_t id[JOB_ID_LEN], bool by_rmdir,
		  engine_done_fn done, void *arg);

/* ---- reporting ---- */

/* Jobs on a route (every status), from the engine's counters. */
uint64_t engine_route_jobs(struct engine *e, const char *route);

/* Prometheus text (SPEC §11) into a malloc'ed buffer. */
int engine_stats_text(struct engine *e, char **out, size_t *len);

/*
 * Replication (SPEC §12). Whether replica= is on; whether a blob this
 * store knows has its file only in the bucket (the cache dropped it:
 * engine_blob_fetch before reading it); a read of a blob (the cache drops
 * the least recently read first).
 */
bool engine_replica_on(struct engine *e);
bool engine_blob_remote(struct engine *e, const uint8_t hash[32]);
void engine_blob_read(struct engine *e, const uint8_t hash[32]);
/*
 * Fetch a blob from the bucket into the store (verified against its
 * hash before it is kept): done(arg, rc) once, on the replica's thread,
 * which it must not hold long (reply and return): 0 the blob is here;
 * -ENOENT the bucket has no such object; -EIO it could not be fetched or
 * did not verify; -EAGAIN too many fetches wait. Returns 0, or -ENOTSUP
 * without replica= (done is not called).
 */
int engine_blob_fetch(struct engine *e, const uint8_t hash[32], void (*done)(void *arg, int rc),
		      void *arg);

/* Format ms since the epoch as RFC 3339 UTC with milliseconds. */
void engine_time_format(uint64_t ms, char out[32]);

/* ---- webhooks (SPEC §13; webhook.c) ---- */

/* 0, or -EINVAL with err saying what is wrong with a request's webhook. */
int engine_webhook_url_check(const char *url, char *err, size_t errlen);
/* webhook.pub ("whpk_<base64>\n") and uid's webhook.secret ("whsec_..."),
 * made on first use: malloc'ed text. */
int engine_webhook_pub(struct engine *e, char **out, size_t *len);
int engine_webhook_secret(struct engine *e, uint32_t uid, char **out, size_t *len);
/* webhook.secret's length: "whsec_", base64 of 32 bytes, "\n" (known
 * without making the secret). */
#define ENGINE_HOOK_SECRET_TEXT_LEN (6 + 44 + 1)
/* A job's `webhooks` file: each delivery and its attempts. */
int engine_webhooks_text(struct engine *e, const struct job *j, char **out, size_t *len);
/* `usage` (SPEC §14): uid's totals as JSON (all: every uid's), per day
 * and in all; malloc'ed text. */
int engine_usage_text(struct engine *e, uint32_t uid, bool all, char **out, size_t *len);
/* Attest the usage from the last attestation to now (ledger/attest);
 * STORE_E_STATE when no job finished in that period. */
struct attestation;
int engine_attest(struct engine *e, struct attestation *out);
/* `redeliver` (ctl): the job's given-up and gone deliveries go again;
 * -EALREADY when it has none. */
int engine_redeliver(struct engine *e, const uint8_t id[JOB_ID_LEN]);

#endif
