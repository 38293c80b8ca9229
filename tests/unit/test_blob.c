/*
 * test_blob.c - the blob write path (sink, commit, dedup, reference
 * counts), deletion and garbage collection, verified reads, fsck's view
 * of a good and of a damaged store, and commits of the same content from
 * several threads beside deletions and collection that free it.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "commit_hold.h"
#include "index_i.h"
#include "store.h"
#include "store_i.h"

static char dir[64];
static struct store *st;

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static void fill(uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		b[i] = (uint8_t)rng;
	}
}

static int new_job(uint8_t id[JOB_ID_LEN], const char *req)
{
	struct job_create c = {0};
	struct job j;
	int rc;

	c.route = "image/synth/default/t2i";
	c.uid = c.gid = 1000;
	c.priority = JOB_PRIO_NORMAL;
	c.request = req;
	c.request_len = strlen(req);
	if ((rc = index_job_create(store_index(st), &c, id, NULL)) != 0)
		return rc;
	/* claim it so that it may receive an output */
	if ((rc = index_job_claim(store_index(st), 0, &j)) != 0)
		return rc;
	job_release(&j);
	return 0;
}

static void queued_failed(const uint8_t id[JOB_ID_LEN], const char *err)
{
	(void)id;
	fprintf(stderr, "a queued output reference failed: %s\n", err);
}

/* Write data through a sink in uneven pieces and commit it as id's
 * output, its reference waited for or queued. */
static int put_how(const uint8_t id[JOB_ID_LEN], const uint8_t *data, size_t len,
		   uint8_t hash[32], bool queued)
{
	struct store_sink *s;
	size_t off = 0, step = 1;
	int rc = store_sink_open(st, &s);

	if (rc)
		return rc;
	while (off < len) {
		size_t n = step < len - off ? step : len - off;
		if ((rc = store_sink_write(s, data + off, n)) != 0) {
			store_sink_abort(s);
			return rc;
		}
		off += n;
		step = step * 3 + 1;
	}
	return queued ? store_job_commit_output_queued(st, id, s, "image/png", "cpu", hash,
						       queued_failed)
		      : store_job_commit_output(st, id, s, "image/png", "cpu", hash);
}

static int put(const uint8_t id[JOB_ID_LEN], const uint8_t *data, size_t len, uint8_t hash[32])
{
	return put_how(id, data, len, hash, false);
}

static size_t count_files(const char *sub)
{
	char cmd[256];
	FILE *p;
	size_t n = 0;

	snprintf(cmd, sizeof(cmd), "find '%s/%s' -type f | wc -l", dir, sub);
	p = popen(cmd, "r");
	if (p) {
		if (fscanf(p, "%zu", &n) != 1)
			n = (size_t)-1;
		pclose(p);
	}
	return n;
}

static void test_write_read(void)
{
	const size_t sizes[] = {0,     1,      1023,    1024,          1025,   16384,
	                        16385, 300000, 1 << 20, (1 << 20) + 1, 3 << 20};
	uint8_t *data = malloc(3 << 20), hash[32], want[32];

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		uint8_t id[16], buf[4096];
		char path[4200], req[32];
		struct stat sb;
		uint64_t size;
		int fd;

		fill(data, sizes[i]);
		snprintf(req, sizeof(req), "{\"size\":%zu}", sizes[i]);
		REQUIRE(new_job(id, req) == 0, "job: %s", store_lasterr());
		REQUIRE(put(id, data, sizes[i], hash) == 0, "put %zu: %s", sizes[i], store_lasterr());
		b3_hash(data, sizes[i], want);
		CHECK(memcmp(hash, want, 32) == 0, "blob id is the BLAKE3 of %zu bytes", sizes[i]);
		store_blob_path(st, hash, path, sizeof(path));
		CHECK(stat(path, &sb) == 0 && (sb.st_mode & 0777) == 0444 &&
			      (size_t)sb.st_size == sizes[i],
		      "blob file %s", path);
		REQUIRE(store_blob_open(st, hash, &fd, &size) == 0, "open: %s", store_lasterr());
		CHECK(size == sizes[i], "size");
		ssize_t n = pread(fd, buf, sizeof(buf), 0);
		CHECK(n == (ssize_t)(sizes[i] < 4096 ? sizes[i] : 4096) && memcmp(buf, data, (size_t)n) == 0,
		      "content");
		close(fd);
		struct job j;
		REQUIRE(index_job_get(store_index(st), id, &j) == 0, "get");
		CHECK(memcmp(j.output_hash, hash, 32) == 0 && j.output_size == sizes[i], "job output");
		job_release(&j);
	}
	CHECK(count_files("tmp") == 0, "tmp/ is empty after commits");
	free(data);
}

