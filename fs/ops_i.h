/*
 * ops_i.h - what the FUSE handlers' files share: ops.c (the table, removal,
 * creation, xattrs, statfs), nodes.c (node helpers, attributes, lookup),
 * dirs.c (directory listings), files.c (open files: generated content,
 * verified blobs, log, ctl, new).
 *
 * Handlers run on the session's worker threads, concurrently; they share
 * only the read-only struct fsctx, fh_lock (below) and what the store and
 * engine lock. None of them touches the mountpoint.
 */
#ifndef RENDERFS_OPS_I_H
#define RENDERFS_OPS_I_H

#include <pthread.h>

#include "fs_i.h"

enum fh_kind { FH_BUF, FH_BLOB, FH_READER, FH_LOG, FH_CTL, FH_NEW, FH_ATTEST };

struct fh {
	enum fh_kind kind;
	char *buf;
	size_t len;
	int fd;
	uint8_t id[JOB_ID_LEN];
	struct new_file *nf;
	struct store_reader *reader;
	struct passthrough *pt; /* set: pt_put(pt, pt_ino) at release */
	uint64_t pt_ino;
	int32_t pt_id; /* > 0: the kernel reads the blob file itself */
};

/*
 * The kernel can send RELEASE for a file while a READ on it is still being
 * answered (seen with direct I/O: AddressSanitizer caught the reply reading
 * a freed buffer). Handlers that use a struct fh hold fh_lock shared for
 * as long as they use it; release takes it exclusively to free one, so it
 * waits for them. Lock order: fh_lock before anything the handler calls.
 */
extern pthread_rwlock_t fh_lock;

struct dirh {
	uint8_t last[JOB_ID_LEN];
	off_t last_off;
	bool have_last;
};

/* nodes.c: node ids, attributes, lookup */
extern const char *const static_names[SN_COUNT]; /* the root's fixed names */
double entry_timeout(struct fsctx *fs, uint64_t ino);
struct fsctx *ctx(fuse_req_t req);
void reply_err(fuse_req_t req, int rc);
bool job_visible(struct fsctx *fs, fuse_req_t req, const struct job *j);
const char *job_visible_id(struct fsctx *fs, fuse_req_t req, const struct job *j,
                           char buf[JOB_ID_STR_LEN + 1]);
int job_by_seq(struct fsctx *fs, uint64_t seq, struct job *j);
uint64_t cas_low(const uint8_t hash[32]);
int cas_hash(struct fsctx *fs, uint64_t ino, uint8_t hash[32]);
int cas_visible(struct fsctx *fs, fuse_req_t req, const uint8_t hash[32]);
/* A cas/ node's blob (hash and record), if the caller may see it. */
int cas_node(struct fsctx *fs, fuse_req_t req, uint64_t ino, uint8_t hash[32],
	     struct blob_info *bi);
int fill_attr(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct stat *st);
double attr_timeout(struct fsctx *fs, uint64_t ino);
void reply_entry(fuse_req_t req, struct fsctx *fs, uint64_t ino);
int lookup_job(struct fsctx *fs, fuse_req_t req, const char *route, const char *name,
               struct job *j);
void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name);
void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                struct fuse_file_info *fi);
void op_readlink(fuse_req_t req, fuse_ino_t ino);

/* dirs.c: directory listings */
void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi);

/* files.c: open files */
void fh_free(struct fh *h);
int fh_join_backing(struct fsctx *fs, struct fh *h, uint64_t ino);
int open_blob_for_writing(struct fsctx *fs, fuse_req_t req, uint64_t ino, struct fh *h);
void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
              struct fuse_file_info *fi);
void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

#endif
