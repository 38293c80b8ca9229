/*
 * test_replica.c - what replication keeps in the store (SPEC §12): the
 * outbox written with the blob, confirmation, the cache's drops and
 * fetches (verified against the name), inputs of unfinished jobs kept,
 * fsck's view; and the bucket's addresses (s3.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "s3.h"
#include "store.h"

static char dir[64];
static struct store *st;

static int new_job(uint8_t id[JOB_ID_LEN], const char *req, const struct job_input *in,
		   size_t nin, bool claim)
{
	struct job_create c = {0};
	struct job j;
	int rc;

	c.route = "image/synth/default/t2i";
	c.uid = c.gid = 1000;
	c.priority = JOB_PRIO_NORMAL;
	c.request = req;
	c.request_len = strlen(req);
	c.inputs = in;
	c.ninputs = nin;
	if ((rc = index_job_create(store_index(st), &c, id, NULL)) != 0 || !claim)
		return rc;
	if ((rc = index_job_claim(store_index(st), 0, &j)) != 0)
		return rc;
	job_release(&j);
	return 0;
}

/* A sink holding data (NULL on failure). */
static struct store_sink *sink_of(const void *data, size_t len)
{
	struct store_sink *s;

	if (store_sink_open(st, &s) != 0)
		return NULL;
	if (store_sink_write(s, data, len) != 0) {
		store_sink_abort(s);
		return NULL;
	}
	return s;
}

static int put(const uint8_t id[JOB_ID_LEN], const void *data, size_t len, uint8_t hash[32])
{
	struct store_sink *s = sink_of(data, len);
	return s ? store_job_commit_output(st, id, s, "image/png", "cpu", hash) : -EIO;
}

static int fetch(const void *data, size_t len, const uint8_t want[32])
{
	struct store_sink *s = sink_of(data, len);
	return s ? store_blob_fetched(st, s, want, "image/png", NULL, NULL) : -EIO;
}

static size_t due(struct outbox_entry *e, size_t max)
{
	size_t n = 0;

	if (index_outbox_due(store_index(st), now_ms(), NULL, 0, 256, e, max, &n) != 0)
		return (size_t)-1;
	return n;
}

static bool here(const uint8_t hash[32])
{
	char path[4200];

	store_blob_path(st, hash, path, sizeof(path));
	return access(path, F_OK) == 0;
}

/* fsck of the store, in a child (one open per process): the store is
 * closed for it and opened again. */
