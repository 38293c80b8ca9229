/*
 * fs_i.h - shared by the files of fs/: the mount's context and node ids.
 *
 * NODE IDS are stateless: the top byte is the kind of object, the rest its
 * persistent number, so any id resolves after a restart and the daemon
 * keeps no per-inode memory (lookups and forgets need no table):
 *
 *   BITS   63..56  55..48      47..0
 *   root   1 (FUSE_ROOT_ID)
 *   STATIC kind    0           which (README, stats, keys/, ...)
 *   RDIR   kind    depth       48 bits of BLAKE3(route prefix): a directory
 *                              of the route tree (image/, image/synth/, ...)
 *   NEW    kind    0           route hash: <route>/new
 *   SCHEMA kind    0           route hash: <route>/schema.json
 *   JOB    kind    0           job seq: <route>/<id>/
 *   JFILE  kind    file        job seq: <route>/<id>/<file>
 *   JLINK  kind    0           job seq: jobs/<id>
 *   KEY    kind    low 56 bits of the key number: keys/<KEYID>.pub
 *   CAS    kind    first 7 bytes of the blob hash: cas/<hex>
 *   CASSIG kind    the same: cas/<hex>.minisig
 *   LEDGER kind    0 json, 1 its .minisig, 2 `attest`
 *                              end of the attestation's period (ms; 0 for
 *                              attest): ledger/<period>.json[.minisig]
 */
#ifndef RENDERFS_FS_I_H
#define RENDERFS_FS_I_H

#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

#include "engine.h"
#include "store.h"

enum node_kind {
	NK_ROOT = 0,
	NK_STATIC = 1,
	NK_RDIR = 2,
	NK_NEW = 3,
	NK_SCHEMA = 4,
	NK_JOB = 5,
	NK_JFILE = 6,
	NK_JLINK = 7,
	NK_KEY = 8,
	NK_CAS = 9,
	NK_CASSIG = 10,
	NK_LEDGER = 11,
};

enum static_node {
	SN_README = 1,
	SN_MODELS,
	SN_STATS,
	SN_PUB,
	SN_KEYS,
	SN_JOBS,
	SN_CAS,
	SN_HOOKPUB,    /* webhook.pub (SPEC §13) */
	SN_HOOKSECRET, /* webhook.secret: the caller's own */
	SN_USAGE,      /* usage: the caller's ledger (root: everyone's), SPEC §14 */
	SN_LEDGER,     /* ledger/: attestations */
	SN_COUNT,
};

/* Files of a job directory, in listing order (bit n of job.hidden). */
enum job_file {
	JF_REQUEST,
	JF_STATUS,
	JF_PROGRESS,
	JF_POSITION,
	JF_LOG,
	JF_ERROR,
	JF_STATUSJSON,
	JF_OUTPUT,
	JF_OUTPUTSIG,
	JF_MANIFEST,
	JF_MANIFESTSIG,
	JF_CTL,
	JF_RESULT,
	JF_WEBHOOKS, /* jobs with a webhook: its deliveries and attempts */
	JF_COUNT,
};

/*
 * Outputs after the first (output.<n>.<ext> and its .minisig, n from 1):
 * node sub JF_EXTRA0 + 2 (n - 1), + 1 for the signature. The owner's
 * unlink hides one from the job's view (the extras record's hidden bits);
 * their blobs go with the job.
 */
#define JF_EXTRA0 32
struct fsctx;
struct jf_extra {
	unsigned n; /* from 1 */
	bool sig;
	struct job_output out;
};
/* Whether sub is an extra output's node; fills n and sig. */
bool jf_is_extra(unsigned sub, unsigned *n, bool *sig);
/* Extra output n of a job whose listing shows them: 0 or -ENOENT (hidden
 * files included: check x->out.hidden). */
int jf_extra_get(struct fsctx *fs, const struct job *j, unsigned n, struct jf_extra *x);
/* Whether x (file or signature, as x->sig) is in the job's view. */
bool jf_extra_shown(const struct jf_extra *x);
/* The extra output file of node sub, if the job's view shows it: 0, or
 * -ENOENT (or the index's error). */
int jf_extra_at(struct fsctx *fs, const struct job *j, unsigned sub, struct jf_extra *x);
/* Its name: output.<n>.<ext>[.minisig]. */
const char *jf_extra_name(const struct jf_extra *x, char *buf, size_t len);
/* Every extra output of j that its view shows (at most max): *n. */
int jf_extras(struct fsctx *fs, const struct job *j, struct job_output *out, size_t max, size_t *n);
int jf_extra_sig(struct fsctx *fs, const struct job *j, const struct jf_extra *x, char **out,
		 size_t *len);
