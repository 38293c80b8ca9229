/*
 * replica_cmd.h - `renderctl replica` and `renderctl fsck --remote`.
 */
#ifndef RENDERFS_REPLICA_CMD_H
#define RENDERFS_REPLICA_CMD_H

#include <stdbool.h>
#include <stdio.h>

/* renderctl replica status|push|verify [--deep] [--credentials FILE] STORE */
int replica_cmd(int argc, char **argv);

/*
 * Check every blob the store's index says the bucket has: HEAD (present,
 * of its size) or, deep, GET and BLAKE3 (the content is its name).
 * Reports to out; returns the problems found.
 */
long replica_verify(const char *dir, bool deep, const char *credfile, FILE *out);

#endif
