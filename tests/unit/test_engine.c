/*
 * test_engine.c - the engine through its API, on a store of its own:
 * submission in order up to the first refusal, quotas, fair share between
 * owners at claim time, job counts kept in the index across a reopen,
 * control (cancel, retry, priority, delete), memoization per owner, and a
 * retry delayed to a time (promoted by a worker once due, never before),
 * the circuit breaker's transitions, each remote route's own queue
 * group (given once, kept across opens, jobs moved out of stale groups),
 * and the status-polling schedule (times counted from the start, not
 * pushed out by slow answers).
 */
#include <errno.h>
#include <json-c/json.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "engine.h"
#include "engine_p.h"
#include "service.h"
#include "store.h"

#define IMAGE "image/synth/default/t2i"

static char dir[64];

static json_object *req(const char *prompt, int seed)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "prompt", json_object_new_string(prompt));
	json_object_object_add(o, "width", json_object_new_int(64));
	json_object_object_add(o, "height", json_object_new_int(64));
	json_object_object_add(o, "seed", json_object_new_int(seed));
	return o;
}

/* Submit one request for uid; its rc, and its id in id (ULID bytes). */
static int submit(struct engine *e, uint32_t uid, const char *prompt, int seed,
		  uint8_t id[JOB_ID_LEN])
{
	struct engine_submission s = {0};
	int rc;

	s.obj = req(prompt, seed);
	rc = engine_submit(e, IMAGE, uid, uid, &s, 1);
	json_object_put(s.obj);
	if (rc)
		return rc;
	if (s.rc == 0 && id)
		ulid_parse(s.id, id);
	return s.rc;
}

static enum job_status status_of(struct engine *e, const uint8_t id[JOB_ID_LEN])
{
	struct job j;
	enum job_status s;

	if (index_job_get(store_index(engine_store(e)), id, &j) != 0)
		return (enum job_status)-1;
	s = j.status;
	job_release(&j);
	return s;
}

/* Wait up to 30 s for a final status. */
static enum job_status wait_final(struct engine *e, const uint8_t id[JOB_ID_LEN])
{
	for (int i = 0; i < 3000; i++) {
		enum job_status s = status_of(e, id);
		if (s == JOB_COMPLETE || s == JOB_ERROR || s == JOB_CANCELLED)
			return s;
		usleep(10000);
	}
	return status_of(e, id);
}

static struct engine *open_engine(struct store *st, int workers, uint64_t user_queue_max,
				  bool per_owner)
{
	struct engine_options o;
	struct engine *e = NULL;
	char err[512];

	engine_options_default(&o);
	o.workers = workers;
	o.rate = 0;
	if (user_queue_max)
		o.user_queue_max = user_queue_max;
	o.memo_per_owner = per_owner;
	if (engine_open(st, &o, &e, err, sizeof(err)) != 0) {
		fprintf(stderr, "engine_open: %s\n", err);
		exit(1);
	}
	return e;
}

/* A batch stops at its first refusal; the quota per owner holds. */
static void test_submission(struct store *st)
{
	struct engine *e = open_engine(st, 0, 3, false);
	struct engine_submission s[4] = {{0}};
	uint8_t id[JOB_ID_LEN];

	s[0].obj = req("one", 1);
	s[1].obj = json_object_new_string("not an object");
	s[2].obj = req("three", 3);
	CHECK(engine_submit(e, IMAGE, 100, 100, s, 3) == 0, "batch");
	CHECK(s[0].rc == 0 && s[1].rc == -EINVAL && s[2].rc == -ECANCELED,
	      "in order up to the first refusal: %d %d %d", s[0].rc, s[1].rc, s[2].rc);
	for (int i = 0; i < 3; i++)
		json_object_put(s[i].obj);
	CHECK(engine_route_jobs(e, IMAGE) == 1, "one job made");
	CHECK(submit(e, 100, "two", 2, id) == 0 && submit(e, 100, "three", 3, id) == 0,
	      "up to the quota");
	CHECK(submit(e, 100, "four", 4, id) == -EAGAIN, "over the owner's quota: EAGAIN");
	CHECK(submit(e, 101, "other", 5, id) == 0, "another owner is not held by it");
	CHECK(engine_route_jobs(e, IMAGE) == 4, "four jobs");
	engine_close(e);
}

