/*
 * s3.c - the bucket's address, credentials and signed requests (s3.h).
 */
#include "s3.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

void s3_encode(const char *src, bool keep_slash, char *out, size_t len)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t k = 0;

	for (const unsigned char *p = (const unsigned char *)src; *p && k + 4 <= len; p++) {
		unsigned char c = *p;
		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		    c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
			out[k++] = (char)c;
		} else {
			out[k++] = '%';
			out[k++] = hex[c >> 4];
			out[k++] = hex[c & 15];
		}
	}
	if (len)
		out[k] = '\0';
}

/* S3's rules for bucket names (the DNS-compatible ones). */
static bool bucket_ok(const char *b)
{
	size_t n = strlen(b);

	if (n < 3 || n > 63 || b[0] == '-' || b[0] == '.' || b[n - 1] == '-' || b[n - 1] == '.')
		return false;
	for (size_t i = 0; i < n; i++)
		if (!((b[i] >= 'a' && b[i] <= 'z') || (b[i] >= '0' && b[i] <= '9') || b[i] == '-' ||
		      b[i] == '.'))
			return false;
	return strstr(b, "..") == NULL;
}

static void trim(char *s)
{
	size_t n = strlen(s), i = 0;

	while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
		s[--n] = '\0';
	while (s[i] == ' ' || s[i] == '\t')
		i++;
	memmove(s, s + i, n - i + 1);
}

static int load_credfile(struct s3 *s, const char *path, char *err, size_t errlen)
{
	struct stat sb;
	char line[4096];
	bool in_default = true;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	FILE *f;

	if (fd < 0) {
		snprintf(err, errlen, "replica_credentials '%s': %s", path, strerror(errno));
		return errno == ELOOP ? -EACCES : -EINVAL;
	}
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		snprintf(err, errlen, "replica_credentials '%s': not a regular file", path);
		return -EINVAL;
	}
	if (sb.st_uid != geteuid() || (sb.st_mode & 077)) {
		close(fd);
		snprintf(err, errlen,
			 "replica_credentials '%s': must belong to uid %u with mode 0600 or "
			 "stricter (it has uid %u, mode %04o)",
			 path, (unsigned)geteuid(), (unsigned)sb.st_uid,
			 (unsigned)(sb.st_mode & 07777));
		return -EACCES;
	}
	if (!(f = fdopen(fd, "r"))) {
		close(fd);
		return -ENOMEM;
	}
	while (fgets(line, sizeof(line), f)) {
		char *eq, *name, *val;

		trim(line);
		if (!line[0] || line[0] == '#' || line[0] == ';')
			continue;
		if (line[0] == '[') {
			in_default = strcmp(line, "[default]") == 0;
			continue;
		}
		if (!in_default || !(eq = strchr(line, '=')))
			continue;
		*eq = '\0';
		name = line;
		val = eq + 1;
		trim(name);
		trim(val);
		if (strcmp(name, "aws_access_key_id") == 0)
			snprintf(s->key_id, sizeof(s->key_id), "%s", val);
		else if (strcmp(name, "aws_secret_access_key") == 0)
			snprintf(s->secret, sizeof(s->secret), "%s", val);
		else if (strcmp(name, "aws_session_token") == 0)
			snprintf(s->token, sizeof(s->token), "%s", val);
	}
	sodium_memzero(line, sizeof(line));
	fclose(f);
	if (!s->key_id[0] || !s->secret[0]) {
		snprintf(err, errlen,
			 "replica_credentials '%s': needs aws_access_key_id and "
			 "aws_secret_access_key",
			 path);
		return -EINVAL;
	}
	return 0;
}