static void test_dedup_gc(void)
{
	uint8_t a[16], b[16], h1[32], h2[32], data[5000];
	struct store_stats s0, s1;
	struct blob_info bi;
	char path[4200];

	fill(data, sizeof(data));
	store_get_stats(st, &s0);
	size_t files0 = count_files("blobs");
	REQUIRE(new_job(a, "{\"d\":1}") == 0 && new_job(b, "{\"d\":2}") == 0, "jobs");
	REQUIRE(put(a, data, sizeof(data), h1) == 0 && put(b, data, sizeof(data), h2) == 0, "puts");
	store_get_stats(st, &s1);
	CHECK(memcmp(h1, h2, 32) == 0, "same content, same id");
	CHECK(count_files("blobs") == files0 + 1, "stored once");
	CHECK(s1.dedup_hits == s0.dedup_hits + 1, "dedup hit counted");
	CHECK(index_blob_get(store_index(st), h1, &bi) == 0 && bi.refcount == 2, "refcount 2");
	store_blob_path(st, h1, path, sizeof(path));

	/* Deleting needs a finished job. */
	CHECK(store_job_delete(st, a) == STORE_E_STATE, "running job deleted");
	index_job_finish(store_index(st), a, JOB_COMPLETE, NULL, NULL);
	index_job_finish(store_index(st), b, JOB_COMPLETE, NULL, NULL);
	CHECK(store_job_delete(st, a) == 0, "delete a");
	CHECK(index_blob_get(store_index(st), h1, &bi) == 0 && bi.refcount == 1, "refcount 1");
	CHECK(access(path, F_OK) == 0, "blob kept while referenced");
	CHECK(store_job_delete(st, b) == 0, "delete b");
	CHECK(index_blob_get(store_index(st), h1, &bi) == STORE_E_NOTFOUND, "record released");
	CHECK(access(path, F_OK) != 0, "file collected with its last reference");

	/* GC: unreferenced files and strays go to lost+found; referenced ones stay. */
	uint64_t n;
	char stray[4300], orphan[4300];
	uint8_t oh[32];
	b3_hash("orphan", 6, oh);
	store_blob_path(st, oh, orphan, sizeof(orphan));
	snprintf(stray, sizeof(stray), "%s/blobs/%.2s/not-a-blob", dir, strrchr(orphan, '/') + 1);
	run_cmd("mkdir -p \"$(dirname '%s')\" && echo orphan > '%s' && echo x > '%s'", orphan,
		orphan, stray);
	size_t before = count_files("blobs");
	CHECK(store_gc(st, &n) == 0 && n == 2, "gc collected %llu", (unsigned long long)n);
	CHECK(count_files("blobs") == before - 2, "gc left referenced blobs");
	CHECK(access(orphan, F_OK) != 0, "orphan removed");
	snprintf(stray, sizeof(stray), "%s/lost+found/%s", dir, strrchr(orphan, '/') + 1);
	CHECK(access(stray, F_OK) == 0, "orphan kept in lost+found");
}

static void test_corruption(void)
{
	uint8_t id[16], hash[32], data[10000];
	char path[4200];
	struct store_stats s0, s1;
	int fd, rc;

	fill(data, sizeof(data));
	REQUIRE(new_job(id, "{\"corrupt\":1}") == 0, "job");
	REQUIRE(put(id, data, sizeof(data), hash) == 0, "put");
	index_job_finish(store_index(st), id, JOB_COMPLETE, NULL, NULL);
	char out[16384];
	int frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 0 && strstr(out, "0 problems"), "fsck of a good store: %s", out);
	store_blob_path(st, hash, path, sizeof(path));

	/* One flipped byte: reads fail with a distinct error, never data. */
	store_get_stats(st, &s0);
	REQUIRE(chmod(path, 0644) == 0, "chmod");
	fd = open(path, O_WRONLY);
	REQUIRE(pwrite(fd, "\xff", 1, 5000) == 1, "write");
	close(fd);
	chmod(path, 0444);
	rc = store_blob_open(st, hash, &fd, NULL);
	CHECK(rc == STORE_E_CORRUPT && strstr(store_lasterr(), path), "flipped: %d %s", rc,
	      store_lasterr());
	CHECK(store_errno(rc) == EIO, "corruption reads as EIO");
	store_get_stats(st, &s1);
	CHECK(s1.integrity_failures == s0.integrity_failures + 1, "counted");
	frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 1 && strstr(out, path) && strstr(out, "does not match"),
	      "fsck names the damaged blob: %s", out);

	/* Truncated. */
	REQUIRE(truncate(path, 100) == 0, "truncate");
	rc = store_blob_open(st, hash, &fd, NULL);
	CHECK(rc == STORE_E_CORRUPT && strstr(store_lasterr(), "100 bytes"), "truncated: %s",
	      store_lasterr());
	/* Missing. */
	REQUIRE(unlink(path) == 0, "unlink");
	rc = store_blob_open(st, hash, &fd, NULL);
	CHECK(rc == STORE_E_CORRUPT && strstr(store_lasterr(), path), "missing: %s",
	      store_lasterr());
	frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 1 && strstr(out, path), "fsck names the missing blob: %s", out);
	/* Unknown blob. */
	uint8_t nothing[32] = {1};
	CHECK(store_blob_open(st, nothing, &fd, NULL) == STORE_E_NOTFOUND, "unknown blob");
	/* Deleting the job releases the (missing) blob: the store is clean again. */
	CHECK(store_job_delete(st, id) == 0, "delete: %s", store_lasterr());
	frc = fsck_run(dir, out, sizeof(out));
	CHECK(frc == 0, "fsck after delete: %s", out);
}

