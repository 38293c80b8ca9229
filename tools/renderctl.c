/*
 * renderctl.c - the renderfs client: jobs in a mount (client.c), store
 * maintenance and verification.
 *
 *   renderctl submit ROUTE [FILE|-] [--wait] [--name N] [--priority P]
 *                 [--timeout S] [--webhook URL] [--mount DIR]
 *   renderctl wait JOBDIR...      follow jobs until they end
 *   renderctl ls [ROUTE] [--status S]  the caller's jobs
 *   renderctl fsck [--remote [--deep]] STORE  check a store; non-zero on any problem
 *   renderctl replica status|push|verify STORE  its bucket (replica=)
 *   renderctl keygen [DIR]        new minisign key pair in DIR (default .)
 *   renderctl keygen --store STORE  rotate a store's signing key
 *   renderctl verify FILE [--sig SIG] [--pub PUB]
 *   renderctl gc STORE            collect unreferenced blobs
 *   renderctl render ROUTE REQUEST.json|- -o OUT [--threads N] [--cpu]
 *                                 run a built-in backend in this process
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json-c/json.h>

#include "client.h"
#include "fileutil.h"
#include "ledger.h"
#include "replica_cmd.h"
#include "store.h"
#include "synth.h"

static const char *prog = "renderctl";

static int usage(FILE *to, int code)
{
	fprintf(to,
		"usage: %s COMMAND [ARGS]\n"
		"\n"
		"commands:\n"
		"  submit ROUTE [FILE|-] [--wait] [--name N] [--priority low|normal|high]\n"
		"         [--timeout S] [--webhook URL] [--mount DIR] [--cancel-on-interrupt]\n"
		"                                  write the request(s) in FILE (default: stdin)\n"
		"                                  to ROUTE's new file in the mount (the current\n"
		"                                  directory's, --mount, $RENDERFS_MOUNT, or the\n"
		"                                  only one) and print each job's path; --wait\n"
		"                                  follows them (a progress bar on a terminal)\n"
		"                                  and prints the outputs' paths; exit 0 when all\n"
		"                                  complete, 1 if one failed (its error on\n"
		"                                  stderr), 3 if one was cancelled, 2 when the\n"
		"                                  request is refused, 130 on Ctrl-C (which asks\n"
		"                                  whether to cancel, on a terminal)\n"
		"  wait JOBDIR... [--cancel-on-interrupt]\n"
		"                                  follow jobs until they end; exit as submit\n"
		"  ls [ROUTE] [--status S] [--mount DIR]\n"
		"                                  your jobs (id, status, progress, age, owner,\n"
		"                                  route), oldest first\n"
		"  usage [--since YYYY-MM-DD|Nd] [--uid U] [--json] [--attest] [--mount DIR]\n"
		"                                  the usage ledger: jobs by route and outcome,\n"
		"                                  seconds by device, output bytes, cache hits\n"
		"                                  (yours; root: everyone's), as a table or\n"
		"                                  JSON; --attest writes a signed attestation\n"
		"                                  into ledger/ and prints its path\n"
		"  fsck [--adopt] [--remote [--deep]] STORE\n"
		"                                  rehash blobs and cross-check the index and\n"
		"                                  the usage ledger and its attestations;\n"
		"                                  exit 1 and name every problem found; with\n"
		"                                  --adopt (store not mounted), first put back\n"
		"                                  the blobs of lost+found/ that jobs name; with\n"
		"                                  --remote, check that the replica bucket has\n"
		"                                  every blob it confirmed (HEAD; --deep: download\n"
		"                                  and rehash)\n"
		"  replica status|push|verify [--deep] [--credentials FILE] STORE\n"
		"                                  the store's replica bucket (replica=): what\n"
		"                                  waits to go up and what is only there; push\n"
		"                                  (not mounted) puts every blob not yet\n"
		"                                  confirmed and every manifest in the outbox;\n"
		"                                  verify checks the bucket's copies\n"
		"  keygen [DIR]                    make a minisign key pair DIR/<KEYID>.key/.pub\n"
		"  keygen --store STORE            rotate STORE's signing key (old public keys stay)\n"
		"  verify FILE [--sig SIG] [--pub PUB]\n"
		"                                  check FILE's signature (default FILE.minisig;\n"
		"                                  key: PUB, else render.pub or keys/<KEYID>.pub\n"
		"                                  found in FILE's folder or above); for a\n"
		"                                  job's output in a mount, also its signed\n"
		"                                  manifest and, input by input, the manifests\n"
		"                                  of the jobs that made them (the pipeline)\n"
		"  gc STORE                        move blob files nothing refers to into\n"
		"                                  STORE/lost+found/\n"
		"  render ROUTE REQUEST.json|- -o OUT [--threads N] [--cpu]\n"
		"                                  run a built-in route (%s, %s)\n"
		"                                  here, without a mount\n",
		prog, SYNTH_ROUTE_IMAGE, SYNTH_ROUTE_VIDEO);
	return code;
}

/* Open the store read-write (it must not be mounted) and put back what
 * lost+found/ holds that jobs name. */