uint64_t jf_extra_size(const struct job *j, const struct jf_extra *x);

#define INO(kind, sub, low) (((uint64_t)(kind) << 56) | ((uint64_t)(sub) << 48) | (low))
#define INO_KIND(ino) ((ino) == FUSE_ROOT_ID ? NK_ROOT : (enum node_kind)((ino) >> 56))
#define INO_SUB(ino) ((unsigned)(((ino) >> 48) & 0xff))
#define INO_LOW48(ino) ((ino) & 0xffffffffffffull)
#define INO_LOW56(ino) ((ino) & 0xffffffffffffffull)

/* A directory of the route tree: "image", "image/synth", ...; task
 * directories (depth 4) are routes. */
struct rnode {
	char path[ROUTE_PATH_MAX + 1];
	const char *name; /* last component, inside path */
	uint64_t ino;
	int depth;		  /* 1..4 */
	const struct route *route; /* depth 4 only */
	struct rnode *parent;	   /* NULL at depth 1 (parent: root) */
	unsigned nsubdirs;
};

struct fsctx {
	struct store *st;
	struct index *ix;
	struct engine *eng;
	const struct mountopts *mo;
	bool private_;
	uid_t owner;	/* the daemon's uid: owns the static nodes */
	gid_t group;
	uint64_t mount_ms;	/* times of static nodes */
	uint64_t generation;	/* from the store id: changes if the store is recreated */
	uint64_t max_request;
	struct rnode *rnodes;	/* read-only after fs_init */
	size_t nrnodes;
	unsigned top_dirs;	/* directories at depth 1 */
	struct notifier *notifier; /* NULL with `nonotify`; set before the loop runs */
	struct passthrough *pt;	   /* NULL without `passthrough`; set before the loop runs */
	struct new_limits *limits; /* budgets of the `new` files (newfile.c) */
};

/* ---- routes.c: the route tree ---- */
const struct rnode *fs_rnode_by_ino(const struct fsctx *fs, uint64_t ino);
/* The task directory of a route path; NULL if the route is not mounted. */
const struct rnode *fs_route_rnode(const struct fsctx *fs, const char *route);
int fs_init_rnodes(struct fsctx *fs);

/* The name job j's directory goes by for a caller of uid (ops.c): its
 * name when that name leads to it for the caller, else its ULID. */
const char *job_dir_name(struct fsctx *fs, uint32_t uid, const struct job *j,
			 char buf[JOB_ID_STR_LEN + 1]);

/* ---- passthrough.c: blobs read by the kernel from their files ---- */
struct passthrough;
/* Run the session through passthrough's I/O callbacks; after mounting. */
int pt_setup(struct fsctx *fs, struct fuse_session *se);
void pt_free(struct passthrough *pt);
/* A backing id for an open of FUSE inode ino whose blob file is fd (read
 * only, verified), or -1: serve this open through the daemon. Each id or
 * -1 is returned by pt_put(ino) once the open is over. pt may be NULL. */
int32_t pt_get(struct passthrough *pt, uint64_t ino, int fd);
/* For the notifier's write-only opens, which must go the way of the
 * inode's other open files: *id is the backing id they use, or -1 (served
 * by the daemon; with no file open, the inode is kept so until this open
 * ends). 0 (pt_put it, pt set) or -ENOMEM. pt may be NULL. */
int pt_join(struct passthrough *pt, uint64_t ino, int32_t *id);
void pt_put(struct passthrough *pt, uint64_t ino);
struct pt_stats {
	uint64_t kernel, daemon; /* blob opens read by the kernel, by the daemon */
};
void pt_get_stats(struct passthrough *pt, struct pt_stats *s);
/* The open reply for a backing id (fuse_reply_open's, with passthrough). */
int pt_reply_open(fuse_req_t req, const struct fuse_file_info *fi, int32_t id);
int pt_reply_create(fuse_req_t req, const struct fuse_entry_param *e,
		    const struct fuse_file_info *fi, int32_t id);

/* ---- errmap.c: the only place errors become errno ---- */
int fs_errno(int rc);

/* ---- content.c: generated file contents ---- */

/* Name of a job file ("output.mp4" for JF_OUTPUT), into buf. */
const char *jf_name(const struct job *j, enum job_file f, char *buf, size_t len);
/* Whether the file is in the job's directory now. */
bool jf_present(const struct job *j, enum job_file f);
/*
 * The content of a generated job file (everything but output and log),
 * malloc'ed into *out. Returns 0 or a negative code.
 */
