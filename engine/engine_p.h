/*
 * engine_p.h - the engine's own state, shared by its files and nothing
 * else: engine.c (life cycle, submission, control), run.c (the runner
 * context, workers, the janitor), remote.c (remote runs on the HTTP
 * loop), breaker.c (circuit breakers), metrics.c (stats).
 *
 * LOCKING (in this order; no index call is made with rate_mu held):
 *   state_mu  serializes job-state changes that race with a claim (claim,
 *             cancel, retry, delete) so that status counters stay exact.
 *   mu        guards stop, the worker slots' job ids and busy counts,
 *             and `work` waits.
 *   remote->mu (remote.c) guards remote runs in flight, per-route counts
 *             and the breakers; taken after state_mu, never with mu.
 *   rate_mu   guards buckets[].
 *   stats_mu  guards the histograms and the counters beside them (job counts
 *             per route and status live in the index).
 *   del_mu    guards the deletions waiting for their runs (dels, del_poked,
 *             del_stop); taken under state_mu or alone, and nothing is
 *             taken under it. ndels, their number, is atomic: engine_notify
 *             reads it without the lock.
 *   A worker slot's `stop` is atomic: set under mu, read by its runner.
 */
#ifndef RENDERFS_ENGINE_P_H
#define RENDERFS_ENGINE_P_H

#include <pthread.h>
#include <stdatomic.h>

#include "engine_i.h"

#define GROUP_CPU 0
#define GROUP_REMOTE 1
#define GROUP_GPU0 2
#define MAX_GPUS 16
#define RATE_SLOTS 1024
#define NBUCKETS 16

#define GROUP_ROUTE0 (GROUP_GPU0 + MAX_GPUS) /* remote routes' own groups */

struct histogram {
	uint64_t buckets[NBUCKETS + 1]; /* the last: +Inf */
	double sum;
	uint64_t count;
};

struct worker {
	struct engine *e;
	pthread_t tid;
	uint8_t group;
	int gpu;
	bool started;
	/* Protected by e->mu: */
	bool busy;
	uint8_t job[JOB_ID_LEN];
	atomic_int stop; /* enum stop_reason for the job it runs */
};

/* A deletion of a running job, answered (done) once its run lets go or
 * after ENGINE_DELETE_WAIT_MS (engine_delete). */
struct pending_delete {
	struct pending_delete *next;
	uint8_t id[JOB_ID_LEN];
	bool by_rmdir;
	uint64_t until_ms; /* CLOCK_MONOTONIC */
	engine_done_fn done;
	void *arg;
};

struct bucket {
	uint32_t uid;
	bool used;
	double tokens;
	uint64_t last_ms;
};

struct engine {
	struct store *st;
	struct index *ix;
	struct engine_options opt;
	struct route_table routes;
	unsigned cpus;
	int ngpus;
	engine_observer_fn observer;
	void *observer_arg;

	pthread_mutex_t state_mu;

	pthread_mutex_t mu;
	pthread_cond_t work;
	bool stop;
	/* When the first delayed retry is due (ms; 0: none). Any thread may
	 * lower it (a retry delayed); workers promote what is due and reset
	 * it to the next time. */
	_Atomic uint64_t next_due;
	struct worker *workers;
	size_t nworkers;
	unsigned busy[GROUP_GPU0 + MAX_GPUS], total[GROUP_GPU0 + MAX_GPUS];
	pthread_t janitor;
	bool janitor_started;

	/* The deletions waiting for their runs to let go, and the thread
	 * that answers them (rfs-delete): a run's end (EV_STATUS) pokes it,
	 * and it answers the ones still held at their time. */
	pthread_mutex_t del_mu;
	pthread_cond_t del_cv; /* on CLOCK_MONOTONIC */
	struct pending_delete *dels;
	_Atomic size_t ndels;
	bool del_poked, del_stop;
	pthread_t deleter;
	bool deleter_started;

	pthread_mutex_t rate_mu;
	struct bucket buckets[RATE_SLOTS];

	pthread_mutex_t stats_mu;
	struct histogram h_wait, h_run, h_e2e;
	uint64_t submitted, rejected, memo_hits, retries, breaker_returns;

	struct remote *remote; /* remote.c */
	struct webhooks *hooks; /* webhook.c */
	struct ledger *ledger;	/* ledger.c */
	struct replica *replica; /* replica.c (NULL: no replica=) */
};

