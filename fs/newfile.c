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
 * keys), and for what json-c would silently change (a NUL escape that
 * truncates a string, a lone surrogate it replaces), and submitted in one
 * batch: one durable commit for the lot, inside the write() call.
 *
 * What a write() reports is what it did (SPEC §2): its count is exactly
 * the bytes of the objects it enqueued plus an incomplete tail it
 * buffered. Objects are taken in order up to the first bad one. A write
 * that reaches a bad object after some of its own bytes returns the count
 * of the bytes before it and consumes nothing after; the writer's retry
 * then starts at the bad object, and a write that starts at (or inside) a
 * bad object fails with that object's errno, consuming the bad object
 * alone (its error line is readable). So a writer that retries the rest
 * of a short write neither loses nor duplicates an object.
 *
 * Consumed bytes are dropped, so the window holds at most one object plus
 * what arrived out of order, bounded by max_request + 1 MiB, and by the
 * per-uid and total budgets of struct new_limits (user_buffer_max=,
 * buffer_max=), which also rate-limit what rejected requests write to
 * the daemon log.
 *
 * Reads return the response lines (an id or "error: ..." per object) as a
 * stream. `read` in a shell reads ahead and seeks back over what it did
 * not use; a read at an offset before the end of the previous read (with
 * no write in between) therefore rewinds the stream by the difference.
 *
 * Protected by nf->mu: everything in struct new_file (FUSE may run two
 * requests on one open file at once). struct new_limits has its own mutex,
 * taken inside nf->mu, never the other way round.
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

/*
 * Budgets shared by every open `new` file of the mount: bytes of window
 * memory held per uid and in all, and a token bucket per uid for lines
 * about rejected requests in the daemon log. Fixed-size tables: nothing
 * here grows with the number of users or files.
 */
#define LIMIT_SLOTS 1024
#define LOG_SLOTS 64
#define LOG_RATE 5   /* lines per second per uid... */
#define LOG_BURST 20 /* ...after a burst of this many */

struct new_limits {
	pthread_mutex_t mu;
	uint64_t max, user_max;	 /* read-only after new_limits_create */
	/* Protected by mu: */
	uint64_t total;
	struct {
		uint32_t uid;
		uint64_t bytes; /* 0: a free slot */
	} held[LIMIT_SLOTS];
	struct {
		uint32_t uid;
		bool used;
		uint64_t last_ms;   /* last refill, also the slot's age */
		double tokens;
		uint64_t suppressed; /* lines not written since the last one */
	} logb[LOG_SLOTS];
	uint64_t refused_user, refused_total, log_suppressed;
	/* Atomic (relaxed), not under mu: writes to `new`, their time in
	 * new_file_write and in engine_submit, in nanoseconds. */
	uint64_t writes, write_ns, engine_ns;
};


int new_limits_create(uint64_t max, uint64_t user_max, struct new_limits **out)
{
	struct new_limits *l = calloc(1, sizeof(*l));

	if (!l)
		return -ENOMEM;
	pthread_mutex_init(&l->mu, NULL);
	l->max = max;
	l->user_max = user_max;
	*out = l;
	return 0;
}

void new_limits_free(struct new_limits *l)
{
	if (!l)
		return;
	pthread_mutex_destroy(&l->mu);
	free(l);
}

void new_limits_get_stats(struct new_limits *l, struct new_limits_stats *s)
{
	pthread_mutex_lock(&l->mu);
	s->held = l->total;
	s->refused_user = l->refused_user;
	s->refused_total = l->refused_total;
	s->log_suppressed = l->log_suppressed;
	pthread_mutex_unlock(&l->mu);
	s->writes = __atomic_load_n(&l->writes, __ATOMIC_RELAXED);
	s->write_ns = __atomic_load_n(&l->write_ns, __ATOMIC_RELAXED);
	s->engine_ns = __atomic_load_n(&l->engine_ns, __ATOMIC_RELAXED);
}

/* Take delta more bytes for uid: 0, -EAGAIN past the uid's budget, -ENOMEM
 * past the mount's (or with every slot taken by other uids). */
