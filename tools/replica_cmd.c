/*
 * replica_cmd.c - `renderctl replica status|push|verify STORE` and the
 * bucket half of `renderctl fsck --remote` (SPEC §12).
 *
 * The bucket is the one the store was last mounted with (replica=,
 * recorded in its index), with the credentials of this process's
 * environment (AWS_ACCESS_KEY_ID, ...) or --credentials FILE. Checks
 * run VERIFY_WINDOW requests at once through the HTTP loop; this tool
 * may wait for them.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sodium.h>

#include "blake3.h"
#include "http.h"
#include "replica_cmd.h"
#include "s3.h"
#include "store.h"

#define VERIFY_WINDOW 8

static int open_index(const char *dir, bool read_only, struct index **ix)
{
	struct index_options opt = {0, read_only};
	char path[4200];

	snprintf(path, sizeof(path), "%s/index", dir);
	return index_open(path, &opt, ix);
}

/* The store's recorded replica= as an s3 config. */
static int config_of(struct index *ix, const char *credfile, struct s3 *s3, char *err,
		     size_t errlen)
{
	char cfg[2048], *endpoint, *style;

	if (index_replica_config_get(ix, cfg, sizeof(cfg)) != 0) {
		snprintf(err, errlen, "the store has never been mounted with replica=");
		return -ENOENT;
	}
	if (!(endpoint = strchr(cfg, '\n')) || !(style = strchr(endpoint + 1, '\n'))) {
		snprintf(err, errlen, "the store's replica setting is damaged");
		return -EINVAL;
	}
	*endpoint++ = '\0';
	*style++ = '\0';
	return s3_init(s3, cfg, strcmp(endpoint, "-") ? endpoint : NULL, strcmp(style, "1") == 0,
		       credfile, err, errlen);
}

/* fn for each blob the bucket confirmed, in hash order; its first
 * non-zero return ends the walk and is returned. */
static int each_confirmed(struct index *ix,
			  int (*fn)(const uint8_t hash[32], const struct replica_state *s, void *arg),
			  void *arg)
{
	uint8_t after[32], batch[256][32];
	struct replica_state st[256];
	bool started = false;
	size_t n;
	int rc;

	do {
		if ((rc = index_replica_list(ix, started ? after : NULL, 256, batch, st, &n)) != 0)
			return rc;
		for (size_t i = 0; i < n; i++)
			if ((rc = fn(batch[i], &st[i], arg)) != 0)
				return rc;
		if (n) {
			memcpy(after, batch[n - 1], 32);
			started = true;
		}
	} while (n == 256);
	return 0;
}

/* ---- checks against the bucket ---- */

struct check {
	struct verifier *v;
	uint8_t hash[32];
	uint64_t size;
	bool deep, busy;
	struct b3_hasher h;
	uint64_t got;
};

struct verifier {
	pthread_mutex_t mu;
	pthread_cond_t cond;
	size_t out;
	FILE *report;
	long problems;
	uint64_t checked;
	struct check slots[VERIFY_WINDOW];
};

static int hash_sink(void *arg, const void *data, size_t len, char *err, size_t errlen)
{
	struct check *c = arg;

	(void)err;
	(void)errlen;
	b3_hasher_update(&c->h, data, len);
	c->got += len;
	return 0;
}

static void check_done(void *arg, const struct http_response *rs)
{
	struct check *c = arg;
	struct verifier *v = c->v;
	char hex[B3_HEX_LEN + 1];

	b3_to_hex(c->hash, hex);
	pthread_mutex_lock(&v->mu);
	if (rs->status == 404 || rs->status == 403) {
		fprintf(v->report, "problem: blob %s is not in the bucket (HTTP %ld)\n", hex,
			rs->status);
		v->problems++;
	} else if (rs->error_code || rs->status != 200) {
		fprintf(v->report, "problem: blob %s: %s\n", hex, rs->message);
		v->problems++;
	} else if (c->deep) {
		uint8_t got[32];
		b3_hasher_finalize(&c->h, got, 32);
		if (c->got != c->size || memcmp(got, c->hash, 32) != 0) {
			fprintf(v->report, "problem: the bucket's blob %s does not hash to its "
					   "name (%" PRIu64 " bytes)\n",
				hex, c->got);
			v->problems++;
		}
	} else if (strtoull(rs->header, NULL, 10) != c->size) {
		fprintf(v->report, "problem: the bucket's blob %s has %s bytes; the index says "
				   "%" PRIu64 "\n",
			hex, rs->header[0] ? rs->header : "an unknown number of", c->size);
		v->problems++;
	}
	v->checked++;
	c->busy = false;
	v->out--;
	pthread_cond_signal(&v->cond);
	pthread_mutex_unlock(&v->mu);
}

