/*
 * remote.c - remote runs (SPEC §8): jobs of remote backends run as steps
 * (backend.h) driven by the answers of one HTTP loop (http.c) and a few
 * remote threads, so that a job waiting on a service holds no thread and
 * costs a struct rrun (a few KiB with its request and last answer).
 *
 * DESIGN
 * Each remote route has its own queue group (index rgroups, given at open)
 * and a count of runs in flight bounded by its `concurrency`; its routes'
 * circuit breaker (breaker.c) decides whether its jobs may be claimed at
 * all. Remote threads loop: put the runs whose time has come on the ready
 * list (behind the answers there: a burst of answers does not hold back
 * the polls due meanwhile), advance a run that is ready (its answer came,
 * its timer fired, or it must stop), else look at the queue depths (one
 * index read) and claim a job for a route with room and a closed (or
 * probing) breaker, else sleep until the earliest timer, deadline or
 * retry, or until woken (a submission, an answer, a signal). A step waits
 * for no index write but the ones that must precede a request that acts
 * at the service (run.c, engine_i.h: batching), and for its output file's
 * own syncs: its writes, its output's reference and its run's end are
 * queued (index_write_async).
 *
 * A run's state: `active` while a thread runs its step (no other thread
 * touches it then); otherwise it waits for an answer (`waiting_http`), a
 * time (`wake_ms`), or is on the ready list. The HTTP loop's callback
 * stores the answer and puts the run on the ready list unless it is
 * active (then the step's return does).
 *
 * Times are kept in a binary min-heap of waiting runs (`timers`), keyed by
 * the run's next timer or deadline (`due_ms`): a thread looks only at the
 * runs that are due, so a timer costs O(log n) with n runs in flight, not
 * a walk over all of them (1,000 polling runs fire hundreds of timers a
 * second). Only a stop asked of some run (remote_signal, remote_stop:
 * `sweep_now`) walks them all. A run is in the heap only while it waits:
 * a step's end puts it there, the next step's start takes it out.
 *
 * Of the idle threads, one waits for the earliest time (on tcv, the
 * `timer_waiter`), the others only to be woken (on cv, `idle` of them;
 * at most a second, as a backstop): a time that comes wakes one thread,
 * not all of them, and so does a run made ready, a run's end (room for a
 * claim) or a submission (wake_one). A new earliest time wakes the timer
 * waiter to wait for it instead.
 *
 * A run that could not reach its service when the breaker is (or has just
 * become) open goes back to the queue without its attempt counted
 * (index_job_return): the breaker holds it, not a backoff; it never ends
 * `error` for a service that is down.
 *
 * LOCKING: mu guards everything in struct remote and every rrun field but
 * those of its struct run, which belong to the thread running the run's
 * step (active) and are read by others only through `stop` (atomic).
 * Order: e->state_mu before mu; index calls are made without mu.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "engine_p.h"
#include "errors.h"
#include "http.h"

#define REMOTE_THREADS 16
/* Jobs one claim takes at most (one durable write for all of them). */
#define CLAIM_BATCH 16

struct rroute {
	const struct route *route;
	uint8_t group;
	unsigned inflight;
	struct breaker *br;
};

struct rrun {
	struct run r;
	atomic_int stop;
	struct remote *m;
	struct rroute *rt;
	struct rrun *prev, *next; /* remote->all */
	struct rrun *qnext;       /* remote->ready */
	bool queued, active, begun, cancelling, probe, bug;
	bool waiting_http, answered, xfer_cancelled;
	uint64_t xfer;
	uint64_t wake_ms; /* run_after: 0 none */
	uint64_t due_ms;  /* its key in remote->timers */
	size_t hidx;      /* 1 + its place in remote->timers; 0: not there */
	/* The answer the loop delivered (next) and the one the step reads. */
	struct http_response next_resp, resp;
	char *next_body, *body;
	uint8_t digest[INDEX_HASH_LEN];
};

struct remote {
	struct engine *e;
	pthread_mutex_t mu;
	pthread_cond_t cv, tcv;
	unsigned idle;	   /* threads waiting on cv */
	bool timer_waiter; /* a thread waits on tcv until timer_until */
	uint64_t timer_until;
	/* A sweep's thread takes the first run it makes ready itself: the
	 * runs it made ready wake others only once it is done (`swept`). */
	bool sweeping;
	size_t swept;
	bool stop;
	struct rrun *all, *ready, *ready_tail;
	size_t nall;
	/* Waiting runs by due_ms (a min-heap); its array has room for every
	 * run (rrun_new grows it), so a run always finds its place. */
	struct rrun **timers;
	size_t ntimers, timers_cap;
	/* A stop was asked of some run: look at every run once. */
	bool sweep_now;
	struct rroute *routes; /* one per remote route, in route order */
	size_t nroutes, next_route;
	uint8_t *group_of; /* per route of the table: its group */
	struct breaker *breakers;
	size_t nbreakers;
	pthread_t threads[REMOTE_THREADS];
	bool started[REMOTE_THREADS];
	struct http_deny *deny;
	struct http_loop *http;
};

