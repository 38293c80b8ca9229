/*
 * test_index.c - the LMDB index: job CRUD and state changes, names, logs,
 * queue order (priorities, fair share across owners, groups), cursor
 * listing over 100,000 jobs, and group commit under concurrency.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <unistd.h>

#include "blake3.h"
#include "check.h"
#include "commit_hold.h"
#include "index.h"
#include "index_i.h"
#include "store.h"

static char dir[64];
static struct index *ix;

static struct job_create mk(const char *route, uint32_t uid, enum job_priority p,
			    const char *request)
{
	struct job_create c = {0};

	c.route = route;
	c.uid = uid;
	c.gid = uid;
	c.priority = p;
	c.request = request;
	c.request_len = strlen(request);
	return c;
}

static int create(const char *route, uint32_t uid, enum job_priority p, const char *req,
		  uint8_t id[JOB_ID_LEN])
{
	struct job_create c = mk(route, uid, p, req);
	return index_job_create(ix, &c, id, NULL);
}

static void test_ulid(void)
{
	uint8_t a[16], b[16], back[16];
	char s[27];

	ulid_new(a);
	ulid_new(b);
	CHECK(memcmp(a, b, 16) < 0, "ULIDs not increasing");
	ulid_format(a, s);
	CHECK(strlen(s) == 26 && ulid_parse(s, back) == 0 && memcmp(a, back, 16) == 0,
	      "ULID round trip %s", s);
	CHECK(ulid_time_ms(a) / 1000 == now_ms() / 1000 || ulid_time_ms(a) <= now_ms(),
	      "ULID time");
	CHECK(ulid_parse("8ZZZZZZZZZZZZZZZZZZZZZZZZZ", back) == -EINVAL, "overflowing ULID");
	CHECK(ulid_parse("01ARZ3NDEKTSV4RRFFQ69G5FA", back) == -EINVAL, "short ULID");
	CHECK(ulid_parse("01ARZ3NDEKTSV4RRFFQ69G5FA!", back) == -EINVAL, "bad char");
	CHECK(ulid_parse("01ARZ3NDEKTSV4RRFFQ69G5FAV", back) == 0, "spec example");
	ulid_format(back, s);
	CHECK(strcmp(s, "01ARZ3NDEKTSV4RRFFQ69G5FAV") == 0, "spec example round trip: %s", s);
}

static void test_crud(void)
{
	const char *route = "image/synth/default/t2i";
	uint8_t id[16], got_ids[4][16];
	struct job j;
	char *req, buf[256];
	size_t len, n, got;
	int rc;

	REQUIRE(create(route, 1000, JOB_PRIO_NORMAL, "{\"prompt\":\"fox\"}", id) == 0, "create: %s",
		store_lasterr());
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_QUEUED && j.uid == 1000 && strcmp(j.route, route) == 0 &&
		      j.attempts == 0 && j.seq >= 1 && j.created_ms > 0,
	      "fields");
	CHECK(strcmp(job_status_name(j.status), "queued") == 0, "status name");
	job_release(&j);
	CHECK(index_job_request(ix, id, &req, &len) == 0 && strcmp(req, "{\"prompt\":\"fox\"}") == 0,
	      "request");
	free(req);

	/* by seq, by route, by owner */
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	uint8_t byseq[16];
	CHECK(index_job_by_seq(ix, j.seq, byseq) == 0 && memcmp(byseq, id, 16) == 0, "by seq");
	job_release(&j);
	CHECK(index_list_by_route(ix, route, NULL, 4, got_ids, &n) == 0 && n == 1 &&
		      memcmp(got_ids[0], id, 16) == 0,
	      "by route");
	CHECK(index_list_by_route(ix, "image/synth/default/t2", NULL, 4, got_ids, &n) == 0 && n == 0,
	      "route prefix must not match");
	CHECK(index_list_by_owner(ix, 1000, NULL, 4, got_ids, &n) == 0 && n == 1, "by owner");
	CHECK(index_list_by_owner(ix, 1001, NULL, 4, got_ids, &n) == 0 && n == 0, "other owner");

	/* claim -> progress -> log -> output -> complete */
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, id, 16) == 0, "claim");
	CHECK(j.status == JOB_RUNNING && j.attempts == 1 && j.started_ms > 0, "running");
	job_release(&j);
	CHECK(index_job_claim(ix, 0, &j) == STORE_E_NOTFOUND, "empty queue");
	CHECK(index_job_progress(ix, id, 250) == 0, "progress");
	CHECK(index_job_progress(ix, id, 1001) == -EINVAL, "progress > 1");
	CHECK(index_job_log(ix, id, "first line", 10) == 0, "log 1");
	CHECK(index_job_log(ix, id, "second", 6) == 0, "log 2");
	CHECK(index_job_log(ix, id, "bad\nline", 8) == -EINVAL, "log newline");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.progress == 250 && j.log_size == 18, "progress %u log %llu", j.progress,
	      (unsigned long long)j.log_size);
	job_release(&j);
	rc = index_job_log_read(ix, id, 0, buf, sizeof(buf), &got);
	CHECK(rc == 0 && got == 18 && memcmp(buf, "first line\nsecond\n", 18) == 0, "log read");
	rc = index_job_log_read(ix, id, 5, buf, 8, &got);
	CHECK(rc == 0 && got == 8 && memcmp(buf, " line\nse", 8) == 0, "log read at offset");
	rc = index_job_log_read(ix, id, 11, buf, 100, &got);
	CHECK(rc == 0 && got == 7 && memcmp(buf, "second\n", 7) == 0, "log read at line start");
	rc = index_job_log_read(ix, id, 18, buf, 100, &got);
	CHECK(rc == 0 && got == 0, "log read at end");

	CHECK(index_job_finish(ix, id, JOB_COMPLETE, NULL, NULL) == STORE_E_STATE,
	      "complete without output");
	uint8_t h[32];
	b3_hash("out", 3, h);
	CHECK(index_job_attach_output(ix, id, h, 3, "image/png", "cpu", false) == 0, "attach");
	CHECK(index_job_attach_output(ix, id, h, 3, "image/png", "cpu", false) == STORE_E_STATE,
	      "second attach");
	CHECK(index_job_finish(ix, id, JOB_COMPLETE, NULL, NULL) == 0, "complete");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_COMPLETE && j.progress == 1000 && j.completed_ms >= j.started_ms &&
		      (j.flags & JOB_F_HAS_OUTPUT) && j.output_size == 3 &&
		      strcmp(j.media_type, "image/png") == 0 && strcmp(j.device, "cpu") == 0,
	      "complete fields");
	job_release(&j);
	struct blob_info bi;
	CHECK(index_blob_get(ix, h, &bi) == 0 && bi.refcount == 1 && bi.size == 3, "blob ref");
	CHECK(index_job_cancel(ix, id) == STORE_E_STATE, "cancel complete");
	CHECK(index_job_retry(ix, id) == STORE_E_STATE, "retry complete");

	/* delete releases the blob, the logs, the listings */
	struct index_freed fr;
	rc = index_job_delete(ix, id, &fr);
	CHECK(rc == 0 && fr.n == 1 && memcmp(fr.hash[0], h, 32) == 0, "delete frees blob: %d %s", rc,
	      store_lasterr());
	CHECK(index_job_get(ix, id, &j) == STORE_E_NOTFOUND, "deleted");
	CHECK(index_blob_get(ix, h, &bi) == STORE_E_NOTFOUND, "blob record gone");
	CHECK(index_list_by_route(ix, route, NULL, 4, got_ids, &n) == 0 && n == 0, "route empty");
	rc = index_job_log_read(ix, id, 0, buf, sizeof(buf), &got);
	CHECK(rc == 0 && got == 0, "log gone");
	CHECK(index_job_delete(ix, id, &fr) == STORE_E_NOTFOUND, "double delete");
}