static int limits_take(struct new_limits *l, uint32_t uid, uint64_t delta)
{
	int mine = -1, free_slot = -1, rc = 0;
	uint64_t cur;

	pthread_mutex_lock(&l->mu);
	for (int i = 0; i < LIMIT_SLOTS && mine < 0; i++) {
		if (l->held[i].bytes && l->held[i].uid == uid)
			mine = i;
		else if (free_slot < 0 && l->held[i].bytes == 0)
			free_slot = i;
	}
	cur = mine >= 0 ? l->held[mine].bytes : 0;
	if (cur + delta > l->user_max) {
		l->refused_user++;
		rc = -EAGAIN;
	} else if (l->total + delta > l->max || (mine < 0 && free_slot < 0)) {
		l->refused_total++;
		rc = -ENOMEM;
	} else {
		if (mine < 0) {
			mine = free_slot;
			l->held[mine].uid = uid;
		}
		l->held[mine].bytes += delta;
		l->total += delta;
	}
	pthread_mutex_unlock(&l->mu);
	return rc;
}

static void limits_give(struct new_limits *l, uint32_t uid, uint64_t delta)
{
	if (delta == 0)
		return;
	pthread_mutex_lock(&l->mu);
	for (int i = 0; i < LIMIT_SLOTS; i++)
		if (l->held[i].bytes && l->held[i].uid == uid) {
			l->held[i].bytes -= delta < l->held[i].bytes ? delta : l->held[i].bytes;
			break;
		}
	l->total -= delta < l->total ? delta : l->total;
	pthread_mutex_unlock(&l->mu);
}

/* Whether uid may write one more line to the daemon log now; *suppressed
 * gets how many of its lines were not written since its last one. */
static bool limits_log(struct new_limits *l, uint32_t uid, uint64_t *suppressed)
{
	uint64_t now = now_ms();
	int slot = -1;
	bool ok;

	pthread_mutex_lock(&l->mu);
	for (int i = 0; i < LOG_SLOTS && slot < 0; i++)
		if (l->logb[i].used && l->logb[i].uid == uid)
			slot = i;
	if (slot < 0) {
		/* A new uid takes a free slot, else the least recently used. */
		slot = 0;
		for (int i = 0; i < LOG_SLOTS; i++) {
			if (!l->logb[i].used) {
				slot = i;
				break;
			}
			if (l->logb[i].last_ms < l->logb[slot].last_ms)
				slot = i;
		}
		l->logb[slot].used = true;
		l->logb[slot].uid = uid;
		l->logb[slot].tokens = LOG_BURST;
		l->logb[slot].suppressed = 0;
		l->logb[slot].last_ms = now;
	}
	if (now > l->logb[slot].last_ms)
		l->logb[slot].tokens += (double)(now - l->logb[slot].last_ms) * LOG_RATE / 1000.0;
	if (l->logb[slot].tokens > LOG_BURST)
		l->logb[slot].tokens = LOG_BURST;
	l->logb[slot].last_ms = now;
	ok = l->logb[slot].tokens >= 1.0;
	if (ok) {
		l->logb[slot].tokens -= 1.0;
		*suppressed = l->logb[slot].suppressed;
		l->logb[slot].suppressed = 0;
	} else {
		l->logb[slot].suppressed++;
		l->log_suppressed++;
	}
	pthread_mutex_unlock(&l->mu);
	return ok;
}

struct new_file {
	pthread_mutex_t mu;
	struct fsctx *fs;
	const struct route *route;
	uint32_t uid, gid;
	bool append;	/* opened O_APPEND: every write comes next, whatever its offset */
	uint64_t held;	/* bytes of buf taken from fs->limits */
	char err[ENGINE_ERR_MAX]; /* the message for the bad object submit() found */

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
	int rc;		     /* scanner's verdict: 0 or -errno (its message: nf->err) */
};

int new_file_open(struct fsctx *fs, const struct route *r, uint32_t uid, uint32_t gid,
		  bool append, struct new_file **out)
{
	struct new_file *nf = calloc(1, sizeof(*nf));

	if (!nf)
		return -ENOMEM;
	pthread_mutex_init(&nf->mu, NULL);
	nf->fs = fs;
	nf->route = r;
	nf->uid = uid;
	nf->gid = gid;
	nf->append = append;
	*out = nf;
	return 0;
}

