/*
 * content.c - what the generated files say: job files (SPEC §3), README,
 * models.json, stats, render.pub, keys/, cas/<hex>.minisig.
 *
 * DESIGN
 * Every generated file is a pure function of the job record (and the
 * store's key), so a getattr can produce the exact size by rendering the
 * content, and two reads of an unchanged job return identical bytes.
 * Signatures are deterministic (Ed25519), so manifest.json.minisig does not
 * change between reads; their sizes follow from the trusted comment's
 * length without signing (SIG_TEXT_LEN), which keeps `ls -l` of a job
 * directory from hashing its output.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fs_i.h"

#include "backend.h"
#include "jobview.h"
#include "mountopts.h"

/* "untrusted comment: signature from renderfs key <16 hex>\n" (64), the
 * signature line (100 + 1), "trusted comment: " (17), the comment, "\n",
 * the global signature line (88 + 1). */
#define SIG_TEXT_LEN(tlen) (64 + 101 + 17 + (tlen) + 1 + 89)
#define SIG_BUF (SIGN_TRUSTED_MAX + 512)

static const char *const jf_names[JF_COUNT] = {
	"request.json", "status", "progress", "position", "log", "error", "status.json",
	NULL,		NULL,	  "manifest.json", "manifest.json.minisig", "ctl", "result.json", "webhooks",
};

const char *jf_name(const struct job *j, enum job_file f, char *buf, size_t len)
{
	if (f != JF_OUTPUT && f != JF_OUTPUTSIG)
		return jf_names[f];
	snprintf(buf, len, "output.%s%s", route_media_ext(j->media_type),
		 f == JF_OUTPUTSIG ? ".minisig" : "");
	return buf;
}

bool jf_present(const struct job *j, enum job_file f)
{
	if (j->hidden & (1u << f))
		return false;
	switch (f) {
	case JF_OUTPUT: /* from the commit of the output on, which comes just
			 * before `complete` (SPEC §3: it exists before status
			 * says complete) */
		return (j->flags & JOB_F_HAS_OUTPUT) != 0;
	case JF_WEBHOOKS:
		return (j->flags & JOB_F_WEBHOOK) != 0;
	case JF_RESULT: /* the service's result, once the job is complete */
		return j->status == JOB_COMPLETE && (j->flags & JOB_F_RESULT);
	case JF_OUTPUTSIG: /* stays listed after the output is unlinked, so that
			    * `rm -r` finds what it listed */
	case JF_MANIFEST:
	case JF_MANIFESTSIG:
		return j->status == JOB_COMPLETE &&
		       (j->flags & (JOB_F_HAS_OUTPUT | JOB_F_OUTPUT_RELEASED));
	default:
		return true;
	}
}

static void hex32(const uint8_t h[32], char out[65])
{
	b3_to_hex(h, out);
}

/* A signature of a blob (verified while read), malloc'ed into *out. */
static int sign_blob(struct fsctx *fs, const uint8_t hash[32], const char *trusted, char **out,
		     size_t *len)
{
	uint64_t size;
	int fd, rc;

	if ((rc = store_blob_open(fs->st, hash, &fd, &size)) != 0)
		return rc;
	*out = malloc(SIG_BUF);
	rc = *out ? store_sign_fd(fs->st, fd, trusted, *out, SIG_BUF) : -ENOMEM;
	close(fd);
	if (rc < 0) {
		free(*out);
		*out = NULL;
		return rc;
	}
	*len = (size_t)rc;
	return 0;
}


static void output_trusted(const struct job *j, char *buf, size_t len)
{
	char id[JOB_ID_STR_LEN + 1], hex[65];

	ulid_format(j->id, id);
	hex32(j->output_hash, hex);
	snprintf(buf, len, "renderfs job=%s route=%s blake3=%s size=%llu", id, j->route, hex,
		 (unsigned long long)j->output_size);
}


