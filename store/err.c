/*
 * err.c - per-thread error messages and code descriptions for store/.
 */
#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char lasterr[1024];

const char *store_strerror(int rc)
{
	switch (rc) {
	case STORE_OK:
		return "success";
	case STORE_E_CORRUPT:
		return "content does not match its hash";
	case STORE_E_BADSIG:
		return "signature verification failed";
	case STORE_E_FORMAT:
		return "malformed file or record";
	case STORE_E_KEYPERM:
		return "secret key file permissions are too open";
	case STORE_E_INDEX:
		return "index is damaged or not a renderfs index";
	case STORE_E_VERSION:
		return "unsupported store format version";
	case STORE_E_EXISTS:
		return "name already used by a different request";
	case STORE_E_NOTFOUND:
		return "not found";
	case STORE_E_STATE:
		return "not allowed in the current job state";
	case STORE_E_KEYID:
		return "signed by a different key";
	default:
		if (rc < 0 && rc > -4096)
			return strerror(-rc);
		return "unknown error";
	}
}

int store_errno(int rc)
{
	switch (rc) {
	case STORE_OK:
		return 0;
	case STORE_E_CORRUPT:
	case STORE_E_INDEX:
	case STORE_E_FORMAT:
	case STORE_E_VERSION:
		return EIO;
	case STORE_E_BADSIG:
	case STORE_E_KEYID:
		return EBADMSG;
	case STORE_E_KEYPERM:
		return EACCES;
	case STORE_E_EXISTS:
		return EEXIST;
	case STORE_E_NOTFOUND:
		return ENOENT;
	case STORE_E_STATE:
		return EINVAL;
	default:
		return rc < 0 && rc > -4096 ? -rc : EIO;
	}
}

int store_seterr(int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(lasterr, sizeof(lasterr), fmt, ap);
	va_end(ap);
	return rc;
}

const char *store_lasterr(void)
{
	return lasterr;
}
