/*
 * fileutil.c - small durable-file helpers.
 */
#include "fileutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

int file_read_small(const char *path, size_t max, char **out, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	char *buf = NULL;
	size_t got = 0;
	int rc;

	if (fd < 0)
		return store_seterr(-errno, "cannot open '%s': %s", path, strerror(errno));
	if (fstat(fd, &st) != 0) {
		rc = store_seterr(-errno, "cannot stat '%s': %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = store_seterr(-EINVAL, "'%s' is not a regular file", path);
		goto out;
	}
	if ((size_t)st.st_size > max) {
		rc = store_seterr(-EFBIG, "'%s' is larger than %zu bytes", path, max);
		goto out;
	}
	buf = malloc(max + 1);
	if (!buf) {
		rc = -ENOMEM;
		goto out;
	}
	for (;;) {
		ssize_t n = read(fd, buf + got, max + 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = store_seterr(-errno, "cannot read '%s': %s", path, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		got += (size_t)n;
		if (got > max) {
			rc = store_seterr(-EFBIG, "'%s' is larger than %zu bytes", path, max);
			goto out;
		}
	}
	buf[got] = '\0';
	*out = buf;
	*len = got;
	buf = NULL;
	rc = 0;
out:
	free(buf);
	close(fd);
	return rc;
}

int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int dir_fsync(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int rc = 0;

	if (fd < 0)
		return store_seterr(-errno, "cannot open directory '%s': %s", path,
				    strerror(errno));
	if (fsync(fd) != 0)
		rc = store_seterr(-errno, "cannot fsync directory '%s': %s", path,
				  strerror(errno));
	close(fd);
	return rc;
}

int dir_ensure(const char *path, mode_t mode)
{
	struct stat st;

	if (mkdir(path, mode) == 0)
		return 0;
	if (errno != EEXIST)
		return store_seterr(-errno, "cannot create directory '%s': %s", path,
				    strerror(errno));
	if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
		return store_seterr(-ENOTDIR, "'%s' exists and is not a directory", path);
	return 0;
}

int file_write_durable(const char *path, const void *data, size_t len, mode_t mode,
		       int exclusive)
{
	char tmp[4096], dir[4096];
	const char *slash = strrchr(path, '/');
	int fd, rc;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof(tmp))
		return store_seterr(-ENAMETOOLONG, "path too long: '%s'", path);
	if (slash)
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
	else
		snprintf(dir, sizeof(dir), ".");
	if (slash == path)
		snprintf(dir, sizeof(dir), "/");

	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return store_seterr(-errno, "cannot create '%s': %s", tmp, strerror(errno));
	/* The umask must not widen or narrow what the caller asked for. */
	if (fchmod(fd, mode) != 0 || (rc = write_all(fd, data, len)) != 0 || fsync(fd) != 0) {
		rc = store_seterr(-errno, "cannot write '%s': %s", tmp, strerror(errno));
		close(fd);
		unlink(tmp);
		return rc;
	}
	close(fd);
	if (exclusive) {
		rc = link(tmp, path) == 0 ? 0 : -errno;
		unlink(tmp);
	} else {
		rc = rename(tmp, path) == 0 ? 0 : -errno;
		if (rc != 0)
			unlink(tmp);
	}
	if (rc != 0)
		return store_seterr(rc, "cannot create '%s': %s", path, strerror(-rc));
	return dir_fsync(dir);
}

int file_open_regular(const char *path, int *fd_out, struct stat *sb)
{
	/* O_NONBLOCK: a FIFO put in a file's place must not block the open
	 * (nor, as a reader of it, every later reader); O_NOFOLLOW: nor may
	 * a symlink lead out of the store. */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOFOLLOW);

	if (fd < 0)
		return -errno;
	if (fstat(fd, sb) != 0) {
		int rc = -errno;
		close(fd);
		return rc;
	}
	if (!S_ISREG(sb->st_mode) || fcntl(fd, F_SETFL, 0) != 0) {
		close(fd);
		return -EINVAL;
	}
	*fd_out = fd;
	return 0;
}

void dir_empty(int dirfd)
{
	int fd = dup(dirfd);
	struct dirent *de;
	DIR *d;

	if (fd < 0)
		return;
	if (!(d = fdopendir(fd))) {
		close(fd);
		return;
	}
	while ((de = readdir(d)) != NULL) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		/* unlinkat removes a symlink itself, never what it names. */
		if (unlinkat(dirfd, de->d_name, 0) != 0 && errno == EISDIR)
			dir_remove_tree(dirfd, de->d_name);
	}
	closedir(d);
}

void dir_remove_tree(int parent, const char *name)
{
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return;
	fchmod(fd, 0700);
	dir_empty(fd);
	close(fd);
	unlinkat(parent, name, AT_REMOVEDIR);
}
