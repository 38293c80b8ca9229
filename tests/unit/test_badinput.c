/*
 * test_badinput.c - damaged and foreign files give clear errors that name
 * the file, and never crash: truncated, bit-flipped and foreign data.mdb,
 * an unknown format version, secret keys with wrong permissions or bytes.
 * Random bit flips are tried in child processes, which must end normally
 * (an error or success, never a signal); so must `renderctl fsck`.
 */
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "fileutil.h"
#include "store.h"

static char base[64], pristine[128];

static void make_pristine(void)
{
	struct store_options opt = {0};
	struct store *st;

	snprintf(pristine, sizeof(pristine), "%s/pristine", base);
	if (store_open(pristine, &opt, &st) != 0) {
		fprintf(stderr, "store_open: %s\n", store_lasterr());
		exit(1);
	}
	for (int i = 0; i < 300; i++) {
		char req[64];
		struct job_create c = {0};
		uint8_t id[16];

		snprintf(req, sizeof(req), "{\"prompt\":\"job %d\"}", i);
		c.route = i % 2 ? "image/synth/default/t2i" : "video/synth/default/t2v";
		c.uid = c.gid = 1000;
		c.request = req;
		c.request_len = strlen(req);
		index_job_create(store_index(st), &c, id, NULL);
		index_job_log(store_index(st), id, "created", 7);
	}
	store_close(st);
}

static void copy_store(const char *to)
{
	run_cmd("rm -rf '%s' && cp -a '%s' '%s'", to, pristine, to);
}

/* store_open on dir must fail with rc and a message containing needle. */
static void expect_open_error(const char *dir, int want_rc, const char *needle, const char *what)
{
	struct store_options opt = {0};
	struct store *st;
	int rc = store_open(dir, &opt, &st);

	CHECK(rc != 0 && (want_rc == 0 || rc == want_rc) && strstr(store_lasterr(), needle),
	      "%s: rc %d, message '%s' (wanted '%s')", what, rc, store_lasterr(), needle);
	if (rc == 0)
		store_close(st);
}

/* Where the pages LMDB uses end in the index of dir (the data file is
 * longer: the writer keeps zeros ahead of LMDB's last page). */
static off_t pages_end(const char *dir)
{
	char idx[200];
	MDB_env *env;
	MDB_envinfo info;
	MDB_stat st;
	off_t end = -1;

	snprintf(idx, sizeof(idx), "%s/index", dir);
	if (mdb_env_create(&env) != 0)
		return -1;
	if (mdb_env_open(env, idx, MDB_RDONLY, 0) == 0 && mdb_env_info(env, &info) == 0 &&
	    mdb_env_stat(env, &st) == 0)
		end = (off_t)(info.me_last_pgno + 1) * st.ms_psize;
	mdb_env_close(env);
	return end;
}

