/*
 * replica.c - replication of the store to an S3-compatible bucket (SPEC
 * §12): the outbox's uploader, fetches on miss, the bounded local cache.
 *
 * DESIGN
 * Objects: blobs/ab/<hex> and blobs/ab/<hex>.minisig, manifests/<job
 * id>.json and .json.minisig, keys/<KEYID>.pub, under the prefix. The
 * index's outbox (index_replica.c) holds what is to be put, written in
 * the transaction that made it; the thread rfs-replica takes due entries
 * in order, UP_MAX objects in flight, and removes each once the bucket's
 * answer to its PUT (or to the multipart upload's completion) confirms
 * it. A failed attempt stays in the outbox with a later not-before time;
 * a failure that says the bucket cannot be reached (no connection, 5xx,
 * 429, refused credentials) also pauses every upload with a backoff that
 * doubles to BACKOFF_MAX, so a bucket that is down costs one attempt per
 * pause, not one per object. Jobs never wait for any of it.
 *
 * Bodies never sit whole in memory: a blob streams from its file through
 * a store reader, which verifies each 1 MiB group against the blob's hash
 * as it is read, so a damaged file is never uploaded. Blobs over PART_LEN
 * go in multipart uploads of PART_LEN parts, PARTS_IN_FLIGHT at a time,
 * each part retried alone up to PART_TRIES times.
 *
 * A fetch (engine_blob_fetch) streams the object into a store sink, which
 * hashes it as it arrives; store_blob_fetched keeps it only when the hash
 * is the name asked for. Callers wait through a callback, never in a
 * thread: FUSE requests are answered from here when their blob is in.
 *
 * With cache_max, rfs-replica drops the files of confirmed blobs, least
 * recently read first (reads are noted in memory, TOUCH_MAX at most
 * between flushes, and written to the index once a second), until the
 * blob files here are under the limit; blobs not confirmed are never
 * dropped. A dropped blob keeps its record; reading it fetches it again.
 *
 * THREADS AND LOCKS
 * mu guards: ups (uploads in flight), finished (ended uploads for the
 * thread to record), fetches (pending and in flight, with their waiters),
 * touched/ntouched, stop; cond wakes the thread. An upload's own fields
 * (parts, etags) are changed by the HTTP loop's thread under mu. Index
 * writes, store commits and the callbacks of fetches run on rfs-replica
 * only. Counters are atomics.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sodium.h>

#include "blake3.h"
#include "engine_p.h"
#include "err.h"
#include "http.h"
#include "jobview.h"
#include "s3.h"
#include "sign.h"
#include "store.h"

#define UP_MAX 8		       /* objects being put at once */
#define PART_LEN (16ull << 20)	       /* multipart part size */
#define PARTS_IN_FLIGHT 4	       /* parts of one upload at once */
#define PART_TRIES 3		       /* attempts of one part */
enum { PART_WAITING, PART_OUT, PART_IN };
#define FETCH_MAX 16		       /* fetches at once */
#define FETCH_QUEUE_MAX 4096	       /* fetches waiting, at most */
#define TOUCH_MAX 1024		       /* reads noted between flushes */
#define FETCH_UNKNOWN_MAX (64ull << 30) /* bytes of a fetched blob of unknown size */
#define KEYS_MAX 64		       /* public keys learnt from the bucket, kept */
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define OBJ_RETRY_MAX_MS (10 * 60 * 1000)
#define SMALL_TIMEOUT_MS 60000
#define STALL_MS 30000
#define SIG_BUF (SIGN_TRUSTED_MAX + 512)
#define UPLOAD_ID_MAX 512			/* bytes of a multipart upload id */
#define UPLOAD_ID_ENC (3 * UPLOAD_ID_MAX + 1) /* percent-encoded, at worst */
#define UPLOAD_QUERY_MAX (UPLOAD_ID_ENC + 64)

enum fail_kind { F_UNAVAILABLE, F_AUTH, F_REJECTED, F_LOCAL, F_OTHER, F_KINDS };
static const char *const fail_names[F_KINDS] = {"unavailable", "auth", "rejected", "local",
						"other"};

struct upload;

struct part {
	struct upload *u;
	uint32_t n; /* from 1 */
};

struct upload {
	struct replica *r;
	struct outbox_entry e;
	char name[256]; /* object name under the prefix */
	char ctype[160];
	struct store_reader *reader; /* OUT_BLOB */
	uint64_t size;
	char *body; /* the others: the whole object */
	size_t blen;
	/* multipart (under mu once submitted) */
	char upload_id[UPLOAD_ID_MAX];
	uint32_t nparts, parts_ok, parts_out;
	char (*etags)[96];
	struct part *parts;
	uint8_t *tries;
	uint8_t *pstate; /* per part: PART_WAITING, PART_OUT, PART_IN */
	/* the end */
	bool ok, failed, cancelled;
	enum fail_kind kind;
	uint64_t retry_after_ms;
	char msg[512];
	struct upload *next;
};

struct waiter {
	void (*done)(void *arg, int rc);
	void *arg;
	struct waiter *next;
};

enum { SIG_NONE, SIG_GOT, SIG_FAILED }; /* the bucket's .minisig of a fetch */

struct fetch {
	struct replica *r;
	uint8_t hash[32];
	uint64_t size; /* known (the cache dropped it), else 0 */
	struct waiter *waiters;
	/* The content as it streams (the loop's thread, until `ended`). */
	struct store_sink *sink;
	crypto_generichash_state b2; /* its BLAKE2b-512: the signature's prehash */
	/* Under mu: */
	bool started, ended;
	int transfers; /* the blob, its signature, the key that made it */
	int rc;
	int sig_state;
	char sig[1024];
	char media[128];
	char msg[512];
	struct fetch *next;
};

struct replica {
	struct engine *e;
	struct s3 s3;
	struct http_loop *loop;
	uint64_t cache_max;
	pthread_t thread;
	bool started;

	pthread_mutex_t mu;
	pthread_cond_t cond;
	bool stop;
	struct upload *ups, *finished;
	struct fetch *fetches;
	size_t nfetches, fetching;
	uint8_t (*touched)[32];
	size_t ntouched;
	struct sign_pubkey keys[KEYS_MAX]; /* from the bucket's keys/ */
	size_t nkeys;

	uint64_t pause_until, backoff; /* rfs-replica's own */