static int fsck_adopt(const char *dir)
{
	struct store_options opt = {0};
	struct store *st;
	uint64_t n = 0;
	int rc;

	if ((rc = store_open(dir, &opt, &st)) != 0) {
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
		return 1;
	}
	rc = store_adopt(st, stdout, &n);
	if (rc)
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
	else
		printf("adopted %llu blob file(s) from lost+found\n", (unsigned long long)n);
	store_close(st);
	return rc ? 1 : 0;
}

static int cmd_fsck(int argc, char **argv)
{
	int status;
	pid_t pid;

	bool remote = false, deep = false;

	if (argc == 3 && strcmp(argv[1], "--adopt") == 0) {
		if (fsck_adopt(argv[2]) != 0)
			return 1;
		argc--;
		argv++;
	}
	while (argc > 2 && (strcmp(argv[1], "--remote") == 0 || strcmp(argv[1], "--deep") == 0)) {
		remote = true;
		deep = deep || strcmp(argv[1], "--deep") == 0;
		argc--;
		argv++;
	}
	if (argc != 2)
		return usage(stderr, 2);
	fflush(stdout);
	/* A damaged index can make LMDB fault; check in a child so that the
	 * report is a message, never a crash of this tool. */
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "%s: fork: %s\n", prog, strerror(errno));
		return 2;
	}
	if (pid == 0) {
		long n = store_fsck(argv[1], stdout), m;
		if (n < 0) {
			printf("problem: %s\n", store_lasterr());
			n = 1;
		} else if ((m = ledger_fsck(argv[1], stdout)) > 0) {
			n += m;
		} else if (m < 0 && n == 0) {
			printf("problem: %s\n", store_lasterr());
			n = 1;
		}
		if (remote)
			n += replica_verify(argv[1], deep, NULL, stdout);
		printf("%ld problem%s in '%s'\n", n, n == 1 ? "" : "s", argv[1]);
		fflush(stdout);
		_exit(n == 0 ? 0 : 1);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return 2;
	if (WIFSIGNALED(status)) {
		printf("problem: reading the index '%s/index/data.mdb' crashed the checker "
		       "(signal %d): the file is damaged\n",
		       argv[1], WTERMSIG(status));
		return 1;
	}
	return WEXITSTATUS(status);
}