static struct rrun *rrun_of(struct run *r)
{
	return (struct rrun *)((char *)r - offsetof(struct rrun, r));
}

/* Under mu: wake one idle thread (the timer waiter if none other is). */
static void wake_one(struct remote *m)
{
	if (m->idle)
		pthread_cond_signal(&m->cv);
	else if (m->timer_waiter)
		pthread_cond_signal(&m->tcv);
}

/* Under mu. */
static void push_ready(struct remote *m, struct rrun *rr)
{
	if (rr->queued)
		return;
	rr->queued = true;
	rr->qnext = NULL;
	if (m->ready_tail)
		m->ready_tail->qnext = rr;
	else
		m->ready = rr;
	m->ready_tail = rr;
	if (m->sweeping)
		m->swept++;
	else
		wake_one(m);
}

static struct rrun *pop_ready(struct remote *m)
{
	struct rrun *rr = m->ready;

	if (rr) {
		m->ready = rr->qnext;
		if (!m->ready)
			m->ready_tail = NULL;
		rr->queued = false;
	}
	return rr;
}

/* ---- the timer heap (under mu) ---- */

static void heap_place(struct remote *m, struct rrun *rr, size_t i)
{
	m->timers[i] = rr;
	rr->hidx = i + 1;
}

static void heap_up(struct remote *m, size_t i)
{
	struct rrun *rr = m->timers[i];

	while (i > 0) {
		size_t parent = (i - 1) / 2;

		if (m->timers[parent]->due_ms <= rr->due_ms)
			break;
		heap_place(m, m->timers[parent], i);
		i = parent;
	}
	heap_place(m, rr, i);
}

static void heap_down(struct remote *m, size_t i)
{
	struct rrun *rr = m->timers[i];

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= m->ntimers)
			break;
		if (c + 1 < m->ntimers && m->timers[c + 1]->due_ms < m->timers[c]->due_ms)
			c++;
		if (rr->due_ms <= m->timers[c]->due_ms)
			break;
		heap_place(m, m->timers[c], i);
		i = c;
	}
	heap_place(m, rr, i);
}

static void timer_del(struct remote *m, struct rrun *rr)
{
	size_t i = rr->hidx;

	if (!i)
		return;
	rr->hidx = 0;
	if (--i == --m->ntimers)
		return;
	/* The last one takes its place, then finds its own. */
	struct rrun *last = m->timers[m->ntimers];
	heap_place(m, last, i);
	heap_up(m, i);
	heap_down(m, last->hidx - 1);
}

/* Wait for due_ms (0: for nothing). Never allocates (timers_cap >= nall). */
static void timer_set(struct remote *m, struct rrun *rr, uint64_t due_ms)
{
	if (!due_ms) {
		timer_del(m, rr);
		return;
	}
	rr->due_ms = due_ms;
	if (!rr->hidx)
		heap_place(m, rr, m->ntimers++);
	heap_up(m, rr->hidx - 1);
	heap_down(m, rr->hidx - 1);
	if (m->timer_waiter && due_ms < m->timer_until)
		pthread_cond_signal(&m->tcv); /* to wait for this one instead */
}

/* When a waiting run must be looked at next: its timer (unless it waits
 * for an answer) or its deadline (unless a stop was asked already); 0:
 * never (an answer will wake it). */
static uint64_t due_of(struct rrun *rr)
{
	uint64_t due = 0, dl = rr->r.deadline_ms;

	if (rr->wake_ms && !rr->waiting_http)
		due = rr->wake_ms;
	if (dl && atomic_load(&rr->stop) == STOP_NONE && (!due || dl < due))
		due = dl;
	return due;
}

/* ---- what backends call ---- */

