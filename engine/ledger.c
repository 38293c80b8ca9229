/*
 * ledger.c - the usage ledger's readers and its attestations (SPEC §14).
 *
 * The ledger itself is kept by the index with each job's final state
 * (index_usage.c). This file shows it (`usage`: totals per owner, per day
 * and in all) and attests it: a signed JSON blob per period (once a day
 * at midnight UTC, and on request) with the period's totals per owner
 * and the BLAKE3 of the previous attestation, so that the chain shows a
 * removed or edited one.
 *
 * Threads: rfs-ledger sleeps until the next midnight (or stop) and
 * attests the day that ended; engine_attest may be called from any
 * thread. ledger_mu guards `stop` and orders attestations (one at a time,
 * the daily one and requests).
 */
#include "engine_p.h"
#include "jobview.h"
#include "ledger.h"

#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <json-c/json.h>

#include "blake3.h"
#include "fileutil.h"
#include "sign.h"

#define DAY_MS 86400000ull
#define RETRY_MS 60000ull /* a failed daily attestation is tried again */

struct ledger {
	struct engine *e;
	pthread_mutex_t mu; /* stop; held through an attestation */
	pthread_cond_t cond;
	bool stop, started;
	pthread_t thread;
};

/* ---- totals as JSON ---- */

/* A summary: {"jobs": {route: {outcome: n}}, "seconds": {kind: ms while
 * summing}, "output_bytes": n, "cache_hits": n}. */
json_object *ledger_summary_new(void)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "jobs", json_object_new_object());
	json_object_object_add(o, "seconds", json_object_new_object());
	json_object_object_add(o, "output_bytes", json_object_new_int64(0));
	json_object_object_add(o, "cache_hits", json_object_new_int64(0));
	return o;
}

static json_object *child(json_object *o, const char *key, bool object)
{
	json_object *c;

	if (json_object_object_get_ex(o, key, &c))
		return c;
	c = object ? json_object_new_object() : json_object_new_int64(0);
	if (c && json_object_object_add(o, key, c) != 0) {
		json_object_put(c);
		return NULL;
	}
	return c;
}

static int add_int(json_object *o, const char *key, uint64_t n)
{
	json_object *c = child(o, key, false);

	if (!c)
		return -ENOMEM;
	json_object_set_int64(c, json_object_get_int64(c) + (int64_t)n);
	return 0;
}

/* One total into a summary. */
static int summary_add(json_object *s, char kind, const char *name, size_t nlen, uint64_t v)
{
	json_object *o;

	switch (kind) {
	case USAGE_JOBS: {
		size_t rlen = strnlen(name, nlen);
		char route[INDEX_ROUTE_MAX + 1];
		if (rlen >= nlen || rlen > INDEX_ROUTE_MAX)
			return 0; /* not ours: left out */
		memcpy(route, name, rlen);
		route[rlen] = '\0';
		if (!(o = child(child(s, "jobs", true), route, true)))
			return -ENOMEM;
		return add_int(o, name + rlen + 1, v);
	}
	case USAGE_MS:
		return add_int(child(s, "seconds", true), name[0] ? name : "unknown", v);
	case USAGE_BYTES:
		return add_int(s, "output_bytes", v);
	case USAGE_CACHED:
		return add_int(s, "cache_hits", v);
	default:
		return 0;
	}
}

void ledger_summary_seconds(json_object *s)
{
	json_object *secs;

	if (!json_object_object_get_ex(s, "seconds", &secs))
		return;
	json_object_object_foreach(secs, k, v)
	{
		int64_t ms = json_object_get_int64(v);
		char text[32];
		snprintf(text, sizeof(text), "%" PRId64 ".%03d", ms / 1000, (int)(ms % 1000));
		json_object_object_add(secs, k, json_object_new_double_s((double)ms / 1000, text));
	}
}

static void day_name(uint32_t day, char out[16])
{
	time_t t = (time_t)day * 86400;
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, 16, "%Y-%m-%d", &tm);
}

struct usage_arg {
	json_object *root, *user, *total, *days, *day;
	uint32_t uid, dayno;
};

