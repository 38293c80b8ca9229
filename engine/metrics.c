/*
 * metrics.c - the stats file: Prometheus text from the index's counts,
 * the engine's counters and latency histograms (stats_mu).
 */
#include "engine_p.h"
#include "webhook.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static const double bucket_le[NBUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
					   2.5,	  5,	10,    30,   60,  120,	300, 600};

void engine_observe(struct histogram *h, double seconds)
{
	int i = 0;

	while (i < NBUCKETS && seconds > bucket_le[i])
		i++;
	h->buckets[i]++;
	h->sum += seconds;
	h->count++;
}


/* ---- metrics ---- */

void tb_printf(struct textbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->oom)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->oom = true;
			return;
		}
		if ((size_t)n < b->cap - b->len)
			break;
		size_t cap = (b->cap + (size_t)n + 1) * 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->oom = true;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
	b->len += (size_t)n;
}

static void histo(struct textbuf *b, const char *name, const char *help,
		  const struct histogram *h)
{
	uint64_t cum = 0;

	tb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	for (int i = 0; i < NBUCKETS; i++) {
		cum += h->buckets[i];
		tb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, bucket_le[i],
			  (unsigned long long)cum);
	}
	cum += h->buckets[NBUCKETS];
	tb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
		  (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->count);
}