int jf_render(struct fsctx *fs, const struct job *j, enum job_file f, char **out, size_t *len)
{
	char prog[16], trusted[SIGN_TRUSTED_MAX + 1];
	uint64_t pos;
	int rc;

	switch (f) {
	case JF_REQUEST: {
		char *text = NULL;
		size_t tl = 0;
		if ((rc = index_job_request(fs->ix, j->id, &text, &tl)) != 0)
			return rc;
		rc = dup_text(out, len, "%s\n", text);
		free(text);
		return rc;
	}
	case JF_STATUS:
		return dup_text(out, len, "%s\n", job_status_name(j->status));
	case JF_PROGRESS:
		jobview_progress_text(j->progress, prog, sizeof(prog));
		return dup_text(out, len, "%s\n", prog);
	case JF_POSITION:
		if (jobview_position(fs->eng, j, &pos) == 0)
			return dup_text(out, len, "%llu\n", (unsigned long long)pos);
		return dup_text(out, len, "%s", "");
	case JF_ERROR:
		if (j->status == JOB_ERROR)
			return dup_text(out, len, "%s\n", j->error_message);
		return dup_text(out, len, "%s", "");
	case JF_STATUSJSON:
		return jobview_status_json(fs->eng, j, out, len);
	case JF_MANIFEST:
		return jobview_manifest_json(fs->eng, j, out, len);
	case JF_MANIFESTSIG: {
		char *m;
		size_t ml;
		if ((rc = jobview_manifest_json(fs->eng, j, &m, &ml)) != 0)
			return rc;
		jobview_manifest_trusted(j, m, ml, trusted, sizeof(trusted));
		*out = malloc(SIG_BUF);
		rc = *out ? store_sign_buf(fs->st, m, ml, trusted, *out, SIG_BUF) : -ENOMEM;
		free(m);
		if (rc < 0) {
			free(*out);
			*out = NULL;
			return rc;
		}
		*len = (size_t)rc;
		return 0;
	}
	case JF_OUTPUTSIG:
		output_trusted(j, trusted, sizeof(trusted));
		return sign_blob(fs, j->output_hash, trusted, out, len);
	case JF_CTL:
		return dup_text(out, len, "%s", "");
	case JF_RESULT: {
		char *text = NULL;
		size_t tl = 0;
		if ((rc = index_job_result_get(fs->ix, j->id, &text, &tl)) != 0)
			return rc == STORE_E_NOTFOUND ? -ENOENT : rc;
		rc = dup_text(out, len, "%s\n", text);
		free(text);
		return rc;
	}
	case JF_WEBHOOKS:
		return engine_webhooks_text(fs->eng, j, out, len);
	case JF_OUTPUT:
	case JF_LOG:
	case JF_COUNT:
		break;
	}
	return -EINVAL;
}

/* ---- outputs after the first ---- */

bool jf_is_extra(unsigned sub, unsigned *n, bool *sig)
{
	if (sub < JF_EXTRA0 || sub >= JF_EXTRA0 + 2 * INDEX_EXTRAS_MAX)
		return false;
	*n = (sub - JF_EXTRA0) / 2 + 1;
	*sig = (sub - JF_EXTRA0) % 2 == 1;
	return true;
}

/* From the commit of the first output on, as it (the backend commits
 * them before it), until the owner unlinks one of them. */
static bool extras_shown(const struct job *j)
{
	return (j->flags & (JOB_F_HAS_OUTPUT | JOB_F_OUTPUT_RELEASED)) &&
	       (j->flags & JOB_F_EXTRAS);
}

bool jf_extra_shown(const struct jf_extra *x)
{
	return !(x->out.hidden & (x->sig ? 2 : 1));
}

int jf_extras(struct fsctx *fs, const struct job *j, struct job_output *out, size_t max, size_t *n)
{
	*n = 0;
	if (!extras_shown(j))
		return 0;
	return index_job_extras(fs->ix, j->id, out, max, n);
}