static int usage_row(const struct usage_row *r, void *arg)
{
	struct usage_arg *a = arg;
	char key[16];
	int rc;

	if (!a->user || r->uid != a->uid) {
		snprintf(key, sizeof(key), "%u", r->uid);
		if (!(a->user = child(a->root, key, true)) || !(a->total = ledger_summary_new()) ||
		    !(a->days = json_object_new_object()))
			return -ENOMEM;
		json_object_object_add(a->user, "total", a->total);
		json_object_object_add(a->user, "days", a->days);
		a->uid = r->uid;
		a->day = NULL;
	}
	if (!a->day || r->day != a->dayno) {
		day_name(r->day, key);
		if (!(a->day = ledger_summary_new()))
			return -ENOMEM;
		json_object_object_add(a->days, key, a->day);
		a->dayno = r->day;
	}
	if ((rc = summary_add(a->total, r->kind, r->name, r->nlen, r->value)) != 0)
		return rc;
	return summary_add(a->day, r->kind, r->name, r->nlen, r->value);
}

/* Every summary of a usage tree: milliseconds summed become seconds. */
static void tree_finish(json_object *root)
{
	json_object_object_foreach(root, k, u)
	{
		json_object *t, *d;
		(void)k;
		if (json_object_object_get_ex(u, "total", &t))
			ledger_summary_seconds(t);
		if (json_object_object_get_ex(u, "days", &d)) {
			json_object_object_foreach(d, dk, dv)
			{
				(void)dk;
				ledger_summary_seconds(dv);
			}
		}
	}
}

/* The usage totals as a tree: uid -> {"total", "days": {date: ...}}. */
static int usage_tree(struct index *ix, uint32_t uid, bool all, json_object **out)
{
	struct usage_arg a = {0};
	int rc;

	if (!(a.root = json_object_new_object()))
		return -ENOMEM;
	if ((rc = index_usage_rows(ix, all ? INDEX_ANY_OWNER : uid, 0, usage_row, &a)) != 0) {
		json_object_put(a.root);
		return rc;
	}
	tree_finish(a.root);
	*out = a.root;
	return 0;
}

int engine_usage_text(struct engine *e, uint32_t uid, bool all, char **out, size_t *len)
{
	json_object *root;
	int rc = usage_tree(e->ix, uid, all, &root);

	return rc ? rc : jobview_json_text(root, out, len);
}

/* ---- attestations ---- */

struct maker {
	struct engine *e;
	const char *name; /* NULL: by the end time */
	bool need_entries; /* refuse a period without usage (a request) */
	json_object *doc, *usage;
	uint64_t entries;
	char err[256];
};

static void iso_time(uint64_t ms, char out[32])
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	char s[24];

	gmtime_r(&t, &tm);
	strftime(s, sizeof(s), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out, 32, "%s.%03uZ", s, (unsigned)(ms % 1000));
}

static int mk_begin(void *arg, uint64_t from_ms, uint64_t end_ms, const struct attestation *prev)
{
	struct maker *m = arg;
	struct sign_pubkey pk;
	char t[32], keyid[SIGN_KEYID_LEN + 1], hex[B3_HEX_LEN + 1], name[64];
	uint8_t sid[16];

	if (m->name) {
		snprintf(name, sizeof(name), "%s", m->name);
	} else {
		/* 2026-12-05T113000.123Z: sorts as the periods do, no ':' */
		time_t s = (time_t)(end_ms / 1000);
		struct tm tm;
		char b[24];
		gmtime_r(&s, &tm);
		strftime(b, sizeof(b), "%Y-%m-%dT%H%M%S", &tm);
		snprintf(name, sizeof(name), "%s.%03uZ", b, (unsigned)(end_ms % 1000));
	}
	if (!(m->doc = json_object_new_object()) || !(m->usage = json_object_new_object()))
		return -ENOMEM;
	store_pubkey(m->e->st, &pk);
	sign_keyid(pk.keynum, keyid);
	json_object_object_add(m->doc, "renderfs_usage_attestation", json_object_new_int(1));
	json_object_object_add(m->doc, "period", json_object_new_string(name));
	iso_time(from_ms, t);
	json_object_object_add(m->doc, "from", from_ms ? json_object_new_string(t) : NULL);
	iso_time(end_ms, t);
	json_object_object_add(m->doc, "to", json_object_new_string(t));
	json_object_object_add(m->doc, "from_ms", json_object_new_int64((int64_t)from_ms));
	json_object_object_add(m->doc, "to_ms", json_object_new_int64((int64_t)end_ms));
	if (prev) {
		b3_to_hex(prev->hash, hex);
		json_object_object_add(m->doc, "previous", json_object_new_string(hex));
		json_object_object_add(m->doc, "previous_period",
				       json_object_new_string(prev->name));
	} else {
		json_object_object_add(m->doc, "previous", NULL);
		json_object_object_add(m->doc, "previous_period", NULL);
	}
	json_object_object_add(m->doc, "key_id", json_object_new_string(keyid));
	if (index_store_id(m->e->ix, sid) == 0) {
		char sh[33];
		for (int i = 0; i < 16; i++)
			snprintf(sh + 2 * i, 3, "%02x", sid[i]);
		json_object_object_add(m->doc, "store_id", json_object_new_string(sh));
	}
	return 0;
}