static int cmd_keygen(int argc, char **argv)
{
	struct sign_seckey sk;
	struct sign_pubkey pk;
	char keyid[SIGN_KEYID_LEN + 1];
	const char *dir = ".";
	int rc;

	if (argc == 3 && strcmp(argv[1], "--store") == 0) {
		struct store *st;
		struct store_options opt = {0};

		if ((rc = store_open(argv[2], &opt, &st)) != 0) {
			fprintf(stderr, "%s: %s\n", prog, store_lasterr());
			return 1;
		}
		rc = store_key_rotate(st);
		if (rc == 0) {
			store_pubkey(st, &pk);
			sign_keyid(pk.keynum, keyid);
			printf("%s/keys/%s.pub\n", argv[2], keyid);
		} else {
			fprintf(stderr, "%s: %s\n", prog, store_lasterr());
		}
		store_close(st);
		return rc ? 1 : 0;
	}
	if (argc > 2)
		return usage(stderr, 2);
	if (argc == 2)
		dir = argv[1];
	if ((rc = sign_keygen(&sk, &pk)) != 0 || (rc = sign_keypair_save(dir, &sk, &pk)) != 0) {
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
		sign_seckey_wipe(&sk);
		return 1;
	}
	sign_keyid(sk.keynum, keyid);
	printf("%s/%s.key\n%s/%s.pub\n", dir, keyid, dir, keyid);
	sign_seckey_wipe(&sk);
	return 0;
}

/* Find the public key for keynum: render.pub or keys/<KEYID>.pub in the
 * file's folder or any folder above it. */
static int find_pubkey(const char *file, const uint8_t keynum[SIGN_KEYNUM_LEN],
		       struct sign_pubkey *pk, char *found, size_t foundsz)
{
	char dir[4096], path[4200], keyid[SIGN_KEYID_LEN + 1];
	char *real = realpath(file, NULL);

	if (!real)
		return -errno;
	snprintf(dir, sizeof(dir), "%s", real);
	free(real);
	*strrchr(dir, '/') = '\0'; /* realpath() is absolute: there is a slash */
	if (!dir[0])
		snprintf(dir, sizeof(dir), "/");
	sign_keyid(keynum, keyid);
	for (;;) {
		const char *cands[] = {"render.pub", NULL};
		char keysub[64];

		snprintf(keysub, sizeof(keysub), "keys/%s.pub", keyid);
		cands[1] = keysub;
		for (int i = 0; i < 2; i++) {
			snprintf(path, sizeof(path), "%s/%s", strcmp(dir, "/") ? dir : "", cands[i]);
			if (access(path, R_OK) == 0 && sign_pubkey_load(path, pk) == 0 &&
			    memcmp(pk->keynum, keynum, SIGN_KEYNUM_LEN) == 0) {
				snprintf(found, foundsz, "%s", path);
				return 0;
			}
		}
		/* Up one folder: cut at the last slash. */
		char *slash = strrchr(dir, '/');
		if (strcmp(dir, "/") == 0 || !slash)
			return STORE_E_NOTFOUND;
		if (slash == dir)
			slash[1] = '\0';
		else
			*slash = '\0';
	}
}

/* The value of " key=" in a trusted comment, or NULL. */
static const char *comment_field(const char *tc, const char *key, char *buf, size_t bufsz)
{
	size_t kl = strlen(key);

	for (const char *p = tc; (p = strstr(p, key)) != NULL; p += kl) {
		if ((p == tc || p[-1] == ' ' || p[-1] == '\t') && p[kl] == '=') {
			size_t n = strcspn(p + kl + 1, " \t");
			snprintf(buf, bufsz, "%.*s", (int)n, p + kl + 1);
			return buf;
		}
	}
	return NULL;
}

/* What verify found of a file and its signature. */
struct sigcheck {
	char hex[B3_HEX_LEN + 1];
	uint64_t size;
	struct sign_sig sig;
	bool bad_sig; /* it was checked and does not verify (else: could not be) */
	char why[4400];
};

/*
 * verify's check of file against sigpath (NULL: file.minisig) and a key
 * (pubpath, else render.pub or keys/<KEYID>.pub found near file): 0 when
 * the signature is good, else 1 with c->why. With show, the lines verify
 * prints as it goes (file, key id, public key).
 */
static int check_sig(const char *file, const char *sigpath, const char *pubpath, bool show,
		     struct sigcheck *c)
{
	char defsig[4200], pubfound[4200], keyid[SIGN_KEYID_LEN + 1];
	struct sign_pubkey pk;
	uint8_t hash[B3_OUT_LEN];
	char *text;
	size_t len;
	int fd, rc = 1;

