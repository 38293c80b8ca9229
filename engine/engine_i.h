/*
 * engine_i.h - what the engine shares with its backends (backend_*.c).
 *
 * A runner implements SPEC §8's run(job context): it reads the normalized
 * request, reports progress and log lines as work is done, checks
 * run_stopping() often (cancellation, deadline, shutdown), and stores its
 * output through a store sink committed with run_commit_output().
 */
#ifndef RENDERFS_ENGINE_I_H
#define RENDERFS_ENGINE_I_H

#include <stdatomic.h>

#include "engine.h"

enum stop_reason {
	STOP_NONE = 0,
	STOP_CANCEL,   /* ctl cancel or delete */
	STOP_TIMEOUT,  /* the job's deadline passed */
	STOP_SHUTDOWN, /* the daemon is stopping: requeue */
};

struct run {
	struct engine *e;
	const struct route *route;
	struct job job;		/* as claimed */
	const char *request;	/* normalized request JSON */
	size_t request_len;
	int gpu;		/* CUDA device of the group, -1 on CPU */
	unsigned threads;	/* CPU threads the runner may use */
	uint64_t deadline_ms;
	atomic_int *stop;	/* enum stop_reason, set by other threads */
	uint64_t last_progress_ms;
	uint16_t progress;	/* the last progress stored (thousandths) */
	/* result.json (run_result), stored with the job's completion. */
	char *result;
	size_t result_len;
	/*
	 * A remote run's step gathers its writes (batching): log lines,
	 * progress, the remote record, the handle and the first line's record
	 * of what runs the job, and makes them one write when the step ends
	 * (run_batch_end), or before the run's end is written. That write is
	 * queued, not waited for (index_job_update_async: the run's thread
	 * goes on to other runs while it commits): every later write of the
	 * run is committed after it or with it, and a request that acts at
	 * the service (run_http: any but a GET) leaves only once all of them
	 * are durable (run_flush). So a handle is durable before anything
	 * acts on it (a "submitting" mark before the submission, a request
	 * id before a cancel), as always; a GET (a status, a result, a
	 * download) may be sent before the step's writes are, since sending
	 * it again after a crash costs nothing. `unsettled`: a write was
	 * queued since the run last waited for one.
	 */
	bool batching;
	char *pend;		/* log lines, each ending in '\n' */
	size_t pend_len, pend_cap;
	bool pend_has_progress, pend_start, pend_moved;
	uint16_t pend_progress;
	char *pend_remote;	/* the remote record to put (NUL-terminated) */
	void *pend_handle;	/* the handle to put (pend_hlen bytes; NULL: none) */
	size_t pend_hlen;
	bool unsettled;
	/* The remote record last written or queued (NUL-terminated; NULL:
	 * none yet): the base of the next change (run_remote_set). */
	char *remote_last;

	/* Filled by the runner when it fails. */
	char error_code[48];
	char error_message[ENGINE_ERR_MAX];
	bool transient;		/* worth another attempt */
	uint64_t retry_after_ms; /* the service asked to wait this long (Retry-After) */
	uint8_t output_hash[32]; /* set by run_commit_output */
	/* A remote run's output reference is queued (run_commit_output):
	 * EV_OUTPUT is posted once the run's end is written. */
	bool output_queued;
	/* For the usage ledger: the device kind that made the output (set by
	 * run_commit_output), and the service's own measure of the run. */
	char used_on[128];
	bool reported;
	uint64_t reported_ms;
	bool cached; /* served from an earlier job: nothing ran */

	/* Remote runs (backend.h: step, cancel, run_free). */
	void *bstate;			  /* the backend's state for this run */
	const struct http_response *http; /* during step/cancel: the answer to
					     the last run_http, else NULL */
};

struct http_request;
struct http_response;

/* What step and cancel return after arranging their next call. */
#define RUN_WAIT 1
/*
 * Start one HTTP transfer (http.h; everything in rq is copied) on the
 * engine's HTTP loop; the run's next step gets its answer in r->http.
 * deny_net= applies. Returns RUN_WAIT, or a failure set with run_fail.
 */
int run_http(struct run *r, const struct http_request *rq);
/* Call the next step after ms (0: at once); returns RUN_WAIT. */
int run_after(struct run *r, uint64_t ms);