/* Large blobs read by group: every byte checked, a damaged group refused
 * while the others still read, with and without the group cache. */
static void test_reader(void)
{
	const size_t len = 3 * B3_GROUP_LEN + 12345;
	uint8_t id[16], hash[32], *data = malloc(len), *got = malloc(len);
	struct store_reader *r;
	struct store_stats s0, s1;
	char path[4200];
	uint64_t size = 0;
	ssize_t n;
	int fd;

	REQUIRE(data && got, "out of memory");
	fill(data, len);
	REQUIRE(new_job(id, "{\"reader\":1}") == 0, "job");
	REQUIRE(put(id, data, len, hash) == 0, "put");
	REQUIRE(store_reader_open(st, hash, &r, &size) == 0, "open: %s", store_lasterr());
	CHECK(size == len, "size %llu", (unsigned long long)size);
	/* Odd pieces across group boundaries, out of order. */
	size_t offs[] = {len - 100, 0, B3_GROUP_LEN - 7, 2 * B3_GROUP_LEN + 1, 77};
	for (size_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++) {
		n = store_reader_pread(r, got, 5000, offs[i]);
		size_t want = len - offs[i] < 5000 ? len - offs[i] : 5000;
		CHECK(n == (ssize_t)want && memcmp(got, data + offs[i], want) == 0, "piece at %zu",
		      offs[i]);
	}
	n = store_reader_pread(r, got, len + 10, 0);
	CHECK(n == (ssize_t)len && memcmp(got, data, len) == 0, "whole");
	CHECK(store_reader_pread(r, got, 10, len) == 0, "end of file");
	store_reader_close(r);

	/* The cache knows the groups: the open is cheap; a group damaged while
	 * the blob is open is not served. */
	store_get_stats(st, &s0);
	REQUIRE(store_reader_open(st, hash, &r, NULL) == 0, "open: %s", store_lasterr());
	store_blob_path(st, hash, path, sizeof(path));
	REQUIRE(chmod(path, 0644) == 0, "chmod");
	fd = open(path, O_WRONLY);
	REQUIRE(pwrite(fd, "\x5a", 1, 2 * B3_GROUP_LEN + 99) == 1, "write");
	close(fd);
	CHECK(store_reader_pread(r, got, 100, 0) == 100, "a sound group still reads");
	n = store_reader_pread(r, got, 100, 2 * B3_GROUP_LEN + 50);
	CHECK(n == STORE_E_CORRUPT && strstr(store_lasterr(), path), "damaged group: %zd %s", n,
	      store_lasterr());
	store_reader_close(r);
	store_get_stats(st, &s1);
	CHECK(s1.integrity_failures == s0.integrity_failures + 1, "counted");
	/* The file changed since its check (ctime): the next open makes the full
	 * pass and refuses. */
	CHECK(store_reader_open(st, hash, &r, NULL) == STORE_E_CORRUPT, "changed file refused");
	/* A fresh store has no cache: the open makes the full pass and refuses. */
	store_close(st);
	REQUIRE(store_open(dir, NULL, &st) == 0, "reopen: %s", store_lasterr());
	CHECK(store_reader_open(st, hash, &r, NULL) == STORE_E_CORRUPT, "full pass refuses");
	chmod(path, 0444);
	store_job_delete(st, id);
	free(data);
	free(got);
}

