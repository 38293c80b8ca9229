/*
 * jobview.h - a job as status.json and manifest.json say it (SPEC §3),
 * built from its record in the index. Each render returns a malloc'ed,
 * newline-terminated text in *out.
 */
#ifndef RENDERFS_JOBVIEW_H
#define RENDERFS_JOBVIEW_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

int jobview_status_json(struct engine *e, const struct job *j, char **out, size_t *len);
int jobview_manifest_json(struct engine *e, const struct job *j, char **out, size_t *len);
/* The trusted comment of the signature of manifest text m. */
void jobview_manifest_trusted(const struct job *j, const char *m, size_t mlen, char *buf,
			      size_t len);
/* The job's place in its queue (0: next); STORE_E_STATE unless it is
 * queued (a delayed retry has none until its time). */
int jobview_position(struct engine *e, const struct job *j, uint64_t *pos);
/* o as pretty JSON text with a newline, malloc'ed; o is put (freed). */
struct json_object;
int jobview_json_text(struct json_object *o, char **out, size_t *len);
/* printf into a malloc'ed *out of *len bytes; 0 or -ENOMEM. */
int dup_text(char **out, size_t *len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Progress in thousandths as the `progress` file says it: "0", "0.25", "1". */
void jobview_progress_text(uint16_t thousandths, char *buf, size_t len);

#endif
