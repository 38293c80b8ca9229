/*
 * check.h - the few assertion macros the C unit tests share.
 *
 * CHECK(cond, fmt, ...) records a failure with its location and goes on;
 * REQUIRE() also returns from the current test function. check_done()
 * prints "N passed, N failed" and gives main()'s exit status.
 */
#ifndef RENDERFS_TEST_CHECK_H
#define RENDERFS_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

static int check_passed, check_failed;

#define CHECK(cond, ...)                                                              \
	do {                                                                          \
		if (cond) {                                                           \
			check_passed++;                                               \
		} else {                                                              \
			check_failed++;                                               \
			fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, \
				#cond);                                               \
			fprintf(stderr, __VA_ARGS__);                                 \
			fputc('\n', stderr);                                          \
		}                                                                     \
	} while (0)

#define REQUIRE(cond, ...)                                                            \
	do {                                                                          \
		int req_ok_ = !!(cond);                                               \
		CHECK(req_ok_, __VA_ARGS__);                                          \
		if (!req_ok_)                                                         \
			return;                                                       \
	} while (0)

static inline int check_done(const char *name)
{
	printf("%s: %d passed, %d failed\n", name, check_passed, check_failed);
	return check_failed == 0 && check_passed > 0 ? 0 : 1;
}

/* Path of a file in tests/vectors, from the RENDERFS_VECTORS define. */
#define VECTOR_PATH(name) RENDERFS_VECTORS "/" name

#include <stdarg.h>
#include <string.h>

/* A new empty directory under /tmp; path must hold 64 bytes. */
static inline void test_tmpdir(char *path, const char *tag)
{
	snprintf(path, 64, "/tmp/renderfs-%s-XXXXXX", tag);
	if (!mkdtemp(path)) {
		perror("mkdtemp");
		exit(2);
	}
}

/* Run a shell command (printf-style); returns its exit status, or -1. */
static inline int run_cmd(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline int run_cmd(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

static inline void rm_rf(const char *path)
{
	if (strncmp(path, "/tmp/renderfs-", 14) == 0)
		run_cmd("rm -rf '%s'", path);
}

/*
 * Run `renderctl fsck dir` (another process: LMDB allows one open of an
 * environment per process). Its output goes to out; returns its exit code.
 */
#ifdef RENDERCTL
static inline int fsck_run(const char *dir, char *out, size_t outsz)
{
	char cmd[512];
	size_t n = 0;
	FILE *p;
	int st;

	snprintf(cmd, sizeof(cmd), "%s fsck '%s' 2>&1", RENDERCTL, dir);
	p = popen(cmd, "r");
	if (!p)
		return -1;
	while (n + 1 < outsz && fgets(out + n, (int)(outsz - n), p))
		n += strlen(out + n);
	out[n] = '\0';
	while (fgetc(p) != EOF)
		;
	st = pclose(p);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
#endif

static inline int have_tool(const char *name)
{
	return run_cmd("command -v %s >/dev/null 2>&1", name) == 0;
}

#endif