static void test_lock(void)
{
	struct store_options opt = {0};
	struct store *second;
	int rc = store_open(dir, &opt, &second);

	CHECK(rc == -EBUSY && strstr(store_lasterr(), "in use"), "second open: %d %s", rc,
	      store_lasterr());
	if (rc == 0)
		store_close(second);
	/* A reader in another process works beside the writer. */
	pid_t pid = fork();
	if (pid == 0) {
		opt.read_only = true;
		rc = store_open(dir, &opt, &second);
		if (rc == 0)
			store_close(second);
		_exit(rc == 0 ? 0 : 1);
	}
	int status;
	waitpid(pid, &status, 0);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "read-only open beside a writer");
}

/*
 * Threads commit the same two contents and delete their jobs at once, so
 * that each commit may find its blob stored, or being freed by another
 * thread's delete at that moment, while one thread collects garbage:
 * every job's output must be readable for as long as the job holds it.
 * Half the threads queue their outputs' references (a remote run's) and
 * end their jobs before they read.
 */
#define RACE_THREADS 4
#define RACE_ROUNDS 300
static pthread_mutex_t race_mu = PTHREAD_MUTEX_INITIALIZER;

struct racer {
	int n;
	unsigned bad, lost;
};

static void *race(void *arg)
{
	struct racer *r = arg;
	uint8_t data[3000], id[16], hash[32];
	char req[64];
	int fd;
	uint64_t size;

	for (int k = 0; k < RACE_ROUNDS; k++) {
		memset(data, 'a' + k % 2, sizeof(data));
		snprintf(req, sizeof(req), "{\"racer\":%d,\"k\":%d}", r->n, k);
		pthread_mutex_lock(&race_mu); /* a create and its claim together */
		int rc = new_job(id, req);
		pthread_mutex_unlock(&race_mu);
		if (rc != 0 || put_how(id, data, sizeof(data), hash, r->n % 2) != 0) {
			r->bad++;
			continue;
		}
		/* A queued reference is written with (or before) the job's
		 * end, which is refused without it. */
		if (r->n % 2 && index_job_finish(store_index(st), id, JOB_COMPLETE, NULL, NULL) != 0)
			r->bad++;
		if (store_blob_open(st, hash, &fd, &size) == 0)
			close(fd);
		else
			r->lost++;
		if ((r->n % 2 == 0 &&
		     index_job_finish(store_index(st), id, JOB_COMPLETE, NULL, NULL) != 0) ||
		    store_job_delete(st, id) != 0)
			r->bad++;
		if (r->n == 0 && k % 10 == 0) {
			uint64_t n;
			if (store_gc(st, &n) != 0 || n != 0)
				r->bad++;
		}
	}
	return NULL;
}

static void test_concurrent_commits(void)
{
	static struct racer r[RACE_THREADS];
	pthread_t t[RACE_THREADS];

	for (int i = 0; i < RACE_THREADS; i++) {
		r[i].n = i;
		REQUIRE(pthread_create(&t[i], NULL, race, &r[i]) == 0, "thread");
	}
	for (int i = 0; i < RACE_THREADS; i++)
		pthread_join(t[i], NULL);
	for (int i = 0; i < RACE_THREADS; i++) {
		CHECK(r[i].bad == 0, "racer %d: %u failed operations (%s)", i, r[i].bad,
		      store_lasterr());
		CHECK(r[i].lost == 0, "racer %d: %u outputs unreadable just after commit", i,
		      r[i].lost);
	}
	CHECK(count_files("tmp") == 0, "tmp/ is empty after concurrent commits");
}

/*
 * An output whose reference is queued behind a commit under way is not
 * garbage: store_gc waits for the queued writes before it looks.
 */
static uint64_t q_collected = 99;

static void *q_gc(void *arg)
{
	(void)arg;
	return (void *)(long)store_gc(st, &q_collected);
}

static void test_queued_output_gc(void)
{
	uint8_t data[5000], id[16], hash[32];
	struct commit_hold hold;
	pthread_t g;
	void *rg;
	int ra;
	int fd;
	uint64_t size;
	struct job j;

	fill(data, sizeof(data));
	REQUIRE(new_job(id, "{\"queued\":1}") == 0, "job");
	commit_hold_start(&hold, store_index(st));
	/* A commit is under way: the reference waits behind it. */
	REQUIRE(put_how(id, data, sizeof(data), hash, true) == 0, "queued: %s", store_lasterr());
	pthread_create(&g, NULL, q_gc, NULL);
	usleep(100 * 1000); /* time for a collection that did not wait to take it */
	ra = commit_hold_release(&hold);
	pthread_join(g, &rg);
	CHECK(ra == 0 && rg == NULL, "the write and the collection: %d %ld", ra, (long)rg);
	CHECK(q_collected == 0, "collected %llu blobs", (unsigned long long)q_collected);
	CHECK(store_blob_open(st, hash, &fd, &size) == 0 && size == sizeof(data),
	      "the output is readable: %s", store_lasterr());
	close(fd);
	REQUIRE(index_job_get(store_index(st), id, &j) == 0, "get");
	CHECK((j.flags & JOB_F_HAS_OUTPUT) && memcmp(j.output_hash, hash, 32) == 0,
	      "the job has it");
	job_release(&j);
}