	atomic_uint_fast64_t uploaded, uploaded_bytes, failures[F_KINDS];
	atomic_uint_fast64_t fetched, fetched_bytes, fetch_missing, fetch_corrupt, fetch_failed;
	atomic_uint_fast64_t evicted, evicted_bytes;
};

/* ---- naming ---- */

static void blob_name(const uint8_t hash[32], bool sig, char *out, size_t len)
{
	char hex[B3_HEX_LEN + 1];

	b3_to_hex(hash, hex);
	snprintf(out, len, "blobs/%.2s/%s%s", hex, hex, sig ? ".minisig" : "");
}

static enum fail_kind kind_of(const struct http_response *rs)
{
	if (!rs->error_code)
		return F_OTHER;
	if (strcmp(rs->error_code, "backend_unavailable") == 0)
		return F_UNAVAILABLE;
	if (strcmp(rs->error_code, "backend_auth") == 0)
		return F_AUTH;
	if (strcmp(rs->error_code, "backend_rejected") == 0)
		return F_REJECTED;
	if (strcmp(rs->error_code, "store") == 0)
		return F_LOCAL;
	return F_OTHER;
}

/* S3 may answer 200 with an <Error> in the body (a completion that failed). */
static bool body_has_error(const struct http_response *rs)
{
	return rs->len && strstr(rs->body, "<Error>") != NULL;
}

/* ---- uploads ---- */

static void upload_free(struct upload *u)
{
	if (!u)
		return;
	if (u->reader)
		store_reader_close(u->reader);
	free(u->body);
	free(u->etags);
	free(u->parts);
	free(u->tries);
	free(u->pstate);
	free(u);
}

/* Under mu: the upload ended; hand it to the thread. */
static void upload_end(struct upload *u)
{
	struct replica *r = u->r;

	for (struct upload **p = &r->ups; *p; p = &(*p)->next)
		if (*p == u) {
			*p = u->next;
			break;
		}
	u->next = r->finished;
	r->finished = u;
	pthread_cond_signal(&r->cond);
}

static void upload_fail(struct upload *u, const struct http_response *rs, const char *what)
{
	if (u->failed)
		return; /* the first failure says what happened */
	u->failed = true;
	u->cancelled = rs && rs->cancelled;
	u->kind = rs ? kind_of(rs) : F_OTHER;
	if (rs && rs->status >= 200 && rs->status < 300)
		u->kind = F_OTHER;
	u->retry_after_ms = rs ? rs->retry_after_ms : 0;
	snprintf(u->msg, sizeof(u->msg), "%s", rs && rs->message[0] ? rs->message : what);
}

static long long src_blob(void *arg, void *buf, size_t len, uint64_t off)
{
	struct part *p = arg;
	struct upload *u = p->u;
	uint64_t base = p->n ? (uint64_t)(p->n - 1) * PART_LEN : 0;
	size_t done = 0;

	while (done < len) {
		ssize_t n = store_reader_pread(u->reader, (char *)buf + done, len - done,
					       base + off + done);
		if (n <= 0)
			return done ? (long long)done : -1;
		done += (size_t)n;
	}
	return (long long)done;
}

static void put_done(void *arg, const struct http_response *rs)
{
	struct part *p = arg;
	struct upload *u = p->u;
	struct replica *r = u->r;

	pthread_mutex_lock(&r->mu);
	if (rs->cancelled || rs->error_code || rs->status < 200 || rs->status >= 300)
		upload_fail(u, rs, "the bucket refused the object");
	else
		u->ok = true;
	upload_end(u);
	pthread_mutex_unlock(&r->mu);
}

static int submit_put(struct upload *u)
{
	struct s3_request q;
	char ct[200];
	int rc;

	if ((rc = s3_request(&u->r->s3, &q, "PUT", u->name, NULL)) != 0)
		return rc;
	snprintf(ct, sizeof(ct), "Content-Type: %s", u->ctype);
	q.headers[q.rq.nheaders++] = ct;
	q.rq.max_body = 64 << 10;
	q.rq.stall_ms = STALL_MS;
	if (u->reader) {
		u->parts = calloc(1, sizeof(*u->parts));
		if (!u->parts)
			return -ENOMEM;
		u->parts[0].u = u;
		u->parts[0].n = 0;
		q.rq.source = src_blob;
		q.rq.source_arg = &u->parts[0];
		q.rq.source_len = u->size;
		q.rq.timeout_ms = SMALL_TIMEOUT_MS + u->size / 1000; /* >= 1 MB/s */
		return http_submit(u->r->loop, &q.rq, put_done, &u->parts[0], NULL);
	}
	q.rq.body = u->body;
	q.rq.body_len = u->blen;
	q.rq.timeout_ms = SMALL_TIMEOUT_MS;
	u->parts = calloc(1, sizeof(*u->parts));
	if (!u->parts)
		return -ENOMEM;
	u->parts[0].u = u;
	return http_submit(u->r->loop, &q.rq, put_done, &u->parts[0], NULL);
}

/* ---- multipart ---- */

static void no_answer(void *arg, const struct http_response *rs)
{
	(void)arg;
	(void)rs;
}

/* Under mu: give up a multipart upload's parts (best effort). */
static void mp_abort(struct upload *u)
{
	struct s3_request q;
	char query[UPLOAD_QUERY_MAX], enc[UPLOAD_ID_ENC];

	if (!u->upload_id[0])
		return;
	s3_encode(u->upload_id, false, enc, sizeof(enc));
	snprintf(query, sizeof(query), "uploadId=%s", enc);
	if (s3_request(&u->r->s3, &q, "DELETE", u->name, query) == 0) {
		q.rq.timeout_ms = SMALL_TIMEOUT_MS;
		/* Best effort: the bucket's lifecycle rules clean up the rest. */
		http_submit(u->r->loop, &q.rq, no_answer, NULL, NULL);
	}
}

static void part_done(void *arg, const struct http_response *rs);

/* Under mu: start waiting parts, lowest first, while fewer than
 * PARTS_IN_FLIGHT are out. */
