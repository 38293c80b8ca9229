/*
 * http.c - requests to services through libcurl's multi interface (http.h).
 *
 * DESIGN
 * One thread owns the multi handle and every easy handle. Other threads
 * hand it transfers (http_submit) and cancellations (http_cancel) through
 * a list under `mu` and wake it through an eventfd; it adds them to the
 * multi handle and, for each finished transfer, builds the response and
 * calls `done` outside the lock. So 1,000 requests waiting on services
 * cost one thread and their buffers, not 1,000 threads. The loop is
 * driven by curl's socket interface and epoll: an answer arriving on one
 * connection costs the work of that connection, not a look at every
 * transfer in flight (curl_multi_perform and poll() would, and with 1,000
 * in flight that was most of the loop's time).
 *
 * What every transfer gets, whoever asks: http and https only, redirects
 * not followed (a 3xx is an answer), a deadline, the answer kept up to
 * max_body (beyond: the transfer fails, it is not cut), no connection to an
 * address in deny_net= (checked on the address curl is about to connect
 * to, so a name that resolves into a denied range is refused too), and
 * messages that name the URL without its query (signed URLs carry their
 * secret there) with the request's secrets replaced by ***.
 *
 * THREADS AND LOCKS
 * mu guards xfers (the list of transfers not yet finished), incoming (those
 * not yet handed to curl), their `cancel`, `added` and `ended` flags,
 * cancels, next_id and stop. Easy handles, buffers, the multi handle, the
 * epoll set and the timer are the loop thread's alone once a transfer is
 * listed.
 */
#include "http.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* ---- deny_net= ---- */

struct http_deny_range {
	int family;	 /* AF_INET or AF_INET6 */
	uint8_t addr[16];
	unsigned prefix; /* bits */
};

struct http_deny {
	struct http_deny_range *r;
	size_t n;
};

int http_deny_parse(const char *spec, struct http_deny **out, char *err, size_t errlen)
{
	struct http_deny *d = calloc(1, sizeof(*d));
	char *copy = strdup(spec ? spec : ""), *save = NULL, *tok;

	if (!d || !copy) {
		free(d);
		free(copy);
		return -ENOMEM;
	}
	for (tok = strtok_r(copy, ",+", &save); tok; tok = strtok_r(NULL, ",+", &save)) {
		struct http_deny_range r = {0};
		char *slash = strchr(tok, '/'), *end = NULL;
		unsigned long bits;
		void *nr;

		r.family = strchr(tok, ':') ? AF_INET6 : AF_INET;
		if (slash)
			*slash = '\0';
		if (inet_pton(r.family, tok, r.addr) != 1)
			goto bad;
		bits = r.family == AF_INET ? 32 : 128;
		if (slash) {
			errno = 0;
			bits = strtoul(slash + 1, &end, 10);
			if (errno || end == slash + 1 || *end || bits > (r.family == AF_INET ? 32 : 128))
				goto bad;
		}
		r.prefix = (unsigned)bits;
		if (!(nr = realloc(d->r, (d->n + 1) * sizeof(*d->r)))) {
			free(copy);
			http_deny_free(d);
			return -ENOMEM;
		}
		d->r = nr;
		d->r[d->n++] = r;
		continue;
bad:
		if (slash)
			*slash = '/';
		snprintf(err, errlen, "'%s' is not an address range (CIDR, e.g. 169.254.0.0/16)", tok);
		free(copy);
		http_deny_free(d);
		return -EINVAL;
	}
	free(copy);
	*out = d;
	return 0;
}