/* Each way a sink's file can be made and named (the probed one, and the
 * others where this system has them): unnamed and linked (nothing in
 * tmp/ while a large content is written), or named in tmp/ and renamed.
 * Either way a stray file at the blob's path that no index entry names
 * (left by a crash) is replaced by the content, as a rename replaces it;
 * a small content makes no file until it is stored. */
static void test_link_modes(void)
{
	int probed = st->link_mode;
	uint8_t *data = malloc(3 << 20), hash[32], want[32];
	char tmp[4200];

	CHECK(probed != STORE_LINK_NONE, "this system links unnamed files (O_TMPFILE, linkat)");
	snprintf(tmp, sizeof(tmp), "%s/tmp", dir);
	for (int mode = STORE_LINK_NONE; mode <= STORE_LINK_PROC; mode++) {
		int fd = open(tmp, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
		char name[4300];
		snprintf(name, sizeof(name), "%s/mode-probe", tmp);
		if (mode != STORE_LINK_NONE) {
			/* as store_link_probe: skipped where the system lacks it */
			char proc[64];
			int ok;
			snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
			ok = mode == STORE_LINK_EMPTY_PATH
				     ? linkat(fd, "", AT_FDCWD, name, AT_EMPTY_PATH) == 0
				     : linkat(AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW) == 0;
			unlink(name);
			if (!ok) {
				close(fd);
				continue;
			}
		}
		close(fd);
		st->link_mode = mode;
		for (int big = 0; big < 2; big++) {
			size_t len = big ? 3 << 20 : 1000;
			struct store_sink *s;
			uint8_t id[16];
			char req[64], path[4200], sub[4200];
			uint64_t size;
			int bfd;

			fill(data, len);
			b3_hash(data, len, want);
			snprintf(req, sizeof(req), "{\"mode\":%d,\"big\":%d}", mode, big);
			REQUIRE(new_job(id, req) == 0, "job: %s", store_lasterr());
			/* a stray, wrong file where the blob goes */
			store_blob_path(st, want, path, sizeof(path));
			snprintf(sub, sizeof(sub), "%.*s", (int)(strrchr(path, '/') - path), path);
			mkdir(sub, 0755);
			bfd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0444);
			CHECK(bfd >= 0 && write(bfd, "stray", 5) == 5, "stray file");
			close(bfd);
			REQUIRE(store_sink_open(st, &s) == 0, "sink");
			REQUIRE(store_sink_write(s, data, len - 1) == 0, "write");
			CHECK(count_files("tmp") == (big && mode == STORE_LINK_NONE ? 1u : 0u),
			      "mode %d, %zu bytes: %zu files in tmp/ while written", mode, len,
			      count_files("tmp"));
			REQUIRE(store_sink_write(s, data + len - 1, 1) == 0, "write");
			REQUIRE(store_job_commit_output(st, id, s, "image/png", "cpu", hash) == 0,
				"mode %d commit: %s", mode, store_lasterr());
			CHECK(memcmp(hash, want, 32) == 0, "hash");
			CHECK(store_blob_open(st, hash, &bfd, &size) == 0 && size == len,
			      "mode %d, %zu bytes: the stray file replaced by the content: %s", mode,
			      len, store_lasterr());
			if (bfd >= 0)
				close(bfd);
			CHECK(count_files("tmp") == 0, "mode %d: tmp/ empty after the commit", mode);
		}
	}
	st->link_mode = probed;
	free(data);
}

int main(void)
{
	struct store_options opt = {0};

	test_tmpdir(dir, "blob");
	if (store_open(dir, &opt, &st) != 0) {
		fprintf(stderr, "store_open: %s\n", store_lasterr());
		return 1;
	}
	test_write_read();
	test_link_modes();
	test_dedup_gc();
	test_corruption();
	test_reader();
	test_lock();
	test_concurrent_commits();
	test_queued_output_gc();
	store_close(st);
	rm_rf(dir);
	return check_done("test_blob");
}