static void on_http(void *arg, const struct http_response *resp)
{
	struct rrun *rr = arg;
	struct remote *m = rr->m;
	char *body = malloc(resp->len + 1);

	pthread_mutex_lock(&m->mu);
	rr->next_resp = *resp;
	if (body) {
		memcpy(body, resp->body, resp->len);
		body[resp->len] = '\0';
	} else {
		rr->next_resp.len = 0;
		rr->next_resp.status = 0;
		rr->next_resp.error_code = "backend_unavailable";
		snprintf(rr->next_resp.message, sizeof(rr->next_resp.message),
		         "out of memory for the service's answer");
	}
	free(rr->next_body);
	rr->next_body = body;
	rr->next_resp.body = body ? body : "";
	rr->waiting_http = false;
	rr->answered = true;
	if (!rr->active)
		push_ready(m, rr);
	pthread_mutex_unlock(&m->mu);
}

int run_http(struct run *r, const struct http_request *rq)
{
	struct rrun *rr = rrun_of(r);
	struct remote *m = rr->m;
	uint64_t id = 0;
	int rc;

	/* A request that acts at the service (not a GET: a submission, a
	 * cancel) leaves once every write of the run is durable (a
	 * "submitting" mark before the submission): engine_i.h, batching. */
	if (strcmp(rq->method, "GET") != 0 && (rc = run_flush(r)) != 0)
		return run_fail(r, rc, "store", "cannot record the job: %s", store_lasterr());
	pthread_mutex_lock(&m->mu);
	rr->waiting_http = true;
	rr->answered = false;
	rr->xfer_cancelled = false;
	rr->xfer = 0;
	pthread_mutex_unlock(&m->mu);
	rc = http_submit(m->http, rq, on_http, rr, &id);
	pthread_mutex_lock(&m->mu);
	if (rc) {
		rr->waiting_http = false;
	} else if (rr->waiting_http) {
		rr->xfer = id;
	}
	pthread_mutex_unlock(&m->mu);
	if (rc)
		return run_fail(r, rc, "backend_unavailable", "cannot start a request: %s",
		                strerror(-rc));
	return RUN_WAIT;
}

int run_after(struct run *r, uint64_t ms)
{
	struct rrun *rr = rrun_of(r);

	pthread_mutex_lock(&rr->m->mu);
	rr->wake_ms = now_ms() + ms;
	if (!rr->wake_ms)
		rr->wake_ms = 1;
	pthread_mutex_unlock(&rr->m->mu);
	return RUN_WAIT;
}

/* ---- a run's life ---- */

static enum breaker_outcome outcome_of(struct run *r, int rc)
{
	if (rc == 0)
		return BREAKER_ANSWERED;
	if (run_stopping(r) != STOP_NONE || !r->error_code[0])
		return BREAKER_NONE;
	if (strcmp(r->error_code, "backend_unavailable") == 0)
		return BREAKER_FAILED;
	if (strcmp(r->error_code, "backend_auth") == 0 ||
	    strcmp(r->error_code, "backend_rejected") == 0 ||
	    strcmp(r->error_code, "backend_failed") == 0 ||
	    strcmp(r->error_code, "cancelled_remotely") == 0 ||
	    strcmp(r->error_code, "output_invalid") == 0)
		return BREAKER_ANSWERED;
	return BREAKER_NONE; /* ours: configuration, store, input */
}

static void rrun_free(struct rrun *rr)
{
	free(rr->next_body);
	free(rr->body);
	free((char *)rr->r.request);
	free(rr->r.result);
	free(rr->r.pend);
	free(rr->r.pend_remote);
	free(rr->r.remote_last);
	free(rr->r.pend_handle);
	job_release(&rr->r.job);
	free(rr);
}