bool http_deny_match(const struct http_deny *d, const struct sockaddr *sa)
{
	const uint8_t *a;
	uint8_t mapped[4];
	int family = sa->sa_family;

	if (!d)
		return false;
	if (family == AF_INET) {
		a = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
	} else if (family == AF_INET6) {
		a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
		/* ::ffff:a.b.c.d is a.b.c.d for the IPv4 ranges */
		static const uint8_t v4pre[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
		if (memcmp(a, v4pre, 12) == 0) {
			memcpy(mapped, a + 12, 4);
			a = mapped;
			family = AF_INET;
		}
	} else {
		return false;
	}
	for (size_t i = 0; i < d->n; i++) {
		const struct http_deny_range *r = &d->r[i];
		unsigned full = r->prefix / 8, rest = r->prefix % 8;

		if (r->family != family || memcmp(a, r->addr, full) != 0)
			continue;
		if (rest && ((a[full] ^ r->addr[full]) & (uint8_t)(0xff << (8 - rest))))
			continue;
		return true;
	}
	return false;
}

void http_deny_free(struct http_deny *d)
{
	if (d) {
		free(d->r);
		free(d);
	}
}

/* ---- transfers ---- */

struct xfer {
	struct xfer *next, *prev; /* loop->xfers */
	struct xfer *inext;	  /* loop->incoming */
	uint64_t id;
	bool added, cancel, ended; /* under mu */
	struct http_loop *loop;
	CURL *easy;
	struct curl_slist *hdrs;
	char *method, *shown; /* the URL as messages name it */
	void *req_body;
	char *body;
	size_t len, cap, max;
	bool too_big, denied, sink_failed;
	int (*sink)(void *arg, const void *data, size_t len, char *err, size_t errlen);
	void *sink_arg;
	uint64_t streamed;
	long long (*source)(void *arg, void *buf, size_t len, uint64_t off);
	void *source_arg;
	uint64_t source_len, sent;
	bool source_failed;
	char sink_err[256];
	char denied_addr[INET6_ADDRSTRLEN];
	uint64_t retry_after_ms;
	char want[64];	   /* want_header, with its ':' ("" : none) */
	char header[128];  /* its value */
	char **secrets;
	size_t nsecrets;
	http_done_fn done;
	void *arg;
};

struct http_loop {
	CURLM *multi;
	pthread_t thread;
	const struct http_deny *deny;
	int ep, evfd;	   /* the epoll set of curl's sockets; the wake-up */
	uint64_t timer_at; /* curl's timer (CLOCK_MONOTONIC ms; 0: none) */
	pthread_mutex_t mu;
	struct xfer *xfers, *incoming, *incoming_tail;
	bool cancels; /* some transfer has `cancel` set since the loop looked */
	uint64_t next_id;
	bool stop;
};

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void loop_wake(struct http_loop *l)
{
	uint64_t one = 1;

	/* Fails only when the counter is full: a wake-up is pending anyway. */
	if (write(l->evfd, &one, sizeof(one)) < 0)
		return;
}

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc;

static void global_init(void)
{
	global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void xfer_free(struct xfer *x)
{
	if (x->easy)
		curl_easy_cleanup(x->easy);
	curl_slist_free_all(x->hdrs);
	for (size_t i = 0; i < x->nsecrets; i++)
		free(x->secrets[i]);
	free(x->secrets);
	free(x->method);
	free(x->shown);
	free(x->req_body);
	free(x->body);
	free(x);
}

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
	struct xfer *x = arg;
	size_t len = size * n;

	if (x->sink) {
		long status = 0;

		curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
		if (status >= 200 && status < 300) {
			if (x->streamed + len > x->max) {
				x->too_big = true;
				return 0;
			}
			if (x->sink(x->sink_arg, p, len, x->sink_err, sizeof(x->sink_err)) != 0) {
				x->sink_failed = true;
				return 0;
			}
			x->streamed += len;
			return len;
		}
		if (x->len + len > 65536)
			return len; /* an error's text: its start is enough */
	} else if (x->len + len > x->max) {
		x->too_big = true;
		return 0; /* fails the transfer: a cut answer is no answer */
	}
	if (x->len + len + 1 > x->cap) {
		size_t cap = x->cap ? x->cap : 4096;
		char *nb;
		while (cap < x->len + len + 1)
			cap *= 2;
		if (!(nb = realloc(x->body, cap)))
			return 0;
		x->body = nb;
		x->cap = cap;
	}
	memcpy(x->body + x->len, p, len);
	x->len += len;
	return len;
}

static size_t on_header(char *p, size_t size, size_t n, void *arg)
{
	struct xfer *x = arg;
	size_t len = size * n;
	static const char name[] = "retry-after:";
	size_t wl = strlen(x->want);

	if (wl && len > wl && strncasecmp(p, x->want, wl) == 0) {
		const char *v = p + wl;
		size_t vl = len - wl;
		while (vl && (*v == ' ' || *v == '\t'))
			v++, vl--;
		while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
			vl--;
		snprintf(x->header, sizeof(x->header), "%.*s", (int)vl, v);
	}
	if (len > sizeof(name) - 1 && len < 256 && strncasecmp(p, name, sizeof(name) - 1) == 0) {
		char v[256], *end;
		unsigned long long secs;
		time_t when;

		memcpy(v, p + sizeof(name) - 1, len - (sizeof(name) - 1));
		v[len - (sizeof(name) - 1)] = '\0';
		v[strcspn(v, "\r\n")] = '\0';
		errno = 0;
		secs = strtoull(v, &end, 10);
		if (!errno && end != v && *end == '\0' && secs < 86400ull * 365)
			x->retry_after_ms = secs * 1000;
		else if ((when = curl_getdate(v + strspn(v, " \t"), NULL)) > 0)
			x->retry_after_ms = when > time(NULL) ? (uint64_t)(when - time(NULL)) * 1000 : 0;
	}
	return len;
}

static size_t on_read(char *p, size_t size, size_t n, void *arg)
{
	struct xfer *x = arg;
	size_t want = size * n;
	long long got;

	if (x->sent >= x->source_len)
		return 0;
	if (want > x->source_len - x->sent)
		want = (size_t)(x->source_len - x->sent);
	got = x->source(x->source_arg, p, want, x->sent);
	if (got <= 0) {
		/* A short source is a failure too: the length was announced. */
		x->source_failed = true;
		return CURL_READFUNC_ABORT;
	}
	x->sent += (uint64_t)got;
	return (size_t)got;
}

static curl_socket_t on_open_socket(void *arg, curlsocktype purpose, struct curl_sockaddr *a)
{
	struct xfer *x = arg;

	(void)purpose;
	if (http_deny_match(x->loop->deny, &a->addr)) {
		const void *in = a->family == AF_INET
					 ? (const void *)&((struct sockaddr_in *)&a->addr)->sin_addr
					 : (const void *)&((struct sockaddr_in6 *)&a->addr)->sin6_addr;
		x->denied = true;
		inet_ntop(a->family, in, x->denied_addr, sizeof(x->denied_addr));
		return CURL_SOCKET_BAD;
	}
	return socket(a->family, a->socktype, a->protocol);
}

/* scheme://host[:port]/path of a URL: no user, query or fragment. */
static char *url_shown(const char *url)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *out = NULL;

	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
		curl_url_get(u, CURLUPART_PORT, &port, 0);
		curl_url_get(u, CURLUPART_PATH, &path, 0);
		if (asprintf(&out, "%s://%s%s%s%s", scheme, host, port ? ":" : "", port ? port : "",
			     path ? path : "/") < 0)
			out = NULL;
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_free(path);
	curl_url_cleanup(u);
	return out ? out : strdup("(an unparsable URL)");
}

