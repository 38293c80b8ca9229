/*
 * err.h - error codes and messages of the store library.
 *
 * Functions return 0 on success or a negative code: -errno for system
 * errors, or one of the STORE_E_* codes below for conditions errno cannot
 * name precisely. The function that detects an error also records a
 * message for the calling thread (lowercase, subject quoted, e.g.
 * "cannot open '/x/data.mdb': Permission denied"); store_lasterr() returns
 * it until the thread's next error. fs/ maps codes to errno in one place.
 */
#ifndef RENDERFS_STORE_ERR_H
#define RENDERFS_STORE_ERR_H

enum store_err {
	STORE_OK = 0,
	/* Module codes start above every errno value. */
	STORE_E_CORRUPT = -0x10001, /* content does not hash to its name */
	STORE_E_BADSIG = -0x10002,  /* a signature does not verify */
	STORE_E_FORMAT = -0x10003,  /* a file or record is malformed */
	STORE_E_KEYPERM = -0x10004, /* a secret key file is readable by others */
	STORE_E_INDEX = -0x10005,   /* the LMDB index is damaged or foreign */
	STORE_E_VERSION = -0x10006, /* the store has an unknown format version */
	STORE_E_EXISTS = -0x10007,  /* a job name is taken by a different request */
	STORE_E_NOTFOUND = -0x10008,
	STORE_E_STATE = -0x10009,   /* the operation does not apply in this job state */
	STORE_E_KEYID = -0x1000A,   /* signed by another key than the one given */
};

/* Short description of a code (errno or STORE_E_*); static storage. */
const char *store_strerror(int rc);

/* The errno a filesystem caller should see for rc (EIO for corruption...). */
int store_errno(int rc);

/* Record "fmt..." as this thread's last error message and return rc. */
int store_seterr(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* This thread's last error message, or "" if none; valid until the next
 * error recorded by the same thread. */
const char *store_lasterr(void);

#endif