/* Report progress (0..1, at most 10 durable writes per second are made). */
void run_progress(struct run *r, double fraction);
void run_log(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Why the runner must stop now, or STOP_NONE. */
enum stop_reason run_stopping(struct run *r);
/* Commit sink as the job's output (the sink is consumed). */
int run_commit_output(struct run *r, struct store_sink *sink, const char *media_type,
		      const char *device);
/* The service measured the run at this many seconds (SPEC §14: the
 * ledger counts them instead of wall time). */
void run_reported(struct run *r, double seconds);
/* The same for output n >= 1 after the first (output.n.<ext>, SPEC §3);
 * hash_out (may be NULL) gets its BLAKE3. Commit these before the first:
 * the first output's commit announces the outputs. */
int run_commit_extra(struct run *r, unsigned n, struct store_sink *sink, const char *media_type,
		     uint8_t hash_out[32]);
/* The service's whole result as result.json (file URLs replaced by
 * cas:<hex> by the backend): kept by the run and stored in the same
 * write as the job's completion (a result too large fails here). */
int run_result(struct run *r, const char *json, size_t len);
/*
 * The job's durable handle (index_job_handle_put/get): a remote backend
 * puts what finds its work again (a request id, status URLs) when the
 * service's answer gives it, durable before the run's next request that
 * acts at the service (`batching`), and on a later attempt (after a restart)
 * gets it back and follows the work instead of submitting it again.
 * get: *out malloc'ed, STORE_E_NOTFOUND when the job has none.
 */
int run_handle_put(struct run *r, const void *data, size_t len);
/* Log n of a service's messages (each prefixed, one line each) and put the
 * handle in one durable write: the handle's count of lines logged and the
 * log never disagree after a crash (each line logged exactly once). */
int run_log_handle(struct run *r, const char *prefix, const char *const *msgs, size_t n,
		   const void *handle, size_t hlen);
int run_handle_get(struct run *r, void **out, size_t *len);
/*
 * What the service says of the job, kept with it (index `remote`): its
 * request id and the model version it ran (NULL: unchanged; the manifest
 * names them), and its place in the service's queue (the `position` file
 * and status.json while the job runs; -1: none now, RUN_REMOTE_SAME:
 * unchanged). Written only when something changed.
 */
#define RUN_REMOTE_SAME (-2)
int run_remote_set(struct run *r, const char *request_id, const char *model_version,
		   long position);
/* The mount's deny_net= (http.h), for a connection a backend makes
 * itself (a WebSocket): valid while the engine runs; copy it. */
const char *run_deny_net(const struct run *r);
/*
 * The request with every cas: input (SPEC §3) replaced by a data: URI of
 * the blob's content (read verified, with its media type), for services
 * that take files inline: *out malloc'ed, NUL-terminated. A request with
 * no input is copied as it is.
 */
int run_request_inline_inputs(struct run *r, char **out);
/*
 * The same with every cas: input copied (read verified) into a read-only
 * file input-<n>.<ext> of the directory dirfd (whose path is dir), and
 * replaced by that file's path, for local programs.
 */
int run_request_input_files(struct run *r, int dirfd, const char *dir, char **out);
/* The job's cas: inputs (index.h: struct job_input): at most cap into
 * in, *n of them; 0 or a failure set with run_fail. */
struct job_input;
int run_inputs(struct run *r, struct job_input *in, size_t cap, size_t *n);
/* Input in's bytes, read verified (store_blob_open), into *data
 * (malloc'ed, *len bytes) and its media type into media: 0, or a failure
 * set with run_fail (input_not_found). */
int run_input_read(struct run *r, const struct job_input *in, uint8_t **data, size_t *len,
		   char *media, size_t mlen);
/* Log n lines (each prefixed) in one durable write. */
int run_log_lines(struct run *r, const char *prefix, const char *const *msgs, size_t n);
/* A remote run's step begins (its writes are gathered) and ends (they are
 * queued as one write, durable soon after). A failure then is said on
 * stderr (by the thread that commits it, when it fails there), naming
 * the job and what was not recorded, and the run goes on: with the index
 * refusing writes its end cannot be recorded either, and recovery puts
 * the job back (a handle of remote work not recorded: `interrupted`,
 * never sent twice). See `batching`. */
void run_batch_begin(struct run *r);
void run_batch_end(struct run *r);
/* What was gathered, written now, and every write of the run queued
 * before durable too (0, or the index's error). */
int run_flush(struct run *r);

/*
 * The job's own credential `name` from its envelope (SPEC §7), unsealed
 * into a locked buffer (*out, NUL-terminated; free it with
 * store_unsealed_free, which wipes it). STORE_E_NOTFOUND when the job has
 * none of that name.
 */
int run_credential(struct run *r, const char *name, uint8_t **out);
/* Set r's error (a code of the catalog, errors.h, which says whether it
 * is retried) and return rc. */
int run_fail(struct run *r, int rc, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* A backend's run() (backend.h): 0 when the output is committed, otherwise
 * a negative code with r->error_* set (or -ECANCELED when run_stopping()
 * said so). */

#endif