	c->bad_sig = false;
	if (!sigpath) {
		snprintf(defsig, sizeof(defsig), "%s.minisig", file);
		sigpath = defsig;
	}
	if ((fd = open(file, O_RDONLY | O_CLOEXEC)) < 0) {
		snprintf(c->why, sizeof(c->why), "cannot open '%s': %s", file, strerror(errno));
		return 1;
	}
	if ((rc = b3_hash_fd(fd, 2, hash, &c->size)) != 0) {
		snprintf(c->why, sizeof(c->why), "cannot read '%s': %s", file, strerror(-rc));
		rc = 1;
		goto out;
	}
	rc = 1;
	b3_to_hex(hash, c->hex);
	if (show)
		printf("file: %s\nblake3: %s\nsize: %llu\n", file, c->hex,
		       (unsigned long long)c->size);
	if (file_read_small(sigpath, SIGN_TRUSTED_MAX + 2048, &text, &len) != 0) {
		snprintf(c->why, sizeof(c->why), "%s", store_lasterr());
		goto out;
	}
	if (sign_sig_parse(text, len, &c->sig) != 0) {
		free(text);
		snprintf(c->why, sizeof(c->why), "'%s' is not a minisign signature", sigpath);
		goto out;
	}
	free(text);
	sign_keyid(c->sig.keynum, keyid);
	if (show)
		printf("key id: %s\ntrusted comment: %s\n", keyid, c->sig.trusted);
	if (pubpath) {
		if (sign_pubkey_load(pubpath, &pk) != 0) {
			snprintf(c->why, sizeof(c->why), "%s", store_lasterr());
			goto out;
		}
		snprintf(pubfound, sizeof(pubfound), "%s", pubpath);
	} else if (find_pubkey(file, c->sig.keynum, &pk, pubfound, sizeof(pubfound)) != 0) {
		snprintf(c->why, sizeof(c->why),
			 "no public key for key id %s (render.pub or keys/%s.pub near '%s'); "
			 "give one with --pub",
			 keyid, keyid, file);
		goto out;
	}
	if (show)
		printf("public key: %s\n", pubfound);
	if (sign_verify_fd(&pk, &c->sig, fd) != 0) {
		c->bad_sig = true;
		snprintf(c->why, sizeof(c->why), "%s", store_lasterr());
		goto out;
	}
	rc = 0;
out:
	close(fd);
	return rc;
}

/* The mount's root above path: the first folder up with jobs/ and
 * render.pub. 0 or -ENOENT. */
static int mount_root(const char *path, char *root, size_t len)
{
	char *real = realpath(path, NULL);
	char probe[4200];

	if (!real)
		return -errno;
	snprintf(root, len, "%s", real);
	free(real);
	for (;;) {
		char *slash = strrchr(root, '/');
		if (!slash || slash == root)
			return -ENOENT;
		*slash = '\0';
		snprintf(probe, sizeof(probe), "%s/render.pub", root);
		if (access(probe, R_OK) != 0)
			continue;
		snprintf(probe, sizeof(probe), "%s/jobs", root);
		if (access(probe, X_OK) == 0)
			return 0;
	}
}

/* Whether manifest m names hash as an output ("output", "outputs"). */
static const char *manifest_names(json_object *m, const char *hex)
{
	json_object *o, *v, *arr;

	if (json_object_object_get_ex(m, "outputs", &arr) &&
	    json_object_is_type(arr, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(arr); i++) {
			o = json_object_array_get_idx(arr, i);
			if (json_object_object_get_ex(o, "blake3", &v) &&
			    strcmp(json_object_get_string(v), hex) == 0)
				return json_object_object_get_ex(o, "name", &v)
					   ? json_object_get_string(v)
					   : "an output";
		}
	}
	if (json_object_object_get_ex(m, "output", &o) && o &&
	    json_object_object_get_ex(o, "blake3", &v) &&
	    strcmp(json_object_get_string(v), hex) == 0)
		return json_object_object_get_ex(o, "name", &v) ? json_object_get_string(v)
								 : "its output";
	return NULL;
}