int jf_extra_get(struct fsctx *fs, const struct job *j, unsigned n, struct jf_extra *x)
{
	struct job_output *all;
	size_t got = 0;
	int rc;

	if (!extras_shown(j) || n < 1 || n > INDEX_EXTRAS_MAX)
		return -ENOENT;
	if (!(all = calloc(INDEX_EXTRAS_MAX, sizeof(*all))))
		return -ENOMEM;
	rc = index_job_extras(fs->ix, j->id, all, INDEX_EXTRAS_MAX, &got);
	if (rc == 0 && n > got)
		rc = -ENOENT;
	if (rc == 0) {
		x->n = n;
		x->out = all[n - 1];
	}
	free(all);
	return rc;
}

int jf_extra_at(struct fsctx *fs, const struct job *j, unsigned sub, struct jf_extra *x)
{
	unsigned n;
	bool sig;
	int rc;

	if (!jf_is_extra(sub, &n, &sig))
		return -ENOENT;
	if ((rc = jf_extra_get(fs, j, n, x)) != 0)
		return rc;
	x->sig = sig;
	return jf_extra_shown(x) ? 0 : -ENOENT;
}

const char *jf_extra_name(const struct jf_extra *x, char *buf, size_t len)
{
	snprintf(buf, len, "output.%u.%s%s", x->n, route_media_ext(x->out.media_type),
		 x->sig ? ".minisig" : "");
	return buf;
}

static void extra_trusted(const struct job *j, const struct jf_extra *x, char *buf, size_t len)
{
	char id[JOB_ID_STR_LEN + 1], hex[65];

	ulid_format(j->id, id);
	hex32(x->out.hash, hex);
	snprintf(buf, len, "renderfs job=%s route=%s output=%u blake3=%s size=%llu", id, j->route,
		 x->n, hex, (unsigned long long)x->out.size);
}

uint64_t jf_extra_size(const struct job *j, const struct jf_extra *x)
{
	char trusted[SIGN_TRUSTED_MAX + 1];

	if (!x->sig)
		return x->out.size;
	extra_trusted(j, x, trusted, sizeof(trusted));
	return SIG_TEXT_LEN(strlen(trusted));
}

int jf_extra_sig(struct fsctx *fs, const struct job *j, const struct jf_extra *x, char **out,
		 size_t *len)
{
	char trusted[SIGN_TRUSTED_MAX + 1];

	extra_trusted(j, x, trusted, sizeof(trusted));
	return sign_blob(fs, x->out.hash, trusted, out, len);
}

int jf_size(struct fsctx *fs, const struct job *j, enum job_file f, uint64_t *size)
{
	char trusted[SIGN_TRUSTED_MAX + 1], *text;
	size_t len;
	int rc;

	switch (f) {
	case JF_OUTPUT:
		*size = j->output_size;
		return 0;
	case JF_LOG:
		*size = j->log_size;
		return 0;
	case JF_OUTPUTSIG:
		output_trusted(j, trusted, sizeof(trusted));
		*size = SIG_TEXT_LEN(strlen(trusted));
		return 0;
	case JF_MANIFESTSIG:
		if ((rc = jobview_manifest_json(fs->eng, j, &text, &len)) != 0)
			return rc;
		jobview_manifest_trusted(j, text, len, trusted, sizeof(trusted));
		free(text);
		*size = SIG_TEXT_LEN(strlen(trusted));
		return 0;
	default:
		if ((rc = jf_render(fs, j, f, &text, &len)) != 0)
			return rc;
		free(text);
		*size = len;
		return 0;
	}
}

/* ---- static files ---- */