struct verify_run {
	struct verifier *v;
	struct index *ix;
	struct http_loop *loop;
	const struct s3 *s3;
	bool deep;
};

static void check_failed(struct check *c, const char *msg)
{
	struct http_response rs = {0};

	snprintf(rs.message, sizeof(rs.message), "%s", msg);
	rs.error_code = "backend_failed";
	check_done(c, &rs);
}

/* Start the check of one blob, waiting for a free slot. */
static int check_one(const uint8_t hash[32], const struct replica_state *st, void *arg)
{
	struct verify_run *run = arg;
	struct verifier *v = run->v;
	struct blob_info bi;
	struct s3_request q;
	struct check *c = NULL;
	char hex[B3_HEX_LEN + 1], name[160];

	(void)st;
	if (index_blob_get(run->ix, hash, &bi) != 0)
		return 0; /* fsck reports it */
	b3_to_hex(hash, hex);
	snprintf(name, sizeof(name), "blobs/%.2s/%s", hex, hex);
	pthread_mutex_lock(&v->mu);
	while (v->out == VERIFY_WINDOW)
		pthread_cond_wait(&v->cond, &v->mu);
	for (size_t k = 0; k < VERIFY_WINDOW && !c; k++)
		if (!v->slots[k].busy)
			c = &v->slots[k];
	c->busy = true;
	v->out++;
	pthread_mutex_unlock(&v->mu);
	c->v = v;
	memcpy(c->hash, hash, 32);
	c->size = bi.size;
	c->deep = run->deep;
	c->got = 0;
	b3_hasher_init(&c->h);
	if (s3_request(run->s3, &q, run->deep ? "GET" : "HEAD", name, NULL) != 0) {
		check_failed(c, "the URL is too long");
		return 0;
	}
	q.rq.want_header = "Content-Length";
	q.rq.timeout_ms = run->deep ? 24ull * 3600 * 1000 : 60000;
	q.rq.stall_ms = 30000;
	if (run->deep) {
		q.rq.sink = hash_sink;
		q.rq.sink_arg = c;
		q.rq.max_body = (size_t)bi.size + 1;
	}
	if (http_submit(run->loop, &q.rq, check_done, c, NULL) != 0)
		check_failed(c, "cannot start the request");
	return 0;
}

long replica_verify(const char *dir, bool deep, const char *credfile, FILE *out)
{
	struct verifier v = {.report = out};
	struct verify_run run = {&v, NULL, NULL, NULL, deep};
	struct s3 s3;
	char err[512];
	int rc;

	if ((rc = open_index(dir, true, &run.ix)) != 0) {
		fprintf(out, "problem: %s\n", store_lasterr());
		return 1;
	}
	if ((rc = config_of(run.ix, credfile, &s3, err, sizeof(err))) != 0) {
		fprintf(out, "problem: %s\n", err);
		index_close(run.ix);
		return 1;
	}
	run.s3 = &s3;
	if ((rc = http_loop_start(NULL, &run.loop)) != 0) {
		fprintf(out, "problem: cannot start HTTP: %s\n", strerror(-rc));
		index_close(run.ix);
		return 1;
	}
	pthread_mutex_init(&v.mu, NULL);
	pthread_cond_init(&v.cond, NULL);
	if (each_confirmed(run.ix, check_one, &run) != 0) {
		fprintf(out, "problem: %s\n", store_lasterr());
		v.problems++;
	}
	pthread_mutex_lock(&v.mu);
	while (v.out)
		pthread_cond_wait(&v.cond, &v.mu);
	pthread_mutex_unlock(&v.mu);
	http_loop_stop(run.loop);
	fprintf(out, "replica: %" PRIu64 " blob(s) checked in s3://%s/%s (%s)\n", v.checked,
		s3.bucket, s3.prefix, deep ? "downloaded and rehashed" : "HEAD");
	sodium_memzero(&s3, sizeof(s3));
	pthread_mutex_destroy(&v.mu);
	pthread_cond_destroy(&v.cond);
	index_close(run.ix);
	return v.problems;
}