/* Replace every secret in s (NUL-terminated, of capacity cap) by ***. */
static void redact(char *s, size_t cap, char *const *secrets, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		size_t sl = strlen(secrets[i]);
		char *p = s;

		if (!sl)
			continue;
		while ((p = strstr(p, secrets[i])) != NULL) {
			size_t at = (size_t)(p - s), tail = strlen(p + sl);

			if (at + 3 + tail + 1 > cap)
				tail = cap - at - 4; /* cut at the end: the secret goes */
			memmove(p + 3, p + sl, tail);
			p[3 + tail] = '\0';
			memcpy(p, "***", 3);
			p += 3; /* after what was put in: a secret of stars ends too */
		}
	}
}

static const char *status_code(long status)
{
	if (status >= 200 && status < 300)
		return NULL;
	if (status == 401 || status == 403)
		return "backend_auth";
	if (status == 408 || status == 429 || status >= 500)
		return "backend_unavailable";
	return "backend_rejected"; /* other 4xx, and 3xx: redirects are not followed */
}

/* The response of a finished (or cancelled) transfer. */
static void respond(struct xfer *x, CURLcode cc, bool cancelled)
{
	struct http_response r = {0};
	long status = 0;

	if (x->body)
		x->body[x->len] = '\0'; /* on_body keeps a byte for it */
	r.body = x->body ? x->body : "";
	r.len = x->body ? x->len : 0;
	r.retry_after_ms = x->retry_after_ms;
	snprintf(r.header, sizeof(r.header), "%s", x->header);
	r.streamed = x->streamed;
	r.maybe_sent = !cancelled || x->added;
	if (x->easy) {
		char *ct = NULL;
		if (curl_easy_getinfo(x->easy, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct)
			snprintf(r.content_type, sizeof(r.content_type), "%s", ct);
	}
	if (cancelled) {
		r.cancelled = true;
		snprintf(r.message, sizeof(r.message), "%s %s: cancelled", x->method, x->shown);
	} else if (x->denied) {
		r.maybe_sent = false;
		r.error_code = "backend_rejected";
		snprintf(r.message, sizeof(r.message),
			 "%s %s: refused to connect to %s, which deny_net= excludes", x->method,
			 x->shown, x->denied_addr);
	} else if (x->too_big || cc == CURLE_FILESIZE_EXCEEDED) {
		r.error_code = x->sink ? "output_invalid" : "backend_failed";
		snprintf(r.message, sizeof(r.message), "%s %s: the answer is over %zu bytes",
			 x->method, x->shown, x->max);
	} else if (x->source_failed) {
		r.maybe_sent = false;
		r.error_code = "store";
		snprintf(r.message, sizeof(r.message), "%s %s: cannot read what is to be sent",
			 x->method, x->shown);
	} else if (x->sink_failed) {
		r.error_code = "store";
		snprintf(r.message, sizeof(r.message), "%s %s: %s", x->method, x->shown,
			 x->sink_err[0] ? x->sink_err : "cannot keep the answer");
	} else if (cc != CURLE_OK) {
		if (cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST ||
		    cc == CURLE_COULDNT_RESOLVE_PROXY || cc == CURLE_UNSUPPORTED_PROTOCOL ||
		    cc == CURLE_URL_MALFORMAT || cc == CURLE_SSL_CONNECT_ERROR)
			r.maybe_sent = false;
		r.error_code = cc == CURLE_UNSUPPORTED_PROTOCOL || cc == CURLE_URL_MALFORMAT
				       ? "backend_rejected"
				       : "backend_unavailable";
		snprintf(r.message, sizeof(r.message), "%s %s: %s", x->method, x->shown,
			 curl_easy_strerror(cc));
	} else {
		curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
		r.status = status;
		r.error_code = status_code(status);
		if (r.error_code) {
			char snippet[160];
			size_t k = 0;
			for (size_t i = 0; i < r.len && k + 1 < sizeof(snippet); i++)
				snippet[k++] = (r.body[i] >= 0x20 && r.body[i] < 0x7f) ? r.body[i] : ' ';
			snippet[k] = '\0';
			snprintf(r.message, sizeof(r.message), "%s %s: HTTP %ld%s%s%s", x->method,
				 x->shown, status, status >= 300 && status < 400
							   ? " (redirects are not followed)"
							   : "",
				 k ? ": " : "", snippet);
		}
	}
	redact(r.message, sizeof(r.message), x->secrets, x->nsecrets);
	x->done(x->arg, &r);
}

static int xfer_setup(struct xfer *x, const struct http_request *rq)
{
	CURL *e = x->easy;
	uint64_t timeout = rq->timeout_ms ? rq->timeout_ms : 60000;

	for (size_t i = 0; i < rq->nheaders; i++) {
		struct curl_slist *h = curl_slist_append(x->hdrs, rq->headers[i]);
		if (!h)
			return -ENOMEM;
		x->hdrs = h;
	}
	if (rq->body_len) {
		if (!(x->req_body = malloc(rq->body_len)))
			return -ENOMEM;
		memcpy(x->req_body, rq->body, rq->body_len);
	}
	if (curl_easy_setopt(e, CURLOPT_URL, rq->url) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK)
		return -EINVAL;
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)timeout);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(timeout < 10000 ? timeout : 10000));
	curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)x->max);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->hdrs);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "renderfs");
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, x);
	curl_easy_setopt(e, CURLOPT_PRIVATE, x);
	if (rq->stall_ms) {
		curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
		curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (long)((rq->stall_ms + 999) / 1000));
	}
	if (rq->aws_sigv4) {
		if (curl_easy_setopt(e, CURLOPT_AWS_SIGV4, rq->aws_sigv4) != CURLE_OK ||
		    curl_easy_setopt(e, CURLOPT_USERPWD, rq->userpwd ? rq->userpwd : "") != CURLE_OK)
			return -ENOTSUP;
	}
	if (strcmp(x->method, "GET") == 0) {
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	} else if (strcmp(x->method, "HEAD") == 0) {
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	} else if (rq->source) {
		x->source = rq->source;
		x->source_arg = rq->source_arg;
		x->source_len = rq->source_len;
		curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
		if (strcmp(x->method, "PUT") != 0)
			curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, x->method);
		curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)rq->source_len);
		/* curl asks for a 100 Continue before a large body (an "Expect:"
		 * header to stop it would be signed by SigV4 in curl 7.88 and
		 * not sent): wait for it briefly. */
		curl_easy_setopt(e, CURLOPT_EXPECT_100_TIMEOUT_MS, 200L);
		curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
		curl_easy_setopt(e, CURLOPT_READDATA, x);
	} else {
		if (strcmp(x->method, "POST") != 0)
			curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, x->method);
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->req_body ? x->req_body : "");
	}
	return 0;
}