static void mp_parts(struct upload *u)
{
	for (uint32_t i = 0; i < u->nparts && !u->failed && u->parts_out < PARTS_IN_FLIGHT; i++) {
		struct s3_request q;
		char query[UPLOAD_QUERY_MAX], enc[UPLOAD_ID_ENC];
		uint64_t off = (uint64_t)i * PART_LEN;

		if (u->pstate[i] != PART_WAITING)
			continue;
		s3_encode(u->upload_id, false, enc, sizeof(enc));
		snprintf(query, sizeof(query), "partNumber=%u&uploadId=%s", i + 1, enc);
		if (s3_request(&u->r->s3, &q, "PUT", u->name, query) != 0) {
			upload_fail(u, NULL, "cannot make a part's request");
			break;
		}
		u->parts[i].u = u;
		u->parts[i].n = i + 1;
		q.rq.source = src_blob;
		q.rq.source_arg = &u->parts[i];
		q.rq.source_len = u->size - off < PART_LEN ? u->size - off : PART_LEN;
		q.rq.want_header = "ETag";
		q.rq.max_body = 64 << 10;
		q.rq.stall_ms = STALL_MS;
		q.rq.timeout_ms = SMALL_TIMEOUT_MS + PART_LEN / 1000;
		u->tries[i]++;
		if (http_submit(u->r->loop, &q.rq, part_done, &u->parts[i], NULL) != 0) {
			upload_fail(u, NULL, "cannot start a part");
			break;
		}
		u->pstate[i] = PART_OUT;
		u->parts_out++;
	}
}

static void complete_done(void *arg, const struct http_response *rs)
{
	struct upload *u = arg;
	struct replica *r = u->r;

	pthread_mutex_lock(&r->mu);
	if (rs->cancelled || rs->error_code || rs->status != 200 || body_has_error(rs)) {
		upload_fail(u, rs, "the bucket did not complete the multipart upload");
		mp_abort(u);
	} else {
		u->ok = true;
	}
	upload_end(u);
	pthread_mutex_unlock(&r->mu);
}

/* Under mu: every part is in; ask the bucket to join them. */
static void mp_complete(struct upload *u)
{
	struct s3_request q;
	char query[UPLOAD_QUERY_MAX], enc[UPLOAD_ID_ENC];
	size_t cap = 128 + (size_t)u->nparts * 160, k = 0;

	free(u->body);
	if (!(u->body = malloc(cap))) {
		upload_fail(u, NULL, "out of memory");
		return;
	}
	k += (size_t)snprintf(u->body + k, cap - k, "<CompleteMultipartUpload>");
	for (uint32_t i = 0; i < u->nparts; i++)
		k += (size_t)snprintf(u->body + k, cap - k,
				      "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag></Part>", i + 1,
				      u->etags[i]);
	k += (size_t)snprintf(u->body + k, cap - k, "</CompleteMultipartUpload>");
	u->blen = k;
	s3_encode(u->upload_id, false, enc, sizeof(enc));
	snprintf(query, sizeof(query), "uploadId=%s", enc);
	if (s3_request(&u->r->s3, &q, "POST", u->name, query) != 0) {
		upload_fail(u, NULL, "cannot make the completion's request");
		return;
	}
	q.rq.body = u->body;
	q.rq.body_len = u->blen;
	q.rq.timeout_ms = 10 * SMALL_TIMEOUT_MS; /* the bucket joins the parts meanwhile */
	if (http_submit(u->r->loop, &q.rq, complete_done, u, NULL) != 0)
		upload_fail(u, NULL, "cannot start the completion");
}

static void part_done(void *arg, const struct http_response *rs)
{
	struct part *p = arg;
	struct upload *u = p->u;
	struct replica *r = u->r;
	uint32_t i = p->n - 1;

	pthread_mutex_lock(&r->mu);
	u->parts_out--;
	if (!rs->cancelled && !rs->error_code && rs->status == 200 && rs->header[0] &&
	    strlen(rs->header) < sizeof(u->etags[i]) && !strpbrk(rs->header, "<>&")) {
		memcpy(u->etags[i], rs->header, strlen(rs->header) + 1); /* fits: checked */
		u->pstate[i] = PART_IN;
		u->parts_ok++;
	} else if (!rs->cancelled && u->tries[i] < PART_TRIES && kind_of(rs) != F_AUTH) {
		u->pstate[i] = PART_WAITING; /* this part alone goes again */
	} else {
		upload_fail(u, rs, "a part failed");
	}
	mp_parts(u);
	if (u->parts_out == 0) {
		if (u->failed) {
			mp_abort(u);
			upload_end(u);
		} else if (u->parts_ok == u->nparts) {
			mp_complete(u);
			if (u->failed)
				upload_end(u);
		}
	}
	pthread_mutex_unlock(&r->mu);
}

/* The UploadId element of CreateMultipartUpload's answer. */
static bool upload_id_of(const char *body, char *out, size_t len)
{
	const char *a = strstr(body, "<UploadId>"), *b;
	size_t n;

	if (!a || !(b = strstr(a, "</UploadId>")))
		return false;
	a += 10;
	n = (size_t)(b - a);
	if (n == 0 || n >= len)
		return false;
	memcpy(out, a, n);
	out[n] = '\0';
	return strcspn(out, "<>&\r\n") == n;
}

static void create_done(void *arg, const struct http_response *rs)
{
	struct upload *u = arg;
	struct replica *r = u->r;

	pthread_mutex_lock(&r->mu);
	if (rs->cancelled || rs->error_code || rs->status != 200 ||
	    !upload_id_of(rs->body, u->upload_id, sizeof(u->upload_id))) {
		upload_fail(u, rs, "the bucket gave no multipart upload id");
		upload_end(u);
	} else {
		mp_parts(u);
		if (u->parts_out == 0) {
			mp_abort(u);
			upload_end(u);
		}
	}
	pthread_mutex_unlock(&r->mu);
}

static int submit_multipart(struct upload *u)
{
	struct s3_request q;
	char ct[200];
	int rc;

	u->nparts = (uint32_t)((u->size + PART_LEN - 1) / PART_LEN);
	if (u->nparts > 10000)
		return -EFBIG; /* S3's limit: 156 GiB at this part size */
	if (!(u->parts = calloc(u->nparts, sizeof(*u->parts))) ||
	    !(u->etags = calloc(u->nparts, sizeof(*u->etags))) ||
	    !(u->tries = calloc(u->nparts, 1)) || !(u->pstate = calloc(u->nparts, 1)))
		return -ENOMEM;
	if ((rc = s3_request(&u->r->s3, &q, "POST", u->name, "uploads=")) != 0)
		return rc;
	snprintf(ct, sizeof(ct), "Content-Type: %s", u->ctype);
	q.headers[q.rq.nheaders++] = ct;
	q.rq.timeout_ms = SMALL_TIMEOUT_MS;
	return http_submit(u->r->loop, &q.rq, create_done, u, NULL);
}