/* A journal entry into a summary (what it added to the totals). */
static int entry_into(json_object *s, const struct ledger_entry *e)
{
	char name[INDEX_ROUTE_MAX + 16];
	size_t rlen = strlen(e->route);
	const char *outcome = job_status_name(e->outcome);
	int rc;

	memcpy(name, e->route, rlen + 1);
	memcpy(name + rlen + 1, outcome, strlen(outcome) + 1);
	if ((rc = summary_add(s, USAGE_JOBS, name, rlen + 1 + strlen(outcome), 1)) != 0)
		return rc;
	if ((e->run_ms || e->kind[0]) &&
	    (rc = summary_add(s, USAGE_MS, e->kind, strlen(e->kind), e->run_ms)) != 0)
		return rc;
	if (e->bytes && (rc = summary_add(s, USAGE_BYTES, "", 0, e->bytes)) != 0)
		return rc;
	if (e->cached && (rc = summary_add(s, USAGE_CACHED, "", 0, 1)) != 0)
		return rc;
	return 0;
}

/* The summary of key in o, made if missing. */
static json_object *summary_at(json_object *o, const char *key)
{
	json_object *s;

	if (json_object_object_get_ex(o, key, &s))
		return s;
	if (!(s = ledger_summary_new()))
		return NULL;
	json_object_object_add(o, key, s);
	return s;
}

/* An entry into per-uid summaries (an attestation's "usage"). */
static int entry_by_uid(json_object *usage, const struct ledger_entry *e)
{
	char key[16];
	json_object *s;

	snprintf(key, sizeof(key), "%u", e->uid);
	return (s = summary_at(usage, key)) ? entry_into(s, e) : -ENOMEM;
}

static int mk_entry(void *arg, const struct ledger_entry *e)
{
	struct maker *m = arg;

	m->entries++;
	return entry_by_uid(m->usage, e);
}

static int mk_finish(void *arg, struct attestation *a)
{
	struct maker *m = arg;
	json_object *period;
	char trusted[512], hex[B3_HEX_LEN + 1];
	const char *text;
	int rc;

	if (m->need_entries && m->entries == 0)
		return store_seterr(STORE_E_STATE, "no usage since the last attestation");
	json_object_object_foreach(m->usage, k, s)
	{
		(void)k;
		ledger_summary_seconds(s);
	}
	json_object_object_add(m->doc, "entries", json_object_new_int64((int64_t)m->entries));
	json_object_object_add(m->doc, "usage", json_object_get(m->usage));
	text = json_object_to_json_string_ext(m->doc, JSON_C_TO_STRING_PRETTY |
							      JSON_C_TO_STRING_NOSLASHESCAPE);
	if ((rc = store_blob_write(m->e->st, text, strlen(text), a->hash)) != 0)
		return rc;
	a->size = strlen(text);
	json_object_object_get_ex(m->doc, "period", &period);
	snprintf(a->name, sizeof(a->name), "%s", json_object_get_string(period));
	b3_to_hex(a->hash, hex);
	snprintf(trusted, sizeof(trusted),
		 "renderfs usage attestation %s.json blake3:%s entries:%" PRIu64, a->name, hex,
		 m->entries);
	rc = store_sign_buf(m->e->st, text, strlen(text), trusted, a->sig, sizeof(a->sig));
	return rc < 0 ? rc : 0;
}