#define CHAIN_DEPTH_MAX 64

/*
 * The chain of a pipeline (SPEC §3): the manifest at mpath (of a job
 * whose output is hex) is signed and names hex; each input it lists that
 * was another job's output leads to that job's manifest (under the
 * mount's jobs/), checked the same way. Prints one line per link; returns
 * the number of problems.
 */
static int verify_chain(const char *root, const char *mpath, const char *hex, int depth,
			unsigned *jobs)
{
	struct sigcheck *sc = malloc(sizeof(*sc));
	json_object *m, *v, *inputs;
	const char *named, *route = "?", *job = "?";
	char *text;
	size_t len;
	int bad = 0;

	if (depth > CHAIN_DEPTH_MAX) {
		printf("%*sproblem: the chain is longer than %d jobs\n", 2 * depth, "",
		       CHAIN_DEPTH_MAX);
		return 1;
	}
	if (!sc || check_sig(mpath, NULL, NULL, false, sc) != 0) {
		if (!sc)
			printf("%*sproblem: out of memory\n", 2 * depth, "");
		else if (sc->bad_sig)
			printf("%*sproblem: BAD signature on '%s' (%s)\n", 2 * depth, "", mpath,
			       sc->why);
		else
			printf("%*sproblem: %s\n", 2 * depth, "", sc->why);
		free(sc);
		return 1;
	}
	free(sc);
	if (file_read_small(mpath, 1 << 20, &text, &len) != 0 ||
	    !(m = json_tokener_parse(text)) || !json_object_is_type(m, json_type_object)) {
		printf("%*sproblem: '%s' is not a manifest\n", 2 * depth, "", mpath);
		return 1;
	}
	free(text);
	if (json_object_object_get_ex(m, "job", &v))
		job = json_object_get_string(v);
	if (json_object_object_get_ex(m, "route", &v))
		route = json_object_get_string(v);
	(*jobs)++;
	if (!(named = manifest_names(m, hex))) {
		printf("%*sproblem: job %s's signed manifest does not name blake3 %s\n",
		       2 * depth, "", job, hex);
		json_object_put(m);
		return 1;
	}
	printf("%*sjob %s (%s): manifest signature good; %s is blake3 %.16s...\n", 2 * depth, "",
	       job, route, named, hex);
	if (json_object_object_get_ex(m, "inputs", &inputs) &&
	    json_object_is_type(inputs, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(inputs); i++) {
			json_object *in = json_object_array_get_idx(inputs, i), *f, *h, *jv;
			const char *ih;
			char next[4200];
			if (!json_object_object_get_ex(in, "blake3", &h)) {
				printf("%*sproblem: an input of job %s names no blob\n",
				       2 * depth + 2, "", job);
				bad++;
				continue;
			}
			ih = json_object_get_string(h);
			json_object_object_get_ex(in, "field", &f);
			if (!json_object_object_get_ex(in, "job", &jv)) {
				printf("%*sinput %s: cas:%.16s... made by no job this store knows "
				       "(the chain ends here)\n",
				       2 * depth + 2, "", f ? json_object_get_string(f) : "?", ih);
				continue;
			}
			if (strspn(json_object_get_string(jv), "0123456789ABCDEFGHJKMNPQRSTVWXYZ") !=
			    strlen(json_object_get_string(jv))) {
				printf("%*sproblem: input %s names a job that is not a job id\n",
				       2 * depth + 2, "", f ? json_object_get_string(f) : "?");
				bad++;
				continue;
			}
			printf("%*sinput %s: cas:%.16s... from job %s\n", 2 * depth + 2, "",
			       f ? json_object_get_string(f) : "?", ih, json_object_get_string(jv));
			snprintf(next, sizeof(next), "%s/jobs/%s/manifest.json", root,
				 json_object_get_string(jv));
			if (access(next, F_OK) != 0) {
				printf("%*sproblem: job %s is gone (no %s)\n", 2 * depth + 4, "",
				       json_object_get_string(jv), next);
				bad++;
				continue;
			}
			bad += verify_chain(root, next, ih, depth + 2, jobs);
		}
	}
	json_object_put(m);
	return bad;
}