/* ---- what each kind of entry puts ---- */

/* Make the upload of e (on rfs-replica). 1: nothing to put any more (its
 * blob or job is gone); 0: made; < 0: failed (u->msg, u->kind). */
static int upload_prepare(struct replica *r, struct upload *u)
{
	struct engine *e = r->e;
	const struct outbox_entry *en = &u->e;
	char trusted[SIGN_TRUSTED_MAX + 1];
	int rc;

	u->kind = F_LOCAL;
	snprintf(u->ctype, sizeof(u->ctype), "application/octet-stream");
	switch (en->kind) {
	case OUT_BLOB: {
		struct blob_info bi;
		if ((rc = index_blob_get(e->ix, en->id, &bi)) == STORE_E_NOTFOUND)
			return 1;
		if (rc)
			goto store_err;
		blob_name(en->id, false, u->name, sizeof(u->name));
		if (bi.media_type[0] && strcspn(bi.media_type, "\r\n") == strlen(bi.media_type))
			snprintf(u->ctype, sizeof(u->ctype), "%s", bi.media_type);
		if ((rc = store_reader_open(e->st, en->id, &u->reader, &u->size)) != 0)
			goto store_err;
		return 0;
	}
	case OUT_BLOBSIG: {
		struct blob_info bi;
		int fd;
		uint64_t size;
		if ((rc = index_blob_get(e->ix, en->id, &bi)) == STORE_E_NOTFOUND)
			return 1;
		if (rc)
			goto store_err;
		blob_name(en->id, true, u->name, sizeof(u->name));
		snprintf(u->ctype, sizeof(u->ctype), "text/plain");
		if ((rc = store_blob_open(e->st, en->id, &fd, &size)) != 0)
			goto store_err;
		store_blob_trusted(en->id, size, trusted, sizeof(trusted));
		if (!(u->body = malloc(SIG_BUF))) {
			close(fd);
			return -ENOMEM;
		}
		rc = store_sign_fd(e->st, fd, trusted, u->body, SIG_BUF);
		close(fd);
		if (rc < 0)
			goto store_err;
		u->blen = (size_t)rc;
		return 0;
	}
	case OUT_MANIFEST:
	case OUT_MANIFESTSIG: {
		struct job j;
		char id[JOB_ID_STR_LEN + 1], *m;
		size_t ml;
		if ((rc = index_job_get(e->ix, en->id, &j)) == STORE_E_NOTFOUND)
			return 1;
		if (rc)
			goto store_err;
		if (j.status != JOB_COMPLETE) {
			job_release(&j);
			return 1; /* retried since: its next completion puts it again */
		}
		ulid_format(j.id, id);
		snprintf(u->name, sizeof(u->name), "manifests/%s.json%s", id,
			 en->kind == OUT_MANIFESTSIG ? ".minisig" : "");
		rc = jobview_manifest_json(e, &j, &m, &ml);
		if (rc == 0 && en->kind == OUT_MANIFEST) {
			snprintf(u->ctype, sizeof(u->ctype), "application/json");
			u->body = m;
			u->blen = ml;
		} else if (rc == 0) {
			snprintf(u->ctype, sizeof(u->ctype), "text/plain");
			jobview_manifest_trusted(&j, m, ml, trusted, sizeof(trusted));
			u->body = malloc(SIG_BUF);
			rc = u->body ? store_sign_buf(e->st, m, ml, trusted, u->body, SIG_BUF) : -ENOMEM;
			free(m);
			if (rc >= 0) {
				u->blen = (size_t)rc;
				rc = 0;
			}
		}
		job_release(&j);
		if (rc)
			goto store_err;
		return 0;
	}
	case OUT_KEY: {
		struct sign_pubkey pk;
		char keyid[SIGN_KEYID_LEN + 1], path[4200];
		/* The key this entry names: the signing key (keyfile= too), or
		 * one rotated out since, whose public half keys/ keeps. */
		store_pubkey(e->st, &pk);
		sign_keyid(en->id, keyid);
		snprintf(path, sizeof(path), "%s/keys/%s.pub", store_dir(e->st), keyid);
		if (memcmp(pk.keynum, en->id, SIGN_KEYNUM_LEN) != 0 && sign_pubkey_load(path, &pk) != 0)
			return 1; /* its public half is gone: nothing to put */
		snprintf(u->name, sizeof(u->name), "keys/%s.pub", keyid);
		snprintf(u->ctype, sizeof(u->ctype), "text/plain");
		if (!(u->body = malloc(1024)))
			return -ENOMEM;
		if ((rc = sign_pubkey_format(&pk, u->body, 1024)) < 0)
			goto store_err;
		u->blen = strlen(u->body);
		return 0;
	}
	default:
		return 1; /* an entry of a later renderfs: not ours to put */
	}
store_err:
	snprintf(u->msg, sizeof(u->msg), "%s", store_lasterr());
	return rc < 0 ? rc : -EIO;
}

/* On rfs-replica: start the due entries, up to UP_MAX in flight. */
static void uploads_fill(struct replica *r, uint64_t now)
{
	struct outbox_entry due[UP_MAX];
	uint64_t skip[UP_MAX];
	size_t nskip = 0, n = 0;

	pthread_mutex_lock(&r->mu);
	for (struct upload *u = r->ups; u && nskip < UP_MAX; u = u->next)
		skip[nskip++] = u->e.seq;
	for (struct upload *u = r->finished; u && nskip < UP_MAX; u = u->next)
		skip[nskip++] = u->e.seq;
	pthread_mutex_unlock(&r->mu);
	if (nskip >= UP_MAX)
		return;
	if (index_outbox_due(r->e->ix, now, skip, nskip, 256, due, UP_MAX - nskip, &n) != 0)
		return;
	for (size_t i = 0; i < n; i++) {
		struct upload *u = calloc(1, sizeof(*u));
		int rc;

		if (!u)
			return;
		u->r = r;
		u->e = due[i];
		rc = upload_prepare(r, u);
		if (rc == 1) {
			index_outbox_done(r->e->ix, u->e.seq, false);
			upload_free(u);
			continue;
		}
		pthread_mutex_lock(&r->mu);
		u->next = r->ups;
		r->ups = u;
		if (rc == 0)
			rc = u->reader && u->size > PART_LEN ? submit_multipart(u) : submit_put(u);
		if (rc != 0) {
			u->failed = true;
			if (!u->msg[0])
				snprintf(u->msg, sizeof(u->msg), "%s", strerror(-rc));
			upload_end(u);
		}
		pthread_mutex_unlock(&r->mu);
	}
}