static void test_states(void)
{
	uint8_t id[16];
	struct job j;

	/* queued -> cancelled -> retry -> queued */
	REQUIRE(create("a/b/c/d", 7, JOB_PRIO_NORMAL, "{}", id) == 0, "create");
	CHECK(index_job_cancel(ix, id) == 0, "cancel queued");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_CANCELLED, "cancelled");
	job_release(&j);
	CHECK(index_job_claim(ix, 0, &j) == STORE_E_NOTFOUND, "cancelled job is not claimable");
	CHECK(index_job_retry(ix, id) == 0, "retry");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim after retry");
	job_release(&j);
	/* running: cancel sets the flag; error; retry */
	CHECK(index_job_cancel(ix, id) == 0, "cancel running");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_RUNNING && (j.flags & JOB_F_CANCEL_REQUESTED), "cancel flag");
	job_release(&j);
	struct index_freed fr;
	CHECK(index_job_delete(ix, id, &fr) == STORE_E_STATE, "delete running");
	CHECK(index_job_finish(ix, id, JOB_ERROR, "timeout", "ran past 5 s") == 0, "error");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_ERROR && strcmp(j.error_code, "timeout") == 0 &&
		      strcmp(j.error_message, "ran past 5 s") == 0,
	      "error fields");
	job_release(&j);
	CHECK(index_job_finish(ix, id, JOB_RUNNING, NULL, NULL) == -EINVAL, "not final");
	CHECK(index_job_retry(ix, id) == 0, "retry error");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_QUEUED && j.attempts == 0 && j.error_code[0] == '\0', "retried");
	job_release(&j);
	/* requeue (automatic retry) keeps attempts */
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim");
	job_release(&j);
	CHECK(index_job_requeue(ix, id, 0, NULL) == 0, "requeue");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim");
	CHECK(j.attempts == 2, "attempts %u", j.attempts);
	job_release(&j);
	/* requeue at a time: not claimable before it, queued all along */
	uint64_t t = now_ms() + 3600 * 1000, next = 0;
	CHECK(index_job_requeue(ix, id, t, NULL) == 0, "requeue at: %s", store_lasterr());
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_QUEUED && (j.flags & JOB_F_DELAYED) && j.round == t, "delayed");
	job_release(&j);
	uint64_t pos;
	CHECK(index_queue_position(ix, id, &pos) == STORE_E_STATE, "a delayed job has no position");
	CHECK(index_job_claim(ix, 0, &j) == STORE_E_NOTFOUND, "not claimable before its time");
	CHECK(index_delayed_next(ix, &next) == 0 && next == t, "next due");
	CHECK(index_promote_due(ix, t - 1, &next) == 0 && next == t, "nothing due yet");
	CHECK(index_job_claim(ix, 0, &j) == STORE_E_NOTFOUND, "still not claimable");
	CHECK(index_promote_due(ix, t, &next) == 0 && next == 0, "due: promoted");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claimable at its time");
	CHECK(j.attempts == 3 && !(j.flags & JOB_F_DELAYED), "attempts %u", j.attempts);
	job_release(&j);
	/* a delayed job cancelled: out of the delayed set */
	CHECK(index_job_requeue(ix, id, t, NULL) == 0, "requeue at again");
	CHECK(index_job_cancel(ix, id) == 0, "cancel delayed");
	CHECK(index_delayed_next(ix, &next) == 0 && next == 0, "cancel empties the delayed set");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_CANCELLED && !(j.flags & JOB_F_DELAYED), "cancelled, not delayed");
	job_release(&j);
	/* a durable handle: put, replaced, bounded, gone with its job */
	void *hd;
	size_t hl;
	CHECK(index_job_handle_get(ix, id, &hd, &hl) == STORE_E_NOTFOUND, "no handle yet");
	CHECK(index_job_handle_put(ix, id, "req-1", 5) == 0 &&
		      index_job_handle_put(ix, id, "req-22", 6) == 0,
	      "handle put twice");
	CHECK(index_job_handle_get(ix, id, &hd, &hl) == 0 && hl == 6 && memcmp(hd, "req-22", 6) == 0,
	      "the last handle");
	free(hd);
	static char huge[INDEX_HANDLE_MAX + 1];
	CHECK(index_job_handle_put(ix, id, huge, sizeof(huge)) == -EFBIG, "handle bounded");
	uint8_t nobody[JOB_ID_LEN] = {1};
	CHECK(index_job_handle_put(ix, nobody, "x", 1) == STORE_E_NOTFOUND, "no handle without a job");
	CHECK(index_job_delete(ix, id, &fr) == 0 && fr.n == 0, "delete");
	CHECK(index_job_handle_get(ix, id, &hd, &hl) == STORE_E_NOTFOUND, "handle gone with its job");
}

