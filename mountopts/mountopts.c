/*
 * mountopts.c - the option table, defaults and validation.
 *
 * DESIGN
 * fuse_opt fills raw strings through offsetof (as sshfs does); a second
 * pass converts and range-checks each one, so every message can name the
 * option and say what it accepts. Options FUSE does not know are refused
 * by fuse_session_new() with their name, so typos never pass silently.
 */
#include "mountopts.h"

#include "http.h"
#include "s3.h"

#include <sodium.h>

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OPT(t, p) {t, offsetof(struct mountopts, p), 1}

static const struct fuse_opt table[] = {
	OPT("store=%s", store),
	OPT("models=%s", models),
	OPT("workers=%s", workers),
	OPT("gpus=%s", gpus),
	OPT("queue_max=%s", queue_max),
	OPT("user_queue_max=%s", user_queue_max),
	OPT("rate=%s", rate),
	OPT("burst=%s", burst),
	OPT("max_request=%s", max_request),
	OPT("max_attempts=%s", max_attempts),
	OPT("buffer_max=%s", buffer_max_s),
	OPT("user_buffer_max=%s", user_buffer_max_s),
	OPT("retain=%s", retain),
	OPT("keyfile=%s", keyfile),
	OPT("deny_net=%s", deny_net),
	OPT("webhook_retry=%s", webhook_retry),
	OPT("replica=%s", replica),
	OPT("replica_endpoint=%s", replica_endpoint),
	OPT("replica_credentials=%s", replica_credentials),
	OPT("replica_path_style", replica_path_style),
	OPT("cache_max=%s", cache_max),
	OPT("private", private_),
	OPT("nonotify", nonotify),
	OPT("passthrough", passthrough),
	OPT("-h", show_help),
	OPT("--help", show_help),
	OPT("-V", show_version),
	OPT("--version", show_version),
	FUSE_OPT_END,
};

static int proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct mountopts *mo = data;

	(void)outargs;
	if (key != FUSE_OPT_KEY_NONOPT)
		return 1;
	/* mount.fuse runs "renderfs SOURCE MOUNTPOINT -o ...". */
	if (!mo->mountpoint) {
		mo->mountpoint = strdup(arg);
	} else if (!mo->source) {
		mo->source = mo->mountpoint;
		mo->mountpoint = strdup(arg);
	} else {
		mo->extra_args++;
	}
	return 0;
}

void mountopts_help(FILE *out, const char *prog)
{
	fprintf(out,
		"usage: %s [options] [SOURCE] MOUNTPOINT\n"
		"\n"
		"renderfs options (-o name=value, comma-separated):\n"
		"    store=DIR            store directory (default $XDG_DATA_HOME/renderfs,\n"
		"                         ~/.local/share/renderfs, or /var/lib/renderfs for root)\n"
		"    models=FILE          models file adding or overriding routes (default: none)\n"
		"    workers=N            CPU worker threads, 0 to run nothing (default: cores)\n"
		"    gpus=all|none|LIST   CUDA devices to use, e.g. 0,1 (default: all)\n"
		"    queue_max=N          queued jobs in all (default: 1000000)\n"
		"    user_queue_max=N     queued jobs per uid (default: 100000)\n"
		"    rate=N               submissions per second per uid, 0: no limit (default: 1000)\n"
		"    burst=N              token bucket size per uid (default: 10000)\n"
		"    max_request=BYTES    largest request object, K/M/G suffixes (default: 16M)\n"
		"    max_attempts=N       runs before a transient failure is final (default: 3)\n"
		"    buffer_max=BYTES     unfinished requests held for writers of new, in all;\n"
		"                         beyond it writes fail ENOMEM (default: 512M, at\n"
		"                         least user_buffer_max)\n"
		"    user_buffer_max=BYTES  the same per uid; beyond it writes fail EAGAIN\n"
		"                         (default: 64M, at least max_request + 1M)\n"
		"    retain=DURATION      delete finished jobs older than this, e.g. 7d, 12h\n"
		"                         (default: keep)\n"
		"    deny_net=CIDR+CIDR   addresses no service request or download may go to,\n"
		"                         '+'-separated, empty for none (default:\n"
		"                         169.254.0.0/16+fe80::/10: link-local, cloud metadata)\n"
		"    webhook_retry=D+D+.. delays between webhook attempts, '+'-separated\n"
		"                         (default: 5s+5m+30m+2h+5h+10h+14h+20h+24h)\n"
		"    replica=s3://BUCKET/PREFIX  put every blob, signature and manifest in this\n"
		"                         bucket and fetch blobs missing here from it (SPEC 12;\n"
		"                         credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,\n"
		"                         AWS_SESSION_TOKEN; region: AWS_REGION)\n"
		"    replica_endpoint=URL an S3-compatible endpoint, http(s)://HOST[:PORT]\n"
		"                         (default: AWS's for AWS_REGION)\n"
		"    replica_path_style   the bucket in the URL's path, not its host name\n"
		"    replica_credentials=FILE  aws_access_key_id/aws_secret_access_key lines\n"
		"                         (a file of the mount's user, mode 0600)\n"
		"    cache_max=BYTES      with replica=, drop the files of blobs the bucket has,\n"
		"                         least recently read first, above this (default: keep)\n"
		"    private              jobs visible to their owner only; modes 0700/0600\n"
		"    keyfile=FILE         sign with this minisign secret key (default: the\n"
		"                         store's own keys/)\n"
		"    nonotify             make no inotify events for changes made by the\n"
		"                         daemon (default: make them, SPEC 4)\n"
		"    passthrough          the kernel reads outputs and cas/ blobs from the\n"
		"                         blob files itself (Linux 6.9+, root): faster, but\n"
		"                         blobs are verified at open, not at every read\n"
		"                         (default: off)\n"
		"\n"
		"FUSE options: -f (foreground), -d (debug), -s (single thread),\n"
		"    -o allow_other, -o max_threads=N, and the rest of mount.fuse3(8)\n",
		prog);
}