static bool fsck_clean(void)
{
	struct store_options opt = {0};
	pid_t pid;
	int status = -1;

	store_close(st);
	st = NULL;
	fflush(stdout);
	if ((pid = fork()) == 0)
		_exit(store_fsck(dir, stderr) == 0 ? 0 : 1);
	waitpid(pid, &status, 0);
	if (store_open(dir, &opt, &st) != 0) {
		fprintf(stderr, "reopen: %s\n", store_lasterr());
		exit(1);
	}
	index_set_replica(store_index(st), true);
	return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void test_outbox_cache_pins(void)
{
	struct index *ix = store_index(st);
	uint8_t a[16], b[16], c[16], h[32], h2[32], zero[32] = {0};
	struct outbox_entry e[16];
	struct outbox_stats os;
	struct replica_state rs;
	struct blob_info bi;
	uint64_t local = 0, size = 0;
	char data[3000], other[2000];
	size_t n;

	memset(data, 'a', sizeof(data));
	memset(other, 'o', sizeof(other));
	REQUIRE(new_job(a, "{\"n\":1}", NULL, 0, true) == 0, "job: %s", store_lasterr());
	REQUIRE(put(a, data, sizeof(data), h) == 0, "put: %s", store_lasterr());
	/* The blob is in the outbox with the commit. */
	n = due(e, 16);
	REQUIRE(n == 1, "one entry due, not %zu", n);
	CHECK(e[0].kind == OUT_BLOB && memcmp(e[0].id, h, 32) == 0 && e[0].size == sizeof(data),
	      "the blob");
	CHECK(index_outbox_stats(ix, &os) == 0 && os.objects == 1 && os.bytes == sizeof(data) &&
		      os.oldest_ms > 0,
	      "stats: %llu objects, %llu bytes", (unsigned long long)os.objects,
	      (unsigned long long)os.bytes);
	CHECK(index_local_bytes(ix, &local) == 0 && local == sizeof(data), "local bytes");
	/* Not confirmed: never dropped. */
	CHECK(store_blob_drop(st, h, &size) == STORE_E_STATE && here(h), "unconfirmed stays");
	/* A failed attempt waits. */
	CHECK(index_outbox_retry(ix, e[0].seq, now_ms() + 60000) == 0, "retry");
	CHECK(due(e + 2, 14) == 0, "the retried one waits");
	CHECK(index_outbox_done(ix, e[0].seq, true) == 0, "confirmed");
	CHECK(index_outbox_done(ix, e[0].seq, true) == STORE_E_NOTFOUND, "done once");
	/* Then its signature, and only then may the cache drop it. */
	n = due(e, 16);
	REQUIRE(n == 1 && e[0].kind == OUT_BLOBSIG && memcmp(e[0].id, h, 32) == 0,
		"the signature follows the confirmed blob");
	CHECK(index_replica_get(ix, h, &rs) == 0 && rs.local && !rs.signed_, "confirmed, unsigned");
	CHECK(store_blob_drop(st, h, &size) == STORE_E_STATE && here(h),
	      "kept until its signature is in the bucket");
	CHECK(index_outbox_due(ix, now_ms(), &e[0].seq, 1, 256, e + 2, 14, &n) == 0 && n == 0,
	      "in flight skipped");
	CHECK(index_outbox_done(ix, e[0].seq, true) == 0, "signature confirmed");
	CHECK(index_replica_get(ix, h, &rs) == 0 && rs.local && rs.signed_ && !rs.cache_ref,
	      "state");
	CHECK(index_outbox_stats(ix, &os) == 0 && os.objects == 0 && os.bytes == 0, "empty");

	/* Completing puts the manifest and its signature in the outbox. */
	CHECK(index_job_finish(ix, a, JOB_COMPLETE, NULL, NULL) == 0, "finish");
	n = due(e, 16);
	CHECK(n == 2 && e[0].kind == OUT_MANIFEST && e[1].kind == OUT_MANIFESTSIG &&
		      memcmp(e[0].id, a, 16) == 0,
	      "manifest entries");
	for (size_t i = 0; i < n; i++)
		index_outbox_done(ix, e[i].seq, true);

	/* A queued job naming the blob keeps it here. */
	struct job_input in = {.field = "image_url", .size = sizeof(data)};
	memcpy(in.hash, h, 32);
	REQUIRE(new_job(b, "{\"n\":2}", &in, 1, false) == 0, "job with input: %s", store_lasterr());
	CHECK(store_blob_drop(st, h, &size) == STORE_E_STATE && here(h), "pinned by a queued job");
	CHECK(index_job_cancel(ix, b) == 0, "cancel");
	CHECK(index_job_retry(ix, b) == 0, "queued again");
	CHECK(store_blob_drop(st, h, &size) == STORE_E_STATE, "pinned again by the retry");
	CHECK(fsck_clean(), "fsck agrees with the pins");
	ix = store_index(st);
	CHECK(index_job_delete(ix, b, &(struct index_freed){0}) == 0, "delete the queued job");
	uint8_t lru[4][32];
	CHECK(index_replica_lru(ix, 4, lru, &n) == 0 && n == 1 && memcmp(lru[0], h, 32) == 0,
	      "the cache may drop it");
	CHECK(store_blob_drop(st, h, &size) == 0 && size == sizeof(data) && !here(h), "dropped");
	CHECK(index_local_bytes(ix, &local) == 0 && local == 0, "local bytes 0");
	CHECK(index_replica_get(ix, h, &rs) == 0 && !rs.local, "remote only");
	CHECK(index_blob_get(ix, h, &bi) == 0 && bi.refcount == 1, "the record stays");
	CHECK(index_replica_lru(ix, 4, lru, &n) == 0 && n == 0, "out of the cache order");

	/* Fetched back: refused unless it hashes to the name. */
	CHECK(fetch(other, sizeof(other), h) == STORE_E_CORRUPT && !here(h), "wrong content refused");
	CHECK(fetch(data, sizeof(data), h) == 0 && here(h), "fetched");
	CHECK(index_replica_get(ix, h, &rs) == 0 && rs.local, "here again");
	CHECK(index_local_bytes(ix, &local) == 0 && local == sizeof(data), "counted again");

	/* A blob the store never had: the cache's own reference, nothing to put. */
	b3_hash(other, sizeof(other), h2);
	CHECK(fetch(other, sizeof(other), h2) == 0 && here(h2), "unknown fetched");
	CHECK(index_blob_get(ix, h2, &bi) == 0 && bi.refcount == 1, "a record of its own");
	CHECK(index_replica_get(ix, h2, &rs) == 0 && rs.local && rs.cache_ref, "cache reference");
	CHECK(due(e, 16) == 0, "nothing to put: the bucket has it");
	/* fsck counts the cache's reference. */
	CHECK(fsck_clean(), "fsck: no problems");
	ix = store_index(st);
	CHECK(store_blob_drop(st, h2, &size) == 0 && !here(h2), "dropped");
	CHECK(index_blob_get(ix, h2, &bi) == STORE_E_NOTFOUND, "with its record");
	CHECK(index_replica_get(ix, h2, &rs) == STORE_E_NOTFOUND, "and its state");
	CHECK(index_local_bytes(ix, &local) == 0 && local == sizeof(data), "local bytes");

	/* A job's output that the cache had dropped, made again: here again. */
	CHECK(store_blob_drop(st, h, &size) == 0 && !here(h), "dropped again");
	REQUIRE(new_job(c, "{\"n\":3}", NULL, 0, true) == 0, "job: %s", store_lasterr());
	CHECK(put(c, data, sizeof(data), h) == 0 && here(h), "made again");
	CHECK(index_replica_get(ix, h, &rs) == 0 && rs.local, "counted as here");
	CHECK(index_local_bytes(ix, &local) == 0 && local == sizeof(data), "local bytes back");
	(void)zero;
}

static void test_s3_addresses(void)
{
	struct s3 s;
	struct s3_request q;
	char err[512], enc[64];

	setenv("AWS_ACCESS_KEY_ID", "AKID", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t/+=", 1);
	unsetenv("AWS_SESSION_TOKEN");
	setenv("AWS_REGION", "eu-west-3", 1);
	REQUIRE(s3_init(&s, "s3://my-bucket/a/b/", NULL, false, NULL, err, sizeof(err)) == 0, "%s",
		err);
	CHECK(strcmp(s.prefix, "a/b") == 0 && strcmp(s.region, "eu-west-3") == 0, "parsed");
	CHECK(strcmp(s.sigv4, "aws:amz:eu-west-3:s3") == 0, "sigv4 %s", s.sigv4);
	REQUIRE(s3_request(&s, &q, "PUT", "blobs/ab/x y+z", NULL) == 0, "request");
	CHECK(strcmp(q.url, "https://my-bucket.s3.eu-west-3.amazonaws.com/a/b/blobs/ab/x%20y%2Bz") ==
		      0,
	      "virtual-host URL %s", q.url);
	CHECK(q.rq.nheaders == 1 && strcmp(q.headers[0], "x-amz-content-sha256: UNSIGNED-PAYLOAD") == 0,
	      "payload header");
	CHECK(q.rq.nsecrets == 1 && strcmp(q.secrets[0], "s3cr3t/+=") == 0, "the secret is masked");
	REQUIRE(s3_init(&s, "s3://rfs", "http://127.0.0.1:9000/", true, NULL, err, sizeof(err)) == 0,
		"%s", err);
	REQUIRE(s3_request(&s, &q, "POST", "k", "uploads=") == 0, "request");
	CHECK(strcmp(q.url, "http://127.0.0.1:9000/rfs/k?uploads=") == 0, "path-style URL %s", q.url);
	s3_encode("a b/c~d", false, enc, sizeof(enc));
	CHECK(strcmp(enc, "a%20b%2Fc~d") == 0, "query encoding %s", enc);
	setenv("AWS_SESSION_TOKEN", "tok", 1);
	REQUIRE(s3_init(&s, "s3://rfs/p", "http://h", true, NULL, err, sizeof(err)) == 0, "%s", err);
	REQUIRE(s3_request(&s, &q, "GET", "k", NULL) == 0, "request");
	CHECK(q.rq.nheaders == 2 && strcmp(q.headers[1], "x-amz-security-token: tok") == 0 &&
		      q.rq.nsecrets == 2,
	      "session token sent and masked");
	unsetenv("AWS_SESSION_TOKEN");

	const char *bad[] = {"s3://ab/x", "s3://Upper/x", "http://rfs/x", "s3://rfs/a//b",
			     "s3://rfs/../x", "s3://-rfs/x"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		CHECK(s3_init(&s, bad[i], NULL, false, NULL, err, sizeof(err)) == -EINVAL, "%s refused",
		      bad[i]);
	CHECK(s3_init(&s, "s3://rfs/x", "ftp://h", false, NULL, err, sizeof(err)) == -EINVAL,
	      "endpoint scheme");
	CHECK(s3_init(&s, "s3://rfs/x", "http://h/path", false, NULL, err, sizeof(err)) == -EINVAL,
	      "endpoint path");
	CHECK(s3_init(&s, "s3://rfs/x", "http://", false, NULL, err, sizeof(err)) == -EINVAL,
	      "endpoint without a host");
	unsetenv("AWS_ACCESS_KEY_ID");
	CHECK(s3_init(&s, "s3://rfs/x", NULL, false, NULL, err, sizeof(err)) == -EINVAL &&
		      strstr(err, "AWS_ACCESS_KEY_ID"),
	      "credentials needed: %s", err);

	/* A credentials file: 0600 and the caller's, else refused. */
	char path[128];
	snprintf(path, sizeof(path), "%s/cred", dir);
	FILE *f = fopen(path, "w");
	REQUIRE(f, "cred file");
	fputs("[other]\naws_access_key_id = NOPE\n[default]\naws_access_key_id = FILEKEY\n"
	      "aws_secret_access_key = filesecret\n",
	      f);
	fclose(f);
	chmod(path, 0644);
	CHECK(s3_init(&s, "s3://rfs/x", NULL, false, path, err, sizeof(err)) == -EACCES &&
		      strstr(err, "0600") && !strstr(err, "filesecret"),
	      "group-readable refused: %s", err);
	chmod(path, 0600);
	CHECK(s3_init(&s, "s3://rfs/x", NULL, false, path, err, sizeof(err)) == 0 &&
		      strcmp(s.key_id, "FILEKEY") == 0 && strcmp(s.secret, "filesecret") == 0,
	      "the [default] section: %s", err);
	char link[160];
	snprintf(link, sizeof(link), "%s/credlink", dir);
	CHECK(symlink(path, link) == 0 &&
		      s3_init(&s, "s3://rfs/x", NULL, false, link, err, sizeof(err)) != 0,
	      "a symlink refused");
}

int main(void)
{
	struct store_options opt = {0};

	test_tmpdir(dir, "replica");
	if (store_open(dir, &opt, &st) != 0) {
		fprintf(stderr, "store_open: %s\n", store_lasterr());
		return 1;
	}
	index_set_replica(store_index(st), true);
	test_outbox_cache_pins();
	test_s3_addresses();
	if (st)
		store_close(st);
	rm_rf(dir);
	return check_done("test_replica");
}