static void test_names(void)
{
	struct job_create c = mk("image/synth/default/t2i", 5, JOB_PRIO_NORMAL, "{\"p\":1}");
	uint8_t a[16], b[16];
	bool existed;

	c.name = "my-render";
	CHECK(index_job_create(ix, &c, a, &existed) == 0 && !existed, "named create");
	CHECK(index_job_create(ix, &c, b, &existed) == 0 && existed && memcmp(a, b, 16) == 0,
	      "same name, same request: same job");
	struct job_create d = mk("image/synth/default/t2i", 5, JOB_PRIO_NORMAL, "{\"p\":2}");
	d.name = "my-render";
	CHECK(index_job_create(ix, &d, b, &existed) == STORE_E_EXISTS &&
		      strstr(store_lasterr(), "my-render"),
	      "same name, other request: %s", store_lasterr());
	d.route = "image/synth/default/other";
	CHECK(index_job_create(ix, &d, b, &existed) == 0 && !existed, "name on another route");
	CHECK(index_name_lookup(ix, "image/synth/default/t2i", "my-render", 5, b) == 0 &&
		      memcmp(a, b, 16) == 0,
	      "lookup");
	struct index_freed fr;
	CHECK(index_job_delete(ix, a, &fr) == 0, "delete named");
	CHECK(index_name_lookup(ix, "image/synth/default/t2i", "my-render", 5, b) == STORE_E_NOTFOUND,
	      "name freed");
	/* names per owner (`private`): two owners, one name, two jobs */
	{
		struct job_create p5 = mk("image/synth/default/po", 5, JOB_PRIO_NORMAL, "{\"p\":5}");
		struct job_create p6 = mk("image/synth/default/po", 6, JOB_PRIO_NORMAL, "{\"p\":6}");
		uint8_t i5[16], i6[16], got[16];

		p5.name = p6.name = "mine";
		index_set_names_per_owner(ix, true);
		CHECK(index_job_create(ix, &p6, i6, &existed) == 0 && !existed, "owner 6 names");
		CHECK(index_job_create(ix, &p5, i5, &existed) == 0 && !existed &&
			      memcmp(i5, i6, 16) != 0,
		      "owner 5, same name: its own job (%s)", store_lasterr());
		CHECK(index_name_lookup(ix, p5.route, "mine", 5, got) == 0 && !memcmp(got, i5, 16),
		      "owner 5 finds its own");
		CHECK(index_name_lookup(ix, p5.route, "mine", 6, got) == 0 && !memcmp(got, i6, 16),
		      "owner 6 finds its own");
		CHECK(index_name_lookup(ix, p5.route, "mine", 7, got) == STORE_E_NOTFOUND,
		      "another owner finds none");
		CHECK(index_name_lookup(ix, p5.route, "mine", 0, got) == 0 && !memcmp(got, i5, 16),
		      "root, without one of its own: the lowest uid's");
		index_set_names_per_owner(ix, false);
		CHECK(index_name_lookup(ix, p5.route, "mine", 6, got) == 0 && !memcmp(got, i5, 16),
		      "shared: the lowest uid's");
		struct job_create p7 = mk("image/synth/default/po", 7, JOB_PRIO_NORMAL, "{\"p\":7}");
		p7.name = "mine";
		CHECK(index_job_create(ix, &p7, got, &existed) == STORE_E_EXISTS, "shared: taken");
		CHECK(index_job_delete(ix, i5, &fr) == 0, "delete owner 5's");
		CHECK(index_name_lookup(ix, p5.route, "mine", 5, got) == 0 && !memcmp(got, i6, 16),
		      "shared: the other owner's now");
		CHECK(index_job_delete(ix, i6, &fr) == 0, "delete owner 6's");
		CHECK(index_name_lookup(ix, p5.route, "mine", 0, got) == STORE_E_NOTFOUND,
		      "both names freed");
	}
	c.name = NULL;
	struct job_create bad = c;
	bad.route = "";
	CHECK(index_job_create(ix, &bad, b, NULL) == -EINVAL, "empty route");
	bad = c;
	bad.priority = (enum job_priority)7;
	CHECK(index_job_create(ix, &bad, b, NULL) == -EINVAL, "bad priority");
	/* digests: of route and request; deleting the job one names removes it */
	uint8_t dg[32], dg2[32];
	index_request_digest(c.route, c.request, c.request_len, INDEX_ANY_OWNER, dg);
	index_request_digest("video/synth/default/t2v", c.request, c.request_len, INDEX_ANY_OWNER,
			     dg2);
	CHECK(memcmp(dg, dg2, 32) != 0, "digest depends on the route");
	index_request_digest(c.route, c.request, c.request_len, c.uid, dg2);
	CHECK(memcmp(dg, dg2, 32) != 0, "per owner: another digest");
	CHECK(index_job_create(ix, &c, a, NULL) == 0, "create for digest");
	CHECK(index_digest_put(ix, dg, a) == 0, "digest put");
	CHECK(index_digest_lookup(ix, dg, b) == 0 && memcmp(a, b, 16) == 0, "digest lookup");
	CHECK(index_job_delete(ix, a, &fr) == 0, "delete digest job");
	CHECK(index_digest_lookup(ix, dg, b) == STORE_E_NOTFOUND, "digest removed with its job");
	CHECK(index_job_create(ix, &c, a, NULL) == 0, "create for an owner's digest");
	CHECK(index_digest_put(ix, dg2, a) == 0, "owner's digest put");
	CHECK(index_job_delete(ix, a, &fr) == 0, "delete owner's digest job");
	CHECK(index_digest_lookup(ix, dg2, b) == STORE_E_NOTFOUND,
	      "an owner's digest removed with its job");
	/* drain the queue for the next tests */
	struct job j;
	while (index_job_claim(ix, 0, &j) == 0) {
		index_job_finish(ix, j.id, JOB_CANCELLED, NULL, NULL);
		job_release(&j);
	}
}

