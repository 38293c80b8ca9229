/*
 * newfile.c - the `new` file of a route: requests in, job ids out (SPEC §2).
 *
 * DESIGN
 * Each open file description has a window of input bytes starting at file
 * offset `base`. Writes land at their offset (NFS and SMB clients, `dd
 * seek=`); `contig` is the end of the contiguous prefix and `extents`
 * remember what arrived beyond a hole. A scanner walks the prefix once,
 * byte by byte, tracking strings, escapes and bracket nesting, so it knows
 * where each top-level object ends without parsing it. Objects completed
 * by one write are parsed with json-c (strict, UTF-8 checked, depth 64),
 * checked for duplicate keys (json-c keeps the last one silently, so the
 * scanner counts key separators and the parse tree must have as many
 * keys), and submitted in one batch: one durable commit for the lot,
 * inside the write() call, whose result is the first failure's errno.
 * Consumed bytes are dropped, so the window holds at most one object plus
 * what arrived out of order, bounded by max_request.
 *
 * Reads return the response lines (an id or "error: ..." per object) as a
 * stream. `read` in a shell reads ahead and seeks back over what it did
 * not use; a read at an offset before the end of the previous read (with
 * no write in between) therefore rewinds the stream by the difference.
 *
 * Protected by nf->mu: everything in struct new_file (FUSE may run two
 * requests on one open file at once).
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs_i.h"

#define MAX_EXTENTS 64
#define MAX_DEPTH 64
#define RESP_MAX (1 << 20)
#define BATCH_MAX 1024

struct extent {
	uint64_t off, end;
};

enum skip_mode {
	SKIP_NONE,
	SKIP_OBJECT, /* drop the rest of this object (too large, too deep, bad byte) */
	SKIP_LINE,   /* junk between objects: drop up to the next newline */
};

struct new_file {
	pthread_mutex_t mu;
	struct fsctx *fs;
	const struct route *route;
	uint32_t uid, gid;

	/* Input window: buf[0] is file offset base; buf holds [base, base+len). */
	uint8_t *buf;
	size_t len, cap;
	uint64_t base, contig;
	struct extent ext[MAX_EXTENTS];
	int next;

	/* Scanner over [.., contig). */
	uint64_t scan;
	uint64_t obj_start;
	int depth;
	uint64_t kinds; /* bit d: level d+1 is an array */
	bool in_str, esc;
	uint64_t colons; /* key separators in the current object */
	enum skip_mode skip;
	int skip_rc;	 /* errno reported for the skipped object */

	/* Responses. */
	char *resp;
	size_t resp_len, resp_cap, resp_pos;
	uint64_t last_read_end;
	bool wrote_since_read;
	/* File offset minus input offset for a writer whose offset also moved
	 * with reads or failed writes (see new_file_write). */
	int64_t shift;
};

/* One completed object waiting to be parsed and submitted. */
struct pending {
	uint64_t start, end; /* file offsets */
	uint64_t colons;
	int rc;		     /* scanner's verdict: 0 or -errno */
	char err[160];
};

int new_file_open(struct fsctx *fs, const struct route *r, uint32_t uid, uint32_t gid,
		  struct new_file **out)
{
	struct new_file *nf = calloc(1, sizeof(*nf));

	if (!nf)
		return -ENOMEM;
	pthread_mutex_init(&nf->mu, NULL);
	nf->fs = fs;
	nf->route = r;
	nf->uid = uid;
	nf->gid = gid;
	*out = nf;
	return 0;
}

void new_file_release(struct new_file *nf)
{
	if (!nf)
		return;
	pthread_mutex_destroy(&nf->mu);
	free(nf->buf);
	free(nf->resp);
	free(nf);
}