int engine_stats_text(struct engine *e, char **out, size_t *len)
{
	static const char *const gname[GROUP_GPU0] = {"cpu", "remote"};
	uint64_t breaker_returns;
	struct textbuf b = {malloc(4096), 0, 4096, false};
	struct store_stats ss;
	struct index_stats is;
	struct histogram hw, hr, he;
	uint64_t submitted, rejected, retries, memo;

	if (!b.p)
		return -ENOMEM;
	pthread_mutex_lock(&e->stats_mu);
	hw = e->h_wait;
	hr = e->h_run;
	he = e->h_e2e;
	submitted = e->submitted;
	rejected = e->rejected;
	retries = e->retries;
	memo = e->memo_hits;
	breaker_returns = e->breaker_returns;
	pthread_mutex_unlock(&e->stats_mu);

	tb_printf(&b, "# HELP renderfs_jobs Jobs in the store by route and status.\n"
		      "# TYPE renderfs_jobs gauge\n");
	for (size_t i = 0; i < e->routes.n; i++) {
		uint64_t c[INDEX_STATUSES];
		if (index_route_counts(e->ix, e->routes.routes[i].path, c) != 0)
			memset(c, 0, sizeof(c));
		for (int s = 0; s < INDEX_STATUSES; s++)
			tb_printf(&b, "renderfs_jobs{route=\"%s\",status=\"%s\"} %llu\n",
				  e->routes.routes[i].path, job_status_name((enum job_status)s),
				  (unsigned long long)c[s]);
	}
	tb_printf(&b, "# HELP renderfs_queue_depth Queued jobs per worker group.\n"
		      "# TYPE renderfs_queue_depth gauge\n");
	uint64_t *depth = calloc(INDEX_GROUPS, sizeof(*depth));
	if (depth && index_queue_depths(e->ix, depth) == 0) {
		/* The remote group: every remote route's queue. */
		for (int g = GROUP_ROUTE0; g < INDEX_GROUPS; g++)
			depth[GROUP_REMOTE] += depth[g];
		for (int g = 0; g < GROUP_GPU0 + e->ngpus; g++) {
			if (g < GROUP_GPU0)
				tb_printf(&b, "renderfs_queue_depth{group=\"%s\"} %llu\n", gname[g],
					  (unsigned long long)depth[g]);
			else
				tb_printf(&b, "renderfs_queue_depth{group=\"gpu%d\"} %llu\n",
					  g - GROUP_GPU0, (unsigned long long)depth[g]);
		}
	}
	free(depth);
	tb_printf(&b, "# HELP renderfs_workers Worker threads per group.\n"
		      "# TYPE renderfs_workers gauge\n");
	pthread_mutex_lock(&e->mu);
	unsigned busy[GROUP_GPU0 + MAX_GPUS], total[GROUP_GPU0 + MAX_GPUS];
	memcpy(busy, e->busy, sizeof(busy));
	memcpy(total, e->total, sizeof(total));
	pthread_mutex_unlock(&e->mu);
	for (int g = 0; g < GROUP_GPU0 + e->ngpus; g++) {
		char name[16];
		if (g < GROUP_GPU0)
			snprintf(name, sizeof(name), "%s", gname[g]);
		else
			snprintf(name, sizeof(name), "gpu%d", g - GROUP_GPU0);
		tb_printf(&b, "renderfs_workers{group=\"%s\"} %u\n", name, total[g]);
		tb_printf(&b, "renderfs_workers_busy{group=\"%s\"} %u\n", name, busy[g]);
	}
	remote_stats(e, &b);
	webhooks_stats(e, &b);
	replica_stats(e, &b);
	histo(&b, "renderfs_job_queue_wait_seconds", "Time from submission to start.", &hw);
	histo(&b, "renderfs_job_run_seconds", "Time from start to a final state.", &hr);
	histo(&b, "renderfs_job_latency_seconds", "Time from submission to a final state.", &he);
	store_get_stats(e->st, &ss);
	if (index_stats(e->ix, &is) != 0)
		memset(&is, 0, sizeof(is));
	tb_printf(&b,
		  "# HELP renderfs_submissions_total Request objects accepted through new.\n"
		  "# TYPE renderfs_submissions_total counter\n"
		  "renderfs_submissions_total %llu\n"
		  "# HELP renderfs_submissions_rejected_total Request objects refused.\n"
		  "# TYPE renderfs_submissions_rejected_total counter\n"
		  "renderfs_submissions_rejected_total %llu\n"
		  "# HELP renderfs_job_retries_total Automatic retries after transient failures.\n"
		  "# TYPE renderfs_job_retries_total counter\n"
		  "renderfs_job_retries_total %llu\n"
		  "# HELP renderfs_breaker_held_total Remote runs that could not reach their "
		  "service while its breaker opened: back in the queue, the attempt not counted.\n"
		  "# TYPE renderfs_breaker_held_total counter\n"
		  "renderfs_breaker_held_total %llu\n"
		  "# HELP renderfs_memo_hits_total Jobs completed from an earlier identical job.\n"
		  "# TYPE renderfs_memo_hits_total counter\n"
		  "renderfs_memo_hits_total %llu\n"
		  "# HELP renderfs_blobs Blobs in the store.\n"
		  "# TYPE renderfs_blobs gauge\n"
		  "renderfs_blobs %llu\n"
		  "# HELP renderfs_blob_bytes_written_total Bytes of outputs committed.\n"
		  "# TYPE renderfs_blob_bytes_written_total counter\n"
		  "renderfs_blob_bytes_written_total %llu\n"
		  "# HELP renderfs_blobs_written_total New blob files.\n"
		  "# TYPE renderfs_blobs_written_total counter\n"
		  "renderfs_blobs_written_total %llu\n"
		  "# HELP renderfs_dedup_hits_total Outputs whose content was already stored.\n"
		  "# TYPE renderfs_dedup_hits_total counter\n"
		  "renderfs_dedup_hits_total %llu\n"
		  "# HELP renderfs_integrity_failures_total Blob reads refused because the content "
		  "no longer matches its hash.\n"
		  "# TYPE renderfs_integrity_failures_total counter\n"
		  "renderfs_integrity_failures_total %llu\n"
		  "# HELP renderfs_index_commits_total Durable index commits (one sync each).\n"
		  "# TYPE renderfs_index_commits_total counter\n"
		  "renderfs_index_commits_total %llu\n"
		  "# HELP renderfs_index_writes_total Index writes (each joins a group commit).\n"
		  "# TYPE renderfs_index_writes_total counter\n"
		  "renderfs_index_writes_total %llu\n"
		  "# HELP renderfs_index_write_seconds_total Time of index writes, summed over "
		  "writes: queued until a commit leader takes them, in their batch, and from "
		  "the commit to their caller running again.\n"
		  "# TYPE renderfs_index_write_seconds_total counter\n"
		  "renderfs_index_write_seconds_total{part=\"queued\"} %.6f\n"
		  "renderfs_index_write_seconds_total{part=\"batch\"} %.6f\n"
		  "renderfs_index_write_seconds_total{part=\"wake\"} %.6f\n"
		  "# HELP renderfs_index_commit_seconds_total Time of group commits, summed over "
		  "commits: applying the batch's writes, and committing it (the sync).\n"
		  "# TYPE renderfs_index_commit_seconds_total counter\n"
		  "renderfs_index_commit_seconds_total{part=\"apply\"} %.6f\n"
		  "renderfs_index_commit_seconds_total{part=\"sync\"} %.6f\n",
		  (unsigned long long)submitted, (unsigned long long)rejected,
		  (unsigned long long)retries, (unsigned long long)breaker_returns,
		  (unsigned long long)memo, (unsigned long long)is.blobs,
		  (unsigned long long)ss.bytes_written, (unsigned long long)ss.blobs_written,
		  (unsigned long long)ss.dedup_hits, (unsigned long long)ss.integrity_failures,
		  (unsigned long long)is.commits, (unsigned long long)is.writes,
		  (double)is.queue_ns / 1e9, (double)is.batch_ns / 1e9, (double)is.wake_ns / 1e9,
		  (double)is.apply_ns / 1e9, (double)is.sync_ns / 1e9);
	if (b.oom) {
		free(b.p);
		return -ENOMEM;
	}
	*out = b.p;
	*len = b.len;
	return 0;
}