/* engine.c */
void engine_notify(struct engine *e, const uint8_t id[JOB_ID_LEN], const char *route,
                   enum engine_event ev);
void engine_wake(struct engine *e);
/* The CLOCK_REALTIME time ms from now, for pthread_cond_timedwait. */
struct timespec;
void engine_abstime(uint64_t ms, struct timespec *ts);
void engine_lower_next_due(struct engine *e, uint64_t t);
uint8_t engine_route_group(struct engine *e, const struct route *r);

/* run.c */
void *engine_worker_main(void *arg);
void *engine_janitor_main(void *arg);
void engine_promote_due(struct engine *e);
/*
 * A run's start, shared by workers and remote runs: r->e, r->job, r->stop,
 * r->gpu set; fills the rest, logs the start and reads the request. false
 * when the run is over already (route gone, store error, served from an
 * earlier identical job): the job is finished. digest: for run_end.
 */
bool engine_run_begin(struct run *r, const char *where, uint8_t digest[32]);
/* A run's end after the backend returned rc: complete, cancelled, timed
 * out, requeued for shutdown, delayed for a retry, or failed. */
void engine_run_end(struct run *r, int rc, const uint8_t digest[32]);

/* metrics.c */
void engine_observe(struct histogram *h, double seconds);

/* remote.c */
int remote_open(struct engine *e, char *err, size_t errlen);
int remote_start(struct engine *e);
void remote_stop(struct engine *e);
void remote_close(struct engine *e);
void remote_wake(struct engine *e);
/* Tell the remote run of id to stop; true if there is one. */
bool remote_signal(struct engine *e, const uint8_t id[JOB_ID_LEN], enum stop_reason why);
/* A run a worker claimed whose route is remote (its job was queued
 * before the route became remote): handed over; the worker goes on. */
bool remote_adopt(struct engine *e, struct job *job);
/* The queue group of a remote route (rgroups). */
uint8_t remote_group(struct engine *e, const struct route *r);
/* Stats lines for remote routes and breakers. */
struct textbuf;
void remote_stats(struct engine *e, struct textbuf *b);

/*
 * breaker.c: a circuit breaker per backend instance (a route's target:
 * base URL and model; routes with the same share one). Its fields are
 * guarded by remote->mu (remote.c), which every call holds.
 *   closed     jobs go; `threshold` consecutive runs that could not reach
 *              the service open it.
 *   open       no job of its routes is claimed until until_ms; the first
 *              period is base_ms, each reopening doubles it, up to 10 min.
 *   half_open  one job (the probe) goes: the service answering closes it,
 *              another failure opens it again.
 */
enum breaker_state { BREAKER_CLOSED, BREAKER_OPEN, BREAKER_HALF_OPEN };
enum breaker_outcome {
	BREAKER_NONE,     /* the run ended without a word from the service (cancel, shutdown) */
	BREAKER_ANSWERED, /* the service answered (success or its own refusal) */
	BREAKER_FAILED,   /* the service could not be reached (backend_unavailable) */
};
#define BREAKER_MAX_MS (600 * 1000)
struct breaker {
	const char *backend;
	char target[768];
	unsigned threshold;
	uint64_t base_ms;
	enum breaker_state state;
	unsigned failures;
	uint64_t open_ms, until_ms;
	bool probing;
	uint64_t opened; /* times it opened */
};
void breaker_init(struct breaker *b, const char *backend, const char *target, unsigned threshold,
                  uint64_t base_ms);
/* Whether a job of its routes may be claimed now (open -> half_open when
 * the period is over). */
bool breaker_may_claim(struct breaker *b, uint64_t now);
/* A job was claimed: in half_open it is the probe (true). */
bool breaker_claimed(struct breaker *b);
/* The probe's claim found no job: another may probe. */
void breaker_unclaimed(struct breaker *b);
/* A run that was the probe (probe) or not ended so; the state after. */
enum breaker_state breaker_result(struct breaker *b, bool probe, enum breaker_outcome o,
                                  uint64_t now);
const char *breaker_state_name(enum breaker_state s);

/* metrics.c */
struct textbuf {
	char *p;
	size_t len, cap;
	bool oom;
};
void tb_printf(struct textbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* replica.c: replication to a bucket (SPEC §12), when replica= is set. */
int replica_open(struct engine *e, char *err, size_t errlen);
int replica_start(struct engine *e);
void replica_stop(struct engine *e);
void replica_close(struct engine *e);
void replica_stats(struct engine *e, struct textbuf *b);

#endif