/* On rfs-replica: record the ended uploads. */
static void uploads_record(struct replica *r, uint64_t now)
{
	struct upload *list, *next;
	bool pause_set = false; /* one pause for the failures of one batch */

	pthread_mutex_lock(&r->mu);
	list = r->finished;
	r->finished = NULL;
	pthread_mutex_unlock(&r->mu);
	for (struct upload *u = list; u; u = next) {
		next = u->next;
		if (u->cancelled) {
			/* The mount is stopping: the entry stays as it was. */
		} else if (u->ok) {
			if (index_outbox_done(r->e->ix, u->e.seq, true) == 0) {
				atomic_fetch_add(&r->uploaded, 1);
				atomic_fetch_add(&r->uploaded_bytes, u->reader ? u->size : u->blen);
			}
			r->backoff = 0;
		} else {
			uint64_t wait = BACKOFF_MIN_MS << (u->e.attempts < 10 ? u->e.attempts : 10);
			if (wait > OBJ_RETRY_MAX_MS)
				wait = OBJ_RETRY_MAX_MS;
			if (u->retry_after_ms > wait)
				wait = u->retry_after_ms;
			atomic_fetch_add(&r->failures[u->kind], 1);
			if (u->e.attempts == 0 || u->kind != F_UNAVAILABLE)
				fprintf(stderr, "renderfs: replica: %s: %s (will retry)\n", u->name,
					u->msg);
			if (u->kind == F_UNAVAILABLE || u->kind == F_AUTH) {
				/* The bucket, not this object: pause every upload; the
				 * object goes again with the others once it is back. */
				if (!pause_set) {
					r->backoff = r->backoff ? r->backoff * 2 : BACKOFF_MIN_MS;
					if (r->backoff > BACKOFF_MAX_MS)
						r->backoff = BACKOFF_MAX_MS;
					if (u->retry_after_ms > r->backoff)
						r->backoff = u->retry_after_ms < BACKOFF_MAX_MS
								     ? u->retry_after_ms
								     : BACKOFF_MAX_MS;
					r->pause_until = now + r->backoff;
					pause_set = true;
				}
				wait = r->backoff;
			}
			index_outbox_retry(r->e->ix, u->e.seq, now + wait);
		}
		upload_free(u);
	}
}

/* ---- fetches ---- */

static int fetch_sink(void *arg, const void *data, size_t len, char *err, size_t errlen)
{
	struct fetch *f = arg;
	int rc = store_sink_write(f->sink, data, len);

	if (rc)
		snprintf(err, errlen, "%s", store_lasterr());
	crypto_generichash_update(&f->b2, data, len);
	return rc;
}

/* Under mu: what the transfer's answer means for the fetch. */
/* Whether the bucket says it has no such object: 404, or S3's
 * AccessDenied for a missing key to a reader without ListBucket (a 403
 * for the credentials is a failure). */
static bool is_missing(const struct http_response *rs)
{
	return rs->status == 404 ||
	       (rs->status == 403 && strstr(rs->body, "<Code>AccessDenied</Code>"));
}

static void fetch_result(struct fetch *f, const struct http_response *rs)
{
	if (is_missing(rs)) {
		f->rc = -ENOENT;
	} else if (rs->cancelled || rs->error_code || rs->status != 200) {
		f->rc = -EIO;
		snprintf(f->msg, sizeof(f->msg), "%s", rs->message);
	} else {
		f->rc = 0;
		if (rs->content_type[0] && strlen(rs->content_type) < sizeof(f->media) &&
		    strcspn(rs->content_type, "\r\n;") == strlen(rs->content_type))
			snprintf(f->media, sizeof(f->media), "%s", rs->content_type);
	}
}

/* What a fetch's transfer carries to its callback. */
enum { X_BLOB, X_SIG, X_KEY };
struct fetch_ctx {
	struct replica *r;
	struct fetch *f;
	int what;
	uint8_t keynum[SIGN_KEYNUM_LEN]; /* X_KEY */
};

/* Under mu: whether the key is one this store has, or one learnt. */
static bool key_known(struct replica *r, const uint8_t keynum[SIGN_KEYNUM_LEN])
{
	char path[4200], keyid[SIGN_KEYID_LEN + 1];

	for (size_t i = 0; i < r->nkeys; i++)
		if (memcmp(r->keys[i].keynum, keynum, SIGN_KEYNUM_LEN) == 0)
			return true;
	sign_keyid(keynum, keyid);
	snprintf(path, sizeof(path), "%s/keys/%s.pub", store_dir(r->e->st), keyid);
	return access(path, F_OK) == 0;
}

static int fetch_submit(struct replica *r, struct fetch *f, int what, const char *name,
			const uint8_t *keynum);

static void fetch_done_ctx(void *arg, const struct http_response *rs)
{
	struct fetch_ctx *c = arg;
	struct replica *r = c->r;
	struct fetch *f = c->f;
	bool missing = is_missing(rs);

	pthread_mutex_lock(&r->mu);
	if (c->what == X_BLOB) {
		fetch_result(f, rs);
	} else if (c->what == X_SIG) {
		struct sign_sig sig;
		if (missing) {
			f->sig_state = SIG_NONE; /* put before its signature: its hash says */
		} else if (rs->cancelled || rs->error_code || rs->status != 200 ||
			   rs->len >= sizeof(f->sig) || sign_sig_parse(rs->body, rs->len, &sig) != 0) {
			f->sig_state = SIG_FAILED;
		} else {
			f->sig_state = SIG_GOT;
			memcpy(f->sig, rs->body, rs->len);
			f->sig[rs->len] = '\0';
			if (!key_known(r, sig.keynum)) {
				char keyid[SIGN_KEYID_LEN + 1], name[64];
				sign_keyid(sig.keynum, keyid);
				snprintf(name, sizeof(name), "keys/%s.pub", keyid);
				fetch_submit(r, f, X_KEY, name, sig.keynum);
			}
		}
	} else if (!missing && !rs->cancelled && !rs->error_code && rs->status == 200 &&
		   r->nkeys < KEYS_MAX) {
		struct sign_pubkey pk;
		if (sign_pubkey_parse(rs->body, rs->len, &pk) == 0 &&
		    memcmp(pk.keynum, c->keynum, SIGN_KEYNUM_LEN) == 0 && !key_known(r, pk.keynum))
			r->keys[r->nkeys++] = pk;
	}
	if (--f->transfers == 0) {
		f->ended = true;
		pthread_cond_signal(&r->cond);
	}
	pthread_mutex_unlock(&r->mu);
	free(c);
}

