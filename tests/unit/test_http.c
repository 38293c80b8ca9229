/*
 * test_http.c - engine/http.c against a small HTTP server in this process
 * (127.0.0.1, one thread per connection): answers and their catalog codes,
 * Retry-After, no redirects, bounded answers, deadlines, cancellation,
 * deny_net= (no connection made), secrets kept out of messages, and 50
 * slow requests in flight at once on the loop's single thread.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "http.h"

static int port;
static atomic_int connections;

static void send_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n <= 0)
			return;
		p += n;
		len -= (size_t)n;
	}
}

static void reply(int fd, const char *status, const char *extra, const char *body, size_t blen,
		  bool with_length)
{
	char head[512];
	int n = with_length ? snprintf(head, sizeof(head),
				       "HTTP/1.1 %s\r\n%sContent-Length: %zu\r\nConnection: close\r\n\r\n",
				       status, extra, blen)
			    : snprintf(head, sizeof(head), "HTTP/1.1 %s\r\n%sConnection: close\r\n\r\n",
				       status, extra);
	send_all(fd, head, (size_t)n);
	send_all(fd, body, blen);
}

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char req[8192], path[256] = "";
	size_t got = 0;
	char *end = NULL;

	while (got < sizeof(req) - 1) {
		ssize_t n = recv(fd, req + got, sizeof(req) - 1 - got, 0);
		if (n <= 0)
			break;
		got += (size_t)n;
		req[got] = '\0';
		if ((end = strstr(req, "\r\n\r\n")) != NULL) {
			char *cl = strcasestr(req, "Content-Length:");
			size_t want = cl ? strtoul(cl + 15, NULL, 10) : 0;
			if (got - (size_t)(end + 4 - req) >= want)
				break;
		}
	}
	sscanf(req, "%*s %255s", path);
	if (strcmp(path, "/ok") == 0) {
		reply(fd, "200 OK", "", "hello", 5, true);
	} else if (strcmp(path, "/busy") == 0) {
		reply(fd, "503 Service Unavailable", "Retry-After: 7\r\n", "try later", 9, true);
	} else if (strncmp(path, "/auth", 5) == 0) {
		reply(fd, "401 Unauthorized", "", "bad key s3cr3t", 14, true);
	} else if (strcmp(path, "/bad") == 0) {
		reply(fd, "400 Bad Request", "", "no", 2, true);
	} else if (strcmp(path, "/redirect") == 0) {
		reply(fd, "302 Found", "Location: /ok\r\n", "", 0, true);
	} else if (strcmp(path, "/big") == 0 || strcmp(path, "/bignolen") == 0) {
		static char big[100000];
		memset(big, 'x', sizeof(big));
		reply(fd, "200 OK", "", big, sizeof(big), strcmp(path, "/big") == 0);
	} else if (strncmp(path, "/slow", 5) == 0) {
		usleep((useconds_t)atoi(path + 5) * 1000);
		reply(fd, "200 OK", "", "late", 4, true);
	} else if (strcmp(path, "/echo") == 0 && end) {
		reply(fd, "200 OK", "", end + 4, got - (size_t)(end + 4 - req), true);
	} else {
		reply(fd, "404 Not Found", "", "", 0, true);
	}
	close(fd);
	return NULL;
}

static void *server_main(void *arg)
{
	int lfd = (int)(intptr_t)arg;

	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		pthread_t t;
		if (fd < 0)
			return NULL;
		atomic_fetch_add(&connections, 1);
		if (pthread_create(&t, NULL, serve, (void *)(intptr_t)fd) == 0)
			pthread_detach(t);
		else
			close(fd);
	}
}

static void server_start(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof(a);
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	pthread_t t;

	REQUIRE(lfd >= 0 && bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
			listen(lfd, 128) == 0 && getsockname(lfd, (struct sockaddr *)&a, &al) == 0,
		"server socket");
	port = ntohs(a.sin_port);
	REQUIRE(pthread_create(&t, NULL, server_main, (void *)(intptr_t)lfd) == 0, "server");
	pthread_detach(t);
}

/* ---- waiting for answers ---- */

struct result {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool done;
	struct http_response r;
	char body[256];
};

