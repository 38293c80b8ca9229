/*
 * index_check.c - structural check of an LMDB data file before opening it.
 *
 * DESIGN
 * LMDB maps its file and follows page numbers and node offsets without
 * checking them, so one flipped bit in a B-tree page can make it read
 * outside the page or the map and fault. Before the environment is opened
 * this walks every page reachable from the current meta page and checks
 * what LMDB will trust: each page number is inside the file, each page
 * says it is the page it was reached as, is of the expected kind and is
 * reached once; node offsets, key and data sizes stay inside their page;
 * overflow runs stay inside the file; named databases' roots are checked
 * the same way; freelist entries name pages inside the file. A file that
 * fails is refused with a message, as a truncated or foreign one is.
 * Values are not checked here (LMDB has no checksums); decoding does that.
 *
 * The layout below is LMDB 0.9's on a 64-bit machine (lmdb's mdb.c):
 *   page header (16): pgno u64, pad u16, flags u16, lower u16, upper u16
 *                     (overflow pages: page count u32 at 12)
 *   node (8 + key + data): lo u16, hi u16, flags u16, ksize u16
 *     branch: child page = lo | hi << 16 | flags << 32
 *     leaf: data size = lo | hi << 16; F_BIGDATA: data is an overflow
 *           page number; F_SUBDATA: data is a 48-byte database record
 *   database record (48): pad u32, flags u16, depth u16, branch, leaf,
 *                         overflow pages, entries, root (u64 each)
 *   The set databases (MDB_DUPSORT | MDB_DUPFIXED) keep a key's values
 *   in its leaf node: F_DUPDATA alone, a sub-page (a page header, then
 *   the values packed: P_LEAF | P_SUBP | P_LEAF2, value size in pad);
 *   F_DUPDATA | F_SUBDATA, the record of a sub-database (flags
 *   MDB_DUPFIXED, value size in pad) whose leaves are P_LEAF2 pages; a
 *   node without them holds one value. A P_LEAF2 page of n values of
 *   size s has lower = 16 + 2n and upper = page size - n (s - 2).
 *   meta (at 16 in pages 0 and 1): magic, version, address, map size,
 *        free db (48), main db (48), last page u64, txnid u64
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "index_i.h"

#define PAGEHDR 16
#define NODEHDR 8
#define DBREC 48
#define P_BRANCH 0x01
#define P_LEAF 0x02
#define P_OVERFLOW 0x04
#define P_META 0x08
#define P_DIRTY 0x10 /* in memory only, but kept in sub-pages */
#define P_LEAF2 0x20
#define P_SUBP 0x40
#define F_BIGDATA 0x01
#define F_SUBDATA 0x02
#define F_DUPDATA 0x04
#define MDB_DUPSORT_F 0x04
#define MDB_INTEGERKEY_F 0x08
#define MDB_DUPFIXED_F 0x10
#define INVALID_PGNO UINT64_MAX
#define MAX_DEPTH 32

struct walk {
	const uint8_t *map;
	uint64_t npages; /* pages that must exist: last_pg + 1 */
	unsigned psize;
	uint8_t *seen; /* one bit per page */
	uint8_t *used; /* one byte per byte of the page being checked */
	const char *path;
	char why[160];
};

static inline uint16_t u16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static int bad(struct walk *w, uint64_t pg, const char *what)
{
	snprintf(w->why, sizeof(w->why), "page %llu: %s", (unsigned long long)pg, what);
	return -1;
}

static int claim_pages(struct walk *w, uint64_t pg, uint64_t count)
{
	if (pg < 2 || pg >= w->npages || count == 0 || count > w->npages - pg)
		return bad(w, pg, "page number outside the file");
	for (uint64_t i = pg; i < pg + count; i++) {
		if (w->seen[i / 8] & (1 << (i % 8)))
			return bad(w, i, "page reached twice");
		w->seen[i / 8] |= (uint8_t)(1 << (i % 8));
	}
	return 0;
}

/* What the leaves of a tree hold. */
struct tree_kind {
	bool is_free; /* the freelist: data are page lists */
	bool dupsort; /* a set database: nodes may hold values (F_DUPDATA) */
	unsigned leaf2; /* a set's sub-database: P_LEAF2 leaves, values this size */
};

static int walk_tree(struct walk *w, uint64_t pg, int depth, const struct tree_kind *kind,
		     int *leaf_depth);

/* A database record: a named database's (sub = false) or a set key's
 * sub-database (sub = true). */
