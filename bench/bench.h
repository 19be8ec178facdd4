/* What every C baseline in bench/ needs: a monotonic clock and a fatal error. */
#ifndef KVM_BINDINGS_BENCH_H
#define KVM_BINDINGS_BENCH_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void die(const char *what)
{
    perror(what);
    exit(1);
}

#endif