static void respond(struct new_file *nf, const char *line)
{
	size_t n = strlen(line);

	if (nf->resp_pos > 0 && nf->resp_len + n + 1 > RESP_MAX / 2) {
		/* Drop what the reader has consumed. */
		memmove(nf->resp, nf->resp + nf->resp_pos, nf->resp_len - nf->resp_pos);
		nf->resp_len -= nf->resp_pos;
		nf->resp_pos = 0;
	}
	if (nf->resp_len + n + 1 > RESP_MAX)
		return; /* a reader that never reads: keep the oldest lines */
	if (nf->resp_len + n + 1 > nf->resp_cap) {
		size_t cap = (nf->resp_len + n + 1) * 2;
		char *p = realloc(nf->resp, cap < RESP_MAX ? cap : RESP_MAX);
		if (!p)
			return;
		nf->resp = p;
		nf->resp_cap = cap < RESP_MAX ? cap : RESP_MAX;
	}
	memcpy(nf->resp + nf->resp_len, line, n);
	nf->resp[nf->resp_len + n] = '\n';
	nf->resp_len += n + 1;
}

static void respond_error(struct new_file *nf, int rc, const char *msg)
{
	char line[ENGINE_ERR_MAX + 16];

	snprintf(line, sizeof(line), "error: %s", msg);
	respond(nf, line);
	fprintf(stderr, "renderfs: uid %u: %s/new: rejected (%s): %s\n", nf->uid, nf->route->path,
		strerror(-rc), msg);
}

/* Put [off, off+len) into the window; advance contig over what is whole. */
static int place(struct new_file *nf, const char *data, size_t len, uint64_t off)
{
	uint64_t end = off + len, limit = nf->fs->max_request + (1 << 20);

	if (end - nf->base > limit)
		return -EFBIG;
	if (end - nf->base > nf->cap) {
		size_t cap = nf->cap ? nf->cap : 65536;
		while (cap < end - nf->base)
			cap *= 2;
		uint8_t *p = realloc(nf->buf, cap);
		if (!p)
			return -ENOMEM;
		nf->buf = p;
		nf->cap = cap;
	}
	memcpy(nf->buf + (off - nf->base), data, len);
	if (end - nf->base > nf->len)
		nf->len = end - nf->base;
	if (off > nf->contig) {
		if (nf->next == MAX_EXTENTS)
			return -EFBIG;
		nf->ext[nf->next].off = off;
		nf->ext[nf->next].end = end;
		nf->next++;
	} else if (end > nf->contig) {
		nf->contig = end;
	}
	/* Extents that now touch the prefix extend it. */
	for (bool grew = true; grew;) {
		grew = false;
		for (int i = 0; i < nf->next; i++)
			if (nf->ext[i].off <= nf->contig) {
				if (nf->ext[i].end > nf->contig)
					nf->contig = nf->ext[i].end;
				nf->ext[i] = nf->ext[--nf->next];
				grew = true;
				break;
			}
	}
	return 0;
}

static void skip_object(struct new_file *nf, int rc)
{
	nf->skip = SKIP_OBJECT;
	nf->skip_rc = rc;
}

/* The scanner refuses an object (or junk) itself: rc and a message. */
static void reject(struct pending *p, uint64_t start, uint64_t end, int rc, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));
static void reject(struct pending *p, uint64_t start, uint64_t end, int rc, const char *fmt, ...)
{
	va_list ap;

	p->start = start;
	p->end = end;
	p->rc = rc;
	va_start(ap, fmt);
	vsnprintf(p->err, sizeof(p->err), fmt, ap);
	va_end(ap);
}

/*
 * Scan the new contiguous bytes; completed objects (and the scanner's own
 * rejections) go to pend. Stops early when pend is full.
 */