/* Under mu: one transfer of a fetch; 0, or -errno (nothing started). */
static int fetch_submit(struct replica *r, struct fetch *f, int what, const char *name,
			const uint8_t *keynum)
{
	struct s3_request q;
	struct fetch_ctx *c;

	if (s3_request(&r->s3, &q, "GET", name, NULL) != 0 || !(c = calloc(1, sizeof(*c))))
		return -ENOMEM;
	c->r = r;
	c->f = f;
	c->what = what;
	if (keynum)
		memcpy(c->keynum, keynum, SIGN_KEYNUM_LEN);
	q.rq.timeout_ms = SMALL_TIMEOUT_MS;
	q.rq.max_body = 4096;
	if (what == X_BLOB) {
		q.rq.sink = fetch_sink;
		q.rq.sink_arg = f;
		/* Never more than the blob is (its hash is checked after). */
		q.rq.max_body = f->size ? f->size : FETCH_UNKNOWN_MAX;
		q.rq.timeout_ms = 24ull * 3600 * 1000;
		q.rq.stall_ms = STALL_MS;
	}
	if (http_submit(r->loop, &q.rq, fetch_done_ctx, c, NULL) != 0) {
		free(c);
		return -EIO;
	}
	f->transfers++;
	return 0;
}

/* On rfs-replica: start waiting fetches, FETCH_MAX at a time: the blob
 * and its signature at once (then the key, if neither this store nor an
 * earlier fetch knows it). */
static void fetches_start(struct replica *r)
{
	pthread_mutex_lock(&r->mu);
	for (struct fetch *f = r->fetches; f && r->fetching < FETCH_MAX; f = f->next) {
		char name[128];

		if (f->started)
			continue;
		f->started = true;
		r->fetching++;
		crypto_generichash_init(&f->b2, NULL, 0, SIGN_PREHASH_LEN);
		blob_name(f->hash, false, name, sizeof(name));
		if (store_sink_open(r->e->st, &f->sink) != 0) {
			f->rc = -EIO;
			snprintf(f->msg, sizeof(f->msg), "%s", store_lasterr());
		} else if (fetch_submit(r, f, X_BLOB, name, NULL) != 0) {
			f->rc = -EIO;
			snprintf(f->msg, sizeof(f->msg), "cannot start the transfer");
		} else {
			blob_name(f->hash, true, name, sizeof(name));
			if (fetch_submit(r, f, X_SIG, name, NULL) != 0)
				f->sig_state = SIG_FAILED;
		}
		if (f->transfers == 0)
			f->ended = true;
	}
	pthread_mutex_unlock(&r->mu);
}

/* On rfs-replica, after the content hashed to its name and before it is
 * kept: its signature in the bucket, if the bucket has one, must be one
 * of this blob by a known key (this store's keys/, or the bucket's). */
static int fetch_check_sig(void *arg, uint64_t size)
{
	struct fetch *f = arg;
	struct replica *r = f->r;
	struct sign_sig sig;
	struct sign_pubkey pk;
	uint8_t prehash[SIGN_PREHASH_LEN];
	char trusted[SIGN_TRUSTED_MAX + 1], keyid[SIGN_KEYID_LEN + 1], path[4200];
	bool found = false;
	int rc;

	if (f->sig_state == SIG_NONE)
		return 0;
	if (f->sig_state == SIG_FAILED)
		return store_seterr(-EIO, "its signature in the bucket cannot be read");
	if (sign_sig_parse(f->sig, strlen(f->sig), &sig) != 0)
		return store_seterr(-EIO, "its signature in the bucket cannot be read");
	store_blob_trusted(f->hash, size, trusted, sizeof(trusted));
	if (strcmp(sig.trusted, trusted) != 0)
		return store_seterr(STORE_E_CORRUPT, "its signature is of another blob ('%s')",
				    sig.trusted);
	sign_keyid(sig.keynum, keyid);
	snprintf(path, sizeof(path), "%s/keys/%s.pub", store_dir(r->e->st), keyid);
	if (sign_pubkey_load(path, &pk) == 0) {
		found = true;
	} else {
		pthread_mutex_lock(&r->mu);
		for (size_t i = 0; i < r->nkeys && !found; i++)
			if (memcmp(r->keys[i].keynum, sig.keynum, SIGN_KEYNUM_LEN) == 0) {
				pk = r->keys[i];
				found = true;
			}
		pthread_mutex_unlock(&r->mu);
	}
	if (!found)
		return store_seterr(STORE_E_CORRUPT,
				    "signed by key %s, which neither this store's keys/ nor the "
				    "bucket's has",
				    keyid);
	crypto_generichash_final(&f->b2, prehash, SIGN_PREHASH_LEN);
	if ((rc = sign_verify_prehash(&pk, &sig, prehash)) != 0)
		return rc == STORE_E_BADSIG || rc == STORE_E_KEYID
			       ? store_seterr(STORE_E_CORRUPT, "its signature by key %s does not "
							       "verify",
					      keyid)
			       : rc;
	return 0;
}

/* On rfs-replica: keep what ended (verified) and answer its waiters. */
static void fetches_finish(struct replica *r)
{
	for (;;) {
		struct fetch *f = NULL;
		char hex[B3_HEX_LEN + 1];

		pthread_mutex_lock(&r->mu);
		for (struct fetch **p = &r->fetches; *p; p = &(*p)->next)
			if ((*p)->ended) {
				f = *p;
				*p = f->next;
				r->nfetches--;
				if (f->started)
					r->fetching--;
				break;
			}
		pthread_mutex_unlock(&r->mu);
		if (!f)
			return;
		b3_to_hex(f->hash, hex);
		if (f->rc == 0) {
			int rc = store_blob_fetched(r->e->st, f->sink, f->hash,
						f->media[0] ? f->media : "application/octet-stream",
						fetch_check_sig, f);
			f->sink = NULL;
			if (rc == 0) {
				atomic_fetch_add(&r->fetched, 1);
			} else {
				fprintf(stderr, "renderfs: replica: refusing blobs/%.2s/%s: %s\n", hex,
					hex, store_lasterr());
				if (rc == STORE_E_CORRUPT)
					atomic_fetch_add(&r->fetch_corrupt, 1);
				else
					atomic_fetch_add(&r->fetch_failed, 1);
				f->rc = -EIO;
			}
		} else if (f->rc == -ENOENT) {
			atomic_fetch_add(&r->fetch_missing, 1);
		} else {
			atomic_fetch_add(&r->fetch_failed, 1);
			fprintf(stderr, "renderfs: replica: cannot fetch blobs/%.2s/%s: %s\n", hex, hex,
				f->msg[0] ? f->msg : "failed");
		}
		if (f->sink)
			store_sink_abort(f->sink);
		for (struct waiter *w = f->waiters, *wn; w; w = wn) {
			wn = w->next;
			w->done(w->arg, f->rc);
			free(w);
		}
		free(f);
	}
}