static void test_truncated(void)
{
	char dir[128], data[200];
	struct stat sb;

	snprintf(dir, sizeof(dir), "%s/trunc", base);
	snprintf(data, sizeof(data), "%s/index/data.mdb", dir);
	copy_store(dir);
	REQUIRE(stat(data, &sb) == 0, "stat");
	off_t used = pages_end(dir);
	REQUIRE(used > 8192 && used <= sb.st_size, "pages end at %lld of %lld bytes",
		(long long)used, (long long)sb.st_size);
	/* Commits overwrite blocks written ahead instead of growing the file. */
	CHECK(sb.st_size - used >= 512 * 1024, "only %lld bytes ahead of LMDB's pages",
	      (long long)(sb.st_size - used));
	const off_t sizes[] = {0, 100, 4096, 8192 + 17, used / 2, used - 4096};
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		char what[64];

		copy_store(dir);
		REQUIRE(truncate(data, sizes[i]) == 0, "truncate");
		snprintf(what, sizeof(what), "truncated to %lld", (long long)sizes[i]);
		expect_open_error(dir, STORE_E_INDEX, data, what);
	}
	/* renderctl fsck says so too, and exits 1. */
	char out[8192];
	CHECK(fsck_run(dir, out, sizeof(out)) == 1 && strstr(out, "data.mdb"),
	      "fsck on a truncated index: %s", out);
	/* No index at all: a first open that died before making it loses
	 * nothing (a note), unless blob files are there (a problem). */
	REQUIRE(unlink(data) == 0, "unlink data.mdb");
	char cmd[800];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s/blobs'/* && mkdir -p '%s/blobs/ab' && echo x >'%s/blobs/ab/%s'",
		 dir, dir, dir, "ab00000000000000000000000000000000000000000000000000000000000000");
	REQUIRE(system(cmd) == 0, "a stray blob file");
	CHECK(fsck_run(dir, out, sizeof(out)) == 1 && strstr(out, "blob file"),
	      "fsck without an index, with blobs: %s", out);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s/blobs'/*", dir);
	REQUIRE(system(cmd) == 0, "rm blobs");
	CHECK(fsck_run(dir, out, sizeof(out)) == 0 && strstr(out, "no index yet"),
	      "fsck without an index, nothing else: %s", out);
	/* The same first open killed after LMDB made data.mdb but before its
	 * first commit: an empty environment, which is no index yet either. */
	char idir[700];
	MDB_env *env;
	snprintf(idir, sizeof(idir), "%s/index", dir);
	REQUIRE(mdb_env_create(&env) == 0 && mdb_env_open(env, idir, 0, 0600) == 0,
		"an empty LMDB environment");
	mdb_env_close(env);
	CHECK(fsck_run(dir, out, sizeof(out)) == 0 && strstr(out, "no index yet"),
	      "fsck of an empty environment: %s", out);
	snprintf(cmd, sizeof(cmd), "mkdir -p '%s/blobs/ab' && echo x >'%s/blobs/ab/%s'", dir, dir,
		 "ab00000000000000000000000000000000000000000000000000000000000000");
	REQUIRE(system(cmd) == 0, "a stray blob file");
	CHECK(fsck_run(dir, out, sizeof(out)) == 1 && strstr(out, "blob file"),
	      "fsck of an empty environment, with blobs: %s", out);
}

static void test_foreign(void)
{
	char dir[128], data[200];
	uint8_t junk[65536];

	snprintf(dir, sizeof(dir), "%s/foreign", base);
	snprintf(data, sizeof(data), "%s/index/data.mdb", dir);

	/* Random bytes. */
	copy_store(dir);
	for (size_t i = 0; i < sizeof(junk); i++)
		junk[i] = (uint8_t)(i * 2654435761u >> 13);
	FILE *f = fopen(data, "w");
	fwrite(junk, 1, sizeof(junk), f);
	fclose(f);
	expect_open_error(dir, STORE_E_INDEX, data, "random bytes");

	/* A text file. */
	f = fopen(data, "w");
	fputs("this is not a database\n", f);
	fclose(f);
	expect_open_error(dir, STORE_E_INDEX, data, "text file");

	/* A valid LMDB environment of someone else. */
	run_cmd("rm -f '%s/index/data.mdb' '%s/index/lock.mdb'", dir, dir);
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_val k = {5, "hello"}, v = {5, "world"};
	char idx[160];
	snprintf(idx, sizeof(idx), "%s/index", dir);
	REQUIRE(mdb_env_create(&env) == 0 && mdb_env_open(env, idx, 0, 0600) == 0, "lmdb");
	mdb_txn_begin(env, NULL, 0, &txn);
	mdb_dbi_open(txn, NULL, 0, &dbi);
	mdb_put(txn, dbi, &k, &v, 0);
	mdb_txn_commit(txn);
	mdb_env_close(env);
	expect_open_error(dir, STORE_E_INDEX, "not a renderfs index", "foreign LMDB");

	/* Ours, but from a future format version. */
	copy_store(dir);
	REQUIRE(mdb_env_create(&env) == 0 && mdb_env_set_maxdbs(env, 40) == 0 &&
			mdb_env_open(env, idx, 0, 0600) == 0,
		"lmdb");
	mdb_txn_begin(env, NULL, 0, &txn);
	mdb_dbi_open(txn, "meta", 0, &dbi);
	uint8_t ver[4] = {99, 0, 0, 0};
	MDB_val vk = {7, "version"}, vv = {4, ver};
	mdb_put(txn, dbi, &vk, &vv, 0);
	mdb_txn_commit(txn);
	mdb_env_close(env);
	expect_open_error(dir, STORE_E_VERSION, "version 99", "future version");
}

/* Flip bits at chosen offsets: the meta pages' magic. */
static void test_meta_flips(void)
{
	char dir[128], data[200];
	const off_t offs[] = {16, 4096 + 16, 20, 40};

	snprintf(dir, sizeof(dir), "%s/meta", base);
	snprintf(data, sizeof(data), "%s/index/data.mdb", dir);
	for (size_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++) {
		uint8_t b;
		copy_store(dir);
		int fd = open(data, O_RDWR);
		REQUIRE(pread(fd, &b, 1, offs[i]) == 1, "read");
		b ^= 0x10;
		REQUIRE(pwrite(fd, &b, 1, offs[i]) == 1, "write");
		close(fd);
		expect_open_error(dir, STORE_E_INDEX, data, "meta page flip");
	}
}