static int attest(struct engine *e, uint64_t end_ms, const char *name, struct attestation *out)
{
	struct maker m = {.e = e, .name = name, .need_entries = !name};
	struct ledger_maker lm = {mk_begin, mk_entry, mk_finish, &m};
	int rc;

	rc = index_ledger_attest(e->ix, end_ms, &lm, out);
	json_object_put(m.doc);
	json_object_put(m.usage);
	return rc;
}

int engine_attest(struct engine *e, struct attestation *out)
{
	struct ledger *l = e->ledger;
	int rc;

	pthread_mutex_lock(&l->mu);
	rc = attest(e, 0, NULL, out);
	pthread_mutex_unlock(&l->mu);
	return rc;
}

static int has_entry(const struct ledger_entry *en, void *arg)
{
	(void)en;
	(void)arg;
	return 1;
}

/*
 * The day that ended at `midnight`, unless attested already (its end is
 * at or after it) or there is nothing to attest (no attestation yet and
 * no usage before it). Called with mu held.
 */
static int attest_day(struct engine *e, uint64_t midnight)
{
	struct attestation last, a;
	char name[16];
	int rc = index_ledger_last(e->ix, &last);

	if (rc == 0 && last.end_ms >= midnight)
		return 0;
	if (rc == STORE_E_NOTFOUND) {
		rc = index_journal_walk(e->ix, 0, midnight, has_entry, NULL);
		if (rc <= 0)
			return rc;
	} else if (rc) {
		return rc;
	}
	day_name((uint32_t)((midnight - 1) / DAY_MS), name);
	return attest(e, midnight, name, &a);
}

static void *ledger_main(void *arg)
{
	struct ledger *l = arg;
	struct engine *e = l->e;

	pthread_mutex_lock(&l->mu);
	while (!l->stop) {
		uint64_t now = now_ms(), midnight = now / DAY_MS * DAY_MS, wait;
		struct timespec ts;

		if (attest_day(e, midnight) != 0) {
			fprintf(stderr, "renderfs: cannot attest the usage of the day to %llu: %s\n",
				(unsigned long long)midnight, store_lasterr());
			wait = RETRY_MS;
		} else {
			wait = midnight + DAY_MS - now;
		}
		engine_abstime(wait, &ts);
		pthread_cond_timedwait(&l->cond, &l->mu, &ts);
	}
	pthread_mutex_unlock(&l->mu);
	return NULL;
}

int ledger_open(struct engine *e)
{
	struct ledger *l = calloc(1, sizeof(*l));

	if (!l)
		return -ENOMEM;
	l->e = e;
	pthread_mutex_init(&l->mu, NULL);
	pthread_cond_init(&l->cond, NULL);
	e->ledger = l;
	return 0;
}

int ledger_start(struct engine *e)
{
	struct ledger *l = e->ledger;

	l->stop = false;
	if (pthread_create(&l->thread, NULL, ledger_main, l) != 0)
		return -EAGAIN;
	l->started = true;
	pthread_setname_np(l->thread, "rfs-ledger");
	return 0;
}

void ledger_stop(struct engine *e)
{
	struct ledger *l = e->ledger;

	if (!l || !l->started)
		return;
	pthread_mutex_lock(&l->mu);
	l->stop = true;
	pthread_cond_signal(&l->cond);
	pthread_mutex_unlock(&l->mu);
	pthread_join(l->thread, NULL);
	l->started = false;
}

void ledger_close(struct engine *e)
{
	struct ledger *l = e->ledger;

	if (!l)
		return;
	ledger_stop(e);
	pthread_mutex_destroy(&l->mu);
	pthread_cond_destroy(&l->cond);
	free(l);
	e->ledger = NULL;
}

/* ---- renderctl fsck ---- */

struct fsck_ctx {
	const char *dir;
	FILE *out;
	long problems;
};