int jf_render(struct fsctx *fs, const struct job *j, enum job_file f, char **out, size_t *len);
/* Sizes without the cost of the content where a formula exists. */
int jf_size(struct fsctx *fs, const struct job *j, enum job_file f, uint64_t *size);
/* README, models.json, stats, render.pub; keys/<ID>.pub. */
/* uid: the caller's (webhook.secret is theirs). */
int static_render(struct fsctx *fs, enum static_node n, uint32_t uid, char **out, size_t *len);
int key_render(struct fsctx *fs, uint64_t low56, char **out, size_t *len);
/* ledger/: the attestation whose period ends at end_ms (-ENOENT: none),
 * and the node of a name in ledger/ (-ENOENT: none). */
#define LEDGER_JSON 0
#define LEDGER_SIG 1
#define LEDGER_ATTEST 2
int ledger_at(struct fsctx *fs, uint64_t end_ms, struct attestation *a);
int ledger_lookup(struct fsctx *fs, const char *name, uint64_t *ino);
/* The key id of a keys/ file name "<16 HEX>.pub"; -ENOENT for others. */
int key_file_id(const char *name, uint64_t *id);
/* cas/<hex>.minisig for a blob of size bytes, and its length. */
int cassig_render(struct fsctx *fs, const uint8_t hash[32], uint64_t size, char **out,
		  size_t *len);
uint64_t cassig_size(const uint8_t hash[32], uint64_t size);

/* ---- newfile.c: the `new` file ---- */
struct new_limits;
/* Budgets of every `new` file of the mount: max bytes buffered in all,
 * user_max per uid. */
int new_limits_create(uint64_t max, uint64_t user_max, struct new_limits **out);
void new_limits_free(struct new_limits *l);
struct new_limits_stats {
	uint64_t held;			/* bytes buffered now */
	uint64_t refused_user, refused_total; /* writes refused by each budget */
	uint64_t log_suppressed;	/* daemon log lines not written (rate limit) */
	uint64_t writes, write_ns, engine_ns; /* writes to new; ns in the handler, in
						 engine_submit */
};
void new_limits_get_stats(struct new_limits *l, struct new_limits_stats *s);

struct new_file;
/* append: opened O_APPEND (each write comes after the last, whatever its
 * offset). */
int new_file_open(struct fsctx *fs, const struct route *r, uint32_t uid, uint32_t gid,
		  bool append, struct new_file **out);
/* Returns the bytes taken (those of the objects enqueued, and an incomplete
 * tail buffered) or a negative errno (the write starts at a bad object). */
ssize_t new_file_write(struct new_file *nf, const char *buf, size_t len, uint64_t off);
/* Response lines for the caller. */
ssize_t new_file_read(struct new_file *nf, char *buf, size_t len, uint64_t off);
/* close(): -EINVAL with an incomplete trailing object. */
int new_file_flush(struct new_file *nf);
void new_file_release(struct new_file *nf);

/* ---- notify.c: inotify events through the mountpoint (SPEC §4) ---- */
enum notify_op_kind { NOP_NONE, NOP_MKDIR, NOP_SYMLINK, NOP_CREATE, NOP_RMDIR, NOP_UNLINK };

/* The one operation the notifier has in flight. */
struct notify_op {
	enum notify_op_kind kind;
	uint64_t parent;		  /* node id of the directory */
	char name[INDEX_ROUTE_MAX + 1];	  /* the name it creates or removes */
	uint64_t ino;			  /* the node that name stands for */
	uint32_t uid, gid;
};

struct notify_stats {
	uint64_t posted, coalesced, dropped, made, failed, queued;
	uint64_t latency_ns_sum, latency_count, latency_ns_max; /* posting to done */
};

struct notifier;
/* Start the thread; mountpoint must be absolute. */
int notify_start(struct fsctx *fs, const char *mountpoint, struct notifier **out);
/* Tell it to stop (when the session loop ends)... */
void notify_stop(struct notifier *n);
/* ...and join and free it once the session is unmounted. */
void notify_free(struct notifier *n);
/* The engine observer (engine_observer_fn): never blocks. */
void notify_post(void *arg, const uint8_t id[JOB_ID_LEN], const char *route,
		 enum engine_event ev, const struct job *gone);
/* Whether req comes from the notifier (its helper process) and is its
 * operation in flight on (parent, name); *op gets a copy. */
bool notify_op_match(struct fsctx *fs, fuse_req_t req, uint64_t parent, const char *name,
		     struct notify_op *op);
/* Whether the creation of the job with this seq has been announced. */
bool notify_announced(struct fsctx *fs, uint64_t seq);
/* Whether the request comes from the notifier's helper process. */
bool notify_is_helper(struct fsctx *fs, fuse_req_t req);
void notify_get_stats(struct notifier *n, struct notify_stats *s);

extern const struct fuse_lowlevel_ops fs_ops;

#endif