static int num(const char *name, const char *s, uint64_t lo, uint64_t hi, uint64_t *out,
	       char *err, size_t errlen)
{
	char *end;
	uintmax_t v;

	errno = 0;
	if (!s || !isdigit((unsigned char)s[0]))
		goto bad;
	v = strtoumax(s, &end, 10);
	if (errno || *end || v < lo || v > hi)
		goto bad;
	*out = v;
	return 0;
bad:
	snprintf(err, errlen, "option '%s=%s': must be an integer from %" PRIu64 " to %" PRIu64,
		 name, s ? s : "", lo, hi);
	return -EINVAL;
}

static int with_unit(const char *s, const char *units, const uint64_t *mult, uint64_t *out)
{
	char *end;
	uintmax_t v;
	const char *u;

	errno = 0;
	if (!isdigit((unsigned char)s[0]))
		return -EINVAL;
	v = strtoumax(s, &end, 10);
	if (errno)
		return -EINVAL;
	if (*end == '\0') {
		*out = v * mult[0];
		return 0;
	}
	if (end[1] != '\0' || !(u = strchr(units, *end)))
		return -EINVAL;
	if (v > UINT64_MAX / mult[u - units + 1])
		return -EINVAL;
	*out = v * mult[u - units + 1];
	return 0;
}

int mountopts_duration(const char *s, uint64_t *ms)
{
	static const uint64_t mult[] = {1000, 1000, 60000, 3600000, 86400000};
	return with_unit(s, "smhd", mult, ms);
}

int mountopts_size(const char *s, uint64_t *bytes)
{
	static const uint64_t mult[] = {1, 1024, 1024 * 1024, 1024 * 1024 * 1024};
	return with_unit(s, "KMG", mult, bytes);
}

static int default_store(char *buf, size_t len)
{
	const char *x = getenv("XDG_DATA_HOME"), *home = getenv("HOME");

	if (geteuid() == 0)
		snprintf(buf, len, "/var/lib/renderfs");
	else if (x && x[0] == '/')
		snprintf(buf, len, "%s/renderfs", x);
	else if (home && home[0] == '/')
		snprintf(buf, len, "%s/.local/share/renderfs", home);
	else
		return -ENOENT;
	return 0;
}

/*
 * Unfinished requests buffered for writers of `new` (newfile.c): a window
 * holds at most max_request + 1M, so one uid must be allowed that much.
 */