static void on_done(void *arg, const struct http_response *r)
{
	struct result *res = arg;

	pthread_mutex_lock(&res->mu);
	res->r = *r;
	snprintf(res->body, sizeof(res->body), "%.*s", (int)(r->len < 255 ? r->len : 255), r->body);
	res->r.body = NULL;
	res->done = true;
	pthread_cond_broadcast(&res->cv);
	pthread_mutex_unlock(&res->mu);
}

static void result_init(struct result *res)
{
	memset(res, 0, sizeof(*res));
	pthread_mutex_init(&res->mu, NULL);
	pthread_cond_init(&res->cv, NULL);
}

static bool result_wait(struct result *res, int ms)
{
	struct timespec ts;
	bool done;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&res->mu);
	while (!res->done && pthread_cond_timedwait(&res->cv, &res->mu, &ts) == 0)
		;
	done = res->done;
	pthread_mutex_unlock(&res->mu);
	return done;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One request; its result in *res (waited for up to 10 s). */
static void fetch(struct http_loop *l, struct http_request *rq, const char *path,
		  struct result *res)
{
	char url[256];

	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
	rq->url = url;
	result_init(res);
	REQUIRE(http_submit(l, rq, on_done, res, NULL) == 0, "submit %s", path);
	REQUIRE(result_wait(res, 10000), "%s answered", path);
}

static bool same(const char *a, const char *b)
{
	return a == b || (a && b && strcmp(a, b) == 0);
}

static void test_answers(struct http_loop *l)
{
	static const char *const secrets[] = {"s3cr3t"};
	struct http_request rq = {.method = "GET", .max_body = 1000};
	struct result r;

	fetch(l, &rq, "/ok", &r);
	CHECK(r.r.status == 200 && !r.r.error_code && strcmp(r.body, "hello") == 0,
	      "200: %ld %s '%s'", r.r.status, r.r.error_code, r.body);
	fetch(l, &rq, "/busy", &r);
	CHECK(r.r.status == 503 && same(r.r.error_code, "backend_unavailable") &&
		      r.r.retry_after_ms == 7000,
	      "503 with Retry-After: %s %llu", r.r.error_code,
	      (unsigned long long)r.r.retry_after_ms);
	rq.secrets = secrets;
	rq.nsecrets = 1;
	fetch(l, &rq, "/auth?token=s3cr3t", &r);
	CHECK(same(r.r.error_code, "backend_auth") && !strstr(r.r.message, "s3cr3t") &&
		      strstr(r.r.message, "/auth: HTTP 401: bad key ***"),
	      "401, no secret in '%s'", r.r.message);
	rq.secrets = NULL;
	rq.nsecrets = 0;
	fetch(l, &rq, "/bad", &r);
	CHECK(same(r.r.error_code, "backend_rejected") && r.r.status == 400, "400: %s",
	      r.r.message);
	fetch(l, &rq, "/redirect", &r);
	CHECK(r.r.status == 302 && same(r.r.error_code, "backend_rejected") &&
		      strstr(r.r.message, "redirects are not followed"),
	      "302 not followed: %s", r.r.message);
	fetch(l, &rq, "/big", &r);
	CHECK(same(r.r.error_code, "backend_failed") && strstr(r.r.message, "over 1000 bytes"),
	      "over max_body (with a length): %s", r.r.message);
	fetch(l, &rq, "/bignolen", &r);
	CHECK(same(r.r.error_code, "backend_failed") && strstr(r.r.message, "over 1000 bytes"),
	      "over max_body (no length): %s", r.r.message);
	rq.method = "POST";
	rq.body = "{\"a\":1}";
	rq.body_len = 7;
	fetch(l, &rq, "/echo", &r);
	CHECK(r.r.status == 200 && strcmp(r.body, "{\"a\":1}") == 0, "POST body: '%s'", r.body);
	rq.method = "GET";
	rq.body = NULL;
	rq.body_len = 0;
	struct result f;
	result_init(&f);
	rq.url = "ftp://127.0.0.1/x";
	REQUIRE(http_submit(l, &rq, on_done, &f, NULL) == 0 && result_wait(&f, 10000), "ftp");
	CHECK(same(f.r.error_code, "backend_rejected"), "ftp refused: %s", f.r.message);
}