/* Everything a daemon would read after opening. */
static int exercise(const char *dir)
{
	struct store_options opt = {0};
	struct store *st;
	uint8_t page[100][16];
	const uint8_t *after = NULL;
	uint8_t last[16];
	size_t n;
	int rc = store_open(dir, &opt, &st);

	if (rc)
		return store_lasterr()[0] ? 10 : 11; /* an error with a message */
	for (int r = 0; r < 2; r++) {
		const char *route = r ? "image/synth/default/t2i" : "video/synth/default/t2v";
		after = NULL;
		for (int guard = 0; guard < 1000; guard++) {
			if (index_list_by_route(store_index(st), route, after, 100, page, &n) != 0 ||
			    n == 0)
				break;
			for (size_t i = 0; i < n; i++) {
				struct job j;
				char *req, buf[256];
				size_t len, got;
				if (index_job_get(store_index(st), page[i], &j) == 0)
					job_release(&j);
				if (index_job_request(store_index(st), page[i], &req, &len) == 0)
					free(req);
				index_job_log_read(store_index(st), page[i], 0, buf, sizeof(buf), &got);
			}
			memcpy(last, page[n - 1], 16);
			after = last;
		}
	}
	struct job j;
	while (index_job_claim(store_index(st), 0, &j) == 0) {
		index_job_finish(store_index(st), j.id, JOB_CANCELLED, NULL, NULL);
		job_release(&j);
	}
	store_close(st);
	return 0;
}

