/*
 * ws.c - a WebSocket client over plain http:// (ws.h).
 *
 * DESIGN
 *
 * One non-blocking socket; every wait is a poll() on it and on the
 * caller's wake descriptor with what is left of a deadline. Frames are
 * taken from c->buf only when whole (a frame larger than the buffer is
 * skipped as its bytes arrive: c->skip counts what is still to come), so
 * a read that times out in the middle of a frame loses nothing. Frames
 * from the server are not masked (RFC 6455 5.1) but one that is masked is
 * unmasked; what the client sends (pong, close) is masked, as it must be.
 * The handshake's Sec-WebSocket-Accept is checked with SHA-1 (RFC 3174),
 * kept here: libsodium has no SHA-1 and nothing else needs it.
 */
#include "ws.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "http.h"

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_HEADERS_MAX 8192

enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2, OP_CLOSE = 8, OP_PING = 9, OP_PONG = 10 };

/* ---- SHA-1, for the handshake only ---- */

static uint32_t rol(uint32_t x, int n)
{
	return (x << n) | (x >> (32 - n));
}

static void sha1_block(uint32_t h[5], const uint8_t *p)
{
	uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];

	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 80; i++)
		w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
	for (int i = 0; i < 80; i++) {
		uint32_t f, k, t;
		if (i < 20) {
			f = (b & c) | (~b & d);
			k = 0x5A827999;
		} else if (i < 40) {
			f = b ^ c ^ d;
			k = 0x6ED9EBA1;
		} else if (i < 60) {
			f = (b & c) | (b & d) | (c & d);
			k = 0x8F1BBCDC;
		} else {
			f = b ^ c ^ d;
			k = 0xCA62C1D6;
		}
		t = rol(a, 5) + f + e + k + w[i];
		e = d;
		d = c;
		c = rol(b, 30);
		b = a;
		a = t;
	}
	h[0] += a;
	h[1] += b;
	h[2] += c;
	h[3] += d;
	h[4] += e;
}

static void sha1(const uint8_t *p, size_t n, uint8_t out[20])
{
	uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
	uint8_t last[128] = {0};
	size_t full = n / 64 * 64, rest = n - full, tail;
	uint64_t bits = (uint64_t)n * 8;

	for (size_t i = 0; i < full; i += 64)
		sha1_block(h, p + i);
	memcpy(last, p + full, rest);
	last[rest] = 0x80;
	tail = rest + 1 + 8 <= 64 ? 64 : 128;
	for (int i = 0; i < 8; i++)
		last[tail - 1 - i] = (uint8_t)(bits >> (8 * i));
	for (size_t i = 0; i < tail; i += 64)
		sha1_block(h, last + i);
	for (int i = 0; i < 5; i++) {
		out[4 * i] = (uint8_t)(h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(h[i] >> 8);
		out[4 * i + 3] = (uint8_t)h[i];
	}
}

/* ---- waiting ---- */

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events, wake is readable, or the deadline:
 * 1 ready, 0 deadline, -EINTR wake, -errno. */
static int wait_fd(int fd, short events, int wake, int64_t deadline)
{
	for (;;) {
		struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = wake, .events = POLLIN}};
		int64_t left = deadline - mono_ms();
		int n;

		if (left <= 0)
			return 0;
		n = poll(p, wake >= 0 ? 2 : 1, left > 60000 ? 60000 : (int)left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (wake >= 0 && (p[1].revents & POLLIN))
			return -EINTR;
		if (n > 0 && p[0].revents)
			return 1;
	}
}

static int send_all(struct ws_conn *c, const void *data, size_t n, int wake, int64_t deadline)
{
	const uint8_t *p = data;

	while (n > 0) {
		ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
			continue;
		}
		if (k < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
		int rc = wait_fd(c->fd, POLLOUT, wake, deadline);
		if (rc <= 0)
			return rc ? rc : -ETIMEDOUT;
	}
	return 0;
}

