/*
 * bench_submit - submission latency and throughput through a mounted `new`
 * file: W threads, each with its own open descriptor, write one request per
 * write() call; a write returning success is a durable acknowledgement
 * (SPEC §2, §6). Prints mean, p50 and p99 latency and jobs per second.
 *
 * usage: bench_submit NEWFILE WRITERS JOBS_PER_WRITER
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct writer {
	const char *path;
	int n, id;
	double *lat;
	int failed;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *run(void *arg)
{
	struct writer *w = arg;
	char req[256];
	int fd = open(w->path, O_WRONLY | O_CLOEXEC);

	if (fd < 0) {
		perror(w->path);
		w->failed = w->n;
		return NULL;
	}
	for (int i = 0; i < w->n; i++) {
		int len = snprintf(req, sizeof(req),
				   "{\"prompt\": \"bench %d %d\", \"width\": 64, \"height\": 64}\n",
				   w->id, i);
		double t0 = now();
		ssize_t r = write(fd, req, (size_t)len);
		w->lat[i] = now() - t0;
		if (r != len) {
			fprintf(stderr, "write: %s\n", r < 0 ? strerror(errno) : "short");
			w->failed++;
		}
	}
	close(fd);
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	int nw, per, failed = 0;
	struct writer *ws;
	pthread_t *tids;
	double *all, t0, el;

	if (argc != 4) {
		fprintf(stderr, "usage: bench_submit NEWFILE WRITERS JOBS_PER_WRITER\n");
		return 2;
	}
	nw = atoi(argv[2]);
	per = atoi(argv[3]);
	if (nw < 1 || per < 1)
		return 2;
	ws = calloc((size_t)nw, sizeof(*ws));
	tids = calloc((size_t)nw, sizeof(*tids));
	all = calloc((size_t)nw * (size_t)per, sizeof(*all));
	if (!ws || !tids || !all)
		return 1;
	t0 = now();
	for (int i = 0; i < nw; i++) {
		ws[i] = (struct writer){argv[1], per, i, all + (size_t)i * per, 0};
		if (pthread_create(&tids[i], NULL, run, &ws[i]) != 0)
			return 1;
	}
	for (int i = 0; i < nw; i++) {
		pthread_join(tids[i], NULL);
		failed += ws[i].failed;
	}
	el = now() - t0;
	qsort(all, (size_t)nw * per, sizeof(*all), cmp);
	double sum = 0;
	for (size_t i = 0; i < (size_t)nw * per; i++)
		sum += all[i];
	printf("writers=%d jobs=%d mean_ms=%.3f p50_ms=%.3f p99_ms=%.3f jobs_per_s=%.0f failed=%d\n",
	       nw, nw * per, sum / nw / per * 1e3, all[(size_t)nw * per / 2] * 1e3,
	       all[(size_t)nw * per * 99 / 100] * 1e3, nw * per / el, failed);
	free(ws);
	free(tids);
	free(all);
	return failed ? 1 : 0;
}