static void test_queue_order(void)
{
	uint8_t low[16], normal[16], high[16], g1[16], id[16];
	struct job j;
	uint64_t depth;

	REQUIRE(create("q/a/b/c", 1, JOB_PRIO_LOW, "{\"n\":1}", low) == 0, "low");
	REQUIRE(create("q/a/b/c", 1, JOB_PRIO_NORMAL, "{\"n\":2}", normal) == 0, "normal");
	REQUIRE(create("q/a/b/c", 1, JOB_PRIO_HIGH, "{\"n\":3}", high) == 0, "high");
	struct job_create c = mk("q/a/b/gpu", 1, JOB_PRIO_NORMAL, "{}");
	c.group = 1;
	REQUIRE(index_job_create(ix, &c, g1, NULL) == 0, "group 1");
	CHECK(index_queue_depth(ix, 0, &depth) == 0 && depth == 3, "depth %llu",
	      (unsigned long long)depth);
	uint64_t pos;
	CHECK(index_queue_position(ix, high, &pos) == 0 && pos == 0, "high position %llu",
	      (unsigned long long)pos);
	CHECK(index_queue_position(ix, normal, &pos) == 0 && pos == 1, "normal position");
	CHECK(index_queue_position(ix, low, &pos) == 0 && pos == 2, "low position");
	CHECK(index_queue_position(ix, g1, &pos) == 0 && pos == 0, "other group's position");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 1");
	CHECK(memcmp(j.id, high, 16) == 0, "high first");
	job_release(&j);
	CHECK(index_queue_position(ix, high, &pos) == STORE_E_STATE, "running job has no position");
	CHECK(index_queue_position(ix, low, &pos) == 0 && pos == 1, "low moved up");
	/* raising the low job's priority reorders it */
	CHECK(index_job_set_priority(ix, low, JOB_PRIO_HIGH) == 0, "set priority");
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 2");
	CHECK(memcmp(j.id, low, 16) == 0, "raised job second");
	job_release(&j);
	REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim 3");
	CHECK(memcmp(j.id, normal, 16) == 0, "normal last");
	job_release(&j);
	CHECK(index_job_claim(ix, 0, &j) == STORE_E_NOTFOUND, "group 0 empty");
	REQUIRE(index_job_claim(ix, 1, &j) == 0 && memcmp(j.id, g1, 16) == 0, "group 1 separate");
	job_release(&j);

	/* Fair share: uid 10 queues 100 jobs, then uid 20 queues one. */
	uint8_t big[100][16], small[16];
	for (int i = 0; i < 100; i++) {
		char req[32];
		snprintf(req, sizeof(req), "{\"i\":%d}", i);
		REQUIRE(create("f/a/b/c", 10, JOB_PRIO_NORMAL, req, big[i]) == 0, "batch");
	}
	for (int i = 0; i < 5; i++) {
		REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim");
		CHECK(memcmp(j.id, big[i], 16) == 0, "FIFO within an owner (%d)", i);
		job_release(&j);
	}
	REQUIRE(create("f/a/b/c", 20, JOB_PRIO_NORMAL, "{\"other\":1}", small) == 0, "small");
	int at = -1;
	CHECK(index_queue_position(ix, small, &pos) == 0 && pos <= 1,
	      "the other owner's job is at position %llu", (unsigned long long)pos);
	for (int i = 0; i < 3; i++) {
		REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim");
		if (memcmp(j.id, small, 16) == 0)
			at = i;
		job_release(&j);
	}
	CHECK(at >= 0 && at <= 1, "the other owner's job ran at claim %d, not within 2", at);
	/* Two owners with many jobs alternate. */
	uint8_t a_ids[6][16], b_ids[6][16];
	while (index_job_claim(ix, 0, &j) == 0)
		job_release(&j);
	for (int i = 0; i < 6; i++) {
		char req[32];
		snprintf(req, sizeof(req), "{\"a\":%d}", i);
		REQUIRE(create("f/a/b/c", 30, JOB_PRIO_NORMAL, req, a_ids[i]) == 0, "a");
	}
	for (int i = 0; i < 6; i++) {
		char req[32];
		snprintf(req, sizeof(req), "{\"b\":%d}", i);
		REQUIRE(create("f/a/b/c", 31, JOB_PRIO_NORMAL, req, b_ids[i]) == 0, "b");
	}
	int alternations = 0;
	uint32_t last_uid = 0;
	for (int i = 0; i < 12; i++) {
		REQUIRE(index_job_claim(ix, 0, &j) == 0, "claim");
		if (i > 0 && j.uid != last_uid)
			alternations++;
		last_uid = j.uid;
		job_release(&j);
	}
	CHECK(alternations == 11, "owners alternate: %d changes in 12 claims", alternations);
	(void)id;
}

static void test_cursor_100k(void)
{
	enum { TOTAL = 100000, BATCH = 2000 };
	static struct job_create cs[BATCH];
	static uint8_t ids[BATCH][16], page[1000][16], first[16], last[16];
	static int rcs[BATCH];
	static char reqs[BATCH][24];
	size_t n, seen = 0;
	int bad = 0;
	uint8_t prev[16] = {0};
	const uint8_t *after = NULL;

	for (int b = 0; b < TOTAL / BATCH; b++) {
		for (int i = 0; i < BATCH; i++) {
			snprintf(reqs[i], sizeof(reqs[i]), "{\"k\":%d}", b * BATCH + i);
			cs[i] = mk("bulk/x/y/z", (uint32_t)(100 + i % 7), JOB_PRIO_NORMAL, reqs[i]);
		}
		REQUIRE(index_job_create_batch(ix, BATCH, cs, ids, NULL, rcs) == 0, "batch: %s",
			store_lasterr());
		for (int i = 0; i < BATCH; i++)
			bad += rcs[i] != 0;
		if (b == 0)
			memcpy(first, ids[0], 16);
		if (b == TOTAL / BATCH - 1)
			memcpy(last, ids[BATCH - 1], 16);
	}
	CHECK(bad == 0, "%d batch creates failed", bad);
	for (;;) {
		REQUIRE(index_list_by_route(ix, "bulk/x/y/z", after, 1000, page, &n) == 0, "list");
		if (n == 0)
			break;
		for (size_t i = 0; i < n; i++) {
			if (memcmp(page[i], prev, 16) <= 0)
				bad++;
			memcpy(prev, page[i], 16);
		}
		if (seen == 0)
			CHECK(memcmp(page[0], first, 16) == 0, "first id");
		seen += n;
		after = prev;
	}
	CHECK(seen == TOTAL, "listed %zu of %d", seen, TOTAL);
	CHECK(bad == 0, "%d ids out of order", bad);
	CHECK(memcmp(prev, last, 16) == 0, "last id");
	/* By owner: uid 100 has every 7th job. */
	seen = 0;
	after = NULL;
	for (;;) {
		REQUIRE(index_list_by_owner(ix, 100, after, 1000, page, &n) == 0, "list owner");
		if (n == 0)
			break;
		seen += n;
		memcpy(prev, page[n - 1], 16);
		after = prev;
	}
	/* uids cycle through 7 values within each batch */
	CHECK(seen == (TOTAL / BATCH) * ((BATCH + 6) / 7), "owner 100 listed %zu", seen);
	struct index_stats s;
	CHECK(index_stats(ix, &s) == 0 && s.jobs >= TOTAL, "stats jobs %llu",
	      (unsigned long long)s.jobs);
}

struct creator {
	int n, failures;
	uint32_t uid;
};

static void *creator_thread(void *arg)
{
	struct creator *c = arg;

	for (int i = 0; i < c->n; i++) {
		char req[48];
		uint8_t id[16];
		snprintf(req, sizeof(req), "{\"uid\":%u,\"i\":%d}", c->uid, i);
		if (create("conc/a/b/c", c->uid, JOB_PRIO_LOW, req, id) != 0)
			c->failures++;
	}
	return NULL;
}

static void test_group_commit(void)
{
	enum { THREADS = 16, EACH = 40 };
	pthread_t t[THREADS];
	struct creator c[THREADS];
	struct index_stats before, after;
	uint8_t page[1000][16];
	size_t n;
	int failures = 0;

	index_stats(ix, &before);
	for (int i = 0; i < THREADS; i++) {
		c[i] = (struct creator){EACH, 0, (uint32_t)(5000 + i)};
		pthread_create(&t[i], NULL, creator_thread, &c[i]);
	}
	for (int i = 0; i < THREADS; i++) {
		pthread_join(t[i], NULL);
		failures += c[i].failures;
	}
	index_stats(ix, &after);
	CHECK(failures == 0, "%d concurrent creates failed", failures);
	CHECK(index_list_by_route(ix, "conc/a/b/c", NULL, 1000, page, &n) == 0 &&
		      n == THREADS * EACH,
	      "listed %zu", n);
	uint64_t commits = after.commits - before.commits, writes = after.writes - before.writes;
	printf("group commit: %llu writes in %llu commits\n", (unsigned long long)writes,
	       (unsigned long long)commits);
	CHECK(writes == THREADS * EACH && commits < writes, "no grouping: %llu commits",
	      (unsigned long long)commits);
}

