/*
 * client.h - renderctl's commands that use a mount (SPEC §11): submit,
 * wait, ls and usage. Each takes the command's arguments (argv[0] is the
 * command's name) and returns the process's exit status.
 */
#ifndef RENDERFS_CLIENT_H
#define RENDERFS_CLIENT_H

/* Exit statuses of submit --wait and wait (the worst job's). */
#define CLIENT_EXIT_COMPLETE 0
#define CLIENT_EXIT_ERROR 1	   /* a job ended in error */
#define CLIENT_EXIT_USAGE 2	   /* bad arguments, no mount, a refused request */
#define CLIENT_EXIT_CANCELLED 3	   /* a job was cancelled (and none failed) */
#define CLIENT_EXIT_INTERRUPT 130  /* Ctrl-C; the job goes on */

int client_submit(int argc, char **argv);
int client_wait(int argc, char **argv);
int client_ls(int argc, char **argv);
/* usage [--since] [--uid] [--json] [--attest]: the usage ledger (SPEC §14). */
int client_usage(int argc, char **argv);

#endif