static size_t scan(struct new_file *nf, struct pending *pend, size_t maxp)
{
	size_t np = 0;

	while (nf->scan < nf->contig && np < maxp) {
		uint8_t c = nf->buf[nf->scan - nf->base];
		uint64_t at = nf->scan++;

		if (nf->skip == SKIP_LINE) {
			if (c == '\n')
				nf->skip = SKIP_NONE;
			continue;
		}
		if (nf->depth == 0 && nf->skip == SKIP_NONE) {
			if (c == ' ' || c == '\t' || c == '\r' || c == '\n')
				continue;
			if (c != '{') {
				reject(&pend[np++], at, at, -EINVAL,
				       "byte %llu: a request must be a JSON object (starting with '{')",
				       (unsigned long long)at);
				nf->skip = SKIP_LINE;
				if (c == '\n')
					nf->skip = SKIP_NONE;
				continue;
			}
			nf->obj_start = at;
			nf->depth = 1;
			nf->kinds = 0;
			nf->colons = 0;
			nf->in_str = nf->esc = false;
			continue;
		}
		/* Inside an object (possibly one being skipped). */
		if (nf->in_str) {
			if (nf->esc)
				nf->esc = false;
			else if (c == '\\')
				nf->esc = true;
			else if (c == '"')
				nf->in_str = false;
			else if (c < 0x20 && nf->skip == SKIP_NONE) {
				reject(&pend[np++], nf->obj_start, at, -EINVAL,
				       "byte %llu: %s inside a string (control characters must be "
				       "escaped)",
				       (unsigned long long)at, c ? "control character" : "NUL byte");
				skip_object(nf, -EINVAL);
			}
			continue;
		}
		switch (c) {
		case '"':
			nf->in_str = true;
			break;
		case ':':
			nf->colons++;
			break;
		case '{':
		case '[':
			if (nf->depth >= MAX_DEPTH && nf->skip == SKIP_NONE) {
				reject(&pend[np++], nf->obj_start, at, -EINVAL,
				       "nesting deeper than %d levels", MAX_DEPTH);
				skip_object(nf, -EINVAL);
			}
			if (nf->depth < MAX_DEPTH) {
				if (c == '[')
					nf->kinds |= 1ull << nf->depth;
				else
					nf->kinds &= ~(1ull << nf->depth);
			}
			nf->depth++;
			break;
		case '}':
		case ']': {
			bool is_array = nf->depth <= MAX_DEPTH && (nf->kinds >> (nf->depth - 1)) & 1;
			if (nf->skip == SKIP_NONE && is_array != (c == ']')) {
				reject(&pend[np++], nf->obj_start, at, -EINVAL,
				       "byte %llu: '%c' does not close '%c'", (unsigned long long)at, c,
				       is_array ? '[' : '{');
				/* The structure is unknown from here: resynchronize
				 * at the next line. */
				nf->depth = 0;
				nf->skip = SKIP_LINE;
				break;
			}
			if (--nf->depth == 0) {
				if (nf->skip == SKIP_OBJECT) {
					nf->skip = SKIP_NONE;
				} else {
					struct pending *p = &pend[np++];
					p->start = nf->obj_start;
					p->end = at + 1;
					p->colons = nf->colons;
					p->rc = 0;
				}
			}
			break;
		}
		default:
			if (c == 0 && nf->skip == SKIP_NONE) {
				reject(&pend[np++], nf->obj_start, at, -EINVAL,
				       "byte %llu: NUL byte in the request", (unsigned long long)at);
				skip_object(nf, -EINVAL);
			}
			break;
		}
	}
	/* An object still open and already too large. */
	if (nf->depth > 0 && nf->skip == SKIP_NONE && np < maxp &&
	    nf->scan - nf->obj_start > nf->fs->max_request) {
		reject(&pend[np++], nf->obj_start, nf->scan, -EFBIG,
		       "a request larger than max_request (%llu bytes)",
		       (unsigned long long)nf->fs->max_request);
		skip_object(nf, -EFBIG);
	}
	return np;
}

static uint64_t count_keys(json_object *o)
{
	uint64_t n = 0;

	if (json_object_is_type(o, json_type_object)) {
		json_object_object_foreach(o, k, v)
		{
			(void)k;
			n += 1 + count_keys(v);
		}
	} else if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++)
			n += count_keys(json_object_array_get_idx(o, i));
	}
	return n;
}

/*
 * Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
 * U+10FFFF. Returns the offset of the first bad byte, or len.
 */
static size_t utf8_check(const uint8_t *s, size_t len)
{
	size_t i = 0;

	while (i < len) {
		uint8_t c = s[i];
		size_t n;
		uint32_t cp, min;

		if (c < 0x80) {
			i++;
			continue;
		}
		if ((c & 0xE0) == 0xC0) {
			n = 1, cp = c & 0x1F, min = 0x80;
		} else if ((c & 0xF0) == 0xE0) {
			n = 2, cp = c & 0x0F, min = 0x800;
		} else if ((c & 0xF8) == 0xF0) {
			n = 3, cp = c & 0x07, min = 0x10000;
		} else {
			return i;
		}
		for (size_t k = 1; k <= n; k++) {
			if (i + k >= len || (s[i + k] & 0xC0) != 0x80)
				return i;
			cp = cp << 6 | (s[i + k] & 0x3F);
		}
		if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return i;
		i += n + 1;
	}
	return len;
}

