/*
 * test_recovery.c - crash recovery: a child process creates jobs (from
 * several threads, so commits are grouped), runs them, writes their
 * outputs as blobs and deletes some, and is killed with SIGKILL at a
 * random moment. After each kill the parent reopens the store and checks:
 * every job whose creation was acknowledged exists; no running job is
 * left; tmp/ is empty; every complete job's blob is present and hashes
 * to its name; `renderctl fsck` is clean, both before the reopen (a crash
 * never leaves an inconsistent index) and after it.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "store.h"

#define KILLS 60
#define CREATORS 4

static char dir[64];

struct child_ctx {
	struct store *st;
	int ackfd;
	pthread_mutex_t ack_mu;
	unsigned seed;
};

/*
 * Tell the parent about an id: 'A' once its creation is acknowledged, 'D'
 * before the worker deletes it (so that only announced jobs may vanish).
 * Records are 17 bytes, written whole (pipe writes under PIPE_BUF are
 * atomic).
 */
static void report(struct child_ctx *c, char kind, const uint8_t id[JOB_ID_LEN])
{
	uint8_t rec[1 + JOB_ID_LEN];

	rec[0] = (uint8_t)kind;
	memcpy(rec + 1, id, JOB_ID_LEN);
	pthread_mutex_lock(&c->ack_mu);
	if (write(c->ackfd, rec, sizeof(rec)) != sizeof(rec))
		_exit(3);
	pthread_mutex_unlock(&c->ack_mu);
}

static void *creator(void *arg)
{
	struct child_ctx *c = arg;
	unsigned seed = c->seed ^ (unsigned)(uintptr_t)pthread_self();

	for (int i = 0;; i++) {
		char req[64];
		struct job_create jc = {0};
		uint8_t id[JOB_ID_LEN];

		snprintf(req, sizeof(req), "{\"prompt\":\"n%u-%d\"}", rand_r(&seed), i);
		jc.route = "image/synth/default/t2i";
		jc.uid = jc.gid = 1000 + (uint32_t)(rand_r(&seed) % 3);
		jc.priority = (enum job_priority)(rand_r(&seed) % 3);
		jc.request = req;
		jc.request_len = strlen(req);
		if (index_job_create(store_index(c->st), &jc, id, NULL) == 0)
			report(c, 'A', id);
	}
	return NULL;
}

/* A worker: claim, make an output (sometimes the same bytes as others, to
 * exercise dedup), complete; sometimes fail or delete. */
static void *worker(void *arg)
{
	struct child_ctx *c = arg;
	unsigned seed = c->seed * 7 + 1;
	static uint8_t buf[200000];

	for (;;) {
		struct job j;
		struct store_sink *s;
		size_t len = (size_t)(rand_r(&seed) % sizeof(buf));
		int kind = rand_r(&seed) % 10;

		if (index_job_claim(store_index(c->st), 0, &j) != 0) {
			usleep(1000);
			continue;
		}
		index_job_progress(store_index(c->st), j.id, 500);
		index_job_log(store_index(c->st), j.id, "rendering", 9);
		if (kind == 0) {
			index_job_finish(store_index(c->st), j.id, JOB_ERROR, "test", "made to fail");
		} else if (store_sink_open(c->st, &s) == 0) {
			uint8_t fillbyte = kind < 4 ? 0x42 : (uint8_t)rand_r(&seed);
			if (kind < 4)
				len = 4096; /* identical content: dedup */
			memset(buf, fillbyte, len);
			for (size_t off = 0; off < len; off += 7919)
				buf[off] = (uint8_t)(off >> 3);
			store_sink_write(s, buf, len);
			if (store_job_commit_output(c->st, j.id, s, "image/png", "cpu", NULL) == 0)
				index_job_finish(store_index(c->st), j.id, JOB_COMPLETE, NULL, NULL);
		}
		if (kind == 9) {
			report(c, 'D', j.id);
			store_job_delete(c->st, j.id);
		}
		job_release(&j);
	}
	return NULL;
}

