/*
 * routes.c - the route tree: every prefix of every route (modality,
 * family, model, task) is a directory node of the mount, built once at
 * mount from the engine's route table and read-only afterwards, so any
 * handler thread reads it without a lock. Node ids are the kind, the depth
 * and 48 bits of the BLAKE3 of the path: stable across mounts, so NFS
 * file handles of route directories survive a restart.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs_i.h"

static uint64_t hash48(const char *s)
{
	uint8_t h[B3_OUT_LEN];
	uint64_t v = 0;

	b3_hash(s, strlen(s), h);
	for (int i = 0; i < 6; i++)
		v = v << 8 | h[i];
	return v;
}

const struct rnode *fs_rnode_by_ino(const struct fsctx *fs, uint64_t ino)
{
	for (size_t i = 0; i < fs->nrnodes; i++)
		if (fs->rnodes[i].ino == ino)
			return &fs->rnodes[i];
	return NULL;
}

const struct rnode *fs_route_rnode(const struct fsctx *fs, const char *route)
{
	for (size_t i = 0; i < fs->nrnodes; i++)
		if (fs->rnodes[i].depth == 4 && strcmp(fs->rnodes[i].path, route) == 0)
			return &fs->rnodes[i];
	return NULL;
}

/* Every prefix of every route becomes a directory node (at most four per
 * route). Parents come before children. */
int fs_init_rnodes(struct fsctx *fs)
{
	const struct route_table *t = engine_routes(fs->eng);

	fs->rnodes = calloc(t->n * 4 + 1, sizeof(*fs->rnodes));
	if (!fs->rnodes)
		return -ENOMEM;
	for (int depth = 1; depth <= 4; depth++)
		for (size_t i = 0; i < t->n; i++) {
			const char *p = t->routes[i].path;
			size_t len = 0;
			int d = 0;
			struct rnode *rn, *parent = NULL;

			while (d < depth) {
				len += strcspn(p + len, "/");
				if (++d < depth)
					len++;
			}
			char prefix[ROUTE_PATH_MAX + 1];
			snprintf(prefix, sizeof(prefix), "%.*s", (int)len, p);
			bool seen = false;
			for (size_t k = 0; k < fs->nrnodes; k++) {
				if (strcmp(fs->rnodes[k].path, prefix) == 0)
					seen = true;
			}
			if (seen)
				continue;
			if (depth > 1) {
				char pp[ROUTE_PATH_MAX + 1];
				snprintf(pp, sizeof(pp), "%.*s", (int)(strrchr(prefix, '/') - prefix),
					 prefix);
				for (size_t k = 0; k < fs->nrnodes; k++)
					if (strcmp(fs->rnodes[k].path, pp) == 0)
						parent = &fs->rnodes[k];
			}
			rn = &fs->rnodes[fs->nrnodes++];
			snprintf(rn->path, sizeof(rn->path), "%s", prefix);
			rn->name = strrchr(rn->path, '/') ? strrchr(rn->path, '/') + 1 : rn->path;
			rn->depth = depth;
			rn->parent = parent;
			rn->ino = INO(NK_RDIR, depth, hash48(rn->path));
			rn->route = depth == 4 ? &t->routes[i] : NULL;
			if (parent)
				parent->nsubdirs++;
			else
				fs->top_dirs++;
		}
	return 0;
}