/* Owners alternate at claim time whatever the order of submission; the
 * counts follow every change and survive a reopen. */
static void test_fair_share_and_counts(struct store *st)
{
	struct engine *e = open_engine(st, 0, 0, false);
	struct index *ix = store_index(st);
	uint8_t a[5][JOB_ID_LEN], b[JOB_ID_LEN];
	uint64_t c[INDEX_STATUSES];
	struct job j;

	/* Drain what test_submission left. */
	while (index_job_claim(ix, 0, &j) == 0) {
		index_job_finish(ix, j.id, JOB_CANCELLED, NULL, NULL);
		job_release(&j);
	}
	for (int i = 0; i < 5; i++)
		REQUIRE(submit(e, 200, "many", 10 + i, a[i]) == 0, "owner 200, job %d", i);
	REQUIRE(submit(e, 201, "one", 20, b) == 0, "owner 201");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 1");
	CHECK(memcmp(j.id, a[0], JOB_ID_LEN) == 0, "the first job first");
	job_release(&j);
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 2");
	CHECK(memcmp(j.id, b, JOB_ID_LEN) == 0, "then the other owner's, not 200's second");
	job_release(&j);
	CHECK(index_route_counts(ix, IMAGE, c) == 0 && c[JOB_QUEUED] == 4 && c[JOB_RUNNING] == 2,
	      "counts: %llu queued, %llu running", (unsigned long long)c[JOB_QUEUED],
	      (unsigned long long)c[JOB_RUNNING]);
	CHECK(engine_cancel(e, a[4]) == 0 && status_of(e, a[4]) == JOB_CANCELLED, "cancel");
	CHECK(engine_retry(e, a[4]) == 0 && status_of(e, a[4]) == JOB_QUEUED, "retry");
	CHECK(engine_set_priority(e, a[3], JOB_PRIO_HIGH) == 0, "priority");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 3");
	CHECK(memcmp(j.id, a[3], JOB_ID_LEN) == 0, "the high-priority job next");
	job_release(&j);
	CHECK(engine_delete(e, a[2], false, NULL, NULL) == 0 && status_of(e, a[2]) == (enum job_status)-1,
	      "delete");
	engine_close(e);
	/* Counts are the index's: a new engine reads them, counts nothing. */
	e = open_engine(st, 0, 0, false);
	CHECK(index_route_counts(ix, IMAGE, c) == 0 && c[JOB_QUEUED] == 2 && c[JOB_RUNNING] == 3,
	      "after reopen: %llu queued, %llu running", (unsigned long long)c[JOB_QUEUED],
	      (unsigned long long)c[JOB_RUNNING]);
	engine_close(e);
	while (index_job_claim(ix, 0, &j) == 0) {
		index_job_finish(ix, j.id, JOB_CANCELLED, NULL, NULL);
		job_release(&j);
	}
}

/* A retry delayed to a time is not run before it, and is run after it by
 * a worker that was waiting for nothing else. */
static void test_delayed_retry(struct store *st)
{
	struct index *ix = store_index(st);
	struct engine *e = open_engine(st, 0, 0, false);
	uint8_t id[JOB_ID_LEN];
	struct job j;
	int n = 0;

	REQUIRE(submit(e, 300, "later", 30, id) == 0, "submit");
	engine_close(e);
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, id, JOB_ID_LEN) == 0, "claim");
	job_release(&j);
	/* As the engine does after a transient failure: due in 700 ms. */
	uint64_t due = now_ms() + 700;
	REQUIRE(index_job_requeue(ix, id, due, NULL) == 0, "requeue at");
	e = open_engine(st, 1, 0, false);
	REQUIRE(engine_start(e) == 0, "start");
	while (now_ms() + 100 < due) {
		CHECK(status_of(e, id) == JOB_QUEUED, "not run before its time");
		usleep(50000);
		n++;
	}
	CHECK(n > 0, "looked before its time");
	CHECK(wait_final(e, id) == JOB_COMPLETE, "run after its time");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.started_ms >= due && j.attempts == 2 && !(j.flags & JOB_F_DELAYED),
	      "started %lld ms after its time, attempt %u", (long long)(j.started_ms - due),
	      j.attempts);
	job_release(&j);
	engine_stop(e);
	engine_close(e);
}