static void child_main(int ackfd, unsigned seed)
{
	struct store_options opt = {0};
	struct child_ctx c = {NULL, ackfd, PTHREAD_MUTEX_INITIALIZER, seed};
	pthread_t t;

	if (store_open(dir, &opt, &c.st) != 0) {
		fprintf(stderr, "child: store_open: %s\n", store_lasterr());
		_exit(2);
	}
	for (int i = 0; i < CREATORS; i++)
		pthread_create(&t, NULL, creator, &c);
	pthread_create(&t, NULL, worker, &c);
	worker(&c);
}

/* Ids acknowledged so far, across all rounds (deleted ones removed), and
 * whether a delete was announced for each. */
static uint8_t (*acked)[JOB_ID_LEN];
static bool *announced;
static size_t nacked, capacked;

static void mark_announced(const uint8_t id[JOB_ID_LEN])
{
	for (size_t i = nacked; i-- > 0;)
		if (memcmp(acked[i], id, JOB_ID_LEN) == 0) {
			announced[i] = true;
			return;
		}
}

static int check_round(int round, unsigned *deleted_seen)
{
	struct store_options opt = {0};
	struct store *st;
	struct store_recovery r;
	char out[65536];
	int rc, failures = 0, frc;

	/* fsck straight after the crash: leftovers are notes, not problems. */
	frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 0, "round %d: fsck after the crash:\n%s", round, out);
	failures += frc != 0;

	rc = store_open(dir, &opt, &st);
	if (rc) {
		CHECK(0, "round %d: reopen: %s", round, store_lasterr());
		return 1;
	}
	store_get_recovery(st, &r);
	size_t keep = 0;
	for (size_t i = 0; i < nacked; i++) {
		struct job j;

		rc = index_job_get(store_index(st), acked[i], &j);
		if (rc == STORE_E_NOTFOUND && announced[i]) {
			(*deleted_seen)++;
			continue;
		}
		if (rc == STORE_E_NOTFOUND) {
			char idstr[JOB_ID_STR_LEN + 1];
			ulid_format(acked[i], idstr);
			CHECK(0, "round %d: acknowledged job %s is lost", round, idstr);
			failures++;
			continue;
		}
		if (rc != 0) {
			CHECK(0, "round %d: acknowledged job unreadable: %s", round, store_lasterr());
			failures++;
			continue;
		}
		if (j.status == JOB_RUNNING) {
			CHECK(0, "round %d: job still running after recovery", round);
			failures++;
		}
		if (j.status == JOB_QUEUED && (j.flags & JOB_F_HAS_OUTPUT)) {
			CHECK(0, "round %d: job back in the queue with its output committed",
			      round);
			failures++;
		}
		if (j.status == JOB_COMPLETE) {
			int fd;
			uint64_t size;
			if (store_blob_open(st, j.output_hash, &fd, &size) != 0) {
				CHECK(0, "round %d: complete job's blob: %s", round, store_lasterr());
				failures++;
			} else {
				close(fd);
				if (size != j.output_size)
					failures++;
			}
		}
		job_release(&j);
		announced[keep] = announced[i];
		memcpy(acked[keep++], acked[i], JOB_ID_LEN);
	}
	nacked = keep;
	char tmpdir[128];
	snprintf(tmpdir, sizeof(tmpdir), "%s/tmp", dir);
	CHECK(run_cmd("test -z \"$(ls -A '%s')\"", tmpdir) == 0, "round %d: tmp/ not empty",
	      round);
	store_close(st);

	frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 0 && !strstr(out, "note: partial"), "round %d: fsck after recovery:\n%s",
	      round, out);
	failures += frc != 0;
	return failures;
}

/* Killed between committing an output and finishing: the job is complete
 * after recovery, with the same attempt count, not queued to run again. */
