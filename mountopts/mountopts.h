/*
 * mountopts.h - the mount options of SPEC §10: one fuse_opt table, the
 * defaults, validation with messages that name the option, --help.
 */
#ifndef RENDERFS_MOUNTOPTS_H
#define RENDERFS_MOUNTOPTS_H

#include <fuse_opt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"

struct mountopts {
	/* Raw values from the table (fuse_opt fills these; freed by
	 * mountopts_release()). */
	char *store, *models, *workers, *gpus, *queue_max, *user_queue_max, *rate, *burst;
	char *max_request, *max_attempts, *retain, *keyfile, *deny_net, *webhook_retry;
	char *buffer_max_s, *user_buffer_max_s;
	char *replica, *replica_endpoint, *replica_credentials, *cache_max;
	int private_, nonotify, passthrough, replica_path_style;
	int show_help, show_version;

	/* Positional arguments: [SOURCE] MOUNTPOINT (mount.fuse passes a
	 * source first). */
	char *source, *mountpoint;
	int extra_args;

	/* Validated results (mountopts_parse). */
	char store_dir[4096];
	struct engine_options engine;
	/* Bytes of unfinished requests held for writers of `new`: in all, and
	 * per uid (newfile.c). */
	uint64_t buffer_max, user_buffer_max;
};

/*
 * Parse argv: our options are taken out of args, FUSE's are left in it for
 * fuse_parse_cmdline(), with the mountpoint re-added last. On a bad option,
 * err names it. Returns 0 or -EINVAL.
 */
int mountopts_parse(struct fuse_args *args, struct mountopts *mo, char *err, size_t errlen);
void mountopts_release(struct mountopts *mo);
void mountopts_help(FILE *out, const char *prog);

/* "2s", "10m", "24h", "7d", "3600" (seconds) -> ms. */
int mountopts_duration(const char *s, uint64_t *ms);
/* "16M", "1G", "4096" -> bytes. */
int mountopts_size(const char *s, uint64_t *bytes);

#endif