int engine_blob_fetch(struct engine *e, const uint8_t hash[32], void (*done)(void *arg, int rc),
		      void *arg)
{
	struct replica *r = e->replica;
	struct blob_info bi;
	uint64_t known = 0;
	struct waiter *w;
	struct fetch *f;

	if (!r)
		return -ENOTSUP;
	if (!(w = calloc(1, sizeof(*w))))
		return -ENOMEM;
	if (index_blob_get(e->ix, hash, &bi) == 0)
		known = bi.size; /* the cache dropped it: exactly this many bytes */
	w->done = done;
	w->arg = arg;
	pthread_mutex_lock(&r->mu);
	for (f = r->fetches; f; f = f->next)
		if (memcmp(f->hash, hash, 32) == 0 && !f->ended)
			break;
	if (!f) {
		if (r->nfetches >= FETCH_QUEUE_MAX || r->stop || !(f = calloc(1, sizeof(*f)))) {
			pthread_mutex_unlock(&r->mu);
			free(w);
			return -EAGAIN;
		}
		f->r = r;
		memcpy(f->hash, hash, 32);
		f->size = known;
		f->next = r->fetches;
		r->fetches = f;
		r->nfetches++;
	}
	w->next = f->waiters;
	f->waiters = w;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->mu);
	return 0;
}

bool engine_replica_on(struct engine *e)
{
	return e->replica != NULL;
}

bool engine_blob_remote(struct engine *e, const uint8_t hash[32])
{
	struct replica_state s;

	return e->replica && index_replica_get(e->ix, hash, &s) == 0 && !s.local;
}

void engine_blob_read(struct engine *e, const uint8_t hash[32])
{
	struct replica *r = e->replica;

	if (!r || !r->cache_max)
		return;
	pthread_mutex_lock(&r->mu);
	if (r->ntouched < TOUCH_MAX &&
	    (!r->ntouched || memcmp(r->touched[r->ntouched - 1], hash, 32) != 0))
		memcpy(r->touched[r->ntouched++], hash, 32);
	pthread_mutex_unlock(&r->mu);
}

/* ---- the cache ---- */

static void cache_tidy(struct replica *r, uint64_t now)
{
	uint8_t (*batch)[32];
	size_t n;
	uint64_t local = 0;

	pthread_mutex_lock(&r->mu);
	n = r->ntouched;
	batch = n ? malloc(n * 32) : NULL;
	if (batch)
		memcpy(batch, r->touched, n * 32);
	r->ntouched = 0;
	pthread_mutex_unlock(&r->mu);
	if (batch) {
		index_replica_touch(r->e->ix, (const uint8_t(*)[32])batch, n, now);
		free(batch);
	}
	if (!r->cache_max || index_local_bytes(r->e->ix, &local) != 0)
		return;
	while (local > r->cache_max) {
		uint8_t lru[64][32];
		bool any = false;

		if (index_replica_lru(r->e->ix, 64, lru, &n) != 0 || n == 0)
			return; /* nothing confirmed to drop: wait for uploads */
		for (size_t i = 0; i < n && local > r->cache_max; i++) {
			uint64_t size = 0;
			if (store_blob_drop(r->e->st, lru[i], &size) != 0)
				continue;
			any = true;
			local = local > size ? local - size : 0;
			atomic_fetch_add(&r->evicted, 1);
			atomic_fetch_add(&r->evicted_bytes, size);
		}
		if (!any)
			return;
	}
}

/* ---- the thread ---- */

/* Under mu: a fetch that ended, or one waiting that may start now. */
static bool fetch_work(const struct replica *r)
{
	for (const struct fetch *f = r->fetches; f; f = f->next)
		if (f->ended || (!f->started && r->fetching < FETCH_MAX))
			return true;
	return false;
}

static void *replica_main(void *arg)
{
	struct replica *r = arg;
	uint64_t last_tidy = 0;

	pthread_mutex_lock(&r->mu);
	while (!r->stop) {
		uint64_t now;
		struct timespec ts;

		pthread_mutex_unlock(&r->mu);
		now = now_ms();
		uploads_record(r, now);
		fetches_finish(r);
		if (now >= r->pause_until)
			uploads_fill(r, now);
		fetches_start(r);
		if (now - last_tidy >= 1000) {
			cache_tidy(r, now);
			last_tidy = now;
		}
		pthread_mutex_lock(&r->mu);
		if (r->stop || r->finished || fetch_work(r))
			continue;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 250 * 1000000L; /* new outbox entries are seen this often */
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&r->cond, &r->mu, &ts);
	}
	pthread_mutex_unlock(&r->mu);
	return NULL;
}

int replica_open(struct engine *e, char *err, size_t errlen)
{
	struct replica *r;
	int rc;

	if (!e->opt.replica)
		return 0;
	if (!(r = calloc(1, sizeof(*r))))
		return -ENOMEM;
	if ((rc = s3_init(&r->s3, e->opt.replica, e->opt.replica_endpoint,
			  e->opt.replica_path_style, e->opt.replica_credentials, err, errlen)) != 0) {
		free(r);
		return rc;
	}
	if (!(r->touched = malloc(TOUCH_MAX * 32))) {
		free(r);
		return -ENOMEM;
	}
	r->e = e;
	r->cache_max = e->opt.cache_max;
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cond, NULL);
	e->replica = r;
	index_set_replica(e->ix, true);
	return 0;
}

