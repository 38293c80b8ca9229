/*
 * s3.h - where replication puts objects (SPEC §12): the bucket, its
 * endpoint and credentials, and requests signed with AWS Signature
 * Version 4 for the HTTP loop (http.h).
 *
 * Signing is libcurl's (CURLOPT_AWS_SIGV4). What curl 7.88 leaves to the
 * caller is done here: the x-amz-content-sha256 header (UNSIGNED-PAYLOAD:
 * bodies stream from files; each blob is verified against its BLAKE3 by
 * whoever reads it), and URLs that are already canonical: every key byte
 * but unreserved ones and '/' percent-encoded, query parameters sorted
 * and encoded, so that what curl signs is what the service recomputes.
 *
 * Thread safety: a struct s3 is read-only once made; any thread may use it.
 */
#ifndef RENDERFS_S3_H
#define RENDERFS_S3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "http.h"

#define S3_URL_MAX 2048

struct s3 {
	char bucket[64];
	char prefix[512];   /* without leading or trailing '/' ("" : none) */
	char endpoint[512]; /* scheme://host[:port], no trailing '/' */
	char region[64];
	bool path_style;
	char key_id[128], secret[256], token[2048];
	char sigv4[128];    /* "aws:amz:<region>:s3" */
	char userpwd[400];  /* "<key id>:<secret>" */
};

/*
 * replica: "s3://BUCKET/PREFIX"; endpoint: "" or NULL for AWS's in
 * AWS_REGION (else us-east-1); path_style: BUCKET in the path, not in the
 * host name; credfile: NULL for AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
 * / AWS_SESSION_TOKEN, else a file of aws_access_key_id = ...,
 * aws_secret_access_key = ..., aws_session_token = ... lines (its
 * [default] section, if it has sections), which must be a regular file of
 * the caller's with no access for group or others. -EINVAL or -EACCES
 * with err saying what is wrong (never a secret).
 */
int s3_init(struct s3 *s, const char *replica, const char *endpoint, bool path_style,
	    const char *credfile, char *err, size_t errlen);

/* The object key of name (relative to the prefix): "PREFIX/name". */
void s3_key(const struct s3 *s, const char *name, char *out, size_t len);

/*
 * A request for the object name (relative to the prefix; NULL: the
 * bucket itself) with query (canonical already: sorted, encoded; NULL:
 * none): everything of rq but the body, source, sink and timeouts, which
 * the caller adds. The strings live in req.
 */
struct s3_request {
	struct http_request rq;
	char url[S3_URL_MAX];
	char token_hdr[2100];
	const char *headers[4];
	const char *secrets[2];
};
int s3_request(const struct s3 *s, struct s3_request *req, const char *method, const char *name,
	       const char *query);

/* Percent-encode src for a URL's query or path ('/' kept when keep_slash). */
void s3_encode(const char *src, bool keep_slash, char *out, size_t len);

#endif