int http_submit(struct http_loop *l, const struct http_request *rq, http_done_fn done, void *arg,
		uint64_t *id)
{
	struct xfer *x = calloc(1, sizeof(*x));
	int rc = -ENOMEM;

	if (!x)
		return -ENOMEM;
	x->loop = l;
	x->done = done;
	x->arg = arg;
	x->max = rq->max_body ? rq->max_body : 1 << 20;
	x->sink = rq->sink;
	x->sink_arg = rq->sink_arg;
	if (rq->want_header && strlen(rq->want_header) + 2 <= sizeof(x->want))
		snprintf(x->want, sizeof(x->want), "%s:", rq->want_header);
	if (!(x->method = strdup(rq->method ? rq->method : "GET")) ||
	    !(x->shown = url_shown(rq->url)) || !(x->easy = curl_easy_init()) ||
	    (rq->nsecrets && !(x->secrets = calloc(rq->nsecrets, sizeof(char *)))))
		goto fail;
	for (size_t i = 0; i < rq->nsecrets; i++, x->nsecrets++)
		if (!(x->secrets[i] = strdup(rq->secrets[i])))
			goto fail;
	if ((rc = xfer_setup(x, rq)) != 0)
		goto fail;
	pthread_mutex_lock(&l->mu);
	if (l->stop) {
		pthread_mutex_unlock(&l->mu);
		rc = -ESHUTDOWN;
		goto fail;
	}
	x->id = ++l->next_id;
	x->next = l->xfers;
	if (l->xfers)
		l->xfers->prev = x;
	l->xfers = x;
	if (l->incoming_tail)
		l->incoming_tail->inext = x;
	else
		l->incoming = x;
	l->incoming_tail = x;
	if (id)
		*id = x->id;
	pthread_mutex_unlock(&l->mu);
	loop_wake(l);
	return 0;
fail:
	xfer_free(x);
	return rc;
}