static int cmd_verify(int argc, char **argv)
{
	static const struct option opts[] = {
		{"sig", required_argument, NULL, 's'},
		{"pub", required_argument, NULL, 'p'},
		{NULL, 0, NULL, 0},
	};
	const char *sigpath = NULL, *pubpath = NULL, *file;
	struct sigcheck *sc;
	char field[256];
	int c, bad = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "s:p:", opts, NULL)) != -1) {
		if (c == 's')
			sigpath = optarg;
		else if (c == 'p')
			pubpath = optarg;
		else
			return usage(stderr, 2);
	}
	if (optind != argc - 1)
		return usage(stderr, 2);
	file = argv[optind];
	if (!(sc = malloc(sizeof(*sc)))) {
		fprintf(stderr, "%s: out of memory\n", prog);
		return 1;
	}
	if (check_sig(file, sigpath, pubpath, true, sc) != 0) {
		if (sc->bad_sig)
			printf("signature: BAD (%s)\n", sc->why);
		else
			fprintf(stderr, "%s: %s\n", prog, sc->why);
		free(sc);
		return 1;
	}
	printf("signature: good\n");
	/* A renderfs trusted comment binds the content's hash and size. */
	if (comment_field(sc->sig.trusted, "blake3", field, sizeof(field)) &&
	    strcmp(field, sc->hex) != 0) {
		printf("problem: the trusted comment names blake3 %s, the file has %s\n", field,
		       sc->hex);
		bad = 1;
	}
	if (comment_field(sc->sig.trusted, "size", field, sizeof(field)) &&
	    strtoull(field, NULL, 10) != sc->size) {
		printf("problem: the trusted comment names size %s, the file has %llu\n", field,
		       (unsigned long long)sc->size);
		bad = 1;
	}
	{
		/* An output of a job: its manifest, and the jobs whose outputs
		 * were its inputs, back to the first (SPEC §3). */
		char mpath[4200], root[4096], *slash;
		unsigned jobs = 0;
		int problems;

		snprintf(mpath, sizeof(mpath), "%s", file);
		slash = strrchr(mpath, '/');
		snprintf(slash ? slash + 1 : mpath, sizeof(mpath) - (size_t)(slash ? slash + 1 - mpath : 0),
			 "manifest.json");
		if (!bad && strcmp(file, mpath) != 0 && access(mpath, F_OK) == 0 &&
		    mount_root(file, root, sizeof(root)) == 0) {
			printf("chain:\n");
			problems = verify_chain(root, mpath, sc->hex, 1, &jobs);
			if (problems)
				printf("chain: %d problem%s\n", problems, problems == 1 ? "" : "s");
			else
				printf("chain: %u job%s, every link signed and named\n", jobs,
				       jobs == 1 ? "" : "s");
			bad = problems ? 1 : 0;
		}
	}
	free(sc);
	return bad;
}

static int cmd_gc(int argc, char **argv)
{
	struct store_options opt = {0};
	struct store_recovery r;
	struct store *st;
	uint64_t n = 0;
	int rc;

	if (argc != 2)
		return usage(stderr, 2);
	if ((rc = store_open(argv[1], &opt, &st)) != 0) {
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
		return 1;
	}
	store_get_recovery(st, &r);
	rc = store_gc(st, &n);
	if (rc)
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
	else
		printf("moved %llu blob file(s) to lost+found\n",
		       (unsigned long long)(n + r.blobs_collected));
	store_close(st);
	return rc ? 1 : 0;
}

static int show_progress(void *arg, int32_t done, int32_t total)
{
	(void)arg;
	fprintf(stderr, "\rrendering: %d/%d frames (%d%%)", done, total,
		(int)((int64_t)done * 100 / total));
	if (done == total)
		fputc('\n', stderr);
	return 0;
}