/* A write that changes nothing (a claim with no job queued, which idle
 * workers make every second) makes no LMDB commit and is not counted as
 * one: renderfs_index_commits_total counts syncs. */
static void test_noop_writes_are_not_commits(void)
{
	struct index_stats before, after;
	struct job j;

	index_stats(ix, &before);
	for (int i = 0; i < 20; i++)
		CHECK(index_job_claim(ix, 7, &j) == STORE_E_NOTFOUND, "a job in an empty group");
	index_stats(ix, &after);
	CHECK(after.writes - before.writes == 20, "writes: %llu",
	      (unsigned long long)(after.writes - before.writes));
	CHECK(after.commits == before.commits, "%llu commits of nothing",
	      (unsigned long long)(after.commits - before.commits));
}

/* What ran since *before was one write and one commit. */
static void one_commit(const struct index_stats *before, const char *what)
{
	struct index_stats after;

	index_stats(ix, &after);
	CHECK(after.writes - before->writes == 1 && after.commits - before->commits == 1,
	      "%s: %llu writes, %llu commits", what,
	      (unsigned long long)(after.writes - before->writes),
	      (unsigned long long)(after.commits - before->commits));
}

/* A run's last log line and its end are one write: one commit, the line
 * and the state together; a bad line changes nothing. */
static void test_end_with_log_line(void)
{
	struct index_stats before;
	uint8_t id[16];
	char buf[256];
	size_t got = 0;
	uint64_t t = now_ms() + 3600 * 1000;
	struct job j;

	REQUIRE(create("end/x/y/z", 9, JOB_PRIO_NORMAL, "{}", id) == 0, "create");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, id, 16) == 0, "claim");
	job_release(&j);
	index_stats(ix, &before);
	CHECK(index_job_requeue_logged(ix, id, t, NULL, "retrying in 1 h", 15) == 0,
	      "requeue with a line: %s", store_lasterr());
	one_commit(&before, "requeue");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_QUEUED && (j.flags & JOB_F_DELAYED) && j.log_size == 16, "requeued, logged");
	job_release(&j);
	CHECK(index_job_cancel(ix, id) == 0 && index_job_retry(ix, id) == 0, "back to the queue");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, id, 16) == 0, "claim again");
	job_release(&j);
	CHECK(index_job_finish_logged(ix, id, JOB_ERROR, "x", "failed", NULL, "bad\nline", 8,
				      NULL, 0) == -EINVAL,
	      "a line with a newline");
	CHECK(index_job_finish_logged(ix, id, JOB_RUNNING, NULL, NULL, NULL, "ok", 2, NULL, 0) ==
		      -EINVAL,
	      "not a final state");
	CHECK(index_job_finish_logged(ix, id, JOB_ERROR, "x", "failed", NULL, "ok", 2, "{}",
				      INDEX_RESULT_MAX + 1) == -EFBIG,
	      "a result too large");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_RUNNING && j.log_size == 16 && !(j.flags & JOB_F_RESULT),
	      "refused: unchanged");
	job_release(&j);
	index_stats(ix, &before);
	CHECK(index_job_finish_logged(ix, id, JOB_ERROR, "x", "failed", NULL, "error: x: failed",
				      16, "{\"seed\": 42}", 12) == 0,
	      "finish with a line and a result: %s", store_lasterr());
	one_commit(&before, "finish");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.status == JOB_ERROR && j.log_size == 33 && (j.flags & JOB_F_RESULT),
	      "finished, logged (%llu), its result kept", (unsigned long long)j.log_size);
	job_release(&j);
	char *res = NULL;
	size_t rlen = 0;
	CHECK(index_job_result_get(ix, id, &res, &rlen) == 0 && rlen == 12 &&
		      memcmp(res, "{\"seed\": 42}", 12) == 0,
	      "the result");
	free(res);
	CHECK(index_job_log_read(ix, id, 0, buf, sizeof(buf), &got) == 0 && got == 33 &&
		      memcmp(buf, "retrying in 1 h\nerror: x: failed\n", 33) == 0,
	      "the log: %.*s", (int)got, buf);
}

/* A remote step's writes are one: log lines, progress, what runs the job,
 * its handle and its remote record in one commit; a bad line changes
 * nothing; progress is left out for a job no longer running. */
static void test_update(void)
{
	struct index_stats before;
	uint8_t id[16];
	char buf[256];
	size_t got = 0;
	void *h = NULL;
	size_t hlen = 0;
	struct job j;
	struct index_update u = {.lines = "a\nb\n", .len = 4, .progress = 250,
				 .backend = "fal", .model = "fal-ai/x", .handle = "{\"id\":1}",
				 .hlen = 8, .remote = "{\"request_id\":\"r\"}", .rlen = 18};
	struct index_update bad = {.lines = "a\nb", .len = 3, .progress = 500, .handle = "x",
				   .hlen = 1};

	REQUIRE(create("upd/x/y/z", 9, JOB_PRIO_NORMAL, "{}", id) == 0, "create");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, id, 16) == 0, "claim");
	job_release(&j);
	index_stats(ix, &before);
	CHECK(index_job_update(ix, id, &u) == 0, "update: %s", store_lasterr());
	one_commit(&before, "update");
	CHECK(index_job_update(ix, id, &bad) == -EINVAL, "a line without its newline");
	bad.len = 4, bad.lines = "a\nb\n", bad.progress = 1001;
	CHECK(index_job_update(ix, id, &bad) == -EINVAL, "progress above 1");
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.progress == 250 && j.log_size == 4 && strcmp(j.backend, "fal") == 0 &&
		      strcmp(j.model, "fal-ai/x") == 0,
	      "lines, progress, backend: %u %llu", j.progress, (unsigned long long)j.log_size);
	job_release(&j);
	CHECK(index_job_log_read(ix, id, 0, buf, sizeof(buf), &got) == 0 && got == 4 &&
		      memcmp(buf, "a\nb\n", 4) == 0,
	      "the log");
	CHECK(index_job_handle_get(ix, id, &h, &hlen) == 0 && hlen == 8 &&
		      memcmp(h, "{\"id\":1}", 8) == 0,
	      "the handle");
	free(h);
	CHECK(index_job_remote_get(ix, id, &h, &hlen) == 0 && hlen == 18, "the remote record");
	free(h);
	/* Ended meanwhile: the lines still go, the progress does not. */
	REQUIRE(index_job_finish(ix, id, JOB_CANCELLED, NULL, NULL) == 0, "cancel");
	struct index_update late = {.lines = "c\n", .len = 2, .progress = 900};
	CHECK(index_job_update(ix, id, &late) == 0, "after the end: %s", store_lasterr());
	REQUIRE(index_job_get(ix, id, &j) == 0, "get");
	CHECK(j.progress == 250 && j.log_size == 6, "progress kept, line added");
	job_release(&j);
}