void http_cancel(struct http_loop *l, uint64_t id)
{
	pthread_mutex_lock(&l->mu);
	for (struct xfer *x = l->xfers; x; x = x->next)
		if (x->id == id) {
			x->cancel = true;
			l->cancels = true;
		}
	pthread_mutex_unlock(&l->mu);
	loop_wake(l);
}

/* Under mu: take x out of the list. */
static void unlink_xfer(struct http_loop *l, struct xfer *x)
{
	if (x->prev)
		x->prev->next = x->next;
	else if (l->xfers == x)
		l->xfers = x->next;
	if (x->next)
		x->next->prev = x->prev;
	x->next = x->prev = NULL;
}

/* curl's CURLMOPT_SOCKETFUNCTION: what it wants to hear of socket s. */
static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct http_loop *l = userp;
	struct epoll_event ev = {0};

	(void)easy;
	(void)socketp;
	if (what == CURL_POLL_REMOVE) {
		epoll_ctl(l->ep, EPOLL_CTL_DEL, s, NULL);
		return 0;
	}
	ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) | (what & CURL_POLL_OUT ? EPOLLOUT : 0);
	ev.data.fd = s;
	if (epoll_ctl(l->ep, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
		epoll_ctl(l->ep, EPOLL_CTL_ADD, s, &ev);
	return 0;
}

/* curl's CURLMOPT_TIMERFUNCTION: call it back (CURL_SOCKET_TIMEOUT) in
 * timeout_ms; -1: never. Called from within curl: only noted here. */
static int on_timer(CURLM *multi, long timeout_ms, void *userp)
{
	struct http_loop *l = userp;

	(void)multi;
	l->timer_at = timeout_ms < 0 ? 0 : mono_ms() + (uint64_t)timeout_ms;
	return 0;
}

/* Every finished transfer: its answer to its owner. */
static void finish_done(struct http_loop *l)
{
	CURLMsg *m;
	int left;

	while ((m = curl_multi_info_read(l->multi, &left)) != NULL) {
		struct xfer *x;

		if (m->msg != CURLMSG_DONE)
			continue;
		CURL *e = m->easy_handle;
		CURLcode cc = m->data.result;
		curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&x);
		curl_multi_remove_handle(l->multi, e);
		pthread_mutex_lock(&l->mu);
		unlink_xfer(l, x);
		pthread_mutex_unlock(&l->mu);
		respond(x, cc, false);
		xfer_free(x);
	}
}

