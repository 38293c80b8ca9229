/*
 * main.c - the renderfs daemon: options, store, engine, FUSE session.
 *
 * DESIGN
 * Set-up runs in order (options, store with recovery, engine, route tree,
 * session, mount, workers) and is unwound by a reverse-order label ladder,
 * as libfuse's examples do. Shutdown stops the engine's workers before the
 * store closes; running jobs go back to the queue and resume at the next
 * mount. The session loop is multi-threaded: every handler in ops.c may run
 * concurrently with the others. The notifier (notify.c) starts after
 * the mount and is joined after the unmount.
 */
#include <errno.h>
#include <limits.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "fs_i.h"
#include "mountopts.h"

static int make_dir(const char *path)
{
	char buf[4096];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++)
		if (*p == '/') {
			*p = '\0';
			if (mkdir(buf, 0755) != 0 && errno != EEXIST)
				return -errno;
			*p = '/';
		}
	if (mkdir(buf, 0700) != 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/*
 * Every open file of the mount holds a descriptor of the daemon until the
 * kernel's RELEASE for it is handled, which is after the user's close():
 * the soft limit many service managers give (1024) is reached by a few
 * readers, and then every commit fails. Take what the hard limit allows.
 */
static void raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
			fprintf(stderr, "renderfs: raising the open file limit: %s\n",
				strerror(errno));
	}
}

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts cmd;
	struct fuse_loop_config *loop = NULL;
	struct fuse_session *se = NULL;
	struct mountopts mo;
	struct store_options so = {0};
	struct store_recovery rec;
	struct fsctx fs;
	char err[1024];
	uint8_t sid[16];
	int rc, ret = 1;

	memset(&fs, 0, sizeof(fs));
	memset(&cmd, 0, sizeof(cmd));
	if (mountopts_parse(&args, &mo, err, sizeof(err)) != 0) {
		fprintf(stderr, "renderfs: %s\n", err);
		goto out_opts;
	}
	if (mo.show_help) {
		mountopts_help(stdout, "renderfs");
		ret = 0;
		goto out_opts;
	}
	if (mo.show_version) {
		printf("renderfs %s (libfuse %s)\n", RENDERFS_VERSION, fuse_pkgversion());
		ret = 0;
		goto out_opts;
	}
	if (fuse_parse_cmdline(&args, &cmd) != 0)
		goto out_opts;
	raise_nofile();
	if ((rc = make_dir(mo.store_dir)) != 0) {
		fprintf(stderr, "renderfs: cannot create store '%s': %s\n", mo.store_dir,
			strerror(-rc));
		goto out_cmd;
	}
	so.max_attempts = mo.engine.max_attempts;
	so.keyfile = mo.keyfile;
	if ((rc = store_open(mo.store_dir, &so, &fs.st)) != 0) {
		fprintf(stderr, "renderfs: cannot open store '%s': %s\n", mo.store_dir,
			store_lasterr()[0] ? store_lasterr() : store_strerror(rc));
		goto out_cmd;
	}
	store_get_recovery(fs.st, &rec);
	if (rec.requeued || rec.interrupted || rec.completed || rec.tmp_removed ||
	    rec.blobs_collected)
		fprintf(stderr,
			"renderfs: recovered '%s': %llu jobs back in the queue, %llu interrupted, "
			"%llu complete (output committed before the crash), "
			"%llu partial outputs removed, %llu stray blob files moved to lost+found\n",
			mo.store_dir, (unsigned long long)rec.requeued,
			(unsigned long long)rec.interrupted, (unsigned long long)rec.completed,
			(unsigned long long)rec.tmp_removed, (unsigned long long)rec.blobs_collected);
	fs.ix = store_index(fs.st);
	/* `private`: names per owner, so that a name tells nobody else
	 * anything (SPEC §7). Before any other thread uses the index. */
	index_set_names_per_owner(fs.ix, mo.private_);
	mo.engine.memo_per_owner = mo.private_;
	mo.engine.private_ = mo.private_;
	{
		uint64_t njobs;
		uint32_t from = index_upgraded(fs.ix, &njobs);
		if (from)
			fprintf(stderr,
				"renderfs: upgraded the index of '%s' from format %u to %d "
				"(%llu jobs)\n",
				mo.store_dir, from, INDEX_FORMAT_VERSION, (unsigned long long)njobs);
	}
	fs.mo = &mo;
	fs.private_ = mo.private_;
	fs.owner = getuid();
	fs.group = getgid();
	fs.mount_ms = now_ms();
	fs.max_request = mo.engine.max_request;
	if (index_store_id(fs.ix, sid) == 0)
		for (int i = 0; i < 8; i++)
			fs.generation = fs.generation << 8 | sid[i];
	if ((rc = engine_open(fs.st, &mo.engine, &fs.eng, err, sizeof(err))) != 0) {
		fprintf(stderr, "renderfs: %s\n", rc == -ENOMEM ? "out of memory" : err);
		goto out_store;
	}
	if (new_limits_create(mo.buffer_max, mo.user_buffer_max, &fs.limits) != 0 ||
	    fs_init_rnodes(&fs) != 0) {
		fprintf(stderr, "renderfs: out of memory\n");
		goto out_engine;
	}
	/* default_permissions: the kernel checks modes (SPEC §7). */
	if (fuse_opt_add_arg(&args, "-odefault_permissions") != 0 ||
	    fuse_opt_add_arg(&args, "-ofsname=renderfs") != 0 ||
	    fuse_opt_add_arg(&args, "-osubtype=renderfs") != 0)
		goto out_rnodes;
	se = fuse_session_new(&args, &fs_ops, sizeof(fs_ops), &fs);
	if (!se)
		goto out_rnodes; /* libfuse said why (an unknown option, ...) */
	if (fuse_set_signal_handlers(se) != 0)
		goto out_session;
	if (fuse_session_mount(se, cmd.mountpoint) != 0)
		goto out_signals;
	if (mo.passthrough && (rc = pt_setup(&fs, se)) != 0) {
		fprintf(stderr, "renderfs: option 'passthrough': %s\n", strerror(-rc));
		goto out_unmount;
	}
	if (fuse_daemonize(cmd.foreground) != 0)
		goto out_unmount;
	if (!mo.nonotify) {
		char mnt[PATH_MAX];
		if (!realpath(cmd.mountpoint, mnt) ||
		    (rc = notify_start(&fs, mnt, &fs.notifier)) != 0) {
			fprintf(stderr, "renderfs: cannot start change notification: %s\n",
				strerror(errno));
			goto out_unmount;
		}
		engine_set_observer(fs.eng, notify_post, fs.notifier);
	}
	if ((rc = engine_start(fs.eng)) != 0) {
		fprintf(stderr, "renderfs: cannot start the workers: %s\n", strerror(-rc));
		goto out_unmount;
	}
	fprintf(stderr, "renderfs: serving '%s' from store '%s'\n", cmd.mountpoint, mo.store_dir);
	if (cmd.singlethread) {
		rc = fuse_session_loop(se);
	} else {
		loop = fuse_loop_cfg_create();
		if (!loop)
			goto out_engine_stop;
		fuse_loop_cfg_set_clone_fd(loop, (unsigned)cmd.clone_fd);
		/* libfuse's default max_threads is 10 (its cmdline parser sets
		 * it). Submissions block in write() for the group commit, so
		 * at most 10 join one commit and further writers wait in the
		 * kernel's queue; measured with 16 writers (bench_fs.py (a)),
		 * 64 threads made batches of 14 instead of 10, each longer to
		 * apply and to wake, for no more jobs/s and a worse p99. */
		fuse_loop_cfg_set_max_threads(loop, cmd.max_threads && cmd.max_threads <= 100000
							    ? cmd.max_threads
							    : 10);
		fuse_loop_cfg_set_idle_threads(loop, cmd.max_idle_threads >= 16 &&
							     cmd.max_idle_threads <= 100000
						     ? cmd.max_idle_threads
						     : 16);
		rc = fuse_session_loop_mt(se, loop);
		fuse_loop_cfg_destroy(loop);
	}
	ret = rc == 0 ? 0 : 1;
out_engine_stop:
	notify_stop(fs.notifier);
	engine_stop(fs.eng);
out_unmount:
	notify_stop(fs.notifier);
	/* Unmounting closes the connection, so a notifier syscall still in
	 * flight fails now; only then can the thread be joined. */
	fuse_session_unmount(se);
	notify_free(fs.notifier);
	fs.notifier = NULL;
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
	pt_free(fs.pt);
out_rnodes:
	free(fs.rnodes);
	new_limits_free(fs.limits);
out_engine:
	engine_close(fs.eng);
out_store:
	store_close(fs.st);
out_cmd:
	free(cmd.mountpoint);
out_opts:
	mountopts_release(&mo);
	fuse_opt_free_args(&args);
	return ret;
}