/*
 * Writes nobody waits for (a remote step's, index_job_update_async): each
 * is committed once, in the order it was queued with the writes around
 * it; its done is called once, after it is durable or with why it failed;
 * index_writes_settle returns only once every write queued before it is
 * durable; a sync write's leader takes the async writes queued behind.
 */
enum { AW_THREADS = 8, AW_EACH = 60 };
static uint8_t aw_id[16];
static atomic_int aw_ok, aw_failed;
static char aw_err[256];

static void aw_done(void *arg, int rc, const char *err)
{
	(void)arg;
	if (rc == 0) {
		atomic_fetch_add(&aw_ok, 1);
	} else {
		if (atomic_fetch_add(&aw_failed, 1) == 0)
			snprintf(aw_err, sizeof(aw_err), "%s", err);
	}
}

static bool log_has(const char *needle)
{
	static __thread char buf[AW_THREADS * AW_EACH * 16];
	size_t got = 0;

	if (index_job_log_read(ix, aw_id, 0, buf, sizeof(buf) - 1, &got) != 0)
		return false;
	buf[got] = '\0';
	return strstr(buf, needle) != NULL;
}

static void *aw_thread(void *arg)
{
	long t = (long)arg, bad = 0;

	for (int i = 0; i < AW_EACH; i++) {
		char line[32];
		int n = snprintf(line, sizeof(line), "t%ld i%d\n", t, i);
		struct index_update u = {.lines = line, .len = (size_t)n, .progress = -1};
		if (i % 10 == 9) {
			/* A sync write, then a settle: the lines before are in. */
			if (index_job_update(ix, aw_id, &u) != 0)
				bad++;
			if (index_writes_settle(ix) != 0 || !log_has(line))
				bad++;
		} else if (index_job_update_async(ix, aw_id, &u, aw_done, NULL) != 0) {
			bad++;
		} else if (i % 10 == 4) {
			if (index_writes_settle(ix) != 0 || !log_has(line))
				bad++;
		}
	}
	return (void *)bad;
}

static void test_update_async(void)
{
	static char buf[AW_THREADS * AW_EACH * 16];
	pthread_t th[AW_THREADS];
	uint8_t nobody[16] = {0xff};
	size_t got = 0;
	long bad = 0;
	int next[AW_THREADS] = {0}, wrong = 0, lines = 0;
	struct job j;
	struct index_update u = {.lines = "x\n", .len = 2, .progress = -1};

	REQUIRE(create("async/x/y/z", 9, JOB_PRIO_NORMAL, "{}", aw_id) == 0, "create");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, aw_id, 16) == 0, "claim");
	job_release(&j);
	for (long t = 0; t < AW_THREADS; t++)
		pthread_create(&th[t], NULL, aw_thread, (void *)t);
	for (int t = 0; t < AW_THREADS; t++) {
		void *r;
		pthread_join(th[t], &r);
		bad += (long)r;
	}
	/* Every leader returned: every done has been called. */
	CHECK(bad == 0, "%ld writes refused or not in before a settle", bad);
	CHECK(atomic_load(&aw_ok) == AW_THREADS * AW_EACH * 9 / 10 && atomic_load(&aw_failed) == 0,
	      "async writes done: %d, failed %d", atomic_load(&aw_ok), atomic_load(&aw_failed));
	REQUIRE(index_job_log_read(ix, aw_id, 0, buf, sizeof(buf) - 1, &got) == 0, "log");
	buf[got] = '\0';
	for (char *p = buf, *nl; (nl = strchr(p, '\n')); p = nl + 1) {
		int t, i;
		lines++;
		if (sscanf(p, "t%d i%d", &t, &i) != 2 || t < 0 || t >= AW_THREADS || i != next[t])
			wrong++;
		else
			next[t]++;
	}
	CHECK(lines == AW_THREADS * AW_EACH && wrong == 0,
	      "%d lines, %d out of their thread's order", lines, wrong);
	/* A write that fails says why, to its done. */
	CHECK(index_job_update_async(ix, nobody, &u, aw_done, NULL) == 0, "queued");
	CHECK(index_writes_settle(ix) == 0, "settle");
	CHECK(atomic_load(&aw_failed) == 1 && strstr(aw_err, "gone"), "the failure and why: %d '%s'",
	      atomic_load(&aw_failed), aw_err);
	/* A bad update is refused before it is queued. */
	u.lines = "x";
	u.len = 1;
	CHECK(index_job_update_async(ix, aw_id, &u, aw_done, NULL) == -EINVAL, "refused");
}

/*
 * A write's error message reaches its own caller whichever thread led its
 * batch (store_lasterr is per thread): A leads a batch that waits; B then
 * C queue behind it; B is woken to lead the next batch, C's write fails
 * in it, on B's thread.
 */
static char lm_msg[256];

static void *lm_b(void *arg)
{
	struct index_update u = {.lines = "b\n", .len = 2, .progress = -1};

	(void)arg;
	return (void *)(long)index_job_update(ix, aw_id, &u);
}

static uint8_t lm_queued[16];

static void *lm_c(void *arg)
{
	int rc;

	(void)arg;
	store_seterr(0, "this thread's earlier message");
	rc = index_job_progress(ix, lm_queued, 500); /* not running */
	snprintf(lm_msg, sizeof(lm_msg), "%s", store_lasterr());
	return (void *)(long)rc;
}

static void wait_queued(size_t n)
{
	for (int i = 0; i < 5000; i++) {
		pthread_mutex_lock(&ix->wmu);
		size_t q = ix->wq_len;
		pthread_mutex_unlock(&ix->wmu);
		if (q >= n)
			return;
		usleep(1000);
	}
}

static void test_error_message_of_own_write(void)
{
	struct commit_hold hold;
	pthread_t b, c;
	void *rb, *rc;
	char want[64];
	int ra;

	REQUIRE(create("lm/x/y/z", 9, JOB_PRIO_NORMAL, "{}", lm_queued) == 0, "create");
	ulid_format(lm_queued, want);
	commit_hold_start(&hold, ix);
	pthread_create(&b, NULL, lm_b, NULL);
	wait_queued(1);
	pthread_create(&c, NULL, lm_c, NULL);
	wait_queued(2);
	ra = commit_hold_release(&hold);
	pthread_join(b, &rb);
	pthread_join(c, &rc);
	CHECK(ra == 0 && rb == NULL && rc != NULL, "the writes: %d %ld %ld", ra, (long)rb,
	      (long)rc);
	CHECK(strstr(lm_msg, want) && strstr(lm_msg, "progress"),
	      "the failed write's own message: '%s'", lm_msg);
}