static void *loop_main(void *arg)
{
	struct http_loop *l = arg;
	struct epoll_event evs[64];

	for (;;) {
		struct xfer *ended = NULL, *in, *x, *next;
		int running, n, wait_ms;
		bool stop;

		/* New transfers in, cancelled ones out. */
		pthread_mutex_lock(&l->mu);
		stop = l->stop;
		in = l->incoming;
		l->incoming = l->incoming_tail = NULL;
		if (stop || l->cancels) {
			for (x = l->xfers; x; x = next) {
				next = x->next;
				if (!x->cancel && !stop)
					continue;
				if (x->added)
					curl_multi_remove_handle(l->multi, x->easy);
				unlink_xfer(l, x);
				x->ended = true;
				x->next = ended;
				ended = x;
			}
			l->cancels = false;
		}
		for (x = in; x; x = x->inext) {
			if (x->ended) /* cancelled before it was added */
				continue;
			x->added = curl_multi_add_handle(l->multi, x->easy) == CURLM_OK;
			if (x->added)
				continue;
			/* One that curl would not take fails now (out of memory). */
			unlink_xfer(l, x);
			x->ended = true;
			x->next = ended;
			ended = x;
		}
		pthread_mutex_unlock(&l->mu);
		for (x = ended; x; x = next) {
			next = x->next;
			respond(x, x->cancel || stop ? CURLE_OK : CURLE_OUT_OF_MEMORY,
				x->cancel || stop);
			xfer_free(x);
		}
		if (stop)
			return NULL;

		uint64_t now = mono_ms();
		if (l->timer_at && l->timer_at <= now) {
			l->timer_at = 0;
			curl_multi_socket_action(l->multi, CURL_SOCKET_TIMEOUT, 0, &running);
			finish_done(l);
			continue; /* the timer may have been set again for now */
		}
		wait_ms = 1000;
		if (l->timer_at && l->timer_at - now < (uint64_t)wait_ms)
			wait_ms = (int)(l->timer_at - now);
		n = epoll_wait(l->ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), wait_ms);
		for (int i = 0; i < n; i++) {
			if (evs[i].data.fd == l->evfd) {
				uint64_t v;
				/* Drain it (EAGAIN: nothing left, fine). */
				ssize_t r = read(l->evfd, &v, sizeof(v));

				(void)r;
				continue;
			}
			int flags = (evs[i].events & EPOLLIN ? CURL_CSELECT_IN : 0) |
				    (evs[i].events & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
				    (evs[i].events & (EPOLLERR | EPOLLHUP) ? CURL_CSELECT_ERR : 0);
			curl_multi_socket_action(l->multi, evs[i].data.fd, flags, &running);
		}
		finish_done(l);
	}
}