/* Receive what is there into c->buf: 1 bytes came, 0 deadline, <0. */
static int recv_some(struct ws_conn *c, int wake, int64_t deadline)
{
	for (;;) {
		ssize_t k;

		if (c->have == sizeof(c->buf))
			return -EPROTO; /* cannot happen: frames are taken or skipped */
		k = recv(c->fd, c->buf + c->have, sizeof(c->buf) - c->have, 0);
		if (k > 0) {
			c->have += (size_t)k;
			return 1;
		}
		if (k == 0)
			return -ECONNRESET;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
		int rc = wait_fd(c->fd, POLLIN, wake, deadline);
		if (rc <= 0)
			return rc;
	}
}

/* ---- opening ---- */

static int fail(char *err, size_t errlen, int rc, const char *fmt, const char *arg)
{
	snprintf(err, errlen, fmt, arg);
	return rc;
}

/* Split "http://host[:port]/path": 0 or -EINVAL / -EPROTONOSUPPORT. */
static int parse_url(const char *url, char *host, size_t hlen, char *port, size_t plen,
		     const char **path)
{
	const char *h, *end, *colon;

	if (strncmp(url, "https://", 8) == 0)
		return -EPROTONOSUPPORT;
	if (strncmp(url, "http://", 7) != 0)
		return -EINVAL;
	h = url + 7;
	end = h + strcspn(h, "/?");
	*path = *end ? end : "/";
	if (*h == '[') { /* [v6]:port */
		const char *close = memchr(h, ']', (size_t)(end - h));
		if (!close || (size_t)(close - h - 1) >= hlen)
			return -EINVAL;
		snprintf(host, hlen, "%.*s", (int)(close - h - 1), h + 1);
		colon = close[1] == ':' ? close + 1 : NULL;
	} else {
		colon = memchr(h, ':', (size_t)(end - h));
		size_t n = (size_t)((colon ? colon : end) - h);
		if (n == 0 || n >= hlen)
			return -EINVAL;
		snprintf(host, hlen, "%.*s", (int)n, h);
	}
	if (colon && (size_t)(end - colon - 1) > 0 && (size_t)(end - colon - 1) < plen)
		snprintf(port, plen, "%.*s", (int)(end - colon - 1), colon + 1);
	else
		snprintf(port, plen, "80");
	return 0;
}

static int connect_to(struct ws_conn *c, const char *host, const char *port,
		      const struct http_deny *deny, int wake, int64_t deadline, char *err,
		      size_t errlen)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *a;
	int rc = -EHOSTUNREACH, g;

	if ((g = getaddrinfo(host, port, &hints, &res)) != 0)
		return fail(err, errlen, -EHOSTUNREACH, "cannot resolve '%s'", host);
	snprintf(err, errlen, "cannot connect to '%s'", host);
	for (a = res; a; a = a->ai_next) {
		int fd, so = 0;
		socklen_t sl = sizeof(so);
		if (deny && http_deny_match(deny, a->ai_addr)) {
			rc = -EACCES;
			snprintf(err, errlen, "'%s' is in deny_net=", host);
			continue;
		}
		fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    a->ai_protocol);
		if (fd < 0)
			continue;
		if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 ||
		    (errno == EINPROGRESS && (g = wait_fd(fd, POLLOUT, wake, deadline)) == 1 &&
		     getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) == 0 && so == 0)) {
			c->fd = fd;
			rc = 0;
			break;
		}
		close(fd);
		if (errno == EINPROGRESS && g == -EINTR) {
			rc = -EINTR;
			break;
		}
		rc = so ? -so : -ECONNREFUSED;
	}
	freeaddrinfo(res);
	return rc;
}

/* The value of header name in the head (lines after the status line),
 * copied into out; false when absent. */
static bool header(const char *head, const char *name, char *out, size_t len)
{
	size_t n = strlen(name);

	for (const char *l = strstr(head, "\r\n"); l && l[2]; l = strstr(l + 2, "\r\n")) {
		const char *s = l + 2;
		if (strncasecmp(s, name, n) == 0 && s[n] == ':') {
			s += n + 1;
			s += strspn(s, " \t");
			snprintf(out, len, "%.*s", (int)strcspn(s, "\r\n"), s);
			return true;
		}
	}
	return false;
}

