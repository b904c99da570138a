/* LD_PRELOAD shim: pin the TCP congestion control of every TCP socket a program opens or accepts.
 *
 * Inside a network namespace this kernel refuses cubic as the namespace default (only the host's
 * tcp_allowed_congestion_control may be chosen there), but a process with CAP_NET_ADMIN may still
 * set it per socket. torch.distributed's gloo opens its sockets in C++, so we set it for them here.
 * The algorithm is $HALO_TCP_CC (default "cubic"). Build: gcc -shared -fPIC -O2 -o x.so this.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static void pin(int fd) {
    const char *cc = getenv("HALO_TCP_CC");
    if (!cc || !*cc) cc = "cubic";
    if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc, strlen(cc)); /* fails harmlessly on non-TCP */
}

int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    if ((domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM) pin(fd);
    return fd;
}

int accept(int s, struct sockaddr *addr, socklen_t *len) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int fd = real(s, addr, len);
    pin(fd);
    return fd;
}

int accept4(int s, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, addr, len, flags);
    pin(fd);
    return fd;
}