static void loop_free(struct http_loop *l)
{
	if (l->multi)
		curl_multi_cleanup(l->multi);
	if (l->ep >= 0)
		close(l->ep);
	if (l->evfd >= 0)
		close(l->evfd);
	pthread_mutex_destroy(&l->mu);
	free(l);
}

int http_loop_start(const struct http_deny *deny, struct http_loop **out)
{
	struct http_loop *l;

	pthread_once(&global_once, global_init);
	if (global_rc != CURLE_OK)
		return -EIO;
	if (!(l = calloc(1, sizeof(*l))))
		return -ENOMEM;
	l->deny = deny;
	l->ep = l->evfd = -1;
	pthread_mutex_init(&l->mu, NULL);
	struct epoll_event ev = {.events = EPOLLIN};
	if (!(l->multi = curl_multi_init()) || (l->ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
	    (l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
	    (ev.data.fd = l->evfd, epoll_ctl(l->ep, EPOLL_CTL_ADD, l->evfd, &ev)) != 0) {
		int rc = errno ? -errno : -ENOMEM;
		loop_free(l);
		return rc;
	}
	curl_multi_setopt(l->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(l->multi, CURLMOPT_SOCKETDATA, l);
	curl_multi_setopt(l->multi, CURLMOPT_TIMERFUNCTION, on_timer);
	curl_multi_setopt(l->multi, CURLMOPT_TIMERDATA, l);
	if (pthread_create(&l->thread, NULL, loop_main, l) != 0) {
		loop_free(l);
		return -EAGAIN;
	}
	pthread_setname_np(l->thread, "rfs-http");
	*out = l;
	return 0;
}

void http_loop_stop(struct http_loop *l)
{
	if (!l)
		return;
	pthread_mutex_lock(&l->mu);
	l->stop = true;
	pthread_mutex_unlock(&l->mu);
	loop_wake(l);
	pthread_join(l->thread, NULL);
	loop_free(l);
}