static int render_readme(struct fsctx *fs, char **out, size_t *len)
{
	const struct route_table *t = engine_routes(fs->eng);
	const struct engine_options *o = engine_options(fs->eng);
	char *routes = NULL, *text;
	size_t rl = 0;
	FILE *m = open_memstream(&routes, &rl);
	int rc;

	if (!m)
		return -ENOMEM;
	for (size_t i = 0; i < t->n; i++)
		fprintf(m, "  %-28s %-6s %s\n", t->routes[i].path,
			t->routes[i].backend->name, t->routes[i].media_type);
	fclose(m);
	rc = asprintf(&text,
		      "renderfs: image and video generation through files.\n"
		      "\n"
		      "Submit a job by writing a JSON request to a route's 'new' file:\n"
		      "  echo '{\"prompt\": \"a red fox in snow\"}' > video/synth/default/t2v/new\n"
		      "Read the job id back from the same open file:\n"
		      "  exec 3<>video/synth/default/t2v/new; echo '{\"prompt\": \"x\"}' >&3; "
		      "read id <&3\n"
		      "Each job is a directory <route>/<id>/ with status, progress, position, log,\n"
		      "error, status.json, request.json, and once complete output.<ext>,\n"
		      "output.<ext>.minisig and manifest.json. Write 'cancel', 'retry',\n"
		      "'redeliver' or 'priority low|normal|high' to its ctl file; rm -r the\n"
		      "directory to delete it. A request's \"webhook\" gets its changes as Standard\n"
		      "Webhooks signed with webhook.pub (v1a) and your webhook.secret (v1).\n"
		      "jobs/ links every job you can see. Verify an output offline:\n"
		      "  minisign -Vm output.mp4 -p render.pub\n"
		      "\n"
		      "Routes (route, backend, media type; schemas in models.json and each\n"
		      "route's schema.json):\n"
		      "%s"
		      "\n"
		      "Options in force: store=%s workers=%d queue_max=%llu user_queue_max=%llu\n"
		      "  rate=%u burst=%u max_request=%llu max_attempts=%u retain=%llus%s\n",
		      routes ? routes : "", store_dir(fs->st), o->workers,
		      (unsigned long long)o->queue_max, (unsigned long long)o->user_queue_max,
		      o->rate, o->burst, (unsigned long long)o->max_request, o->max_attempts,
		      (unsigned long long)(o->retain_ms / 1000), fs->private_ ? " private" : "");
	free(routes);
	if (rc < 0)
		return -ENOMEM;
	*out = text;
	*len = (size_t)rc;
	return 0;
}

/* The engine's metrics, then the notifier's and passthrough's, when on
 * (Prometheus text format). */