static int buffer_limits(struct mountopts *mo, char *err, size_t errlen)
{
	uint64_t window = mo->engine.max_request + (1u << 20);

	mo->user_buffer_max = window > (64ull << 20) ? window : 64ull << 20;
	if (mo->user_buffer_max_s) {
		if (mountopts_size(mo->user_buffer_max_s, &mo->user_buffer_max) != 0 ||
		    mo->user_buffer_max < window || mo->user_buffer_max > (1ull << 40)) {
			snprintf(err, errlen,
				 "option 'user_buffer_max=%s': must be a size of at least "
				 "max_request + 1M (%llu bytes)",
				 mo->user_buffer_max_s, (unsigned long long)window);
			return -EINVAL;
		}
	}
	mo->buffer_max = mo->user_buffer_max > (512ull << 20) ? mo->user_buffer_max : 512ull << 20;
	if (mo->buffer_max_s) {
		if (mountopts_size(mo->buffer_max_s, &mo->buffer_max) != 0 ||
		    mo->buffer_max < mo->user_buffer_max || mo->buffer_max > (1ull << 40)) {
			snprintf(err, errlen,
				 "option 'buffer_max=%s': must be a size of at least "
				 "user_buffer_max (%llu bytes)",
				 mo->buffer_max_s, (unsigned long long)mo->user_buffer_max);
			return -EINVAL;
		}
	}
	return 0;
}