int replica_start(struct engine *e)
{
	struct replica *r = e->replica;
	struct sign_pubkey pk;
	int rc;

	if (!r)
		return 0;
	/* For `renderctl replica` on this store: where its bucket is. */
	{
		char cfg[2048];
		/* Lines: a prefix may hold a space, never a line break. */
		snprintf(cfg, sizeof(cfg), "%s\n%s\n%d", e->opt.replica,
			 e->opt.replica_endpoint && *e->opt.replica_endpoint ? e->opt.replica_endpoint
									     : "-",
			 e->opt.replica_path_style ? 1 : 0);
		if ((rc = index_replica_config_put(e->ix, cfg)) != 0)
			return rc;
	}
	/* The bucket's own copy of the key that signs what this store puts. */
	store_pubkey(e->st, &pk);
	if ((rc = index_outbox_put(e->ix, OUT_KEY, pk.keynum, sizeof(pk.keynum), 0)) != 0)
		return rc;
	if ((rc = http_loop_start(NULL, &r->loop)) != 0)
		return rc;
	if (pthread_create(&r->thread, NULL, replica_main, r) != 0) {
		http_loop_stop(r->loop);
		r->loop = NULL;
		return -EAGAIN;
	}
	pthread_setname_np(r->thread, "rfs-replica");
	r->started = true;
	return 0;
}

void replica_stop(struct engine *e)
{
	struct replica *r = e->replica;

	if (!r || !r->started)
		return;
	pthread_mutex_lock(&r->mu);
	r->stop = true;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->mu);
	pthread_join(r->thread, NULL);
	/* Transfers in flight end `cancelled`: their entries stay in the
	 * outbox for the next mount; waiting fetches answer -EIO. */
	http_loop_stop(r->loop);
	r->loop = NULL;
	r->started = false;
	uploads_record(r, now_ms());
	pthread_mutex_lock(&r->mu);
	for (struct fetch *f = r->fetches; f; f = f->next)
		if (!f->ended) {
			f->ended = true;
			f->rc = -EIO;
			snprintf(f->msg, sizeof(f->msg), "the mount is stopping");
		}
	pthread_mutex_unlock(&r->mu);
	fetches_finish(r);
}

void replica_close(struct engine *e)
{
	struct replica *r = e->replica;

	if (!r)
		return;
	replica_stop(e);
	pthread_mutex_destroy(&r->mu);
	pthread_cond_destroy(&r->cond);
	sodium_memzero(&r->s3, sizeof(r->s3));
	free(r->touched);
	free(r);
	e->replica = NULL;
}

void replica_stats(struct engine *e, struct textbuf *b)
{
	struct replica *r = e->replica;
	struct outbox_stats os = {0};
	uint64_t local = 0, now = now_ms();

	if (!r)
		return;
	index_outbox_stats(e->ix, &os);
	index_local_bytes(e->ix, &local);
	tb_printf(b,
		  "# HELP renderfs_replica_backlog_objects Objects waiting to be put in the "
		  "replica bucket.\n"
		  "# TYPE renderfs_replica_backlog_objects gauge\n"
		  "renderfs_replica_backlog_objects %" PRIu64 "\n"
		  "# HELP renderfs_replica_backlog_bytes Bytes of blobs waiting to be put.\n"
		  "# TYPE renderfs_replica_backlog_bytes gauge\n"
		  "renderfs_replica_backlog_bytes %" PRIu64 "\n"
		  "# HELP renderfs_replica_backlog_oldest_seconds Age of the oldest object "
		  "waiting.\n"
		  "# TYPE renderfs_replica_backlog_oldest_seconds gauge\n"
		  "renderfs_replica_backlog_oldest_seconds %.3f\n"
		  "# HELP renderfs_replica_uploaded_total Objects the bucket confirmed since the "
		  "mount.\n"
		  "# TYPE renderfs_replica_uploaded_total counter\n"
		  "renderfs_replica_uploaded_total %" PRIu64 "\n"
		  "renderfs_replica_uploaded_bytes_total %" PRIu64 "\n",
		  os.objects, os.bytes,
		  os.oldest_ms && now > os.oldest_ms ? (double)(now - os.oldest_ms) / 1000.0 : 0.0,
		  (uint64_t)atomic_load(&r->uploaded), (uint64_t)atomic_load(&r->uploaded_bytes));
	tb_printf(b, "# HELP renderfs_replica_failures_total Failed attempts to put an object, "
		     "by kind.\n"
		     "# TYPE renderfs_replica_failures_total counter\n");
	for (int k = 0; k < F_KINDS; k++)
		tb_printf(b, "renderfs_replica_failures_total{kind=\"%s\"} %" PRIu64 "\n",
			  fail_names[k], (uint64_t)atomic_load(&r->failures[k]));
	tb_printf(b,
		  "# HELP renderfs_replica_fetches_total Blobs asked of the bucket since the "
		  "mount, by outcome.\n"
		  "# TYPE renderfs_replica_fetches_total counter\n"
		  "renderfs_replica_fetches_total{outcome=\"ok\"} %" PRIu64 "\n"
		  "renderfs_replica_fetches_total{outcome=\"missing\"} %" PRIu64 "\n"
		  "renderfs_replica_fetches_total{outcome=\"corrupt\"} %" PRIu64 "\n"
		  "renderfs_replica_fetches_total{outcome=\"failed\"} %" PRIu64 "\n"
		  "# HELP renderfs_cache_bytes Bytes of blob files here.\n"
		  "# TYPE renderfs_cache_bytes gauge\n"
		  "renderfs_cache_bytes %" PRIu64 "\n"
		  "# HELP renderfs_cache_max_bytes cache_max= (0: no limit).\n"
		  "# TYPE renderfs_cache_max_bytes gauge\n"
		  "renderfs_cache_max_bytes %" PRIu64 "\n"
		  "# HELP renderfs_cache_evicted_total Blob files the cache dropped since the "
		  "mount (the bucket has them).\n"
		  "# TYPE renderfs_cache_evicted_total counter\n"
		  "renderfs_cache_evicted_total %" PRIu64 "\n"
		  "renderfs_cache_evicted_bytes_total %" PRIu64 "\n",
		  (uint64_t)atomic_load(&r->fetched), (uint64_t)atomic_load(&r->fetch_missing),
		  (uint64_t)atomic_load(&r->fetch_corrupt), (uint64_t)atomic_load(&r->fetch_failed),
		  local, r->cache_max, (uint64_t)atomic_load(&r->evicted),
		  (uint64_t)atomic_load(&r->evicted_bytes));
}
