/*
 * errmap.c - the one place where store and engine results become errno
 * values for the kernel (STYLE: as sshfs maps its remote errors).
 *
 * The store's table (store_errno) already says what fs needs: a job or
 * blob that is not there is ENOENT, a ctl command the job's state refuses
 * is EINVAL, a taken name EEXIST, content that no longer matches its hash
 * EIO (never data), a full index ENOSPC; engine results are -errno.
 */
#include "fs_i.h"

int fs_errno(int rc)
{
	return store_errno(rc);
}