/* Memoization per owner: another owner's identical request renders again;
 * the owner's own repeat is served from the first. */
static void test_memo_per_owner(struct store *st)
{
	struct engine *e = open_engine(st, 1, 0, true);
	uint8_t a[JOB_ID_LEN], b[JOB_ID_LEN], c[JOB_ID_LEN];
	struct job j;

	REQUIRE(engine_start(e) == 0, "start");
	REQUIRE(submit(e, 400, "same", 40, a) == 0 && wait_final(e, a) == JOB_COMPLETE, "first");
	REQUIRE(submit(e, 401, "same", 40, b) == 0 && wait_final(e, b) == JOB_COMPLETE, "other");
	REQUIRE(submit(e, 400, "same", 40, c) == 0 && wait_final(e, c) == JOB_COMPLETE, "repeat");
	REQUIRE(index_job_get(store_index(st), b, &j) == 0, "get other");
	CHECK(!(j.flags & JOB_F_CACHED), "another owner's request is not served from the first");
	job_release(&j);
	REQUIRE(index_job_get(store_index(st), c, &j) == 0, "get repeat");
	CHECK(j.flags & JOB_F_CACHED, "the owner's own repeat is");
	job_release(&j);
	engine_stop(e);
	engine_close(e);
}

/* closed -> open after `threshold` failures -> half open after the period
 * (one probe) -> open again, doubled, on failure -> closed on an answer. */
static void test_breaker(void)
{
	struct breaker b;
	uint64_t t = 1000000;

	breaker_init(&b, "fal", "http://h\"x/m", 2, 1000);
	CHECK(strcmp(b.target, "http://h_x/m") == 0, "breaker and groups"); /* a label: no quote */
	CHECK(breaker_may_claim(&b, t) && !breaker_claimed(&b), "breaker and groups");
	CHECK(breaker_result(&b, false, BREAKER_FAILED, t) == BREAKER_CLOSED, "breaker and groups");
	CHECK(breaker_result(&b, false, BREAKER_ANSWERED, t) == BREAKER_CLOSED, "breaker and groups");
	CHECK(breaker_result(&b, false, BREAKER_FAILED, t) == BREAKER_CLOSED, "breaker and groups");
	CHECK(breaker_result(&b, false, BREAKER_FAILED, t) == BREAKER_OPEN, "breaker and groups");
	CHECK(b.until_ms == t + 1000 && b.opened == 1, "breaker and groups");
	CHECK(!breaker_may_claim(&b, t + 999), "breaker and groups");
	CHECK(breaker_may_claim(&b, t + 1000) && b.state == BREAKER_HALF_OPEN, "breaker and groups");
	CHECK(breaker_claimed(&b), "breaker and groups");		    /* the probe */
	CHECK(!breaker_may_claim(&b, t + 1001), "breaker and groups");    /* one at a time */
	/* A run from before that fails now changes nothing while probing. */
	CHECK(breaker_result(&b, false, BREAKER_FAILED, t + 1001) == BREAKER_HALF_OPEN, "breaker and groups");
	CHECK(breaker_result(&b, true, BREAKER_FAILED, t + 1002) == BREAKER_OPEN, "breaker and groups");
	CHECK(b.until_ms == t + 1002 + 2000, "breaker and groups"); /* doubled */
	CHECK(breaker_may_claim(&b, t + 3002) && breaker_claimed(&b), "breaker and groups");
	/* A probe that ends without a word (cancelled) lets another go. */
	CHECK(breaker_result(&b, true, BREAKER_NONE, t + 3003) == BREAKER_HALF_OPEN, "breaker and groups");
	CHECK(breaker_may_claim(&b, t + 3003) && breaker_claimed(&b), "breaker and groups");
	CHECK(breaker_result(&b, true, BREAKER_ANSWERED, t + 3004) == BREAKER_CLOSED, "breaker and groups");
	CHECK(b.open_ms == 1000 && b.failures == 0, "breaker and groups");
	for (int i = 0; i < 20; i++) { /* the period stops doubling at 10 min */
		breaker_result(&b, false, BREAKER_FAILED, t);
		breaker_result(&b, false, BREAKER_FAILED, t);
		breaker_may_claim(&b, b.until_ms);
		breaker_claimed(&b);
		breaker_result(&b, true, BREAKER_FAILED, t);
	}
	CHECK(b.open_ms == BREAKER_MAX_MS, "breaker and groups");
}

