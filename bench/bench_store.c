/*
 * bench_store.c - figures for the store, as ratios against baselines
 * measured in the same run.
 *
 *   bench_store [--file PATH] [--size MIB] [--store DIR] [--jobs N]
 *
 * 1. BLAKE3 of one file in the page cache (default: a 1 GiB file of
 *    random bytes made in the store folder): our hash with 1 and 2
 *    threads against `b3sum --num-threads N` for N = 1, 2 (best of 3
 *    runs each), and the ratios.
 * 2. Job creation with durable acknowledgement (every create returns only
 *    after its commit is synced): jobs/s with 1 and with 16 concurrent
 *    creators, and the number of durable LMDB commits (syncs) each needed.
 *
 * Absolute numbers on a shared machine are noise; the ratios are the
 * figures of merit.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "store.h"

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int make_file(const char *path, uint64_t size)
{
	struct stat sb;
	uint8_t *buf;
	int fd;

	if (stat(path, &sb) == 0 && (uint64_t)sb.st_size == size)
		return 0;
	fprintf(stderr, "making %s (%llu MiB of random bytes)...\n", path,
		(unsigned long long)(size >> 20));
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return -errno;
	buf = malloc(1 << 20);
	uint64_t x = 0x9E3779B97F4A7C15ull;
	for (uint64_t off = 0; off < size; off += 1 << 20) {
		for (size_t i = 0; i < (1 << 20) / 8; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			memcpy(buf + 8 * i, &x, 8);
		}
		if (write(fd, buf, 1 << 20) != 1 << 20) {
			free(buf);
			close(fd);
			return -EIO;
		}
	}
	free(buf);
	close(fd);
	return 0;
}

static double time_ours(const char *path, unsigned threads, char hex[65])
{
	double best = 1e9;

	for (int r = 0; r < 3; r++) {
		uint8_t h[32];
		int fd = open(path, O_RDONLY);
		double t0 = now();
		b3_hash_fd(fd, threads, h, NULL);
		double t = now() - t0;
		close(fd);
		b3_to_hex(h, hex);
		if (t < best)
			best = t;
	}
	return best;
}

static double time_b3sum(const char *path, unsigned threads, char hex[65])
{
	double best = 1e9;
	char cmd[4300];

	snprintf(cmd, sizeof(cmd), "b3sum --no-names --num-threads %u '%s'", threads, path);
	for (int r = 0; r < 3; r++) {
		double t0 = now();
		FILE *p = popen(cmd, "r");
		if (!p || fscanf(p, "%64s", hex) != 1) {
			if (p)
				pclose(p);
			return -1;
		}
		if (pclose(p) != 0)
			return -1;
		double t = now() - t0;
		if (t < best)
			best = t;
	}
	return best;
}

struct creator_arg {
	struct store *st;
	int n, failures;
	unsigned id;
};

static void *creator(void *p)
{
	struct creator_arg *a = p;

	for (int i = 0; i < a->n; i++) {
		char req[64];
		struct job_create c = {0};
		uint8_t id[JOB_ID_LEN];

		snprintf(req, sizeof(req), "{\"prompt\":\"bench %u %d\"}", a->id, i);
		c.route = "image/synth/default/t2i";
		c.uid = c.gid = 1000 + a->id;
		c.request = req;
		c.request_len = strlen(req);
		if (index_job_create(store_index(a->st), &c, id, NULL) != 0)
			a->failures++;
	}
	return NULL;
}

/* jobs/s with `threads` creators making `total` jobs; *commits receives
 * the durable commits used. */