/* The run is over (rc from its backend, or `begun` false: begin ended it). */
static void end_run(struct engine *e, struct rrun *rr, int rc, bool ended)
{
	struct remote *m = e->remote;
	struct run *r = &rr->r;
	enum breaker_state st = BREAKER_CLOSED;
	bool hold = false;
	uint64_t until = 0;

	if (!ended) {
		enum breaker_outcome o = outcome_of(r, rc);

		pthread_mutex_lock(&m->mu);
		if (rr->rt && rr->rt->br) {
			st = breaker_result(rr->rt->br, rr->probe, o, now_ms());
			until = rr->rt->br->until_ms;
		}
		hold = o == BREAKER_FAILED && st != BREAKER_CLOSED;
		pthread_mutex_unlock(&m->mu);
		if (hold) {
			char ts[32];

			engine_time_format(until, ts);
			run_log(r,
			        "%s: %s; the %s service at %s is unavailable and its circuit "
			        "breaker is open until %s: the job waits in the queue (this "
			        "attempt is not counted)",
			        r->error_code, r->error_message, r->route->backend->name,
			        rr->rt->br->target, ts);
			free((char *)r->request);
			r->request = NULL;
			if (index_job_return(e->ix, r->job.id) == 0) {
				engine_notify(e, r->job.id, r->job.route, EV_STATUS);
			} else {
				run_log(r, "error: cannot requeue: %s", store_lasterr());
				engine_run_end(r, rc, rr->digest);
			}
			pthread_mutex_lock(&e->stats_mu);
			e->breaker_returns++;
			pthread_mutex_unlock(&e->stats_mu);
		} else {
			engine_run_end(r, rc, rr->digest);
		}
		if (r->route && r->route->backend->run_free)
			r->route->backend->run_free(r);
		else
			free(r->bstate);
		r->bstate = NULL;
	} else if (rr->probe) {
		/* Begin ended it (cached, say): the probe is still to go. */
		pthread_mutex_lock(&m->mu);
		if (rr->rt && rr->rt->br)
			breaker_result(rr->rt->br, true, BREAKER_NONE, now_ms());
		pthread_mutex_unlock(&m->mu);
	}
	pthread_mutex_lock(&m->mu);
	timer_del(m, rr);
	if (rr->prev)
		rr->prev->next = rr->next;
	else
		m->all = rr->next;
	if (rr->next)
		rr->next->prev = rr->prev;
	m->nall--;
	if (rr->rt)
		rr->rt->inflight--;
	wake_one(m); /* room for a claim */
	pthread_mutex_unlock(&m->mu);
	rrun_free(rr);
}

static void advance(struct engine *e, struct rrun *rr)
{
	struct remote *m = e->remote;
	struct run *r = &rr->r;
	const struct backend *b;
	bool have_answer;
	int rc;

	pthread_mutex_lock(&m->mu);
	have_answer = rr->answered;
	if (have_answer) {
		free(rr->body);
		rr->body = rr->next_body;
		rr->resp = rr->next_resp;
		rr->next_body = NULL;
		rr->answered = false;
	}
	rr->wake_ms = 0;
	timer_del(m, rr);
	pthread_mutex_unlock(&m->mu);
	r->http = have_answer ? &rr->resp : NULL;

	/* The step's log lines, progress and remote record go in one write
	 * (with the handle, if it puts one): engine_i.h, batching. */
	run_batch_begin(r);
	if (!rr->begun) {
		rr->begun = true;
		if (!engine_run_begin(r, "remote", rr->digest)) {
			end_run(e, rr, 0, true);
			return;
		}
		b = r->route->backend;
		if (!b->step) {
			/* A local backend's job in a remote group (its route
			 * changed since it was queued): run it here, once. */
			run_batch_end(r);
			end_run(e, rr, b->run(r), false);
			return;
		}
		rc = b->step(r);
	} else {
		enum stop_reason why = run_stopping(r);

		b = r->route->backend;
		if (rr->bug) {
			rc =
			    run_fail(r, -EIO, "backend_failed",
			             "the %s backend left a run with nothing to wait for", b->name);
		} else if (rr->cancelling) {
			rc = b->cancel(r);
			if (rc != RUN_WAIT)
				rc = -ECANCELED;
		} else if ((why == STOP_CANCEL || why == STOP_TIMEOUT) && b->cancel) {
			rr->cancelling = true;
			r->http = NULL;
			rc = b->cancel(r);
			if (rc != RUN_WAIT)
				rc = -ECANCELED;
		} else if (why != STOP_NONE) {
			rc = -ECANCELED;
		} else {
			rc = b->step(r);
		}
	}
	r->http = NULL;
	run_batch_end(r);
	if (rc != RUN_WAIT) {
		end_run(e, rr, rc, false);
		return;
	}
	pthread_mutex_lock(&m->mu);
	rr->active = false;
	if (rr->answered || (rr->wake_ms && rr->wake_ms <= now_ms()) ||
	    (atomic_load(&rr->stop) != STOP_NONE && !rr->waiting_http)) {
		push_ready(m, rr);
	} else if (!rr->waiting_http && !rr->wake_ms) {
		rr->bug = true;
		push_ready(m, rr);
	} else {
		/* Its timer or deadline (a deadline already past: the next
		 * sweep stops it). */
		timer_set(m, rr, due_of(rr));
	}
	pthread_mutex_unlock(&m->mu);
}

/* Under mu: a new run of job for route slot rt (NULL: the route is not
 * remote here). Takes job's strings. */
static struct rrun *rrun_new(struct remote *m, struct rroute *rt, struct job *job, bool probe)
{
	struct rrun *rr;