static int cmd_render(int argc, char **argv)
{
	static const struct option opts[] = {
		{"output", required_argument, NULL, 'o'},
		{"threads", required_argument, NULL, 't'},
		{"cpu", no_argument, NULL, 'c'},
		{NULL, 0, NULL, 0},
	};
	struct synth_options so = {0, true, 0, NULL, NULL};
	struct synth_request r;
	const char *out = NULL, *route, *reqpath;
	char err[512], device[320], *text = NULL;
	size_t len = 0;
	int c, rc;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:t:c", opts, NULL)) != -1) {
		if (c == 'o')
			out = optarg;
		else if (c == 't')
			so.threads = (unsigned)atoi(optarg);
		else if (c == 'c')
			so.allow_gpu = false;
		else
			return usage(stderr, 2);
	}
	if (!out || optind != argc - 2)
		return usage(stderr, 2);
	route = argv[optind];
	reqpath = argv[optind + 1];
	if (strcmp(reqpath, "-") == 0) {
		size_t cap = 0;
		ssize_t n;
		FILE *in = stdin;
		char *line = NULL;
		while ((n = getline(&line, &cap, in)) > 0) {
			char *grown = realloc(text, len + (size_t)n + 1);
			if (!grown || len + (size_t)n > (1u << 20)) {
				fprintf(stderr, "%s: request larger than 1 MiB\n", prog);
				free(grown ? grown : text);
				free(line);
				return 1;
			}
			text = grown;
			memcpy(text + len, line, (size_t)n);
			len += (size_t)n;
			text[len] = '\0';
		}
		free(line);
		if (!text)
			text = strdup("");
	} else if (file_read_small(reqpath, 1u << 20, &text, &len) != 0) {
		fprintf(stderr, "%s: %s\n", prog, store_lasterr());
		return 1;
	}
	rc = synth_parse(route, text, len, &r, err, sizeof(err));
	free(text);
	if (rc) {
		fprintf(stderr, "%s: invalid request: %s\n", prog, err);
		return 1;
	}
	if (isatty(STDERR_FILENO))
		so.progress = show_progress;
	rc = synth_render_file(&r, out, &so, device, sizeof(device), err, sizeof(err));
	if (rc == 0)
		printf("%s: %dx%d, %d frame%s, seed %u, %s, on %s\n", out, r.width, r.height,
		       r.num_frames, r.num_frames == 1 ? "" : "s", r.seed,
		       enc_media_type(r.format), device);
	else
		fprintf(stderr, "%s: %s\n", prog, err);
	synth_request_release(&r);
	return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return usage(stderr, 2);
	if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)
		return usage(stdout, 0);
	if (strcmp(argv[1], "fsck") == 0)
		return cmd_fsck(argc - 1, argv + 1);
	if (strcmp(argv[1], "usage") == 0)
		return client_usage(argc - 1, argv + 1);
	if (strcmp(argv[1], "replica") == 0)
		return replica_cmd(argc - 1, argv + 1);
	if (strcmp(argv[1], "keygen") == 0)
		return cmd_keygen(argc - 1, argv + 1);
	if (strcmp(argv[1], "verify") == 0)
		return cmd_verify(argc - 1, argv + 1);
	if (strcmp(argv[1], "gc") == 0)
		return cmd_gc(argc - 1, argv + 1);
	if (strcmp(argv[1], "render") == 0)
		return cmd_render(argc - 1, argv + 1);
	if (strcmp(argv[1], "submit") == 0)
		return client_submit(argc - 1, argv + 1);
	if (strcmp(argv[1], "wait") == 0)
		return client_wait(argc - 1, argv + 1);
	if (strcmp(argv[1], "ls") == 0)
		return client_ls(argc - 1, argv + 1);
	fprintf(stderr, "%s: unknown command '%s'\n", prog, argv[1]);
	return usage(stderr, 2);
}