int ws_open(struct ws_conn *c, const char *url, const struct http_deny *deny, int wake,
	    int timeout_ms, char *err, size_t errlen)
{
	char host[256], port[16], req[2048], key[32], want[32], got[64], up[32];
	uint8_t nonce[16], digest[20];
	const char *path, *end;
	int64_t deadline = mono_ms() + timeout_ms;
	int rc, n;

	c->fd = -1;
	c->have = c->skip = c->msg_len = 0;
	c->skip_msg = c->up = 0;
	if ((rc = parse_url(url, host, sizeof(host), port, sizeof(port), &path)) != 0)
		return fail(err, errlen, rc, "'%s' is not an http:// URL", url);
	if ((rc = connect_to(c, host, port, deny, wake, deadline, err, errlen)) != 0)
		return rc;
	randombytes_buf(nonce, sizeof(nonce));
	sodium_bin2base64(key, sizeof(key), nonce, sizeof(nonce), sodium_base64_VARIANT_ORIGINAL);
	n = snprintf(req, sizeof(req),
		     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
		     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
		     "Sec-WebSocket-Version: 13\r\n\r\n",
		     path, host, port, key);
	if (n < 0 || (size_t)n >= sizeof(req)) {
		ws_close(c);
		return fail(err, errlen, -E2BIG, "the URL '%s' is too long", url);
	}
	if ((rc = send_all(c, req, (size_t)n, wake, deadline)) != 0) {
		ws_close(c);
		return fail(err, errlen, rc, "cannot send the handshake to '%s'", host);
	}
	/* The answer's head: up to the blank line, within WS_HEADERS_MAX. */
	for (;;) {
		c->buf[c->have < sizeof(c->buf) ? c->have : sizeof(c->buf) - 1] = 0;
		if ((end = strstr((const char *)c->buf, "\r\n\r\n")) != NULL)
			break;
		if (c->have >= WS_HEADERS_MAX) {
			ws_close(c);
			return fail(err, errlen, -EPROTO, "'%s' answered a head too long", host);
		}
		rc = recv_some(c, wake, deadline);
		if (rc <= 0) {
			ws_close(c);
			return fail(err, errlen, rc ? rc : -ETIMEDOUT,
				    "no WebSocket handshake answer from '%s'", host);
		}
	}
	if (strncmp((const char *)c->buf, "HTTP/1.1 101", 12) != 0 ||
	    !header((const char *)c->buf, "Upgrade", up, sizeof(up)) ||
	    strcasecmp(up, "websocket") != 0 ||
	    !header((const char *)c->buf, "Sec-WebSocket-Accept", got, sizeof(got))) {
		ws_close(c);
		return fail(err, errlen, -EPROTO, "'%s' did not switch to a WebSocket", host);
	}
	n = snprintf(req, sizeof(req), "%s%s", key, WS_GUID);
	sha1((const uint8_t *)req, (size_t)n, digest);
	sodium_bin2base64(want, sizeof(want), digest, sizeof(digest),
			  sodium_base64_VARIANT_ORIGINAL);
	if (strcmp(want, got) != 0) {
		ws_close(c);
		return fail(err, errlen, -EPROTO, "'%s' answered a wrong Sec-WebSocket-Accept",
			    host);
	}
	size_t used = (size_t)(end + 4 - (const char *)c->buf);
	memmove(c->buf, c->buf + used, c->have - used);
	c->have -= used;
	c->up = 1;
	return 0;
}

/* ---- frames ---- */

/* Send a control frame (masked, as a client must). */
static int send_control(struct ws_conn *c, int op, const uint8_t *payload, size_t n, int wake,
			int64_t deadline)
{
	uint8_t f[2 + 4 + 125];

	if (n > 125)
		n = 125;
	f[0] = (uint8_t)(0x80 | op);
	f[1] = (uint8_t)(0x80 | n);
	randombytes_buf(f + 2, 4);
	for (size_t i = 0; i < n; i++)
		f[6 + i] = payload[i] ^ f[2 + i % 4];
	return send_all(c, f, 6 + n, wake, deadline);
}