	if (m->timers_cap <= m->nall) {
		size_t cap = m->timers_cap ? 2 * m->timers_cap : 64;
		struct rrun **t = realloc(m->timers, cap * sizeof(*t));

		if (!t)
			return NULL;
		m->timers = t;
		m->timers_cap = cap;
	}
	if (!(rr = calloc(1, sizeof(*rr))))
		return NULL;
	rr->m = m;
	rr->rt = rt;
	rr->probe = probe;
	rr->r.e = m->e;
	rr->r.job = *job;
	memset(job, 0, sizeof(*job));
	rr->r.stop = &rr->stop;
	rr->r.gpu = -1;
	atomic_store(&rr->stop, m->stop ? STOP_SHUTDOWN : STOP_NONE);
	rr->next = m->all;
	if (m->all)
		m->all->prev = rr;
	m->all = rr;
	m->nall++;
	if (rt)
		rt->inflight++;
	rr->active = false;
	push_ready(m, rr);
	return rr;
}

/* Under mu, which it drops while claiming: claim one job for a route with
 * room whose breaker lets it. true if one was claimed (or tried and the
 * index failed: the caller loops, a bounded number of times). */
static bool claim_one(struct engine *e, const uint64_t *depth)
{
	struct remote *m = e->remote;
	uint64_t now = now_ms();

	for (size_t k = 0; k < m->nroutes; k++) {
		size_t i = (m->next_route + k) % m->nroutes;
		struct rroute *rt = &m->routes[i];
		struct job job, claimed[CLAIM_BATCH];
		bool probe;
		int rc;

		if (!depth[rt->group] || rt->inflight >= rt->route->concurrency ||
		    (rt->br && !breaker_may_claim(rt->br, now)))
			continue;
		/* Claims go by batches (one durable write for several jobs)
		 * while the breaker is closed; a probe is one job. */
		size_t room = rt->route->concurrency - rt->inflight, got = 0;
		bool probe_kept = false;
		if (room > CLAIM_BATCH)
			room = CLAIM_BATCH;
		if (rt->br && rt->br->state != BREAKER_CLOSED) {
			/* The probe's place is taken before mu is dropped, so
			 * that no other thread claims a second one meanwhile. */
			room = 1;
			probe_kept = breaker_claimed(rt->br);
		}
		rt->inflight += (unsigned)room; /* places kept while claiming */
		pthread_mutex_unlock(&m->mu);
		pthread_mutex_lock(&e->state_mu);
		rc = index_job_claim_many(e->ix, rt->group, room, claimed, &got);
		pthread_mutex_unlock(&e->state_mu);
		pthread_mutex_lock(&m->mu);
		rt->inflight -= (unsigned)room;
		m->next_route = i + 1;
		if (rc) {
			if (probe_kept)
				breaker_unclaimed(rt->br);
			if (rc != STORE_E_NOTFOUND)
				fprintf(stderr, "renderfs: cannot claim a job: %s\n",
				        store_lasterr());
			return false;
		}
		for (size_t c = 0; c < got; c++) {
			job = claimed[c];
			probe = probe_kept && c == 0;
			if (!rrun_new(m, rt, &job, probe)) {
				/* No memory for it: back to the queue as it was. */
				pthread_mutex_unlock(&m->mu);
				index_job_return(e->ix, job.id);
				job_release(&job);
				pthread_mutex_lock(&m->mu);
				if (probe)
					breaker_result(rt->br, true, BREAKER_NONE, now);
			}
		}
		return true;
	}
	return false;
}

/* Under mu: a waiting run whose time came or that must stop goes to the
 * ready list; the transfer of one that must stop is cancelled; otherwise
 * it waits for its next time. */
static void look(struct remote *m, struct rrun *rr, uint64_t now)
{
	uint64_t dl = rr->r.deadline_ms, due;
	bool stopping = atomic_load(&rr->stop) != STOP_NONE || (dl && now >= dl);

	if (stopping && dl && now >= dl && atomic_load(&rr->stop) == STOP_NONE)
		atomic_store(&rr->stop, STOP_TIMEOUT);
	if (rr->waiting_http) {
		if (stopping && !rr->cancelling && !rr->xfer_cancelled && rr->xfer) {
			rr->xfer_cancelled = true;
			http_cancel(m->http, rr->xfer);
		}
	} else if (rr->wake_ms && (rr->wake_ms <= now || stopping)) {
		timer_del(m, rr);
		push_ready(m, rr);
		return;
	} else if (stopping && !rr->cancelling) {
		timer_del(m, rr);
		push_ready(m, rr);
		return;
	}
	/* Only a later time: what is due now was dealt with above. */
	due = due_of(rr);
	timer_set(m, rr, due > now ? due : 0);
}