static uint8_t stale_group;
static bool is_stale(uint8_t g, void *arg)
{
	(void)arg;
	return g == stale_group;
}
static uint8_t to_cpu(const char *route, void *arg)
{
	(void)route, (void)arg;
	return 0;
}

/* A remote route's jobs queue in a group of its own, the same one after a
 * reopen; index_regroup moves the jobs of a group no route has. */
static void test_route_groups(struct store *st)
{
	struct index *ix = store_index(st);
	const char *a[] = {"image/a/default/t2i", "image/b/default/t2i"};
	const char *b[] = {"image/c/default/t2i", "image/a/default/t2i"};
	uint8_t g1[2], g2[2], id[JOB_ID_LEN];
	char path[128], err[512];
	struct engine_options o;
	struct engine_submission s = {0};
	struct engine *e = NULL;
	uint64_t n = 0, moved = 0;
	FILE *f;

	CHECK(index_route_groups(ix, a, 2, GROUP_ROUTE0, g1) == 0, "breaker and groups");
	CHECK(g1[0] >= GROUP_ROUTE0 && g1[1] >= GROUP_ROUTE0 && g1[0] != g1[1], "breaker and groups");
	CHECK(index_route_groups(ix, b, 2, GROUP_ROUTE0, g2) == 0, "breaker and groups");
	CHECK(g2[1] == g1[0] && g2[0] != g1[0] && g2[0] != g1[1], "breaker and groups");

	snprintf(path, sizeof(path), "%s/models.json", dir);
	CHECK((f = fopen(path, "w")) != NULL, "breaker and groups");
	fputs("{\"routes\": {\"image/a/default/t2i\": {\"backend\": \"fal\", \"model\": "
	      "\"fal-ai/x\", \"base_url\": \"http://127.0.0.1:9\", \"media_type\": "
	      "\"image/png\", \"schema\": {\"type\": \"object\"}}}}",
	      f);
	fclose(f);
	engine_options_default(&o);
	o.workers = 0;
	o.rate = 0;
	o.models = path;
	CHECK(engine_open(st, &o, &e, err, sizeof(err)) == 0, "breaker and groups");
	s.obj = json_object_new_object();
	CHECK(engine_submit(e, "image/a/default/t2i", 1, 1, &s, 1) == 0 && s.rc == 0, "breaker and groups");
	json_object_put(s.obj);
	ulid_parse(s.id, id);
	CHECK(index_queue_depth(ix, g1[0], &n) == 0 && n == 1, "breaker and groups");
	engine_close(e);

	stale_group = g1[0];
	CHECK(index_regroup(ix, is_stale, to_cpu, NULL, &moved) == 0 && moved == 1, "breaker and groups");
	CHECK(index_queue_depth(ix, g1[0], &n) == 0 && n == 0, "breaker and groups");
	CHECK(index_queue_depth(ix, 0, &n) == 0 && n >= 1, "breaker and groups");
	CHECK(index_job_cancel(ix, id) == 0, "breaker and groups");
}