static void problem(struct fsck_ctx *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct fsck_ctx *f, const char *fmt, ...)
{
	va_list ap;

	fprintf(f->out, "problem: ");
	va_start(ap, fmt);
	vfprintf(f->out, fmt, ap);
	va_end(ap);
	fputc('\n', f->out);
	f->problems++;
}

/* The journal as a usage tree (what the totals must be). */
static int journal_tree_entry(const struct ledger_entry *e, void *arg)
{
	json_object *root = arg, *u, *days, *s;
	char key[16];
	int rc;

	snprintf(key, sizeof(key), "%u", e->uid);
	if (!(u = child(root, key, true)) || !(days = child(u, "days", true)))
		return -ENOMEM;
	day_name((uint32_t)(e->at_ms / DAY_MS), key);
	if (!(s = summary_at(u, "total")) || (rc = entry_into(s, e)) != 0)
		return s ? rc : -ENOMEM;
	return (s = summary_at(days, key)) ? entry_into(s, e) : -ENOMEM;
}

static const char *compact(json_object *o)
{
	return o ? json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
							    JSON_C_TO_STRING_NOSLASHESCAPE)
		 : "nothing";
}

/* The totals (usage) against the journal, per uid and day. */
static void check_totals(struct fsck_ctx *f, struct index *ix)
{
	json_object *have = NULL, *want = json_object_new_object();

	if (!want || usage_tree(ix, 0, true, &have) != 0 ||
	    index_journal_walk(ix, 0, UINT64_MAX, journal_tree_entry, want) != 0) {
		problem(f, "cannot read the usage ledger: %s", store_lasterr());
		goto out;
	}
	tree_finish(want);
	/* Both ways: a uid or day on one side only differs too. */
	for (int side = 0; side < 2; side++) {
		json_object *a = side ? want : have, *b = side ? have : want;
		json_object_object_foreach(a, uid, ua)
		{
			json_object *ub = NULL, *da, *db = NULL;
			json_object_object_get_ex(b, uid, &ub);
			if (!json_object_object_get_ex(ua, "days", &da))
				continue;
			if (ub)
				json_object_object_get_ex(ub, "days", &db);
			json_object_object_foreach(da, day, sa)
			{
				json_object *sb = NULL;
				if (db)
					json_object_object_get_ex(db, day, &sb);
				if (side && sb)
					continue; /* compared from the other side */
				if (sb && json_object_equal(sa, sb))
					continue;
				/* compact() reuses one buffer per object: print apart */
				fprintf(f->out, "problem: usage of uid %s on %s: the totals say %s,", uid,
					day, compact(side ? sb : sa));
				fprintf(f->out, " its journal says %s\n", compact(side ? sa : sb));
				f->problems++;
			}
		}
	}
out:
	json_object_put(have);
	json_object_put(want);
}

static int period_entry(const struct ledger_entry *e, void *arg)
{
	return entry_by_uid(arg, e);
}

/* One attestation: its blob, its place in the chain, its totals, its
 * signature. prev: the one before it (NULL: the first). */