/* Under mu: look at the runs that are due (all of them after a stop was
 * asked); *wake: the next time something is due. */
static void sweep(struct remote *m, uint64_t now, uint64_t *wake)
{
	m->sweeping = true;
	m->swept = 0;
	if (m->sweep_now) {
		m->sweep_now = false;
		for (struct rrun *rr = m->all; rr; rr = rr->next)
			if (!rr->active && !rr->queued)
				look(m, rr, now);
	}
	while (m->ntimers && m->timers[0]->due_ms <= now) {
		struct rrun *rr = m->timers[0];

		if (rr->active || rr->queued)
			timer_del(m, rr); /* its step's end sets its time again */
		else
			look(m, rr, now);
	}
	m->sweeping = false;
	/* This thread runs one of them next; others for the rest. */
	for (size_t i = 1; i < m->swept && (m->idle || m->timer_waiter); i++)
		wake_one(m);
	if (m->ntimers && m->timers[0]->due_ms < *wake)
		*wake = m->timers[0]->due_ms;
	for (size_t i = 0; i < m->nbreakers; i++)
		if (m->breakers[i].state == BREAKER_OPEN && m->breakers[i].until_ms < *wake)
			*wake = m->breakers[i].until_ms;
}

static void *remote_main(void *arg)
{
	struct engine *e = arg;
	struct remote *m = e->remote;
	uint64_t *depth = malloc(INDEX_GROUPS * sizeof(*depth));

	pthread_mutex_lock(&m->mu);
	while (!m->stop || m->nall) {
		struct rrun *rr;
		uint64_t now = now_ms(), wake = now + 1000, due;
		struct timespec ts;

		/* Runs whose time has come join the ready list first, behind
		 * the answers already there: a burst of answers does not hold
		 * back the polls that are due meanwhile. */
		sweep(m, now, &wake);
		if ((rr = pop_ready(m)) != NULL) {
			rr->active = true;
			pthread_mutex_unlock(&m->mu);
			advance(e, rr);
			pthread_mutex_lock(&m->mu);
			continue;
		}
		if (!m->stop && depth) {
			pthread_mutex_unlock(&m->mu);
			engine_promote_due(e);
			int rc = index_queue_depths(e->ix, depth);
			pthread_mutex_lock(&m->mu);
			if (rc == 0 && !m->stop && claim_one(e, depth))
				continue;
		}
		if (m->ready)
			continue;
		due = atomic_load(&e->next_due);
		if (due && due < wake)
			wake = due > now ? due : now + 1;
		now = now_ms();
		if (wake <= now)
			wake = now + 1;
		if (!m->timer_waiter) {
			m->timer_waiter = true;
			m->timer_until = wake;
			engine_abstime(wake - now, &ts);
			pthread_cond_timedwait(&m->tcv, &m->mu, &ts);
			m->timer_waiter = false;
		} else {
			m->idle++;
			engine_abstime(1000, &ts);
			pthread_cond_timedwait(&m->cv, &m->mu, &ts);
			m->idle--;
		}
	}
	pthread_mutex_unlock(&m->mu);
	free(depth);
	return NULL;
}

/* ---- the engine's side ---- */

static bool group_stale(uint8_t g, void *arg)
{
	struct remote *m = arg;

	if (g == GROUP_REMOTE)
		return true;
	if (g < GROUP_ROUTE0)
		return false;
	for (size_t i = 0; i < m->nroutes; i++)
		if (m->routes[i].group == g)
			return false;
	return true;
}

static uint8_t group_for(const char *route, void *arg)
{
	struct remote *m = arg;
	const struct route *r = route_find(&m->e->routes, route);

	if (!r)
		return GROUP_CPU; /* ends there as "not configured" */
	return engine_route_group(m->e, r);
}

