/*
 * ws.h - the client side of a WebSocket (RFC 6455) over plain http://, for
 * the progress a service reports only there (ComfyUI's /ws). libcurl as
 * Debian builds it has no WebSocket support, and this needs little: open,
 * read text messages (pings answered, binary messages skipped), close.
 *
 * Every wait has a deadline and can be cut short by a file descriptor the
 * caller makes readable (an eventfd: its stop); deny_net= (http.h) applies
 * to the address connected to; a message longer than the caller's buffer
 * is skipped, never buffered, so a service cannot grow the daemon.
 *
 * Threads: a ws_conn belongs to one thread at a time.
 */
#ifndef RENDERFS_WS_H
#define RENDERFS_WS_H

#include <stddef.h>
#include <stdint.h>

struct http_deny;

#define WS_BUF 65536 /* bytes of frames held at once */

struct ws_conn {
	int fd;		      /* -1: not open */
	int up;		      /* the handshake is done */
	uint8_t buf[WS_BUF];  /* received, not yet taken */
	size_t have;
	uint64_t skip;	      /* payload bytes of a skipped frame still to come */
	int skip_msg;	      /* the rest of a skipped message's fragments too */
	size_t msg_len;	      /* a text message's fragments so far */
};

/*
 * Connect to url ("http://host[:port]/path?query"; https is not
 * supported: -EPROTONOSUPPORT) unless its address is in deny (may be
 * NULL), and make the WebSocket handshake (the server's
 * Sec-WebSocket-Accept checked), within timeout_ms. 0, or -errno with err
 * saying why; -EINTR when wake became readable.
 */
int ws_open(struct ws_conn *c, const char *url, const struct http_deny *deny, int wake,
	    int timeout_ms, char *err, size_t errlen);
/*
 * The next text message into out (NUL-terminated; cap bytes with the NUL;
 * a longer one is skipped): 1 with *len set, 0 when none came within
 * timeout_ms, -EINTR when wake became readable, or -errno when the
 * connection ended (a close frame: -ECONNRESET) or broke the protocol
 * (-EPROTO). Pings are answered on the way.
 */
int ws_read(struct ws_conn *c, char *out, size_t cap, size_t *len, int wake, int timeout_ms);
/* Close (a close frame, then the socket); c may be closed already. */
void ws_close(struct ws_conn *c);

#endif