static void test_output_committed_before_crash(void)
{
	struct store_options opt = {0};
	struct job_create jc = {0};
	struct store_recovery r;
	struct store_sink *s;
	struct store *st;
	uint8_t id[JOB_ID_LEN];
	struct job j;
	char cdir[64];

	test_tmpdir(cdir, "recovery-committed");
	CHECK(store_open(cdir, &opt, &st) == 0, "open: %s", store_lasterr());
	jc.route = "image/synth/default/t2i";
	jc.request = "{}";
	jc.request_len = 2;
	CHECK(index_job_create(store_index(st), &jc, id, NULL) == 0, "create: %s",
	      store_lasterr());
	CHECK(index_job_claim(store_index(st), 0, &j) == 0, "claim: %s", store_lasterr());
	job_release(&j);
	CHECK(store_sink_open(st, &s) == 0, "sink: %s", store_lasterr());
	store_sink_write(s, "output", 6);
	CHECK(store_job_commit_output(st, id, s, "image/png", "cpu", NULL) == 0, "commit: %s",
	      store_lasterr());
	store_close(st); /* no finish: the running set still holds the job */

	CHECK(store_open(cdir, &opt, &st) == 0, "reopen: %s", store_lasterr());
	store_get_recovery(st, &r);
	CHECK(r.completed == 1 && r.requeued == 0 && r.interrupted == 0,
	      "recovery counted %llu complete, %llu requeued, %llu interrupted",
	      (unsigned long long)r.completed, (unsigned long long)r.requeued,
	      (unsigned long long)r.interrupted);
	CHECK(index_job_get(store_index(st), id, &j) == 0, "get: %s", store_lasterr());
	CHECK(j.status == JOB_COMPLETE && j.attempts == 1 && j.progress == 1000 &&
		      j.output_size == 6 && j.completed_ms != 0,
	      "after recovery: status %s, attempts %u, progress %u, size %llu",
	      job_status_name(j.status), j.attempts, j.progress,
	      (unsigned long long)j.output_size);
	job_release(&j);
	CHECK(index_job_claim(store_index(st), 0, &j) == STORE_E_NOTFOUND,
	      "the complete job is still in the queue");
	store_close(st);
	rm_rf(cdir);
}

int main(void)
{
	unsigned seed = (unsigned)time(NULL), deleted = 0;
	int total_failures = 0;
	uint64_t acks_total = 0;

	test_output_committed_before_crash();
	test_tmpdir(dir, "recovery");
	printf("seed %u\n", seed);
	srand(seed);
	for (int round = 0; round < KILLS; round++) {
		int p[2];
		pid_t pid;

		if (pipe(p) != 0)
			return 2;
		pid = fork();
		if (pid == 0) {
			close(p[0]);
			child_main(p[1], seed + (unsigned)round);
		}
		close(p[1]);
		/* Kill anywhere from during store_open() to well into the work. */
		usleep((useconds_t)(rand() % 60000));
		kill(pid, SIGKILL);
		int status;
		waitpid(pid, &status, 0);
		CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
		      "round %d: the child ended on its own (status %d)", round, status);
		/* Collect the ids it acknowledged before dying. */
		FILE *in = fdopen(p[0], "r");
		uint8_t rec[1 + JOB_ID_LEN];
		while (fread(rec, sizeof(rec), 1, in) == 1) {
			if (rec[0] == 'D') {
				mark_announced(rec + 1);
				continue;
			}
			if (nacked == capacked) {
				capacked = capacked ? capacked * 2 : 4096;
				acked = realloc(acked, capacked * JOB_ID_LEN);
				announced = realloc(announced, capacked * sizeof(bool));
			}
			memcpy(acked[nacked], rec + 1, JOB_ID_LEN);
			announced[nacked++] = false;
			acks_total++;
		}
		fclose(in);
		total_failures += check_round(round, &deleted);
		if (total_failures > 5)
			break;
	}
	printf("%d kills, %llu acknowledged jobs, %zu still present, %u deleted by workers\n",
	       KILLS, (unsigned long long)acks_total, nacked, deleted);
	CHECK(acks_total > 100, "the children acknowledged only %llu jobs",
	      (unsigned long long)acks_total);
	free(acked);
	free(announced);
	rm_rf(dir);
	return check_done("test_recovery");
}
