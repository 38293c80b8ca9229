/*
 * http.h - the one way renderfs speaks HTTP to services (SPEC §7, §8):
 * libcurl's multi interface driven by one thread, so that requests in
 * flight hold no thread while they wait; every transfer with a deadline,
 * a bound on what it keeps of the answer, no redirects, http and https
 * only, no connection to an address in deny_net=, messages without
 * secrets, and the answer's HTTP status turned into a code of the error
 * catalog (errors.h) with Retry-After read.
 *
 * Threads: http_submit and http_cancel from any thread; `done` runs on the
 * loop's thread and must not block (it queues work and returns).
 */
#ifndef RENDERFS_HTTP_H
#define RENDERFS_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* ---- deny_net= ---- */

struct http_deny;
/* Parse "CIDR,CIDR,..." or "CIDR+CIDR" (a mount option cannot hold a bare
 * comma) (IPv4 and IPv6; "" for none). 0 or -EINVAL with
 * err naming the bad entry. */
int http_deny_parse(const char *spec, struct http_deny **out, char *err, size_t errlen);
/* Whether an address falls in one of the ranges. */
bool http_deny_match(const struct http_deny *d, const struct sockaddr *sa);
void http_deny_free(struct http_deny *d);
/* SPEC §7's default: link-local and cloud metadata ranges. */
#define HTTP_DENY_DEFAULT "169.254.0.0/16,fe80::/10"

/* ---- requests ---- */

struct http_request {
	const char *method;		/* "GET", "POST", "PUT", "DELETE", "HEAD" */
	const char *url;		/* http:// or https:// */
	const char *const *headers;	/* "Name: value", nheaders of them */
	size_t nheaders;
	const void *body;		/* sent as is (NULL: none) */
	size_t body_len;
	uint64_t timeout_ms;		/* the whole transfer; 0: 60 s */
	size_t max_body;		/* answer bytes kept at most; 0: 1 MiB */
	const char *const *secrets;	/* never in a message: replaced by *** */
	size_t nsecrets;
	/*
	 * With sink: a 2xx answer's body goes to sink as it arrives (on the
	 * loop's thread; a non-zero return fails the transfer with that
	 * message), bounded by max_body, instead of being kept; any other
	 * answer is kept (64 KiB at most) for the message.
	 */
	int (*sink)(void *arg, const void *data, size_t len, char *err, size_t errlen);
	void *sink_arg;
	/* One more header of the answer to report (its name without ':'),
	 * or NULL. */
	const char *want_header;
	/*
	 * With source: the body is source_len bytes that source reads at
	 * each offset from 0 (a blob file through a verifying reader),
	 * never held whole in memory; it returns the bytes read or < 0 to
	 * fail the transfer. Called on the loop's thread; arg lives until
	 * `done`. Method "PUT" (or "POST").
	 */
	long long (*source)(void *arg, void *buf, size_t len, uint64_t off);
	void *source_arg;
	uint64_t source_len;
	/* AWS Signature Version 4 (CURLOPT_AWS_SIGV4 "aws:amz:REGION:s3")
	 * with userpwd "KEYID:SECRET"; the caller lists the secret in
	 * secrets. NULL: none. */
	const char *aws_sigv4, *userpwd;
	/* Fail a transfer that moves no byte for this long (0: only the
	 * deadline): lets a large transfer have a long deadline. */
	uint64_t stall_ms;
};

struct http_response {
	long status;		   /* 0: no answer */
	const char *body;	   /* NUL-terminated; valid during `done` only */
	size_t len;
	uint64_t retry_after_ms;   /* from Retry-After (seconds or a date); 0: none */
	const char *error_code;	   /* NULL for a 2xx answer, else the catalog's code */
	bool cancelled;		   /* http_cancel() or the loop's stop */
	bool maybe_sent;	   /* the service may have the request (false: it
				      never left: no connection, refused, denied) */
	uint64_t streamed;	   /* bytes given to the sink */
	char content_type[128];	   /* of the answer ("" if none) */
	char header[128];	   /* want_header's value ("" if none; cut) */
	char message[512];	   /* what went wrong, for the job's log (no secrets) */
};

typedef void (*http_done_fn)(void *arg, const struct http_response *r);

struct http_loop;
/* Start the loop's thread; deny (may be NULL) is borrowed for its life. */
int http_loop_start(const struct http_deny *deny, struct http_loop **out);
/* Stop: every transfer in flight ends with `cancelled`, then the thread. */
void http_loop_stop(struct http_loop *l);
/* Start a transfer (everything in rq is copied); *id names it for
 * http_cancel. done is called exactly once. 0 or -errno. */
int http_submit(struct http_loop *l, const struct http_request *rq, http_done_fn done, void *arg,
		uint64_t *id);
/* End a transfer now (done: `cancelled`); a finished one is left alone. */
void http_cancel(struct http_loop *l, uint64_t id);

#endif