static void test_deadline_and_cancel(struct http_loop *l)
{
	struct http_request rq = {.method = "GET", .timeout_ms = 300};
	struct result r;
	double t0 = now_s();
	uint64_t id;
	char url[256];

	fetch(l, &rq, "/slow2000", &r);
	CHECK(same(r.r.error_code, "backend_unavailable") && now_s() - t0 < 1.5,
	      "deadline: %s after %.2f s", r.r.message, now_s() - t0);
	rq.timeout_ms = 10000;
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow2000", port);
	rq.url = url;
	result_init(&r);
	REQUIRE(http_submit(l, &rq, on_done, &r, &id) == 0, "submit");
	usleep(100000);
	t0 = now_s();
	http_cancel(l, id);
	REQUIRE(result_wait(&r, 5000), "cancelled answered");
	CHECK(r.r.cancelled && !r.r.error_code && now_s() - t0 < 0.5, "cancel: %.2f s",
	      now_s() - t0);
}

/* 50 requests that each wait 500 ms at the server, all in flight at once
 * on the loop's one thread. */
static void test_many_in_flight(struct http_loop *l)
{
	static struct result r[50];
	struct http_request rq = {.method = "GET"};
	char url[256];
	double t0 = now_s();
	int ok = 0;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow500", port);
	rq.url = url;
	for (int i = 0; i < 50; i++) {
		result_init(&r[i]);
		REQUIRE(http_submit(l, &rq, on_done, &r[i], NULL) == 0, "submit %d", i);
	}
	for (int i = 0; i < 50; i++)
		ok += result_wait(&r[i], 10000) && r[i].r.status == 200;
	CHECK(ok == 50 && now_s() - t0 < 3.0, "50 in flight: %d answered in %.2f s", ok,
	      now_s() - t0);
}

static void test_deny(void)
{
	struct http_deny *d = NULL;
	struct http_loop *l;
	struct http_request rq = {.method = "GET"};
	struct result r;
	char err[256];
	int before;
	struct sockaddr_in6 v6 = {.sin6_family = AF_INET6};

	CHECK(http_deny_parse("10.0.0.0/33", &d, err, sizeof(err)) == -EINVAL &&
		      strstr(err, "10.0.0.0/33"),
	      "bad range: %s", err);
	REQUIRE(http_deny_parse(HTTP_DENY_DEFAULT ",127.0.0.0/8", &d, err, sizeof(err)) == 0,
		"parse: %s", err);
	inet_pton(AF_INET6, "::ffff:169.254.169.254", &v6.sin6_addr);
	CHECK(http_deny_match(d, (struct sockaddr *)&v6), "IPv4-mapped metadata address");
	inet_pton(AF_INET6, "fe80::1", &v6.sin6_addr);
	CHECK(http_deny_match(d, (struct sockaddr *)&v6), "link-local IPv6");
	inet_pton(AF_INET6, "2001:db8::1", &v6.sin6_addr);
	CHECK(!http_deny_match(d, (struct sockaddr *)&v6), "another IPv6");
	REQUIRE(http_loop_start(d, &l) == 0, "loop");
	before = atomic_load(&connections);
	fetch(l, &rq, "/ok", &r);
	CHECK(same(r.r.error_code, "backend_rejected") && strstr(r.r.message, "deny_net") &&
		      atomic_load(&connections) == before,
	      "denied without connecting: %s", r.r.message);
	http_loop_stop(l);
	http_deny_free(d);
}

/* Stopping with a transfer in flight answers it `cancelled`. */
static void test_stop(struct http_loop *l)
{
	struct http_request rq = {.method = "GET"};
	char url[256];
	static struct result r;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow3000", port);
	rq.url = url;
	result_init(&r);
	CHECK(http_submit(l, &rq, on_done, &r, NULL) == 0, "submit");
	usleep(100000);
	http_loop_stop(l);
	CHECK(r.done && r.r.cancelled, "stop cancels what is in flight");
}

int main(void)
{
	struct http_loop *l;

	server_start();
	if (http_loop_start(NULL, &l) != 0) {
		fprintf(stderr, "http_loop_start failed\n");
		return 1;
	}
	test_answers(l);
	test_deadline_and_cancel(l);
	test_many_in_flight(l);
	test_stop(l);
	test_deny();
	return check_done("test_http");
}