int remote_open(struct engine *e, char *err, size_t errlen)
{
	struct remote *m = calloc(1, sizeof(*m));
	const struct route_table *t = &e->routes;
	const char **names = NULL;
	uint8_t *groups = NULL;
	uint64_t moved = 0;
	int rc = -ENOMEM;

	if (!m)
		return -ENOMEM;
	m->e = e;
	e->remote = m;
	pthread_mutex_init(&m->mu, NULL);
	pthread_cond_init(&m->cv, NULL);
	pthread_cond_init(&m->tcv, NULL);
	if ((rc = http_deny_parse(e->opt.deny_net ? e->opt.deny_net : HTTP_DENY_DEFAULT, &m->deny,
	                          err, errlen)) != 0)
		return rc;
	rc = -ENOMEM;
	if (!(m->group_of = calloc(t->n ? t->n : 1, 1)) ||
	    !(m->routes = calloc(t->n ? t->n : 1, sizeof(*m->routes))) ||
	    !(m->breakers = calloc(t->n ? t->n : 1, sizeof(*m->breakers))) ||
	    !(names = calloc(t->n ? t->n : 1, sizeof(*names))) ||
	    !(groups = calloc(t->n ? t->n : 1, 1)))
		goto out;
	for (size_t i = 0; i < t->n; i++) {
		const struct route *r = &t->routes[i];
		struct breaker *br = NULL;
		char target[sizeof(br->target)];

		if (!r->backend->remote)
			continue;
		snprintf(target, sizeof(target), "%s", r->target[0] ? r->target : r->path);
		for (size_t k = 0; k < m->nbreakers && !br; k++)
			if (strcmp(m->breakers[k].target, target) == 0 &&
			    m->breakers[k].backend == r->backend->name)
				br = &m->breakers[k];
		if (!br) {
			br = &m->breakers[m->nbreakers++];
			breaker_init(br, r->backend->name, target, r->breaker,
			             (uint64_t)r->breaker_s * 1000);
		}
		m->routes[m->nroutes].route = r;
		m->routes[m->nroutes].br = br;
		names[m->nroutes++] = r->path;
	}
	if (m->nroutes &&
	    (rc = index_route_groups(e->ix, names, m->nroutes, GROUP_ROUTE0, groups)) != 0) {
		snprintf(err, errlen, "%s", store_lasterr());
		goto out;
	}
	for (size_t i = 0; i < m->nroutes; i++) {
		m->routes[i].group = groups[i];
		m->group_of[m->routes[i].route - t->routes] = groups[i];
	}
	/* Jobs queued for a group no route has now (an older format's shared
	 * remote group, a route that changed backend) move to their route's. */
	if ((rc = index_regroup(e->ix, group_stale, group_for, m, &moved)) != 0) {
		snprintf(err, errlen, "cannot move queued jobs to their routes' queues: %s",
		         store_lasterr());
		goto out;
	}
	if (moved)
		fprintf(stderr, "renderfs: %llu queued jobs moved to their routes' queues\n",
		        (unsigned long long)moved);
	rc = 0;
out:
	free(names);
	free(groups);
	return rc;
}

uint8_t remote_group(struct engine *e, const struct route *r)
{
	struct remote *m = e->remote;

	return m && m->group_of ? m->group_of[r - e->routes.routes] : GROUP_REMOTE;
}

int remote_start(struct engine *e)
{
	struct remote *m = e->remote;
	int rc;

	if (!m->nroutes)
		return 0; /* no remote route: no thread (jobs a worker adopts start it) */
	if ((rc = http_loop_start(m->deny, &m->http)) != 0)
		return rc;
	for (int i = 0; i < REMOTE_THREADS; i++) {
		if (pthread_create(&m->threads[i], NULL, remote_main, e) != 0)
			return -EAGAIN;
		m->started[i] = true;
		char name[32];
		snprintf(name, sizeof(name), "rfs-remote%d", i % 100);
		pthread_setname_np(m->threads[i], name);
	}
	return 0;
}

void remote_wake(struct engine *e)
{
	struct remote *m = e->remote;

	if (!m)
		return;
	/* One thread to claim, and the timer waiter for a new due time. */
	pthread_mutex_lock(&m->mu);
	if (m->idle)
		pthread_cond_signal(&m->cv);
	if (m->timer_waiter)
		pthread_cond_signal(&m->tcv);
	pthread_mutex_unlock(&m->mu);
}

void remote_stop(struct engine *e)
{
	struct remote *m = e->remote;

	if (!m)
		return;
	pthread_mutex_lock(&m->mu);
	m->stop = true;
	m->sweep_now = true;
	for (struct rrun *rr = m->all; rr; rr = rr->next)
		atomic_store(&rr->stop, STOP_SHUTDOWN);
	pthread_cond_broadcast(&m->cv);
	pthread_cond_broadcast(&m->tcv);
	pthread_mutex_unlock(&m->mu);
	for (int i = 0; i < REMOTE_THREADS; i++)
		if (m->started[i]) {
			pthread_join(m->threads[i], NULL);
			m->started[i] = false;
		}
	http_loop_stop(m->http);
	m->http = NULL;
}