static int stats_render(struct fsctx *fs, char **out, size_t *len)
{
	struct notify_stats ns;
	struct pt_stats ps;
	char tail[4096], *p;
	int rc = engine_stats_text(fs->eng, out, len), n = 0;

	if (rc)
		return rc;
	if (fs->notifier) {
		notify_get_stats(fs->notifier, &ns);
		n = snprintf(tail, sizeof(tail),
			     "# HELP renderfs_notify_events_total Changes posted for inotify, by fate.\n"
			     "# TYPE renderfs_notify_events_total counter\n"
			     "renderfs_notify_events_total{fate=\"posted\"} %llu\n"
			     "renderfs_notify_events_total{fate=\"coalesced\"} %llu\n"
			     "renderfs_notify_events_total{fate=\"dropped\"} %llu\n"
			     "# HELP renderfs_notify_ops_total Operations made through the mount.\n"
			     "# TYPE renderfs_notify_ops_total counter\n"
			     "renderfs_notify_ops_total{result=\"ok\"} %llu\n"
			     "renderfs_notify_ops_total{result=\"failed\"} %llu\n"
			     "# HELP renderfs_notify_queued Jobs whose creation or changes wait "
			     "for the notifier.\n"
			     "# TYPE renderfs_notify_queued gauge\n"
			     "renderfs_notify_queued %llu\n"
			     "# HELP renderfs_notify_seconds From posting to the event made.\n"
			     "# TYPE renderfs_notify_seconds summary\n"
			     "renderfs_notify_seconds_sum %.6f\n"
			     "renderfs_notify_seconds_count %llu\n"
			     "renderfs_notify_seconds_max %.6f\n",
			     (unsigned long long)ns.posted, (unsigned long long)ns.coalesced,
			     (unsigned long long)ns.dropped, (unsigned long long)ns.made,
			     (unsigned long long)ns.failed, (unsigned long long)ns.queued,
			     (double)ns.latency_ns_sum / 1e9, (unsigned long long)ns.latency_count,
			     (double)ns.latency_ns_max / 1e9);
	}
	if (fs->limits && n >= 0 && (size_t)n < sizeof(tail)) {
		struct new_limits_stats ls;
		new_limits_get_stats(fs->limits, &ls);
		int k = snprintf(tail + n, sizeof(tail) - (size_t)n,
				 "# HELP renderfs_new_buffered_bytes Unfinished requests held for "
				 "writers of new.\n"
				 "# TYPE renderfs_new_buffered_bytes gauge\n"
				 "renderfs_new_buffered_bytes %llu\n"
				 "# HELP renderfs_new_buffer_refused_total Writes to new refused by a "
				 "buffer budget.\n"
				 "# TYPE renderfs_new_buffer_refused_total counter\n"
				 "renderfs_new_buffer_refused_total{budget=\"user_buffer_max\"} %llu\n"
				 "renderfs_new_buffer_refused_total{budget=\"buffer_max\"} %llu\n"
				 "# HELP renderfs_log_suppressed_total Daemon log lines about rejected "
				 "requests not written (per-uid rate limit).\n"
				 "# TYPE renderfs_log_suppressed_total counter\n"
				 "renderfs_log_suppressed_total %llu\n"
				 "# HELP renderfs_new_writes_total Writes to new files.\n"
				 "# TYPE renderfs_new_writes_total counter\n"
				 "renderfs_new_writes_total %llu\n"
				 "# HELP renderfs_new_write_seconds_total Time of writes to new: in "
				 "the handler (all of it), of which in the engine (checks and the "
				 "durable store).\n"
				 "# TYPE renderfs_new_write_seconds_total counter\n"
				 "renderfs_new_write_seconds_total{part=\"handler\"} %.6f\n"
				 "renderfs_new_write_seconds_total{part=\"engine\"} %.6f\n",
				 (unsigned long long)ls.held, (unsigned long long)ls.refused_user,
				 (unsigned long long)ls.refused_total,
				 (unsigned long long)ls.log_suppressed, (unsigned long long)ls.writes,
				 (double)ls.write_ns / 1e9, (double)ls.engine_ns / 1e9);
		n = k < 0 ? k : n + k;
	}
	if (fs->pt && n >= 0 && (size_t)n < sizeof(tail)) {
		pt_get_stats(fs->pt, &ps);
		int k = snprintf(tail + n, sizeof(tail) - (size_t)n,
				 "# HELP renderfs_passthrough_opens_total Blob opens, by who reads.\n"
				 "# TYPE renderfs_passthrough_opens_total counter\n"
				 "renderfs_passthrough_opens_total{reader=\"kernel\"} %llu\n"
				 "renderfs_passthrough_opens_total{reader=\"daemon\"} %llu\n",
				 (unsigned long long)ps.kernel, (unsigned long long)ps.daemon);
		n = k < 0 ? k : n + k;
	}
	if (n == 0)
		return 0;
	if (n < 0 || (size_t)n >= sizeof(tail) || !(p = realloc(*out, *len + (size_t)n + 1))) {
		free(*out);
		return -ENOMEM;
	}
	memcpy(p + *len, tail, (size_t)n + 1);
	*out = p;
	*len += (size_t)n;
	return 0;
}

int static_render(struct fsctx *fs, enum static_node n, uint32_t uid, char **out, size_t *len)
{
	const struct route_table *t = engine_routes(fs->eng);
	struct sign_pubkey pk;
	char buf[512];
	int rc;

	switch (n) {
	case SN_README:
		return render_readme(fs, out, len);
	case SN_MODELS:
		return dup_text(out, len, "%s", t->models_json);
	case SN_STATS:
		return stats_render(fs, out, len);
	case SN_PUB:
		store_pubkey(fs->st, &pk);
		if ((rc = sign_pubkey_format(&pk, buf, sizeof(buf))) < 0)
			return rc;
		return dup_text(out, len, "%s", buf);
	case SN_HOOKPUB:
		return engine_webhook_pub(fs->eng, out, len);
	case SN_HOOKSECRET:
		return engine_webhook_secret(fs->eng, uid, out, len);
	case SN_USAGE:
		return engine_usage_text(fs->eng, uid, uid == 0, out, len);
	default:
		return -EINVAL;
	}
}