static double bench_create(struct store *st, int threads, int total, uint64_t *commits)
{
	pthread_t t[64];
	struct creator_arg a[64];
	struct index_stats s0, s1;
	int failures = 0;

	index_stats(store_index(st), &s0);
	double t0 = now();
	for (int i = 0; i < threads; i++) {
		a[i] = (struct creator_arg){st, total / threads, 0, (unsigned)i};
		pthread_create(&t[i], NULL, creator, &a[i]);
	}
	for (int i = 0; i < threads; i++) {
		pthread_join(t[i], NULL);
		failures += a[i].failures;
	}
	double dt = now() - t0;
	index_stats(store_index(st), &s1);
	*commits = s1.commits - s0.commits;
	if (failures)
		fprintf(stderr, "%d creates failed: %s\n", failures, store_lasterr());
	return (double)(total / threads * threads) / dt;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"file", required_argument, NULL, 'f'},
		{"size", required_argument, NULL, 's'},
		{"store", required_argument, NULL, 'd'},
		{"jobs", required_argument, NULL, 'j'},
		{NULL, 0, NULL, 0},
	};
	const char *file = NULL, *storedir = "bench-store";
	uint64_t size = 1024;
	int jobs = 2000, c;
	char path[4200], h1[65], h2[65], hb1[65], hb2[65];

	while ((c = getopt_long(argc, argv, "f:s:d:j:", opts, NULL)) != -1) {
		if (c == 'f')
			file = optarg;
		else if (c == 's')
			size = strtoull(optarg, NULL, 10);
		else if (c == 'd')
			storedir = optarg;
		else if (c == 'j')
			jobs = atoi(optarg);
		else {
			fprintf(stderr, "usage: %s [--file PATH] [--size MIB] [--store DIR] "
					"[--jobs N]\n",
				argv[0]);
			return 2;
		}
	}
	mkdir(storedir, 0755);
	if (!file) {
		snprintf(path, sizeof(path), "%s/bench-%llumib.bin", storedir,
			 (unsigned long long)size);
		if (make_file(path, size << 20) != 0) {
			fprintf(stderr, "cannot make %s\n", path);
			return 1;
		}
		file = path;
	}
	struct stat sb;
	if (stat(file, &sb) != 0) {
		fprintf(stderr, "cannot stat %s: %s\n", file, strerror(errno));
		return 1;
	}
	double gb = (double)sb.st_size / 1e9;
	char warm[4400];
	snprintf(warm, sizeof(warm), "cat '%s' > /dev/null", file);
	if (system(warm) != 0)
		return 1;

	printf("== BLAKE3 of %s (%.2f GB, in the page cache), best of 3 ==\n", file, gb);
	printf("backend: %s\n", b3_backend_name(b3_get_backend()));
	double o1 = time_ours(file, 1, h1), o2 = time_ours(file, 2, h2);
	double b1 = time_b3sum(file, 1, hb1), b2 = time_b3sum(file, 2, hb2);
	printf("ours   1 thread : %6.3f s  %6.2f GB/s\n", o1, gb / o1);
	printf("ours   2 threads: %6.3f s  %6.2f GB/s\n", o2, gb / o2);
	if (b1 > 0 && b2 > 0) {
		printf("b3sum  1 thread : %6.3f s  %6.2f GB/s\n", b1, gb / b1);
		printf("b3sum  2 threads: %6.3f s  %6.2f GB/s\n", b2, gb / b2);
		printf("ratio ours/b3sum, 1 thread : %.2f (target >= 0.95)\n", b1 / o1);
		printf("ratio ours/b3sum, 2 threads: %.2f (target >= 0.95)\n", b2 / o2);
		if (strcmp(h1, hb1) != 0 || strcmp(h2, hb2) != 0)
			printf("MISMATCH: ours %s, b3sum %s\n", h1, hb1);
	} else {
		printf("b3sum not available: install it for the baseline (apt-get install b3sum)\n");
	}
	printf("ratio ours 2 threads / 1 thread: %.2f (target >= 1.60)\n", o1 / o2);

	/* Group commit. */
	struct store_options opt = {0};
	struct store *st;
	char sdir[4200];
	snprintf(sdir, sizeof(sdir), "%s/store", storedir);
	if (store_open(sdir, &opt, &st) != 0) {
		fprintf(stderr, "store_open: %s\n", store_lasterr());
		return 1;
	}
	uint64_t c1, c16;
	int n1 = jobs / 5 > 100 ? jobs / 5 : 100;
	printf("\n== durable job creation in %s ==\n", sdir);
	double r1 = bench_create(st, 1, n1, &c1);
	double r16 = bench_create(st, 16, jobs, &c16);
	printf(" 1 creator : %8.0f jobs/s  %5d jobs  %5llu durable commits (syncs)\n", r1, n1,
	       (unsigned long long)c1);
	printf("16 creators: %8.0f jobs/s  %5d jobs  %5llu durable commits (syncs), %.1f jobs per "
	       "sync\n",
	       r16, jobs, (unsigned long long)c16, (double)jobs / (double)(c16 ? c16 : 1));
	printf("ratio 16 creators / 1 creator: %.2f (target >= 5)\n", r16 / r1);
	printf("(each durable commit is one fdatasync of the data file plus one synchronous "
	       "meta-page write)\n");
	store_close(st);
	return 0;
}