/* Free the window's memory and give its bytes back to the budgets. */
static void window_free(struct new_file *nf)
{
	free(nf->buf);
	nf->buf = NULL;
	nf->cap = 0;
	limits_give(nf->fs->limits, nf->uid, nf->held);
	nf->held = 0;
}

void new_file_release(struct new_file *nf)
{
	if (!nf)
		return;
	pthread_mutex_destroy(&nf->mu);
	window_free(nf);
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

/* A refused object: its line for the reader, the count in stats, and a
 * line in the daemon log unless this uid has written too many lately. */
static void respond_error(struct new_file *nf, int rc, const char *msg)
{
	char line[ENGINE_ERR_MAX + 16];
	uint64_t suppressed = 0;

	snprintf(line, sizeof(line), "error: %s", msg);
	respond(nf, line);
	engine_count_rejected(nf->fs->eng, 1);
	if (!limits_log(nf->fs->limits, nf->uid, &suppressed))
		return;
	if (suppressed)
		fprintf(stderr,
			"renderfs: uid %u: %llu rejected requests not logged (more than %d a "
			"second)\n",
			nf->uid, (unsigned long long)suppressed, LOG_RATE);
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
		int rc;
		while (cap < end - nf->base)
			cap *= 2;
		if (cap > limit)
			cap = limit;
		if ((rc = limits_take(nf->fs->limits, nf->uid, cap - nf->cap)) != 0)
			return rc;
		uint8_t *p = realloc(nf->buf, cap);
		if (!p) {
			limits_give(nf->fs->limits, nf->uid, cap - nf->cap);
			return -ENOMEM;
		}
		nf->held += cap - nf->cap;
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
static void reject(struct new_file *nf, struct pending *p, uint64_t start, uint64_t end, int rc,
		   const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static void reject(struct new_file *nf, struct pending *p, uint64_t start, uint64_t end, int rc,
		   const char *fmt, ...)
{
	va_list ap;

	p->start = start;
	p->end = end;
	p->rc = rc;
	va_start(ap, fmt);
	vsnprintf(nf->err, sizeof(nf->err), fmt, ap);
	va_end(ap);
}

/*
 * Scan the new contiguous bytes; completed objects go to pend, and so
 * does the scanner's own rejection of an object (or junk), which ends the
 * scan right after the byte that decided it. Stops early when pend is
 * full. skip_only: scan only while the rest of a refused object (or junk
 * line) is being dropped, and stop where it ends.
 */
static size_t scan(struct new_file *nf, struct pending *pend, size_t maxp, bool skip_only)
{
	size_t np = 0;

	while (nf->scan < nf->contig && np < maxp && !(np && pend[np - 1].rc) &&
	       !(skip_only && nf->skip == SKIP_NONE)) {
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
				reject(nf, &pend[np++], at, at, -EINVAL,
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
				reject(nf, &pend[np++], nf->obj_start, at, -EINVAL,
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
				reject(nf, &pend[np++], nf->obj_start, at, -EINVAL,
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
				reject(nf, &pend[np++], nf->obj_start, at, -EINVAL,
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
				} else if (at + 1 - nf->obj_start > nf->fs->max_request) {
					reject(nf, &pend[np++], nf->obj_start, at + 1, -EFBIG,
					       "a request larger than max_request (%llu bytes)",
					       (unsigned long long)nf->fs->max_request);
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
				reject(nf, &pend[np++], nf->obj_start, at, -EINVAL,
				       "byte %llu: NUL byte in the request", (unsigned long long)at);
				skip_object(nf, -EINVAL);
			}
			break;
		}
	}
	/* An object still open and already too large. */
	if (nf->depth > 0 && nf->skip == SKIP_NONE && np < maxp && !(np && pend[np - 1].rc) &&
	    nf->scan - nf->obj_start > nf->fs->max_request) {
		reject(nf, &pend[np++], nf->obj_start, nf->scan, -EFBIG,
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

static int hex4(const uint8_t *p)
{
	int v = 0;

	for (int i = 0; i < 4; i++) {
		int c = p[i], d = c >= '0' && c <= '9'	 ? c - '0'
				  : c >= 'a' && c <= 'f' ? c - 'a' + 10
				  : c >= 'A' && c <= 'F' ? c - 'A' + 10
							 : -1;
		if (d < 0)
			return -1;
		v = v << 4 | d;
	}
	return v;
}

/*
 * What json-c would accept and change: "\u0000" (its strings are C strings
 * to most callers, so a name or priority is silently cut there) and lone
 * surrogate escapes (replaced with U+FFFD). Runs on text json-c parsed
 * strictly, so its structure is valid JSON. Returns 0, or -EINVAL with
 * err naming the field by its path ('input.name', 'loras[2]').
 */
static int escape_check(const uint8_t *t, size_t len, char *err, size_t errlen)
{
	struct level {
		bool obj, expect_key;
		size_t key_off, key_len; /* the key whose value is being read */
		size_t index;		 /* arrays: the element being read */
	} lv[MAX_DEPTH + 2];
	int d = 0;

	memset(&lv[0], 0, sizeof(lv[0]));

	if (!memmem(t, len, "\\u", 2))
		return 0;
	for (size_t i = 0; i < len; i++) {
		uint8_t c = t[i];

		if (c == '"') {
			size_t start = ++i;
			bool is_key = d > 0 && lv[d].obj && lv[d].expect_key;
			const char *what = NULL;

			for (; i < len && t[i] != '"'; i++) {
				if (t[i] != '\\')
					continue;
				if (++i + 4 >= len || t[i] != 'u')
					continue;
				int u = hex4(t + i + 1), v;
				i += 4;
				if (u == 0) {
					what = "NUL characters (\\u0000)";
				} else if (u >= 0xD800 && u <= 0xDBFF) {
					if (i + 6 < len && t[i + 1] == '\\' && t[i + 2] == 'u' &&
					    (v = hex4(t + i + 3)) >= 0xDC00 && v <= 0xDFFF)
						i += 6;
					else
						what = "a lone surrogate escape";
				} else if (u >= 0xDC00 && u <= 0xDFFF) {
					what = "a lone surrogate escape";
				}
				if (what)
					break;
			}
			if (what) {
				char path[256];
				size_t n = 0;
				for (int k = 1; k <= d && n < sizeof(path); k++) {
					int w;
					if (lv[k].obj && (k < d || !is_key) && lv[k].key_len)
						w = snprintf(path + n, sizeof(path) - n, "%s%.*s",
							     n ? "." : "", (int)(lv[k].key_len > 64 ? 64 : lv[k].key_len),
							     (const char *)t + lv[k].key_off);
					else if (!lv[k].obj)
						w = snprintf(path + n, sizeof(path) - n, "[%zu]",
							     lv[k].index);
					else
						w = 0;
					if (w < 0)
						break;
					n += (size_t)w;
				}
				if (n >= sizeof(path))
					n = sizeof(path) - 1;
				path[n] = '\0';
				if (is_key)
					snprintf(err, errlen, "a key in '%s' must not contain %s",
						 n ? path : "the request", what);
				else
					snprintf(err, errlen, "'%s' must not contain %s",
						 n ? path : "the request", what);
				return -EINVAL;
			}
			if (is_key) {
				lv[d].key_off = start;
				lv[d].key_len = i - start;
			}
			continue;
		}
		switch (c) {
		case '{':
		case '[':
			if (d >= MAX_DEPTH + 1)
				return 0; /* the scanner refused deeper ones already */
			d++;
			lv[d].obj = c == '{';
			lv[d].expect_key = true;
			lv[d].key_len = 0;
			lv[d].index = 0;
			break;
		case '}':
		case ']':
			if (d > 0)
				d--;
			break;
		case ',':
			lv[d].expect_key = true;
			lv[d].index++;
			break;
		case ':':
			lv[d].expect_key = false;
			break;
		}
	}
	return 0;
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
	if (escape_check(text, len, err, errlen) != 0) {
		json_object_put(o);
		return -EINVAL;
	}
	*out = o;
	return 0;
}

#define TRIM_BATCH 64

/*
 * Parse and submit the pending objects, in order, up to the first bad one
 * (refused by the scanner, the parser or the engine): the ones before it
 * are enqueued and answered. Returns the index of the bad one, or np;
 * its errno is in pend[bad].rc and its message in nf->err.
 */
static size_t submit(struct new_file *nf, struct pending *pend, size_t np)
{
	struct engine_submission *subs = calloc(np ? np : 1, sizeof(*subs));
	size_t n = 0, bad;
	int rc;

	if (!subs) {
		pend[0].rc = -ENOMEM;
		snprintf(nf->err, sizeof(nf->err), "out of memory");
		return 0;
	}
	while (n < np && pend[n].rc == 0 &&
	       (pend[n].rc = parse_object(nf->buf + (pend[n].start - nf->base),
					  pend[n].end - pend[n].start, pend[n].colons, &subs[n].obj,
					  nf->err, sizeof(nf->err))) == 0)
		n++;
	bad = n;
	if (n) {
		uint64_t t0 = mono_ns();

		rc = engine_submit(nf->fs->eng, nf->route->path, nf->uid, nf->gid, subs, n);
		__atomic_fetch_add(&nf->fs->limits->engine_ns, mono_ns() - t0, __ATOMIC_RELAXED);
	} else {
		rc = 0;
	}
	for (size_t i = 0; i < n; i++) {
		int r = rc ? rc : subs[i].rc;
		if (r == 0) {
			respond(nf, subs[i].id);
			continue;
		}
		/* The engine refused this one (or all, rc): it is the bad one. */
		bad = i;
		pend[i].rc = r;
		snprintf(nf->err, sizeof(nf->err), "%s",
			 rc ? (rc == -ENOMEM ? "out of memory" : strerror(-rc)) : subs[i].err);
		break;
	}
	for (size_t i = 0; i < n; i++)
		json_object_put(subs[i].obj);
	free(subs);
	/* A large batch leaves this thread's malloc arena as large as its
	 * parse trees were; give the free part back rather than keep every
	 * handler thread's peak. */
	if (np >= TRIM_BATCH)
		malloc_trim(0);
	return bad;
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
	if (nf->len == 0 && nf->cap > (1 << 20))
		window_free(nf);
}

/*
 * Forget the input from `at` on, as if this write had ended there: `at`
 * is where a top-level object starts or a refused one ended, so the
 * scanner resumes there at depth 0. Extents that arrived out of order
 * before this write (saved) are kept where they lie beyond `at`.
 */
static void truncate_at(struct new_file *nf, uint64_t at, const struct extent *saved, int nsaved)
{
	uint64_t end = at;

	nf->scan = nf->contig = at;
	nf->depth = 0;
	nf->in_str = nf->esc = false;
	nf->skip = SKIP_NONE;
	nf->next = 0;
	for (int i = 0; i < nsaved; i++) {
		if (saved[i].end <= at)
			continue;
		nf->ext[nf->next].off = saved[i].off > at ? saved[i].off : at;
		nf->ext[nf->next].end = saved[i].end;
		if (saved[i].end > end)
			end = saved[i].end;
		nf->next++;
	}
	nf->len = end - nf->base;
}

/*
 * The scanner is inside a refused object (or junk line): drop it up to
 * its end, and forget what this write brought after that. If it does not
 * end in what has arrived, all of it is dropped and the skip goes on.
 */
static void drop_refused(struct new_file *nf, struct pending *pend, const struct extent *saved,
			 int nsaved)
{
	scan(nf, pend, BATCH_MAX, true);
	if (nf->scan < nf->contig || nf->skip == SKIP_NONE)
		truncate_at(nf, nf->scan, saved, nsaved);
}

static ssize_t file_write(struct new_file *nf, const char *data, size_t len, uint64_t off);

/* The time split of `new` writes is kept in fs->limits (stats). */
ssize_t new_file_write(struct new_file *nf, const char *data, size_t len, uint64_t off)
{
	uint64_t t0 = mono_ns();
	ssize_t r = file_write(nf, data, len, off);

	__atomic_fetch_add(&nf->fs->limits->write_ns, mono_ns() - t0, __ATOMIC_RELAXED);
	__atomic_fetch_add(&nf->fs->limits->writes, 1, __ATOMIC_RELAXED);
	return r;
}

static ssize_t file_write(struct new_file *nf, const char *data, size_t len, uint64_t off)
{
	struct pending *pend = NULL;
	struct extent saved[MAX_EXTENTS];
	int nsaved, rc = 0;
	uint64_t w0;
	ssize_t ret = (ssize_t)len;

	pthread_mutex_lock(&nf->mu);
	/*
	 * One file description carries both directions (exec 3<>new): reading
	 * the responses moves the offset the next write lands at, and a failed
	 * write leaves it where it was although its bytes were consumed. A
	 * write at the offset where the last read ended means "next", so the
	 * input offset is the file offset minus a shift kept from then on.
	 * With O_APPEND the kernel writes at the size `new` reports, and
	 * every write is simply the next.
	 */
	if (nf->append) {
		off = nf->contig;
	} else {
		if (nf->resp_pos > 0 && !nf->wrote_since_read && off == nf->last_read_end)
			nf->shift = (int64_t)off - (int64_t)nf->contig;
		if ((int64_t)off >= nf->shift)
			off = (uint64_t)((int64_t)off - nf->shift);
	}
	nf->wrote_since_read = true;
	w0 = off; /* the input offset of data[0] */
	if (off + len <= nf->contig) { /* already here (a resend) */
		pthread_mutex_unlock(&nf->mu);
		return (ssize_t)len;
	}
	if (off < nf->contig) {
		size_t skip = nf->contig - off;
		data += skip;
		len -= skip;
		off = nf->contig;
	}
	nsaved = nf->next;
	memcpy(saved, nf->ext, sizeof(saved[0]) * (size_t)nsaved);
	if (!(pend = malloc(BATCH_MAX * sizeof(*pend)))) {
		pthread_mutex_unlock(&nf->mu);
		return -ENOMEM;
	}
	if ((rc = place(nf, data, len, off)) != 0) {
		/* Nothing of this write was taken. */
		if (rc == -EFBIG)
			respond_error(nf, rc, "a request larger than max_request, or too much data "
					      "written out of order");
		else
			respond_error(nf, rc, rc == -EAGAIN ? "this user's unfinished requests "
							      "hold user_buffer_max bytes; "
							      "finish or close some first"
							    : "unfinished requests hold buffer_max bytes");
		free(pend);
		pthread_mutex_unlock(&nf->mu);
		return rc;
	}
	/* The rest of an object (or junk line) refused by an earlier write:
	 * this write starts inside a bad object (unless it only lands beyond
	 * a hole, taken as it is). */
	if (nf->skip != SKIP_NONE && nf->contig > off) {
		rc = nf->skip == SKIP_OBJECT ? nf->skip_rc : -EINVAL;
		drop_refused(nf, pend, saved, nsaved);
		compact(nf);
		goto out;
	}
	while (nf->scan < nf->contig) {
		size_t np = scan(nf, pend, BATCH_MAX, false), bad;
		struct pending *p;

		if (np == 0)
			break;
		bad = submit(nf, pend, np);
		if (bad == np) {
			compact(nf);
			continue;
		}
		p = &pend[bad];
		if (p->start > w0) {
			/* Report the bytes before the bad object; it is taken
			 * (and refused) when the writer sends it again. */
			truncate_at(nf, p->start, saved, nsaved);
			ret = (ssize_t)(p->start - w0);
		} else {
			/* This write starts at the bad object: it fails, and
			 * takes the bad object alone. */
			rc = p->rc;
			respond_error(nf, rc, nf->err);
			if (nf->skip != SKIP_NONE) /* refused by the scanner */
				drop_refused(nf, pend, saved, nsaved);
			else /* by the parser or the engine: it ended at p->end */
				truncate_at(nf, p->end, saved, nsaved);
		}
		compact(nf);
		break;
	}
out:
	free(pend);
	if (rc) {
		/* A failed write leaves the writer's offset where it was; what it
		 * consumed (up to nf->contig) is behind the input offset. */
		if (!nf->append)
			nf->shift -= (int64_t)(nf->contig - w0);
		ret = rc;
	}
	pthread_mutex_unlock(&nf->mu);
	return ret;
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
	if (n) /* nothing answered yet: resp may be NULL */
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