/* The job whose output made a blob follows it into the inputs of later
 * jobs (the chain of a pipeline); it is forgotten when that job goes,
 * and records written before producers were kept still read. */
static void test_made_by(void)
{
	const char *route = "image/synth/default/t2i";
	uint8_t a[16], b[16], c[16], h[32], zero[16] = {0};
	struct job j;
	struct job_input in[INDEX_INPUTS_MAX], want = {.field = "image_url", .size = 4};
	struct index_freed fr;
	size_t n = 0;

	b3_hash("made", 4, h);
	memcpy(want.hash, h, 32);
	REQUIRE(create(route, 7, JOB_PRIO_NORMAL, "{\"prompt\":\"first\"}", a) == 0, "create");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, a, 16) == 0, "claim");
	job_release(&j);
	REQUIRE(index_job_attach_output(ix, a, h, 4, "image/png", "cpu", false) == 0 &&
		    index_job_finish(ix, a, JOB_COMPLETE, NULL, NULL) == 0,
		"complete: %s", store_lasterr());
	struct job_create cb = mk(route, 7, JOB_PRIO_NORMAL, "{\"prompt\":\"second\"}");
	cb.inputs = &want;
	cb.ninputs = 1;
	REQUIRE(index_job_create(ix, &cb, b, NULL) == 0, "create with input: %s", store_lasterr());
	CHECK(index_job_inputs(ix, b, in, INDEX_INPUTS_MAX, &n) == 0 && n == 1 &&
		  memcmp(in[0].made_by, a, 16) == 0 && strcmp(in[0].field, "image_url") == 0,
	      "the input names the job that made it");
	/* The maker goes; its output lives on as b's input, made by nobody. */
	CHECK(index_job_delete(ix, a, &fr) == 0 && fr.n == 0, "delete the maker");
	cb.request = "{\"prompt\":\"third\"}";
	cb.request_len = strlen(cb.request);
	REQUIRE(index_job_create(ix, &cb, c, NULL) == 0, "create after: %s", store_lasterr());
	CHECK(index_job_inputs(ix, c, in, INDEX_INPUTS_MAX, &n) == 0 && n == 1 &&
		  memcmp(in[0].made_by, zero, 16) == 0,
	      "a job that is gone is not named");
	CHECK(index_job_inputs(ix, b, in, INDEX_INPUTS_MAX, &n) == 0 &&
		  memcmp(in[0].made_by, a, 16) == 0,
	      "what b was given stays as it was");
	/* A format-12 record: the inputs without producers. */
	uint8_t rec[1 + 32 + 9 + 9];
	rec[0] = 1;
	memcpy(rec + 1, h, 32);
	memset(rec + 33, 0, 8);
	rec[33] = 4;
	rec[41] = 9;
	memcpy(rec + 42, "image_url", 9);
	MDB_val v = {sizeof(rec), rec};
	CHECK(index_inputs_decode(&v, in, INDEX_INPUTS_MAX, &n) == 0 && n == 1 && in[0].size == 4 &&
		  memcmp(in[0].made_by, zero, 16) == 0,
	      "format 12 record");
	v.mv_size = sizeof(rec) - 1;
	CHECK(index_inputs_decode(&v, in, INDEX_INPUTS_MAX, &n) == STORE_E_INDEX, "cut record");
	/* Lines and a handle in one write (what a service said, and how much
	 * of it is logged). */
	char buf[64], *hd = NULL;
	size_t got = 0, hl = 0;
	CHECK(index_job_log_handle(ix, c, "one\ntwo\n", 8, "{\"logs\":2}", 10) == 0,
	      "log lines and handle: %s", store_lasterr());
	CHECK(index_job_log_read(ix, c, 0, buf, sizeof(buf), &got) == 0 && got == 8 &&
		  memcmp(buf, "one\ntwo\n", 8) == 0,
	      "both lines logged");
	CHECK(index_job_handle_get(ix, c, (void **)&hd, &hl) == 0 && hl == 10 &&
		  memcmp(hd, "{\"logs\":2}", 10) == 0,
	      "the handle with them");
	free(hd);
	CHECK(index_job_log_handle(ix, c, "three", 5, "x", 1) == -EINVAL, "a line without newline");
	CHECK(index_job_log_read(ix, c, 0, buf, sizeof(buf), &got) == 0 && got == 8,
	      "nothing of a refused write");
	CHECK(index_job_delete(ix, b, &fr) == 0 && index_job_delete(ix, c, &fr) == 0 && fr.n == 1,
	      "the last reference frees the blob");
}

/* ---- the usage ledger (SPEC §14) ---- */

struct rows {
	uint64_t complete, error, cancelled, gpu_ms, cpu_ms, bytes;
};

static int count_row(const struct usage_row *r, void *arg)
{
	struct rows *c = arg;
	const char *outcome = r->name + strlen(r->name) + 1;

	if (r->kind == USAGE_JOBS && strcmp(r->name, "usage/x/y/z") == 0) {
		if (strcmp(outcome, "complete") == 0)
			c->complete += r->value;
		else if (strcmp(outcome, "error") == 0)
			c->error += r->value;
		else if (strcmp(outcome, "cancelled") == 0)
			c->cancelled += r->value;
	} else if (r->kind == USAGE_MS && strcmp(r->name, "gpu:Test GPU") == 0) {
		c->gpu_ms += r->value;
	} else if (r->kind == USAGE_MS && strcmp(r->name, "cpu") == 0) {
		c->cpu_ms += r->value;
	} else if (r->kind == USAGE_BYTES) {
		c->bytes += r->value;
	}
	return 0;
}

struct stub {
	uint64_t entries, from, end;
	bool had_prev;
	uint8_t prev_hash[32];
	int n;
};

static int stub_begin(void *arg, uint64_t from, uint64_t end, const struct attestation *prev)
{
	struct stub *s = arg;
	s->entries = 0;
	s->from = from;
	s->end = end;
	s->had_prev = prev != NULL;
	if (prev)
		memcpy(s->prev_hash, prev->hash, 32);
	return 0;
}

static int stub_entry(void *arg, const struct ledger_entry *e)
{
	struct stub *s = arg;
	s->entries += e->uid == 42;
	return 0;
}

static int stub_finish(void *arg, struct attestation *a)
{
	struct stub *s = arg;
	char text[32];
	snprintf(text, sizeof(text), "attestation %d", ++s->n);
	b3_hash(text, strlen(text), a->hash);
	a->size = strlen(text);
	snprintf(a->name, sizeof(a->name), "period-%d", s->n);
	snprintf(a->sig, sizeof(a->sig), "signature %d", s->n);
	return 0;
}