static void check_attestation(struct fsck_ctx *f, struct index *ix, const struct attestation *a,
			      const struct attestation *prev)
{
	char path[4200], hex[B3_HEX_LEN + 1], keyid[SIGN_KEYID_LEN + 1], *text = NULL;
	uint8_t got[B3_OUT_LEN];
	json_object *doc = NULL, *v, *want = NULL;
	struct sign_sig sig;
	struct sign_pubkey pk;
	size_t len;
	int rc;

	if (a->from_ms != (prev ? prev->end_ms : 0))
		problem(f, "attestation %s: the chain is broken: it starts at %llu ms, the one "
			   "before it (%s) ends at %llu ms (one is missing)",
			a->name, (unsigned long long)a->from_ms, prev ? prev->name : "none",
			(unsigned long long)(prev ? prev->end_ms : 0));
	b3_to_hex(a->hash, hex);
	snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", f->dir, hex, hex);
	if ((rc = file_read_small(path, 64u << 20, &text, &len)) != 0) {
		problem(f, "attestation %s: its file '%s' cannot be read (removed?): %s", a->name,
			path, store_lasterr());
		return;
	}
	b3_hash(text, len, got);
	if (len != a->size || memcmp(got, a->hash, B3_OUT_LEN) != 0) {
		problem(f, "attestation %s: '%s' was modified (its content does not hash to its "
			   "name)",
			a->name, path);
		goto out;
	}
	if (sign_sig_parse(a->sig, strlen(a->sig), &sig) != 0) {
		problem(f, "attestation %s: its signature cannot be read", a->name);
	} else {
		sign_keyid(sig.keynum, keyid);
		snprintf(path, sizeof(path), "%s/keys/%s.pub", f->dir, keyid);
		if (sign_pubkey_load(path, &pk) != 0)
			problem(f, "attestation %s: signed by key %s, which '%s/keys' lacks",
				a->name, keyid, f->dir);
		else if (sign_verify_buf(&pk, &sig, text, len) != 0)
			problem(f, "attestation %s: its signature does not verify", a->name);
	}
	if (!(doc = json_tokener_parse(text)) || !json_object_is_type(doc, json_type_object)) {
		problem(f, "attestation %s is not a JSON object", a->name);
		goto out;
	}
	if (prev)
		b3_to_hex(prev->hash, hex);
	if (!json_object_object_get_ex(doc, "previous", &v) ||
	    (prev ? !json_object_is_type(v, json_type_string) ||
			    strcmp(json_object_get_string(v), hex) != 0
		  : v != NULL))
		problem(f, "attestation %s: the chain is broken: its \"previous\" is not the "
			   "BLAKE3 of %s",
			a->name, prev ? prev->name : "nothing (it is the first)");
	if (!json_object_object_get_ex(doc, "from_ms", &v) ||
	    (uint64_t)json_object_get_int64(v) != a->from_ms ||
	    !json_object_object_get_ex(doc, "to_ms", &v) ||
	    (uint64_t)json_object_get_int64(v) != a->end_ms)
		problem(f, "attestation %s: its period differs from the ledger's record", a->name);
	if (!(want = json_object_new_object()) ||
	    index_journal_walk(ix, a->from_ms, a->end_ms, period_entry, want) != 0) {
		problem(f, "attestation %s: cannot read the journal: %s", a->name, store_lasterr());
		goto out;
	}
	json_object_object_foreach(want, k, s)
	{
		(void)k;
		ledger_summary_seconds(s);
	}
	if (!json_object_object_get_ex(doc, "usage", &v) || !json_object_equal(v, want)) {
		fprintf(f->out, "problem: attestation %s: its totals %s differ", a->name,
			compact(v));
		fprintf(f->out, " from the journal's for its period %s\n", compact(want));
		f->problems++;
	}
out:
	json_object_put(want);
	json_object_put(doc);
	free(text);
}

long ledger_fsck(const char *dir, FILE *out)
{
	struct index_options opt = {0, true};
	struct fsck_ctx f = {dir, out, 0};
	struct attestation a[16], prev;
	struct index *ix;
	char path[4200];
	uint64_t after = 0, count = 0;
	bool have_prev = false;
	size_t n;

	struct stat sb;
	snprintf(path, sizeof(path), "%s/index/data.mdb", dir);
	if (lstat(path, &sb) != 0 && errno == ENOENT)
		return 0; /* no index yet: nothing used (store_fsck says so) */
	snprintf(path, sizeof(path), "%s/index", dir);
	switch (index_open(path, &opt, &ix)) {
	case 0:
		break;
	case STORE_E_NOTFOUND:
		return 0; /* no index yet: nothing used */
	default:
		return -1;
	}
	check_totals(&f, ix);
	do {
		if (index_ledger_list(ix, after, a, 16, &n) != 0) {
			problem(&f, "cannot read the attestations: %s", store_lasterr());
			break;
		}
		for (size_t i = 0; i < n; i++) {
			check_attestation(&f, ix, &a[i], have_prev ? &prev : NULL);
			prev = a[i];
			have_prev = true;
			after = a[i].end_ms;
			count++;
		}
	} while (n == 16);
	fprintf(out, "usage ledger: %llu attestation%s checked\n", (unsigned long long)count,
		count == 1 ? "" : "s");
	index_close(ix);
	return f.problems;
}