/* ---- the command ---- */

struct counts {
	uint64_t confirmed, remote_only;
};

static int count_one(const uint8_t hash[32], const struct replica_state *st, void *arg)
{
	struct counts *c = arg;

	(void)hash;
	c->confirmed++;
	c->remote_only += !st->local;
	return 0;
}

static int status(const char *dir)
{
	struct index *ix;
	struct outbox_stats os;
	struct counts c = {0};
	uint64_t local = 0;
	char cfg[2048];
	int rc;

	if (open_index(dir, true, &ix) != 0) {
		fprintf(stderr, "renderctl: %s\n", store_lasterr());
		return 1;
	}
	if ((rc = index_outbox_stats(ix, &os)) == 0 && (rc = index_local_bytes(ix, &local)) == 0)
		rc = each_confirmed(ix, count_one, &c);
	if (rc) {
		fprintf(stderr, "renderctl: %s\n", store_lasterr());
		index_close(ix);
		return 1;
	}
	if (index_replica_config_get(ix, cfg, sizeof(cfg)) != 0)
		snprintf(cfg, sizeof(cfg), "(never mounted with replica=)");
	for (char *p = cfg; (p = strchr(p, '\n')) != NULL;)
		*p = ' '; /* URL, endpoint, path-style on one line */
	printf("replica:        %s\n", cfg);
	printf("waiting:        %" PRIu64 " object(s), %" PRIu64 " blob byte(s)", os.objects,
	       os.bytes);
	if (os.oldest_ms)
		printf(", the oldest for %.0f s", (double)(now_ms() - os.oldest_ms) / 1000.0);
	printf("\nin the bucket:  %" PRIu64 " blob(s), %" PRIu64 " of them only there\n",
	       c.confirmed, c.remote_only);
	printf("here:           %" PRIu64 " byte(s) of blob files\n", local);
	index_close(ix);
	return 0;
}

static int push(const char *dir)
{
	struct store_options opt = {0};
	struct store *st;
	uint64_t n = 0;
	int rc;

	if (store_open(dir, &opt, &st) != 0) {
		fprintf(stderr, "renderctl: %s\n", store_lasterr());
		return 1;
	}
	rc = index_replica_push_all(store_index(st), &n);
	if (rc)
		fprintf(stderr, "renderctl: %s\n", store_lasterr());
	else
		printf("%" PRIu64 " object(s) put in the outbox: the next mount with replica= "
		       "uploads them\n",
		       n);
	store_close(st);
	return rc ? 1 : 0;
}

int replica_cmd(int argc, char **argv)
{
	const char *credfile = NULL, *dir = NULL, *what = argc > 1 ? argv[1] : "";
	bool deep = false;

	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--deep") == 0)
			deep = true;
		else if (strcmp(argv[i], "--credentials") == 0 && i + 1 < argc)
			credfile = argv[++i];
		else if (!dir && argv[i][0] != '-')
			dir = argv[i];
		else
			dir = NULL, what = "";
	}
	if (!dir) {
		fprintf(stderr, "usage: renderctl replica status|push|verify [--deep] "
				"[--credentials FILE] STORE\n");
		return 2;
	}
	if (strcmp(what, "status") == 0)
		return status(dir);
	if (strcmp(what, "push") == 0)
		return push(dir);
	if (strcmp(what, "verify") == 0) {
		long n = replica_verify(dir, deep, credfile, stdout);
		printf("%ld problem%s\n", n, n == 1 ? "" : "s");
		return n ? 1 : 0;
	}
	fprintf(stderr, "usage: renderctl replica status|push|verify [--deep] "
			"[--credentials FILE] STORE\n");
	return 2;
}