static void test_usage_ledger(void)
{
	const char *route = "usage/x/y/z";
	uint8_t a[16], b[16], h[32];
	struct job j;
	struct rows r = {0};
	struct job_usage gpu = {"gpu:Test GPU", 1500}, cpu = {"cpu", 200}, wall = {"cpu", -1};

	REQUIRE(create(route, 42, JOB_PRIO_HIGH, "{\"u\":1}", a) == 0, "create");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, a, 16) == 0, "claim a");
	job_release(&j);
	b3_hash("usage", 5, h);
	REQUIRE(index_job_attach_output(ix, a, h, 5, "image/png", "cuda:0 Test GPU", false) == 0 &&
		    index_job_finish_used(ix, a, JOB_COMPLETE, NULL, NULL, &gpu) == 0,
		"complete a: %s", store_lasterr());
	REQUIRE(index_job_get(ix, a, &j) == 0, "get a");
	CHECK(j.run_ms == 1500 && strcmp(j.ran_on, "gpu:Test GPU") == 0,
	      "the service's measure counts: %llu on %s", (unsigned long long)j.run_ms, j.ran_on);
	job_release(&j);
	/* b: an attempt that is retried, then one that fails: both count. */
	REQUIRE(create(route, 42, JOB_PRIO_HIGH, "{\"u\":2}", b) == 0, "create b");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, b, 16) == 0, "claim b");
	job_release(&j);
	CHECK(index_job_requeue(ix, b, 0, &cpu) == 0, "requeue b");
	REQUIRE(index_job_claim(ix, 0, &j) == 0 && memcmp(j.id, b, 16) == 0, "claim b again");
	job_release(&j);
	CHECK(index_job_finish_used(ix, b, JOB_ERROR, "x", "failed", &wall) == 0, "fail b");
	REQUIRE(index_job_get(ix, b, &j) == 0, "get b");
	CHECK(j.run_ms >= 200 && strcmp(j.ran_on, "cpu") == 0, "attempts add up: %llu",
	      (unsigned long long)j.run_ms);
	uint64_t b_ms = j.run_ms;
	job_release(&j);
	CHECK(index_usage_rows(ix, 42, 0, count_row, &r) == 0, "rows");
	CHECK(r.complete == 1 && r.error == 1 && r.gpu_ms == 1500 && r.cpu_ms == b_ms &&
		      r.bytes == 5,
	      "totals: %llu complete, %llu error, %llu gpu ms, %llu cpu ms, %llu bytes",
	      (unsigned long long)r.complete, (unsigned long long)r.error,
	      (unsigned long long)r.gpu_ms, (unsigned long long)r.cpu_ms,
	      (unsigned long long)r.bytes);
	/* A retry starts a new run; its cancel counts too, the error stays. */
	CHECK(index_job_retry(ix, b) == 0 && index_job_cancel(ix, b) == 0, "retry, cancel");
	REQUIRE(index_job_get(ix, b, &j) == 0, "get b");
	CHECK(j.run_ms == 0 && j.ran_on[0] == '\0', "a retried job starts from nothing");
	job_release(&j);
	memset(&r, 0, sizeof(r));
	CHECK(index_usage_rows(ix, 42, 0, count_row, &r) == 0 && r.error == 1 &&
		  r.cancelled == 1 && r.complete == 1,
	      "both runs counted");
	/* Deleting a job keeps its usage. */
	struct index_freed fr;
	CHECK(index_job_delete(ix, a, &fr) == 0, "delete a");
	memset(&r, 0, sizeof(r));
	CHECK(index_usage_rows(ix, 42, 0, count_row, &r) == 0 && r.complete == 1 && r.bytes == 5,
	      "a deleted job's usage stays");

	/* Attestations: a chain over the journal. */
	struct stub st = {0};
	struct ledger_maker m = {stub_begin, stub_entry, stub_finish, &st};
	struct attestation at, list[4], last;
	/* A little ahead: an entry moved to the next millisecond (a job that
	 * ended twice in one) is in. */
	uint64_t end = now_ms() + 100;
	size_t n;
	REQUIRE(index_ledger_attest(ix, end, &m, &at) == 0, "attest: %s", store_lasterr());
	CHECK(!st.had_prev && st.from == 0 && st.entries == 3 && at.end_ms == end,
	      "the first attestation: %llu entries", (unsigned long long)st.entries);
	CHECK(index_ledger_attest(ix, end, &m, &at) == STORE_E_STATE, "the same period again");
	REQUIRE(index_ledger_attest(ix, end + 1000, &m, &at) == 0, "attest again");
	CHECK(st.had_prev && st.from == end && st.entries == 0, "the next starts at its end");
	CHECK(index_ledger_list(ix, 0, list, 4, &n) == 0 && n == 2 &&
		  strcmp(list[0].name, "period-1") == 0 && list[1].from_ms == list[0].end_ms &&
		  strcmp(list[1].sig, "signature 2") == 0 && memcmp(st.prev_hash, list[0].hash, 32) == 0,
	      "listed in chain order");
	CHECK(index_ledger_last(ix, &last) == 0 && strcmp(last.name, "period-2") == 0, "last");
	CHECK(index_ledger_find(ix, "period-1", &last) == 0 && last.end_ms == end, "find");
	CHECK(index_ledger_find(ix, "period-9", &last) == STORE_E_NOTFOUND, "find none");
	struct blob_info bi;
	CHECK(index_blob_get(ix, list[0].hash, &bi) == 0 && bi.refcount == 1,
	      "an attestation holds its blob");
}

int main(void)
{
	struct index_options opt = {0};

	test_tmpdir(dir, "index");
	if (index_open(dir, &opt, &ix) != 0) {
		fprintf(stderr, "index_open: %s\n", store_lasterr());
		return 1;
	}
	test_ulid();
	test_crud();
	test_states();
	test_names();
	test_made_by();
	test_usage_ledger();
	test_queue_order();
	test_group_commit();
	test_noop_writes_are_not_commits();
	test_end_with_log_line();
	test_update();
	test_update_async();
	test_error_message_of_own_write();
	test_cursor_100k();
	index_close(ix);

	/* Reopen: the data is there, the format version checked. */
	if (index_open(dir, &opt, &ix) == 0) {
		uint8_t page[10][16];
		size_t n;
		CHECK(index_list_by_route(ix, "bulk/x/y/z", NULL, 10, page, &n) == 0 && n == 10,
		      "reopened");
		index_close(ix);
	} else {
		CHECK(0, "reopen: %s", store_lasterr());
	}
	rm_rf(dir);
	return check_done("test_index");
}