static int check_db_record(struct walk *w, uint64_t pg, const uint8_t *rec, bool is_free,
			   bool sub)
{
	uint64_t root = le64_get(rec + 40);
	uint16_t flags = u16(rec + 4), tree_depth = u16(rec + 6);
	uint32_t pad = (uint32_t)u16(rec) | (uint32_t)u16(rec + 2) << 16;
	struct tree_kind kind = {is_free, false, 0};
	int leaf_depth = -1;

	if (sub) {
		/* Values of a DUPFIXED set: fixed size, at most a key's. */
		if (flags != MDB_DUPFIXED_F || pad == 0 || pad > 511 || root == INVALID_PGNO)
			return bad(w, pg, "damaged set record");
		kind.leaf2 = pad;
	} else if (flags == (MDB_DUPSORT_F | MDB_DUPFIXED_F)) {
		kind.dupsort = true;
	} else if (flags & ~MDB_INTEGERKEY_F) {
		/* No other kinds are used: their pages have other layouts. */
		return bad(w, root == INVALID_PGNO ? pg : root, "unexpected database flags");
	}
	if (root == INVALID_PGNO)
		return 0;
	if (walk_tree(w, root, 0, &kind, &leaf_depth) != 0)
		return -1;
	/* LMDB sizes its cursor stacks from the recorded depth. */
	if (leaf_depth + 1 != tree_depth)
		return bad(w, root, "database depth does not match its tree");
	return 0;
}

/* A P_LEAF2 page of size bytes (a whole page or a sub-page): n values of
 * ksize bytes packed after the header, with lower and upper as LMDB keeps
 * them (lower - 16 = 2n, size - upper = n (ksize - 2)). */
static int check_leaf2(struct walk *w, uint64_t pg, const uint8_t *p, size_t size,
		       unsigned ksize)
{
	uint16_t lower = u16(p + 12), upper = u16(p + 14);
	size_t n;

	if (ksize < 2 || ksize > 511 || lower < PAGEHDR || (lower - PAGEHDR) % 2 ||
	    upper > size || lower > upper)
		return bad(w, pg, "damaged packed page");
	n = (lower - PAGEHDR) / 2u;
	if (PAGEHDR + n * ksize > size || size - upper != n * (ksize - 2))
		return bad(w, pg, "packed page sizes do not add up");
	return 0;
}

/* Size a node takes in its page, as LMDB computes it (even-rounded). */
static unsigned node_size(const uint8_t *node, bool branch)
{
	unsigned ksize = u16(node + 6);
	uint64_t dsize = (uint64_t)u16(node) | (uint64_t)u16(node + 2) << 16;

	if (branch)
		return (NODEHDR + ksize + 1u) & ~1u;
	if (u16(node + 4) & F_BIGDATA)
		dsize = 8; /* an overflow page number */
	if (dsize > 65536)
		return UINT32_MAX / 2; /* cannot fit: caught by the caller */
	return (unsigned)((NODEHDR + ksize + dsize + 1) & ~(uint64_t)1);
}

/* Pass 1: every node lies inside the page, nodes do not overlap, and they
 * fill the space between upper and the end of the page exactly. */
static int check_placement(struct walk *w, uint64_t pg, const uint8_t *p, unsigned n,
			   unsigned upper, bool branch, bool dupsort)
{
	unsigned allowed = dupsort ? F_DUPDATA | F_SUBDATA : F_BIGDATA | F_SUBDATA;

	unsigned total = 0;

	memset(w->used + upper, 0, w->psize - upper);
	for (unsigned i = 0; i < n; i++) {
		unsigned off = u16(p + PAGEHDR + 2 * i), size;

		if (off < upper || off + NODEHDR > w->psize)
			return bad(w, pg, "node offset out of range");
		if (!branch && (u16(p + off + 4) & ~allowed))
			return bad(w, pg, "unexpected node flags");
		if (!branch && dupsort && u16(p + off + 4) == F_SUBDATA)
			return bad(w, pg, "unexpected node flags");
		size = node_size(p + off, branch);
		if (size > w->psize - off)
			return bad(w, pg, "node runs past the page");
		if (memchr(w->used + off, 1, size))
			return bad(w, pg, "nodes overlap");
		memset(w->used + off, 1, size);
		total += size;
	}
	if (total != w->psize - upper)
		return bad(w, pg, "node sizes do not add up to the page's used space");
	return 0;
}