static void test_poll_schedule(void)
{
	struct svc_poll p;
	uint64_t t = 10000, d;

	/* A schedule never started (zeroed) starts at its first answer. */
	memset(&p, 0, sizeof(p));
	CHECK(svc_poll_after(&p, t) == 200 && p.at == t + 200, "poll schedule");
	CHECK(svc_poll_start(&p, t) == 200, "poll schedule");
	/* Quick answers: 200 ms growing by 5/4, counted from the start. */
	CHECK(svc_poll_after(&p, t + 210) == 240, "poll schedule");	/* at 450 */
	CHECK(svc_poll_after(&p, t + 460) == 302, "poll schedule");	/* at 762 */
	/* An answer that came late (at 1800: the times 1152 and 1639 went by
	 * while it was in flight): the next time on the schedule, 2247, not
	 * 1800 + 390; the times missed are not made up for. */
	CHECK(svc_poll_after(&p, t + 1800) == 2247 - 1800, "poll schedule");
	CHECK(svc_poll_after(&p, t + 2260) == 3007 - 2260, "poll schedule");
	/* Never more than 2 s apart, never due in the past, whatever the gap. */
	for (int i = 0; i < 40; i++) {
		d = svc_poll_after(&p, p.at + 1);
		CHECK(d > 0 && d <= 2000, "poll schedule");
	}
	CHECK(p.ms == 2000, "poll schedule");
	t = p.at;
	d = svc_poll_after(&p, t + 3600 * 1000 + 7); /* every 2 s: 1993 to go */
	CHECK(d == 1993 && p.at == t + 3602 * 1000, "poll schedule");
}

static atomic_int answers, answer_rc;

static void answered(void *arg, int rc)
{
	(void)arg;
	atomic_store(&answer_rc, rc);
	atomic_fetch_add(&answers, 1);
}

/* A running job is not deleted under its run. Without done: -EBUSY at
 * once, the job cancelled and kept. With done: answered later, once: the
 * job deleted (0) when it has ended by its time, or -EBUSY at the
 * engine's stop while it still runs (kept). */
static void test_delete_of_a_running_job(struct store *st)
{
	struct engine *e = open_engine(st, 0, 0, false);
	struct index *ix = store_index(st);
	uint8_t a[JOB_ID_LEN], b[JOB_ID_LEN];
	struct job j;

	while (index_job_claim(ix, 0, &j) == 0) {
		index_job_finish(ix, j.id, JOB_CANCELLED, NULL, NULL);
		job_release(&j);
	}
	REQUIRE(engine_start(e) == 0, "start");
	REQUIRE(submit(e, 300, "held a", 30, a) == 0 && submit(e, 300, "held b", 31, b) == 0,
		"submit");
	for (int i = 0; i < 2; i++) {
		REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim %d", i);
		job_release(&j);
	}
	CHECK(engine_delete(e, a, false, NULL, NULL) == -EBUSY && status_of(e, a) == JOB_RUNNING,
	      "without done: EBUSY, the job kept");
	CHECK(engine_delete(e, a, false, answered, NULL) == ENGINE_LATER && !atomic_load(&answers),
	      "with done: answered later");
	/* Its run ends (here, behind the engine's back: no event; the
	 * deletion is looked at again at its time). */
	index_job_finish(ix, a, JOB_CANCELLED, NULL, NULL);
	for (int i = 0; i < 500 && !atomic_load(&answers); i++)
		usleep(10000);
	CHECK(atomic_load(&answers) == 1 && atomic_load(&answer_rc) == 0 &&
		      status_of(e, a) == (enum job_status)-1,
	      "the ended job deleted at its time: %d answers, rc %d", atomic_load(&answers),
	      atomic_load(&answer_rc));
	CHECK(engine_delete(e, b, false, answered, NULL) == ENGINE_LATER, "b later");
	engine_close(e);
	REQUIRE(index_job_get(ix, b, &j) == 0, "b kept");
	CHECK(atomic_load(&answers) == 2 && atomic_load(&answer_rc) == -EBUSY &&
		      j.status == JOB_RUNNING,
	      "still running at the stop: EBUSY, kept");
	job_release(&j);
	index_job_finish(ix, b, JOB_CANCELLED, NULL, NULL);
}

int main(void)
{
	struct store_options so = {0};
	struct store *st;

	test_tmpdir(dir, "engine");
	if (store_open(dir, &so, &st) != 0) {
		fprintf(stderr, "store_open: %s\n", store_lasterr());
		return 1;
	}
	test_submission(st);
	test_fair_share_and_counts(st);
	test_delayed_retry(st);
	test_memo_per_owner(st);
	test_breaker();
	test_route_groups(st);
	test_poll_schedule();
	test_delete_of_a_running_job(st);
	store_close(st);
	rm_rf(dir);
	return check_done("test_engine");
}