int mountopts_parse(struct fuse_args *args, struct mountopts *mo, char *err, size_t errlen)
{
	struct engine_options *eo = &mo->engine;
	uint64_t v;
	int rc;

	memset(mo, 0, sizeof(*mo));
	engine_options_default(eo);
	if (fuse_opt_parse(args, mo, table, proc) != 0) {
		snprintf(err, errlen, "cannot parse the options");
		return -EINVAL;
	}
	if (mo->show_help || mo->show_version)
		return 0;
	if (mo->extra_args) {
		snprintf(err, errlen, "too many arguments: expected [SOURCE] MOUNTPOINT");
		return -EINVAL;
	}
	if (!mo->mountpoint) {
		snprintf(err, errlen, "no mountpoint given (see --help)");
		return -EINVAL;
	}
	if (mo->store) {
		if (mo->store[0] == '\0' || strlen(mo->store) >= sizeof(mo->store_dir) - 128) {
			snprintf(err, errlen, "option 'store=%s': must be a directory path", mo->store);
			return -EINVAL;
		}
		snprintf(mo->store_dir, sizeof(mo->store_dir), "%s", mo->store);
	} else if (default_store(mo->store_dir, sizeof(mo->store_dir)) != 0) {
		snprintf(err, errlen, "no store=DIR given and neither $XDG_DATA_HOME nor $HOME is set");
		return -EINVAL;
	}
	if (mo->workers) {
		if ((rc = num("workers", mo->workers, 0, 1024, &v, err, errlen)) != 0)
			return rc;
		eo->workers = (int)v;
	}
	if (mo->gpus) {
		if (strcmp(mo->gpus, "all") == 0) {
			eo->gpus_all = true;
		} else if (strcmp(mo->gpus, "none") == 0) {
			eo->gpus_all = false;
			eo->gpu_mask = 0;
		} else {
			char *copy = strdup(mo->gpus), *save = NULL;
			eo->gpus_all = false;
			eo->gpu_mask = 0;
			if (!copy)
				return -ENOMEM;
			for (char *t = strtok_r(copy, ":+", &save); t; t = strtok_r(NULL, ":+", &save)) {
				if (num("gpus", t, 0, 63, &v, err, errlen) != 0) {
					snprintf(err, errlen,
						 "option 'gpus=%s': must be all, none, or device "
						 "numbers 0-63 separated by ':' or '+'",
						 mo->gpus);
					free(copy);
					return -EINVAL;
				}
				eo->gpu_mask |= 1ull << v;
			}
			free(copy);
		}
	}
	if (mo->queue_max &&
	    (rc = num("queue_max", mo->queue_max, 1, 1ull << 40, &eo->queue_max, err, errlen)))
		return rc;
	if (mo->user_queue_max && (rc = num("user_queue_max", mo->user_queue_max, 1, 1ull << 40,
					    &eo->user_queue_max, err, errlen)))
		return rc;
	if (mo->rate) {
		if ((rc = num("rate", mo->rate, 0, 1000000000, &v, err, errlen)) != 0)
			return rc;
		eo->rate = (uint32_t)v;
	}
	if (mo->burst) {
		if ((rc = num("burst", mo->burst, 1, 1000000000, &v, err, errlen)) != 0)
			return rc;
		eo->burst = (uint32_t)v;
	}
	if (mo->max_request) {
		if (mountopts_size(mo->max_request, &v) != 0 || v < 1024 || v > (1ull << 30)) {
			snprintf(err, errlen,
				 "option 'max_request=%s': must be a size from 1K to 1G (e.g. 16M)",
				 mo->max_request);
			return -EINVAL;
		}
		eo->max_request = v;
	}
	if ((rc = buffer_limits(mo, err, errlen)) != 0)
		return rc;
	if (mo->max_attempts) {
		if ((rc = num("max_attempts", mo->max_attempts, 1, 100, &v, err, errlen)) != 0)
			return rc;
		eo->max_attempts = (uint32_t)v;
	}
	if (mo->retain) {
		if (mountopts_duration(mo->retain, &v) != 0 || v == 0) {
			snprintf(err, errlen,
				 "option 'retain=%s': must be a duration such as 3600, 90s, 30m, "
				 "12h or 7d",
				 mo->retain);
			return -EINVAL;
		}
		eo->retain_ms = v;
	}
	if (mo->keyfile && access(mo->keyfile, R_OK) != 0) {
		snprintf(err, errlen, "option 'keyfile=%s': %s", mo->keyfile, strerror(errno));
		return -EINVAL;
	}
	if (mo->models && access(mo->models, R_OK) != 0) {
		snprintf(err, errlen, "option 'models=%s': %s", mo->models, strerror(errno));
		return -EINVAL;
	}
	eo->models = mo->models;
	if (mo->deny_net) {
		struct http_deny *d = NULL;
		char why[256];
		if (http_deny_parse(mo->deny_net, &d, why, sizeof(why)) != 0) {
			snprintf(err, errlen, "option 'deny_net=%s': %s", mo->deny_net, why);
			return -EINVAL;
		}
		http_deny_free(d);
		eo->deny_net = mo->deny_net;
	}
	if (mo->webhook_retry) {
		char *copy = strdup(mo->webhook_retry), *save = NULL;
		size_t n = 0;

		if (!copy)
			return -ENOMEM;
		rc = 0;
		for (char *t = strtok_r(copy, "+", &save); t && rc == 0;
		     t = strtok_r(NULL, "+", &save)) {
			if (n == ENGINE_HOOK_RETRY_MAX || mountopts_duration(t, &v) != 0 || v == 0 ||
			    v > 7 * 86400000ull)
				rc = -EINVAL;
			else
				eo->webhook_retry_ms[n++] = v;
		}
		free(copy);
		if (rc || n == 0) {
			snprintf(err, errlen,
				 "option 'webhook_retry=%s': must be 1 to %d durations such as 5s, "
				 "5m or 2h (7d at most), '+'-separated",
				 mo->webhook_retry, ENGINE_HOOK_RETRY_MAX);
			return -EINVAL;
		}
		eo->webhook_retries = n;
	}
	if ((mo->replica_endpoint || mo->replica_credentials || mo->cache_max ||
	     mo->replica_path_style) && !mo->replica) {
		snprintf(err, errlen, "options replica_endpoint, replica_credentials, "
				      "replica_path_style and cache_max need replica=s3://BUCKET/PREFIX");
		return -EINVAL;
	}
	if (mo->cache_max) {
		if (mountopts_size(mo->cache_max, &v) != 0 || v == 0) {
			snprintf(err, errlen, "option 'cache_max=%s': must be a size such as 512M or 20G",
				 mo->cache_max);
			return -EINVAL;
		}
		eo->cache_max = v;
	}
	if (mo->replica) {
		struct s3 s3;
		char why[512];
		if (s3_init(&s3, mo->replica, mo->replica_endpoint, mo->replica_path_style,
			    mo->replica_credentials, why, sizeof(why)) != 0) {
			snprintf(err, errlen, "option 'replica=%s': %s", mo->replica, why);
			sodium_memzero(&s3, sizeof(s3));
			return -EINVAL;
		}
		sodium_memzero(&s3, sizeof(s3));
		eo->replica = mo->replica;
		eo->replica_endpoint = mo->replica_endpoint;
		eo->replica_credentials = mo->replica_credentials;
		eo->replica_path_style = mo->replica_path_style;
	}
	/* FUSE parses the mountpoint itself (with -f, -d, ...). */
	if (fuse_opt_add_arg(args, mo->mountpoint) != 0)
		return -ENOMEM;
	return 0;
}

void mountopts_release(struct mountopts *mo)
{
	char **strs[] = {&mo->store,	    &mo->models,      &mo->workers,	 &mo->gpus,
			 &mo->queue_max,    &mo->user_queue_max, &mo->rate,	 &mo->burst,
			 &mo->max_request,  &mo->max_attempts, &mo->retain,	 &mo->keyfile, &mo->deny_net,
			 &mo->webhook_retry, &mo->replica, &mo->replica_endpoint,
			 &mo->replica_credentials, &mo->cache_max,
			 &mo->buffer_max_s, &mo->user_buffer_max_s,
			 &mo->source,	    &mo->mountpoint};

	for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
		free(*strs[i]);
		*strs[i] = NULL;
	}
}