static void test_random_flips(void)
{
	char dir[128], data[200], out[16384];
	/* A seed from a failed run reproduces it: RENDERFS_FLIP_SEED=N. */
	const char *given = getenv("RENDERFS_FLIP_SEED");
	unsigned seed = given ? (unsigned)strtoul(given, NULL, 10) : (unsigned)time(NULL);
	struct stat sb;
	int trials = 40, opened = 0, refused = 0;

	printf("bit-flip seed %u\n", seed);
	snprintf(dir, sizeof(dir), "%s/flip", base);
	snprintf(data, sizeof(data), "%s/index/data.mdb", dir);
	for (int t = 0; t < trials; t++) {
		copy_store(dir);
		REQUIRE(stat(data, &sb) == 0, "stat");
		off_t off = (off_t)(rand_r(&seed) % (unsigned)sb.st_size);
		uint8_t b;
		int fd = open(data, O_RDWR);
		REQUIRE(pread(fd, &b, 1, off) == 1, "read");
		b ^= (uint8_t)(1 << (rand_r(&seed) % 8));
		REQUIRE(pwrite(fd, &b, 1, off) == 1, "write");
		close(fd);

		pid_t pid = fork();
		if (pid == 0)
			_exit(exercise(dir));
		int status;
		waitpid(pid, &status, 0);
		CHECK(WIFEXITED(status), "flip at %lld: the reader died of signal %d",
		      (long long)off, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			opened++;
		else if (WIFEXITED(status) && WEXITSTATUS(status) == 10)
			refused++;
		int frc = fsck_run(dir, out, sizeof(out));
		CHECK(frc == 0 || frc == 1, "flip at %lld: fsck exit %d: %s", (long long)off, frc,
		      out);
	}
	printf("random flips: %d opened, %d refused with a message, of %d\n", opened, refused,
	       trials);
	CHECK(opened + refused == trials, "every flip opened or was refused with a message");
}

/* A flip inside a job record's value: the structure is sound, the record
 * checksum catches it, reads and fsck name the file. */
static void test_record_flip(void)
{
	char dir[128], data[200], *bytes, out[16384];
	size_t len;
	uint8_t page[400][16];
	size_t n, damaged = 0, good = 0;

	snprintf(dir, sizeof(dir), "%s/record", base);
	snprintf(data, sizeof(data), "%s/index/data.mdb", dir);
	copy_store(dir);
	/* Job 7's record, found by its magic and its seq (8: seqs start at 1,
	 * at offset 24). LMDB is copy-on-write: freed pages may hold stale
	 * copies, so every copy is damaged, the live one among them. */
	const uint8_t seq8[8] = {8, 0, 0, 0, 0, 0, 0, 0};
	int copies = 0;
	REQUIRE(file_read_small(data, 1 << 26, &bytes, &len) == 0, "read");
	int fd = open(data, O_RDWR);
	for (char *q = bytes; (q = memmem(q, len - (size_t)(q - bytes), "RJ4\0", 4)) != NULL;
	     q++) {
		if ((size_t)(q - bytes) + 32 > len || memcmp(q + 24, seq8, 8) != 0)
			continue;
		off_t off = (q - bytes) + 36; /* inside created_at */
		uint8_t b = (uint8_t)bytes[off] ^ 0x01;
		REQUIRE(pwrite(fd, &b, 1, off) == 1, "write");
		copies++;
	}
	close(fd);
	free(bytes);
	REQUIRE(copies >= 1, "job 7's record not found");

	struct store_options opt = {0};
	struct store *st;
	REQUIRE(store_open(dir, &opt, &st) == 0, "open: %s", store_lasterr());
	for (int r = 0; r < 2; r++) {
		const char *route = r ? "image/synth/default/t2i" : "video/synth/default/t2v";
		REQUIRE(index_list_by_route(store_index(st), route, NULL, 400, page, &n) == 0, "list");
		for (size_t i = 0; i < n; i++) {
			struct job j;
			int rc = index_job_get(store_index(st), page[i], &j);
			if (rc == 0) {
				good++;
				job_release(&j);
			} else if (rc == STORE_E_INDEX && strstr(store_lasterr(), data) &&
				   strstr(store_lasterr(), "damaged record")) {
				damaged++;
			}
		}
	}
	store_close(st);
	CHECK(damaged == 1 && good == 299, "damaged %zu good %zu", damaged, good);
	CHECK(fsck_run(dir, out, sizeof(out)) == 1 && strstr(out, "damaged record"),
	      "fsck: %s", out);
}

/* The set databases' packed pages (P_LEAF2, index_check.c): a count or a
 * value size that does not fit is refused before LMDB reads the page. A
 * compacted copy of the index holds live pages only. */
static void test_set_pages(void)
{
	char dir[128], idx[160], cidx[170], data[200], *bytes;
	const char *what[] = {"one value more than the page holds", "another value size"};
	const off_t field[] = {12, 8}; /* lower; pad (the value size) */
	MDB_env *env;
	size_t len;
	off_t page = -1;

	snprintf(dir, sizeof(dir), "%s/sets", base);
	snprintf(idx, sizeof(idx), "%s/index", dir);
	snprintf(cidx, sizeof(cidx), "%s/compact", dir);
	snprintf(data, sizeof(data), "%s/data.mdb", idx);
	for (int v = 0; v < 2; v++) {
		copy_store(dir);
		REQUIRE(mkdir(cidx, 0700) == 0, "mkdir");
		REQUIRE(mdb_env_create(&env) == 0 && mdb_env_set_maxdbs(env, 40) == 0 &&
				mdb_env_open(env, idx, MDB_RDONLY, 0600) == 0 &&
				mdb_env_copy2(env, cidx, MDB_CP_COMPACT) == 0,
			"compact copy");
		mdb_env_close(env);
		run_cmd("rm -rf '%s' && mv '%s' '%s'", idx, cidx, idx);
		REQUIRE(file_read_small(data, 1 << 26, &bytes, &len) == 0, "read");
		for (size_t off = 2 * 4096; page < 0 && off + 4096 <= len; off += 4096)
			if ((uint8_t)bytes[off + 10] == 0x22 && bytes[off + 11] == 0)
				page = (off_t)off;
		free(bytes);
		REQUIRE(page > 0, "no packed page in the index");
		uint8_t b;
		int fd = open(data, O_RDWR);
		REQUIRE(pread(fd, &b, 1, page + field[v]) == 1, "read");
		b = (uint8_t)(b + 2);
		REQUIRE(pwrite(fd, &b, 1, page + field[v]) == 1, "write");
		close(fd);
		expect_open_error(dir, STORE_E_INDEX, "packed page", what[v]);
	}
}

static void test_keys(void)
{
	char dir[128], keydir[160], cmd[400];
	FILE *p;
	char keyname[256] = "";

	snprintf(dir, sizeof(dir), "%s/keys", base);
	snprintf(keydir, sizeof(keydir), "%s/keys", dir);
	copy_store(dir);
	snprintf(cmd, sizeof(cmd), "ls '%s'/*.key", keydir);
	p = popen(cmd, "r");
	REQUIRE(p && fgets(keyname, sizeof(keyname), p), "no key file");
	pclose(p);
	keyname[strcspn(keyname, "\n")] = '\0';

	REQUIRE(chmod(keyname, 0644) == 0, "chmod");
	expect_open_error(dir, STORE_E_KEYPERM, keyname, "key readable by others");
	chmod(keyname, 0600);

	run_cmd("cp '%s' '%s.orig' && printf 'untrusted comment: x\\ngarbage\\n' > '%s'", keyname,
		keyname, keyname);
	expect_open_error(dir, STORE_E_FORMAT, keyname, "garbage key");
	run_cmd("head -c 60 '%s.orig' > '%s'", keyname, keyname);
	expect_open_error(dir, STORE_E_FORMAT, keyname, "truncated key");
	run_cmd("rm -f '%s'", keyname);
	expect_open_error(dir, -ENOENT, keyname, "missing key");
	run_cmd("mv '%s.orig' '%s'", keyname, keyname);

	/* Restored: it opens again. */
	struct store_options opt = {0};
	struct store *st;
	CHECK(store_open(dir, &opt, &st) == 0, "restored key: %s", store_lasterr());
	store_close(st);
}

/* A named job with an output: fsck checks its names and blobusers entries,
 * which `private` mounts rely on (names per owner, cas/ access), and the
 * jobs counted per route and status. */
static void test_owner_records(void)
{
	struct store_options opt = {0};
	struct job_create jc = {0};
	struct store_sink *s;
	struct store *st;
	uint8_t id[JOB_ID_LEN];
	struct job j;
	char dir[128], idx[200], out[8192];
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;

	snprintf(dir, sizeof(dir), "%s/owners", base);
	REQUIRE(store_open(dir, &opt, &st) == 0, "open: %s", store_lasterr());
	jc.route = "image/synth/default/t2i";
	jc.request = "{}";
	jc.request_len = 2;
	jc.uid = jc.gid = 1234;
	jc.name = "kept";
	REQUIRE(index_job_create(store_index(st), &jc, id, NULL) == 0, "create: %s",
		store_lasterr());
	REQUIRE(index_job_claim(store_index(st), 0, &j) == 0, "claim");
	job_release(&j);
	REQUIRE(store_sink_open(st, &s) == 0, "sink");
	store_sink_write(s, "output", 6);
	REQUIRE(store_job_commit_output(st, id, s, "image/png", "cpu", NULL) == 0, "commit: %s",
		store_lasterr());
	REQUIRE(index_job_finish(store_index(st), id, JOB_COMPLETE, NULL, NULL) == 0, "finish");
	store_close(st);
	CHECK(fsck_run(dir, out, sizeof(out)) == 0, "fsck of a sound store: %s", out);

	snprintf(idx, sizeof(idx), "%s/index", dir);
	REQUIRE(mdb_env_create(&env) == 0 && mdb_env_set_maxdbs(env, 40) == 0 &&
			mdb_env_open(env, idx, 0, 0600) == 0,
		"lmdb");
	mdb_txn_begin(env, NULL, 0, &txn);
	REQUIRE(mdb_dbi_open(txn, "names", 0, &dbi) == 0 && mdb_drop(txn, dbi, 0) == 0, "names");
	REQUIRE(mdb_dbi_open(txn, "blobusers", 0, &dbi) == 0 && mdb_drop(txn, dbi, 0) == 0,
		"blobusers");
	REQUIRE(mdb_dbi_open(txn, "counts", 0, &dbi) == 0 && mdb_drop(txn, dbi, 0) == 0, "counts");
	REQUIRE(mdb_txn_commit(txn) == 0, "commit");
	mdb_env_close(env);
	CHECK(fsck_run(dir, out, sizeof(out)) == 1 &&
		      strstr(out, "is named 'kept' but the name does not lead to it") &&
		      strstr(out, "job(s) of uid 1234 have output") &&
		      strstr(out, "route image/synth/default/t2i has jobs but no counts"),
	      "fsck without the owner records and counts: %s", out);
}

int main(void)
{
	test_tmpdir(base, "badinput");
	make_pristine();
	test_truncated();
	test_foreign();
	test_meta_flips();
	test_random_flips();
	test_record_flip();
	test_set_pages();
	test_keys();
	test_owner_records();
	rm_rf(base);
	return check_done("test_badinput");
}
