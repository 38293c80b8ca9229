/*
 * nfs_hold.c - an NFS client that keeps its file handles: it opens a file
 * over NFS (libnfs) once, then on each line "read" from stdin reads the
 * whole file again through the same handle and prints "ok <hex>" (or
 * "error <message>"). The export tests restart the server side between
 * reads to check that the handle still resolves.
 *
 * usage: nfs_hold nfs://SERVER/EXPORT/PATH?version=3&nfsport=N&mountport=M
 */
#include <fcntl.h>
#include <nfsc/libnfs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int read_all(struct nfs_context *nfs, struct nfsfh *fh)
{
	static char buf[1 << 20];
	uint64_t off = 0;
	int n;

	fputs("ok ", stdout);
	while ((n = nfs_pread(nfs, fh, off, sizeof(buf), buf)) > 0) {
		for (int i = 0; i < n; i++)
			printf("%02x", (unsigned char)buf[i]);
		off += (uint64_t)n;
	}
	putchar('\n');
	if (n < 0) {
		printf("error read: %s\n", nfs_get_error(nfs));
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct nfs_context *nfs = nfs_init_context();
	struct nfs_url *url;
	struct nfsfh *fh;
	char line[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2 || !nfs) {
		fprintf(stderr, "usage: nfs_hold NFS-URL\n");
		return 2;
	}
	if (!(url = nfs_parse_url_full(nfs, argv[1]))) {
		fprintf(stderr, "nfs_hold: %s\n", nfs_get_error(nfs));
		return 2;
	}
	nfs_set_autoreconnect(nfs, -1);
	nfs_set_timeout(nfs, 20000);
	if (nfs_mount(nfs, url->server, url->path) != 0 ||
	    nfs_open(nfs, url->file, O_RDONLY, &fh) != 0) {
		printf("error open: %s\n", nfs_get_error(nfs));
		return 1;
	}
	while (fgets(line, sizeof(line), stdin)) {
		if (strncmp(line, "read", 4) == 0)
			read_all(nfs, fh);
		else
			printf("error unknown command\n");
	}
	nfs_close(nfs, fh);
	nfs_destroy_url(url);
	nfs_destroy_context(nfs);
	return 0;
}