/* Parse a completed object; 0 with *out, or -EINVAL with err. */
static int parse_object(const uint8_t *text, size_t len, uint64_t colons, json_object **out,
			char *err, size_t errlen)
{
	json_tokener *tok = json_tokener_new_ex(MAX_DEPTH);
	json_object *o;
	enum json_tokener_error je;

	size_t bad = utf8_check(text, len);

	if (bad < len) {
		json_tokener_free(tok);
		snprintf(err, errlen, "not valid JSON: invalid UTF-8 at byte %zu of the object", bad);
		return -EINVAL;
	}
	if (!tok)
		return -ENOMEM;
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	o = json_tokener_parse_ex(tok, (const char *)text, (int)len);
	je = json_tokener_get_error(tok);
	if (!o && je == json_tokener_continue)
		je = json_tokener_error_parse_eof;
	if (je != json_tokener_success || !o) {
		snprintf(err, errlen, "not valid JSON: %s", json_tokener_error_desc(je));
		json_object_put(o);
		json_tokener_free(tok);
		return -EINVAL;
	}
	json_tokener_free(tok);
	if (count_keys(o) != colons) {
		snprintf(err, errlen, "duplicate key in an object");
		json_object_put(o);
		return -EINVAL;
	}
	*out = o;
	return 0;
}

#define TRIM_BATCH 64

/* Parse and submit the pending objects; returns the first failure. */
static int submit(struct new_file *nf, struct pending *pend, size_t np)
{
	struct engine_submission *subs = calloc(np, sizeof(*subs));
	int first = 0, rc;

	if (!subs)
		return -ENOMEM;
	for (size_t i = 0; i < np; i++) {
		struct pending *p = &pend[i];
		if (p->rc == 0)
			p->rc = parse_object(nf->buf + (p->start - nf->base), p->end - p->start,
					     p->colons, &subs[i].obj, p->err, sizeof(p->err));
	}
	/* One batch of the parsed ones, in order. */
	{
		struct engine_submission *ok = calloc(np, sizeof(*ok));
		size_t n = 0;
		if (!ok) {
			rc = -ENOMEM;
			goto out;
		}
		for (size_t i = 0; i < np; i++)
			if (pend[i].rc == 0)
				ok[n++].obj = subs[i].obj;
		rc = n ? engine_submit(nf->fs->eng, nf->route->path, nf->uid, nf->gid, ok, n) : 0;
		if (rc) {
			free(ok);
			goto out;
		}
		n = 0;
		for (size_t i = 0; i < np; i++)
			if (pend[i].rc == 0)
				subs[i] = ok[n++];
		free(ok);
	}
	for (size_t i = 0; i < np; i++) {
		int r = pend[i].rc ? pend[i].rc : subs[i].rc;
		if (r) {
			respond_error(nf, r, pend[i].rc ? pend[i].err : subs[i].err);
			if (!first)
				first = r;
		} else {
			respond(nf, subs[i].id);
		}
	}
	rc = first;
out:
	for (size_t i = 0; i < np; i++)
		json_object_put(subs[i].obj);
	free(subs);
	/* A large batch leaves this thread's malloc arena as large as its
	 * parse trees were; give the free part back rather than keep every
	 * handler thread's peak. */
	if (np >= TRIM_BATCH)
		malloc_trim(0);
	return rc;
}

/* Drop input bytes nothing needs any more. */
static void compact(struct new_file *nf)
{
	uint64_t keep = nf->depth > 0 && nf->skip == SKIP_NONE ? nf->obj_start : nf->scan;
	size_t drop = keep - nf->base;

	if (drop == 0)
		return;
	memmove(nf->buf, nf->buf + drop, nf->len - drop);
	nf->len -= drop;
	nf->base = keep;
	/* A large window that emptied gives its memory back. */
	if (nf->len == 0 && nf->cap > (1 << 20)) {
		free(nf->buf);
		nf->buf = NULL;
		nf->cap = 0;
	}
}

