/*
 * fileutil.h - small durable-file helpers shared by store/ and tools/.
 */
#ifndef RENDERFS_FILEUTIL_H
#define RENDERFS_FILEUTIL_H

#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>

/*
 * Read a whole file of at most max bytes into a new NUL-terminated buffer
 * (*out, freed by the caller). Returns 0, -EFBIG if larger, or -errno; the
 * error message names the file.
 */
int file_read_small(const char *path, size_t max, char **out, size_t *len);

/*
 * Create path with mode and content, durably: written to a temporary name
 * in the same directory, fsynced, renamed (or linked, when exclusive, so an
 * existing file is never replaced: -EEXIST), and the directory fsynced.
 */
int file_write_durable(const char *path, const void *data, size_t len, mode_t mode,
		       int exclusive);

/* fsync a directory by path. */
int dir_fsync(const char *path);

/* mkdir that accepts an existing directory. */
int dir_ensure(const char *path, mode_t mode);

/* write() all of buf, retrying on EINTR and short writes. */
int write_all(int fd, const void *buf, size_t len);

/*
 * Open path read-only if it is a regular file, never following a symlink
 * and never blocking (a FIFO or device in its place): 0 with *fd_out and
 * *sb, -ELOOP for a symlink, -EINVAL for any other kind of file, or
 * another -errno.
 */
int file_open_regular(const char *path, int *fd_out, struct stat *sb);

/*
 * Remove everything under the directory dirfd (kept open, not closed),
 * never following a symlink (one is removed itself); subdirectories are
 * made writable first. Best effort: what cannot be removed stays.
 */
void dir_empty(int dirfd);
/* dir_empty on the directory name in parent, then the directory. */
void dir_remove_tree(int parent, const char *name);

#endif