int ledger_at(struct fsctx *fs, uint64_t end_ms, struct attestation *a)
{
	size_t n;
	int rc;

	if (end_ms == 0)
		return -ENOENT;
	if ((rc = index_ledger_list(fs->ix, end_ms - 1, a, 1, &n)) != 0)
		return rc;
	return n == 1 && a->end_ms == end_ms ? 0 : -ENOENT;
}

int ledger_lookup(struct fsctx *fs, const char *name, uint64_t *ino)
{
	struct attestation a;
	char stem[sizeof(a.name)];
	size_t nl = strlen(name);
	int sub, rc;

	if (strcmp(name, "attest") == 0) {
		*ino = INO(NK_LEDGER, LEDGER_ATTEST, 0);
		return 0;
	}
	if (nl > 5 && nl - 5 < sizeof(stem) && strcmp(name + nl - 5, ".json") == 0) {
		sub = LEDGER_JSON;
		nl -= 5;
	} else if (nl > 13 && nl - 13 < sizeof(stem) && strcmp(name + nl - 13, ".json.minisig") == 0) {
		sub = LEDGER_SIG;
		nl -= 13;
	} else {
		return -ENOENT;
	}
	memcpy(stem, name, nl);
	stem[nl] = '\0';
	if ((rc = index_ledger_find(fs->ix, stem, &a)) != 0)
		return rc == STORE_E_NOTFOUND ? -ENOENT : rc;
	*ino = INO(NK_LEDGER, sub, a.end_ms);
	return 0;
}

/* keys/<KEYID>.pub: the file in the store's keys/ whose key id (16 hex
 * digits, the key number) ends in low56. */
int key_render(struct fsctx *fs, uint64_t low56, char **out, size_t *len)
{
	char dir[4200], path[4500], buf[512];
	struct sign_pubkey pk;
	struct dirent *de;
	DIR *d;
	int rc = STORE_E_NOTFOUND;

	snprintf(dir, sizeof(dir), "%s/keys", store_dir(fs->st));
	if (!(d = opendir(dir)))
		return -errno;
	while ((de = readdir(d)) != NULL) {
		uint64_t k;
		if (key_file_id(de->d_name, &k) != 0 || (k & 0xffffffffffffffull) != low56)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if ((rc = sign_pubkey_load(path, &pk)) != 0)
			break;
		if ((rc = sign_pubkey_format(&pk, buf, sizeof(buf))) < 0)
			break;
		rc = out ? dup_text(out, len, "%s", buf) : 0;
		break;
	}
	closedir(d);
	return rc;
}

int key_file_id(const char *name, uint64_t *id)
{
	char *end;

	if (strlen(name) != SIGN_KEYID_LEN + 4 || strcmp(name + SIGN_KEYID_LEN, ".pub") != 0 ||
	    strspn(name, "0123456789ABCDEF") != SIGN_KEYID_LEN)
		return -ENOENT;
	*id = strtoull(name, &end, 16);
	return 0;
}

int cassig_render(struct fsctx *fs, const uint8_t hash[32], uint64_t size, char **out,
		  size_t *len)
{
	char trusted[256];

	store_blob_trusted(hash, size, trusted, sizeof(trusted));
	return sign_blob(fs, hash, trusted, out, len);
}

uint64_t cassig_size(const uint8_t hash[32], uint64_t size)
{
	char trusted[256];

	store_blob_trusted(hash, size, trusted, sizeof(trusted));
	return SIG_TEXT_LEN(strlen(trusted));
}