ssize_t new_file_write(struct new_file *nf, const char *data, size_t len, uint64_t off)
{
	struct pending *pend = NULL;
	size_t whole = len;
	int first = 0, rc;
	bool was_skipping;

	pthread_mutex_lock(&nf->mu);
	/*
	 * One file description carries both directions (exec 3<>new): reading
	 * the responses moves the offset the next write lands at, and a failed
	 * write leaves it where it was although its bytes were consumed. A
	 * write at the offset where the last read ended means "next", so the
	 * input offset is the file offset minus a shift kept from then on.
	 */
	if (nf->resp_pos > 0 && !nf->wrote_since_read && off == nf->last_read_end)
		nf->shift = (int64_t)off - (int64_t)nf->contig;
	if ((int64_t)off >= nf->shift)
		off = (uint64_t)((int64_t)off - nf->shift);
	nf->wrote_since_read = true;
	if (off + len <= nf->contig) { /* already here (a resend) */
		pthread_mutex_unlock(&nf->mu);
		return (ssize_t)whole;
	}
	if (off < nf->contig) {
		size_t skip = nf->contig - off;
		data += skip;
		len -= skip;
		off = nf->contig;
	}
	was_skipping = nf->skip == SKIP_OBJECT;
	if ((rc = place(nf, data, len, off)) != 0) {
		if (rc == -EFBIG)
			respond_error(nf, rc, "a request larger than max_request, or too much data "
					      "written out of order");
		pthread_mutex_unlock(&nf->mu);
		return rc;
	}
	pend = malloc(BATCH_MAX * sizeof(*pend));
	if (!pend) {
		pthread_mutex_unlock(&nf->mu);
		return -ENOMEM;
	}
	while (nf->scan < nf->contig) {
		size_t np = scan(nf, pend, BATCH_MAX);
		if (np == 0)
			break;
		rc = submit(nf, pend, np);
		if (rc && !first)
			first = rc;
		compact(nf);
	}
	compact(nf);
	/* Bytes of an object already refused (too large) keep failing. */
	if (!first && was_skipping && nf->skip == SKIP_OBJECT)
		first = nf->skip_rc;
	free(pend);
	/* A failed write leaves the writer's offset where it was. */
	if (first)
		nf->shift -= (int64_t)whole;
	pthread_mutex_unlock(&nf->mu);
	return first ? first : (ssize_t)whole;
}

ssize_t new_file_read(struct new_file *nf, char *buf, size_t len, uint64_t off)
{
	size_t n;

	pthread_mutex_lock(&nf->mu);
	if (!nf->wrote_since_read && off != nf->last_read_end) {
		int64_t delta = (int64_t)(off - nf->last_read_end);
		int64_t pos = (int64_t)nf->resp_pos + delta;
		nf->resp_pos = pos < 0 ? 0 : (size_t)pos > nf->resp_len ? nf->resp_len : (size_t)pos;
	}
	n = nf->resp_len - nf->resp_pos;
	if (n > len)
		n = len;
	memcpy(buf, nf->resp + nf->resp_pos, n);
	nf->resp_pos += n;
	nf->last_read_end = off + n;
	nf->wrote_since_read = false;
	pthread_mutex_unlock(&nf->mu);
	return (ssize_t)n;
}

int new_file_flush(struct new_file *nf)
{
	int rc = 0;

	/* close() of every descriptor of this open file comes here (a shell
	 * closes its dups after each redirection), so nothing is dropped: the
	 * object may still be completed through another descriptor, and the
	 * last close discards it (new_file_release). */
	pthread_mutex_lock(&nf->mu);
	if (nf->next > 0 || nf->depth > 0) {
		fprintf(stderr, "renderfs: uid %u: %s/new: closed with %s; nothing was enqueued "
				"from it\n",
			nf->uid, nf->route->path,
			nf->next > 0 ? "a hole in the written data"
				     : "an incomplete request (a JSON object not closed)");
		rc = -EINVAL;
	}
	pthread_mutex_unlock(&nf->mu);
	return rc;
}