int s3_init(struct s3 *s, const char *replica, const char *endpoint, bool path_style,
	    const char *credfile, char *err, size_t errlen)
{
	const char *p, *slash, *region;
	size_t blen;
	int rc;

	memset(s, 0, sizeof(*s));
	if (!replica || strncmp(replica, "s3://", 5) != 0) {
		snprintf(err, errlen, "replica must be s3://BUCKET/PREFIX");
		return -EINVAL;
	}
	p = replica + 5;
	slash = strchr(p, '/');
	blen = slash ? (size_t)(slash - p) : strlen(p);
	if (blen >= sizeof(s->bucket)) {
		snprintf(err, errlen, "replica: the bucket name is over 63 bytes");
		return -EINVAL;
	}
	memcpy(s->bucket, p, blen);
	if (!bucket_ok(s->bucket)) {
		snprintf(err, errlen,
			 "replica: '%s' is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')",
			 s->bucket);
		return -EINVAL;
	}
	if (slash) {
		const char *q = slash + 1;
		size_t n = strlen(q);
		while (n && q[n - 1] == '/')
			n--;
		if (n >= sizeof(s->prefix) || strstr(q, "//") || strstr(q, "..")) {
			snprintf(err, errlen, "replica: the prefix must be a plain path of at most "
					      "511 bytes");
			return -EINVAL;
		}
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)q[i] < 0x20 || q[i] == 0x7f) {
				snprintf(err, errlen, "replica: the prefix has a control character");
				return -EINVAL;
			}
		memcpy(s->prefix, q, n);
	}
	region = getenv("AWS_REGION");
	if (!region || !*region)
		region = getenv("AWS_DEFAULT_REGION");
	if (!region || !*region)
		region = "us-east-1";
	if (strlen(region) >= sizeof(s->region) ||
	    strspn(region, "abcdefghijklmnopqrstuvwxyz0123456789-") != strlen(region)) {
		snprintf(err, errlen, "AWS_REGION '%.64s' is not a region name", region);
		return -EINVAL;
	}
	snprintf(s->region, sizeof(s->region), "%s", region);
	if (endpoint && *endpoint) {
		size_t n = strlen(endpoint), host = strncmp(endpoint, "https://", 8) == 0 ? 8
						     : strncmp(endpoint, "http://", 7) == 0  ? 7
											      : 0;
		while (n > host && endpoint[n - 1] == '/')
			n--;
		/* scheme://HOST[:PORT]: a host, and no path, query or user */
		if (!host || n == host || n >= sizeof(s->endpoint) ||
		    memchr(endpoint + host, '/', n - host) || strpbrk(endpoint, "?@# ")) {
			snprintf(err, errlen, "replica_endpoint must be http(s)://HOST[:PORT]");
			return -EINVAL;
		}
		memcpy(s->endpoint, endpoint, n);
	} else {
		snprintf(s->endpoint, sizeof(s->endpoint), "https://s3.%s.amazonaws.com", s->region);
	}
	/* A dotted bucket name cannot be a host name under TLS. */
	s->path_style = path_style || strchr(s->bucket, '.');
	if (credfile) {
		if ((rc = load_credfile(s, credfile, err, errlen)) != 0)
			return rc;
	} else {
		const char *id = getenv("AWS_ACCESS_KEY_ID"), *sec = getenv("AWS_SECRET_ACCESS_KEY"),
			   *tok = getenv("AWS_SESSION_TOKEN");
		if (!id || !*id || !sec || !*sec) {
			snprintf(err, errlen,
				 "replica needs credentials: AWS_ACCESS_KEY_ID and "
				 "AWS_SECRET_ACCESS_KEY, or replica_credentials=FILE");
			return -EINVAL;
		}
		snprintf(s->key_id, sizeof(s->key_id), "%s", id);
		snprintf(s->secret, sizeof(s->secret), "%s", sec);
		if (tok)
			snprintf(s->token, sizeof(s->token), "%s", tok);
	}
	if (strchr(s->key_id, ':') || strpbrk(s->token, "\r\n")) {
		snprintf(err, errlen, "replica credentials: a key id with ':' or a token with a "
				      "line break");
		return -EINVAL;
	}
	snprintf(s->sigv4, sizeof(s->sigv4), "aws:amz:%s:s3", s->region);
	snprintf(s->userpwd, sizeof(s->userpwd), "%s:%s", s->key_id, s->secret);
	return 0;
}

void s3_key(const struct s3 *s, const char *name, char *out, size_t len)
{
	snprintf(out, len, "%s%s%s", s->prefix, s->prefix[0] ? "/" : "", name);
}

int s3_request(const struct s3 *s, struct s3_request *req, const char *method, const char *name,
	       const char *query)
{
	char key[1024], enc[3 * 1024 + 1];
	const char *scheme_end = strstr(s->endpoint, "://");
	int n;

	memset(req, 0, sizeof(*req));
	if (name) {
		s3_key(s, name, key, sizeof(key));
		s3_encode(key, true, enc, sizeof(enc));
	} else {
		enc[0] = '\0';
	}
	if (s->path_style)
		n = snprintf(req->url, sizeof(req->url), "%s/%s%s%s%s%s", s->endpoint, s->bucket,
			     name ? "/" : "", enc, query ? "?" : "", query ? query : "");
	else
		n = snprintf(req->url, sizeof(req->url), "%.*s%s.%s/%s%s%s",
			     (int)(scheme_end + 3 - s->endpoint), s->endpoint, s->bucket,
			     scheme_end + 3, enc, query ? "?" : "", query ? query : "");
	if (n < 0 || (size_t)n >= sizeof(req->url))
		return -ENAMETOOLONG;
	req->headers[req->rq.nheaders++] = "x-amz-content-sha256: UNSIGNED-PAYLOAD";
	if (s->token[0]) {
		snprintf(req->token_hdr, sizeof(req->token_hdr), "x-amz-security-token: %s",
			 s->token);
		req->headers[req->rq.nheaders++] = req->token_hdr;
		req->secrets[req->rq.nsecrets++] = s->token;
	}
	req->secrets[req->rq.nsecrets++] = s->secret;
	req->rq.method = method;
	req->rq.url = req->url;
	req->rq.headers = req->headers;
	req->rq.secrets = req->secrets;
	req->rq.aws_sigv4 = s->sigv4;
	req->rq.userpwd = s->userpwd;
	return 0;
}
