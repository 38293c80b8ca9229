/*
 * dirs.c - directory handles and listings. A directory handle carries a
 * cursor (struct dirh) so that listing a route with 100,000 jobs is one
 * pass over the index, and offsets survive a reopen and a restart.
 *
 * Threads and locks: ops_i.h.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "ops_i.h"


/* ---- directories ---- */

void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dirh *d = calloc(1, sizeof(*d));

	(void)ino;
	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	fi->fh = (uintptr_t)d;
	fuse_reply_open(req, fi);
}

void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	free((struct dirh *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

struct dirbuf {
	fuse_req_t req;
	struct fsctx *fs;
	char *p;
	size_t size, used;
	bool plus;
	bool full;
};

/* Add one entry whose successor is at next_off; false when the buffer is
 * full (the entry was not added). */
static bool dir_add(struct dirbuf *b, const char *name, uint64_t ino, mode_t type,
		    off_t next_off)
{
	size_t n;

	if (b->plus) {
		struct fuse_entry_param e;
		memset(&e, 0, sizeof(e));
		if (strcmp(name, ".") != 0 && strcmp(name, "..") != 0 &&
		    fill_attr(b->fs, b->req, ino, &e.attr) == 0) {
			e.ino = ino;
			e.generation = b->fs->generation;
			e.entry_timeout = entry_timeout(b->fs, ino);
			e.attr_timeout = attr_timeout(b->fs, ino);
		} else {
			e.attr.st_ino = ino;
			e.attr.st_mode = type;
		}
		n = fuse_add_direntry_plus(b->req, b->p + b->used, b->size - b->used, name, &e,
					   next_off);
	} else {
		struct stat st = {.st_ino = ino, .st_mode = type};
		n = fuse_add_direntry(b->req, b->p + b->used, b->size - b->used, name, &st,
				      next_off);
	}
	if (n > b->size - b->used) {
		b->full = true;
		return false;
	}
	b->used += n;
	return true;
}

typedef int (*list_fn)(struct index *, const void *key, const uint8_t *after, size_t max,
		       uint8_t (*ids)[JOB_ID_LEN], size_t *n);

static int list_route(struct index *ix, const void *key, const uint8_t *after, size_t max,
		      uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	return index_list_by_route(ix, key, after, max, ids, n);
}

static int list_all(struct index *ix, const void *key, const uint8_t *after, size_t max,
		    uint8_t (*ids)[JOB_ID_LEN], size_t *n)
{
	(void)key;
	return index_list_all(ix, after, max, ids, n);
}

/*
 * Job entries, in id order, each with the offset base + 1 + its seq: an
 * offset names the job listed last, not a position, so it stays valid
 * across reopen, restart and deletions (NFS clients resume listings with
 * it). The handle's cursor makes a sequential listing one pass; another
 * offset resumes after that job, or, if it is gone, at the first job
 * created after it (seq order is id order).
 */
static int dir_jobs(struct dirbuf *b, struct dirh *d, list_fn list, const void *key,
		    off_t base, off_t off, bool links)
{
	uint8_t ids[128][JOB_ID_LEN];
	uint8_t after[JOB_ID_LEN];
	bool have_after = false;
	int rc;

	if (off > base) {
		uint64_t seq = (uint64_t)(off - base - 1);
		if (d->have_last && d->last_off == off) {
			memcpy(after, d->last, JOB_ID_LEN);
		} else if (index_job_by_seq(b->fs->ix, seq, after) != 0) {
			seq++;
			rc = index_job_seq_at_or_after(b->fs->ix, &seq, after);
			if (rc == STORE_E_NOTFOUND)
				return 0;
			if (rc)
				return rc;
			/* just before it, so that the listing includes it */
			for (int i = JOB_ID_LEN - 1; i >= 0 && after[i]-- == 0; i--)
				;
		}
		have_after = true;
	}
	for (;;) {
		size_t n = 0;

		if ((rc = list(b->fs->ix, key, have_after ? after : NULL, 128, ids, &n)) != 0)
			return rc;
		if (n == 0)
			return 0;
		for (size_t i = 0; i < n; i++) {
			struct job j;
			char idbuf[JOB_ID_STR_LEN + 1];

			memcpy(after, ids[i], JOB_ID_LEN);
			have_after = true;
			if (index_job_get(b->fs->ix, ids[i], &j) != 0)
				continue;
			if (!job_visible(b->fs, b->req, &j)) {
				job_release(&j);
				continue;
			}
			if (links)
				ulid_format(j.id, idbuf);
			off_t next = base + 1 + (off_t)j.seq;
			bool ok = dir_add(b, links ? idbuf : job_visible_id(b->fs, b->req, &j, idbuf),
					  links ? INO(NK_JLINK, 0, j.seq) : INO(NK_JOB, 0, j.seq),
					  links ? S_IFLNK : S_IFDIR, next);
			job_release(&j);
			if (!ok)
				return 0;
			memcpy(d->last, ids[i], JOB_ID_LEN);
			d->have_last = true;
			d->last_off = next;
		}
	}
}

/*
 * cas/: each blob and its .minisig, in hash order. Like job entries, an
 * offset names the entry listed last: base + 1 + (the blob's first 7 hash
 * bytes << 1 | whether it was the .minisig), so listings resume after
 * reopen and collection (a collected blob's successors follow it).
 */
static int dir_cas(struct dirbuf *b, off_t base, off_t off)
{
	uint8_t hashes[64][32], after[32];
	bool have = false, sig_next = false;
	int rc;

	/* `private`: blobs are listed to root only (cas_visible). */
	if (b->fs->private_ && fuse_req_ctx(b->req)->uid != 0)
		return 0;

	if (off > base) {
		uint64_t c = (uint64_t)(off - base - 1), low = c >> 1;
		uint8_t prefix[7];

		for (int i = 0; i < 7; i++)
			prefix[i] = (uint8_t)(low >> (8 * (6 - i)));
		rc = index_blob_find_prefix(b->fs->ix, prefix, 7, after);
		if (rc == 0) {
			sig_next = !(c & 1); /* its .minisig has not been listed yet */
		} else if (rc == STORE_E_NOTFOUND) {
			memcpy(after, prefix, 7); /* after every hash with that prefix */
			memset(after + 7, 0xff, sizeof(after) - 7);
		} else {
			return rc;
		}
		have = true;
	}
	for (;;) {
		size_t n = 0;
		char hex[80];

		if (sig_next) {
			uint64_t low = cas_low(after);
			b3_to_hex(after, hex);
			snprintf(hex + 64, sizeof(hex) - 64, ".minisig");
			if (!dir_add(b, hex, INO(NK_CASSIG, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1 | 1)))
				return 0;
			sig_next = false;
		}
		if ((rc = index_blob_list(b->fs->ix, have ? after : NULL, 64, hashes, &n)) != 0)
			return rc;
		if (n == 0)
			return 0;
		for (size_t i = 0; i < n; i++) {
			uint64_t low = cas_low(hashes[i]);
			memcpy(after, hashes[i], 32);
			have = true;
			b3_to_hex(hashes[i], hex);
			if (!dir_add(b, hex, INO(NK_CAS, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1)))
				return 0;
			snprintf(hex + 64, sizeof(hex) - 64, ".minisig");
			if (!dir_add(b, hex, INO(NK_CASSIG, 0, 0) | low, S_IFREG,
				     base + 1 + (off_t)(low << 1 | 1)))
				return 0;
		}
	}
}

/*
 * ledger/: `attest`, then each attestation's <period>.json and its
 * .minisig in chain order; offsets count entries (attestations are few:
 * one a day), so a listing resumes where it stopped.
 */
static int dir_ledger(struct fsctx *fs, struct dirbuf *b, off_t nfixed, off_t off)
{
	struct attestation a[16];
	uint64_t after = 0;
	off_t ord = nfixed;
	size_t n;
	int rc;

	if (ord++ >= off && !dir_add(b, "attest", INO(NK_LEDGER, LEDGER_ATTEST, 0), S_IFREG, ord))
		return 0;
	do {
		if ((rc = index_ledger_list(fs->ix, after, a, 16, &n)) != 0)
			return rc;
		for (size_t i = 0; i < n; i++) {
			char name[sizeof(a[i].name) + 16];
			after = a[i].end_ms;
			for (int sig = 0; sig < 2; sig++) {
				if (ord++ < off)
					continue;
				snprintf(name, sizeof(name), "%s.json%s", a[i].name, sig ? ".minisig" : "");
				if (!dir_add(b, name, INO(NK_LEDGER, sig, a[i].end_ms), S_IFREG, ord))
					return 0;
			}
		}
	} while (n == 16);
	return 0;
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi, bool plus)
{
	struct fsctx *fs = ctx(req);
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	struct dirbuf b = {req, fs, NULL, size, 0, plus, false};
	const struct rnode *self = NULL;
	const char *names[64 + 2 * INDEX_EXTRAS_MAX];
	char outname[2][96]; /* output.<ext>, output.<ext>.minisig */
	char (*xname)[96] = NULL; /* output.<n>.<ext>[.minisig] */
	uint64_t inos[64 + 2 * INDEX_EXTRAS_MAX];
	mode_t types[64 + 2 * INDEX_EXTRAS_MAX];
	int nfixed = 0, rc = 0;

	b.p = malloc(size);
	if (!b.p) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	names[nfixed] = ".";
	inos[nfixed] = ino;
	types[nfixed++] = S_IFDIR;
	names[nfixed] = "..";
	inos[nfixed] = FUSE_ROOT_ID;
	types[nfixed++] = S_IFDIR;
	switch (INO_KIND(ino)) {
	case NK_ROOT:
		for (int n = 1; n < SN_COUNT; n++) {
			names[nfixed] = static_names[n];
			inos[nfixed] = INO(NK_STATIC, 0, n);
			types[nfixed++] = n == SN_KEYS || n == SN_JOBS || n == SN_CAS || n == SN_LEDGER
						  ? S_IFDIR
						  : S_IFREG;
		}
		break;
	case NK_RDIR:
		if (!(self = fs_rnode_by_ino(fs, ino))) {
			rc = -ENOENT;
			goto out;
		}
		if (self->parent)
			inos[1] = self->parent->ino;
		if (self->depth == 4) {
			names[nfixed] = "new";
			inos[nfixed] = INO(NK_NEW, 0, INO_LOW48(ino));
			types[nfixed++] = S_IFREG;
			names[nfixed] = "schema.json";
			inos[nfixed] = INO(NK_SCHEMA, 0, INO_LOW48(ino));
			types[nfixed++] = S_IFREG;
		}
		break;
	case NK_JOB: {
		struct job j;
		if ((rc = job_by_seq(fs, INO_LOW48(ino), &j)) != 0)
			goto out;
		const struct rnode *rn = fs_route_rnode(fs, j.route);
		if (rn)
			inos[1] = rn->ino;
		for (int f = 0; f < JF_COUNT; f++) {
			if (!jf_present(&j, f))
				continue;
			names[nfixed] = f == JF_OUTPUT || f == JF_OUTPUTSIG
						? jf_name(&j, f, outname[f == JF_OUTPUTSIG], 96)
						: jf_name(&j, f, NULL, 0);
			inos[nfixed] = INO(NK_JFILE, f, j.seq);
			types[nfixed++] = S_IFREG;
		}
		if (j.flags & JOB_F_EXTRAS) {
			struct job_output *x = calloc(INDEX_EXTRAS_MAX, sizeof(*x));
			size_t nx = 0;
			xname = calloc(2 * INDEX_EXTRAS_MAX, sizeof(*xname));
			if (x && xname && jf_extras(fs, &j, x, INDEX_EXTRAS_MAX, &nx) == 0)
				for (size_t i = 0; i < nx; i++)
					for (int sig = 0; sig < 2; sig++) {
						struct jf_extra e = {(unsigned)i + 1, sig, x[i]};
						if (!jf_extra_shown(&e))
							continue;
						names[nfixed] = jf_extra_name(&e, xname[2 * i + sig], 96);
						inos[nfixed] = INO(NK_JFILE, JF_EXTRA0 + 2 * i + sig, j.seq);
						types[nfixed++] = S_IFREG;
					}
			free(x);
		}
		job_release(&j);
		break;
	}
	case NK_STATIC:
		break;
	default:
		rc = -ENOTDIR;
		goto out;
	}
	if (INO_KIND(ino) == NK_ROOT || (self && self->depth < 4)) {
		for (size_t i = 0; i < fs->nrnodes && nfixed < 64; i++)
			if (fs->rnodes[i].parent == self) {
				names[nfixed] = fs->rnodes[i].name;
				inos[nfixed] = fs->rnodes[i].ino;
				types[nfixed++] = S_IFDIR;
			}
	}
	for (off_t i = off; i < nfixed; i++)
		if (!dir_add(&b, names[i], inos[i], types[i], i + 1))
			goto done;
	if (self && self->depth == 4) {
		rc = dir_jobs(&b, d, list_route, self->path, nfixed, off, false);
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_JOBS) {
		rc = dir_jobs(&b, d, list_all, NULL, nfixed, off, true);
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_KEYS) {
		char dir[4200];
		DIR *dd;
		struct dirent *de;
		off_t ord = nfixed;
		snprintf(dir, sizeof(dir), "%s/keys", store_dir(fs->st));
		if ((dd = opendir(dir)) != NULL) {
			while ((de = readdir(dd)) != NULL) {
				uint64_t k;
				if (key_file_id(de->d_name, &k) != 0)
					continue;
				if (ord++ < off)
					continue;
				if (!dir_add(&b, de->d_name, INO(NK_KEY, 0, 0) | (k & 0xffffffffffffffull),
					     S_IFREG, ord))
					break;
			}
			closedir(dd);
		}
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_CAS) {
		rc = dir_cas(&b, nfixed, off);
	} else if (INO_KIND(ino) == NK_STATIC && INO_LOW48(ino) == SN_LEDGER) {
		rc = dir_ledger(fs, &b, nfixed, off);
	}
done:
	if (rc == 0) {
		fuse_reply_buf(req, b.p, b.used);
		free(b.p);
		free(xname);
		return;
	}
out:
	free(b.p);
	free(xname);
	reply_err(req, rc);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, false);
}

void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			   struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, true);
}
