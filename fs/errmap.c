/*
 * errmap.c - the one place where store and engine results become errno
 * values for the kernel (STYLE: as sshfs maps its remote errors).
 */
#include <errno.h>

#include "fs_i.h"

int fs_errno(int rc)
{
	if (rc == 0)
		return 0;
	switch (rc) {
	case STORE_E_NOTFOUND:
		return ENOENT;
	case STORE_E_STATE:
		return EINVAL; /* e.g. ctl "retry" on a complete job */
	case STORE_E_EXISTS:
		return EEXIST;
	case STORE_E_CORRUPT:
		return EIO; /* never hand out bytes that do not match their hash */
	default:
		return store_errno(rc);
	}
}