/* Pass 2 for a leaf node whose placement is checked: what its data names. */
static int check_leaf_data(struct walk *w, uint64_t pg, const uint8_t *node,
			   const struct tree_kind *kind)
{
	bool is_free = kind->is_free;
	unsigned ksize = u16(node + 6);
	uint16_t nflags = u16(node + 4);
	uint64_t dsize = (uint64_t)u16(node) | (uint64_t)u16(node + 2) << 16;
	const uint8_t *d = node + NODEHDR + ksize;

	if (nflags & F_BIGDATA) {
		uint64_t ov = le64_get(d);
		const uint8_t *op;
		uint32_t pages;

		if (ov < 2 || ov >= w->npages)
			return bad(w, pg, "overflow page outside the file");
		op = w->map + ov * w->psize;
		pages = (uint32_t)(op[12] | op[13] << 8 | op[14] << 16 | (uint32_t)op[15] << 24);
		if (le64_get(op) != ov || !(u16(op + 10) & P_OVERFLOW) ||
		    (uint64_t)pages * w->psize < dsize + PAGEHDR)
			return bad(w, ov, "damaged overflow page");
		return claim_pages(w, ov, pages);
	}
	if (nflags & F_SUBDATA) {
		if (dsize != DBREC)
			return bad(w, pg, "damaged database record");
		return check_db_record(w, pg, d, false, (nflags & F_DUPDATA) != 0);
	}
	if (nflags & F_DUPDATA) {
		/* A sub-page of packed values; P_DIRTY may be left set. */
		if (dsize < PAGEHDR || (u16(d + 10) & ~P_DIRTY) != (P_LEAF | P_SUBP | P_LEAF2))
			return bad(w, pg, "damaged set sub-page");
		return check_leaf2(w, pg, d, dsize, u16(d + 8));
	}
	if (is_free) {
		/* A list of free page numbers, led by its count. */
		if (dsize % 8 || dsize < 8 || le64_get(d) > dsize / 8 - 1)
			return bad(w, pg, "damaged freelist entry");
		for (uint64_t k = 1; k <= le64_get(d); k++)
			if (le64_get(d + 8 * k) >= w->npages || le64_get(d + 8 * k) < 2)
				return bad(w, pg, "freelist names a page outside the file");
	}
	return 0;
}

static int walk_tree(struct walk *w, uint64_t pg, int depth, const struct tree_kind *kind,
		     int *leaf_depth)
{
	const uint8_t *p;
	uint16_t flags, lower, upper;
	unsigned n;
	bool branch;

	if (depth > MAX_DEPTH)
		return bad(w, pg, "tree too deep");
	if (claim_pages(w, pg, 1) != 0)
		return -1;
	p = w->map + pg * w->psize;
	if (le64_get(p) != pg)
		return bad(w, pg, "page does not carry its own number");
	flags = u16(p + 10) & 0x7f;
	lower = u16(p + 12);
	upper = u16(p + 14);
	if (flags != P_BRANCH && flags != (kind->leaf2 ? P_LEAF | P_LEAF2 : P_LEAF))
		return bad(w, pg, "not a branch or leaf page");
	branch = flags == P_BRANCH;
	if (!branch && kind->leaf2) {
		if (*leaf_depth >= 0 && *leaf_depth != depth)
			return bad(w, pg, "leaves at different depths");
		*leaf_depth = depth;
		if (u16(p + 8) != kind->leaf2)
			return bad(w, pg, "packed page of another value size");
		return check_leaf2(w, pg, p, w->psize, kind->leaf2);
	}
	if (lower < PAGEHDR || lower > upper || upper > w->psize || (lower - PAGEHDR) % 2)
		return bad(w, pg, "page bounds out of range");
	n = (lower - PAGEHDR) / 2u;
	if (branch && n == 0)
		return bad(w, pg, "empty branch page");
	if (!branch) {
		if (*leaf_depth >= 0 && *leaf_depth != depth)
			return bad(w, pg, "leaves at different depths");
		*leaf_depth = depth;
	}
	if (check_placement(w, pg, p, n, upper, branch, kind->dupsort) != 0)
		return -1;
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *node = p + u16(p + PAGEHDR + 2 * i);

		if (branch) {
			uint64_t child = (uint64_t)u16(node) | (uint64_t)u16(node + 2) << 16 |
					 (uint64_t)u16(node + 4) << 32;
			if (walk_tree(w, child, depth + 1, kind, leaf_depth) != 0)
				return -1;
		} else if (check_leaf_data(w, pg, node, kind) != 0) {
			return -1;
		}
	}
	return 0;
}

/*
 * Check the B-tree structure of dir/data.mdb, whose meta pages were
 * already checked: psize, the chosen meta page's offset in the file.
 */
int index_check_tree(const char *path, unsigned psize, off_t meta_off, uint64_t last_pg)
{
	struct walk w = {0};
	struct stat sb;
	int fd, rc = 0;
	void *map;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	if (fstat(fd, &sb) != 0 || (uint64_t)sb.st_size < (last_pg + 1) * psize) {
		close(fd);
		return store_seterr(STORE_E_INDEX, "'%s' is truncated", path);
	}
	map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (map == MAP_FAILED)
		return store_seterr(-errno, "cannot map '%s': %s", path, strerror(errno));
	w.map = map;
	w.npages = last_pg + 1;
	w.psize = psize;
	w.path = path;
	w.seen = calloc((size_t)(w.npages / 8 + 1), 1);
	w.used = malloc(psize);
	if (!w.seen || !w.used) {
		free(w.seen);
		free(w.used);
		munmap(map, (size_t)sb.st_size);
		return -ENOMEM;
	}
	const uint8_t *meta = w.map + meta_off + PAGEHDR;
	if (check_db_record(&w, 0, meta + 24, true, false) != 0 ||
	    check_db_record(&w, 0, meta + 24 + DBREC, false, false) != 0)
		rc = store_seterr(STORE_E_INDEX, "'%s' is damaged (%s)", path, w.why);
	free(w.seen);
	free(w.used);
	munmap(map, (size_t)sb.st_size);
	return rc;
}