void remote_close(struct engine *e)
{
	struct remote *m = e->remote;

	if (!m)
		return;
	remote_stop(e);
	/* Runs adopted with no thread to run them (no remote route). */
	while (m->all) {
		struct rrun *rr = m->all;
		m->all = rr->next;
		rrun_free(rr);
	}
	http_deny_free(m->deny);
	free(m->timers);
	free(m->group_of);
	free(m->routes);
	free(m->breakers);
	pthread_mutex_destroy(&m->mu);
	pthread_cond_destroy(&m->cv);
	pthread_cond_destroy(&m->tcv);
	free(m);
	e->remote = NULL;
}

bool remote_signal(struct engine *e, const uint8_t id[JOB_ID_LEN], enum stop_reason why)
{
	struct remote *m = e->remote;
	bool found = false;

	if (!m)
		return false;
	pthread_mutex_lock(&m->mu);
	for (struct rrun *rr = m->all; rr; rr = rr->next)
		if (memcmp(rr->r.job.id, id, JOB_ID_LEN) == 0) {
			atomic_store(&rr->stop, why);
			found = true;
		}
	m->sweep_now = true;
	/* The thread that sweeps next: the timer waiter, or any. */
	if (m->timer_waiter)
		pthread_cond_signal(&m->tcv);
	else
		wake_one(m);
	pthread_mutex_unlock(&m->mu);
	return found;
}

bool remote_adopt(struct engine *e, struct job *job)
{
	struct remote *m = e->remote;
	const struct route *r = route_find(&e->routes, job->route);
	struct rroute *rt = NULL;
	bool ok;

	if (!m || !m->nroutes || !r || !r->backend->remote)
		return false;
	pthread_mutex_lock(&m->mu);
	for (size_t i = 0; i < m->nroutes; i++)
		if (m->routes[i].route == r)
			rt = &m->routes[i];
	ok = !m->stop && rrun_new(m, rt, job, false) != NULL;
	pthread_mutex_unlock(&m->mu);
	return ok;
}

void engine_waiting_for(struct engine *e, const char *route, char *buf, size_t len)
{
	struct remote *m = e->remote;
	char ts[32];

	buf[0] = '\0';
	if (!m)
		return;
	pthread_mutex_lock(&m->mu);
	for (size_t i = 0; i < m->nroutes; i++) {
		struct rroute *rt = &m->routes[i];
		struct breaker *br = rt->br;

		if (strcmp(rt->route->path, route) != 0)
			continue;
		if (br && br->state == BREAKER_OPEN) {
			engine_time_format(br->until_ms, ts);
			snprintf(buf, len,
			         "the %s service at %s: unavailable, its circuit breaker is open "
			         "until %s",
			         br->backend, br->target, ts);
		} else if (br && br->state == BREAKER_HALF_OPEN) {
			snprintf(buf, len,
			         "the %s service at %s: unavailable until one job gets through "
			         "(circuit breaker half open)",
			         br->backend, br->target);
		} else if (rt->inflight >= rt->route->concurrency) {
			snprintf(buf, len, "the route's concurrency: %u jobs in flight",
			         rt->inflight);
		}
	}
	pthread_mutex_unlock(&m->mu);
}

void remote_stats(struct engine *e, struct textbuf *b)
{
	struct remote *m = e->remote;

	if (!m)
		return;
	tb_printf(b, "# HELP renderfs_remote_in_flight Remote jobs in flight per route.\n"
	             "# TYPE renderfs_remote_in_flight gauge\n");
	pthread_mutex_lock(&m->mu);
	for (size_t i = 0; i < m->nroutes; i++)
		tb_printf(b, "renderfs_remote_in_flight{route=\"%s\"} %u\n",
		          m->routes[i].route->path, m->routes[i].inflight);
	tb_printf(b, "# HELP renderfs_breaker_state Circuit breakers: 0 closed, 1 open, 2 half "
	             "open.\n# TYPE renderfs_breaker_state gauge\n");
	for (size_t i = 0; i < m->nbreakers; i++)
		tb_printf(b, "renderfs_breaker_state{backend=\"%s\",target=\"%s\"} %d\n",
		          m->breakers[i].backend, m->breakers[i].target, (int)m->breakers[i].state);
	tb_printf(b, "# HELP renderfs_breaker_opened_total Times each circuit breaker opened.\n"
	             "# TYPE renderfs_breaker_opened_total counter\n");
	for (size_t i = 0; i < m->nbreakers; i++)
		tb_printf(b, "renderfs_breaker_opened_total{backend=\"%s\",target=\"%s\"} %llu\n",
		          m->breakers[i].backend, m->breakers[i].target,
		          (unsigned long long)m->breakers[i].opened);
	pthread_mutex_unlock(&m->mu);
}