int ws_read(struct ws_conn *c, char *out, size_t cap, size_t *len, int wake, int timeout_ms)
{
	int64_t deadline = mono_ms() + timeout_ms;
	int rc;

	if (c->fd < 0)
		return -ENOTCONN;
	for (;;) {
		/* A skipped frame's payload goes as it arrives. */
		if (c->skip) {
			size_t k = c->have < c->skip ? c->have : (size_t)c->skip;
			memmove(c->buf, c->buf + k, c->have - k);
			c->have -= k;
			c->skip -= k;
		}
		if (!c->skip && c->have >= 2) {
			uint8_t b0 = c->buf[0], b1 = c->buf[1];
			int op = b0 & 0x0f;
			bool fin = b0 & 0x80, masked = b1 & 0x80;
			uint64_t plen = b1 & 0x7f;
			size_t hlen = 2;

			if (b0 & 0x70)
				return -EPROTO; /* no extension was agreed */
			if (plen == 126) {
				if (c->have < 4)
					goto more;
				plen = (uint64_t)c->buf[2] << 8 | c->buf[3];
				hlen = 4;
			} else if (plen == 127) {
				if (c->have < 10)
					goto more;
				plen = 0;
				for (int i = 0; i < 8; i++)
					plen = plen << 8 | c->buf[2 + i];
				if (plen >> 63)
					return -EPROTO; /* the most significant bit must be 0 */
				hlen = 10;
			}
			if (masked)
				hlen += 4;
			if (c->have < hlen)
				goto more;
			if (op >= OP_CLOSE && (plen > 125 || !fin))
				return -EPROTO;
			/* Compared without sums that could wrap. */
			if (plen > sizeof(c->buf) - hlen ||
			    ((op == OP_TEXT || op == OP_CONT) && !c->skip_msg &&
			     (op == OP_TEXT ? plen >= cap : plen >= cap - c->msg_len)) ||
			    op == OP_BINARY || (op == OP_CONT && c->skip_msg)) {
				/* Not wanted, or too long: skipped. */
				if (op == OP_TEXT || op == OP_BINARY || op == OP_CONT)
					c->skip_msg = !fin;
				if (op == OP_TEXT || op == OP_CONT)
					c->msg_len = 0;
				memmove(c->buf, c->buf + hlen, c->have - hlen);
				c->have -= hlen;
				c->skip = plen;
				continue;
			}
			if (c->have < hlen + plen)
				goto more;
			uint8_t *pl = c->buf + hlen;
			if (masked)
				for (uint64_t i = 0; i < plen; i++)
					pl[i] ^= c->buf[hlen - 4 + i % 4];
			rc = 0;
			if (op == OP_PING) {
				rc = send_control(c, OP_PONG, pl, (size_t)plen, wake, deadline);
			} else if (op == OP_CLOSE) {
				send_control(c, OP_CLOSE, pl, plen >= 2 ? 2 : 0, wake, deadline);
				return -ECONNRESET;
			} else if (op == OP_TEXT || op == OP_CONT) {
				if (op == OP_TEXT)
					c->msg_len = 0;
				memcpy(out + c->msg_len, pl, (size_t)plen);
				c->msg_len += (size_t)plen;
				if (fin) {
					out[c->msg_len] = '\0';
					*len = c->msg_len;
					c->msg_len = 0;
					rc = 1;
				}
			} /* OP_PONG and unknown: nothing */
			memmove(c->buf, c->buf + hlen + plen, c->have - hlen - (size_t)plen);
			c->have -= hlen + (size_t)plen;
			if (rc != 0)
				return rc;
			continue;
		}
	more:
		if ((rc = recv_some(c, wake, deadline)) <= 0)
			return rc;
	}
}

void ws_close(struct ws_conn *c)
{
	uint8_t code[2] = {0x03, 0xe8}; /* 1000: normal closure */

	if (c->fd < 0)
		return;
	if (c->up)
		send_control(c, OP_CLOSE, code, 2, -1, mono_ms() + 100);
	c->up = 0;
	close(c->fd);
	c->fd = -1;
	c->have = c->skip = c->msg_len = 0;
	c->skip_msg = 0;
}
