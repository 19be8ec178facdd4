/* The C baseline for bench/bench_vcpus.py: one VM, N vCPUs, one pthread per vCPU,
 * the same guest and the same per-exit work (read port and data[0]) as the Python side.
 *   vcpus_baseline GUEST.bin NVCPUS SECONDS
 * vCPU i writes byte i + 1 to port 0x3f8 + i. The threads start together and run until
 * the main thread sets `stop`; then each prints one line (vCPU order):
 *   exits wall_s user_s sys_s oncpu_s runqueue_s voluntary_switches checksum
 * user/sys from getrusage(RUSAGE_THREAD); on-CPU and runqueue-wait time from
 * /proc/thread-self/schedstat, so wall - oncpu - runqueue is time spent blocked.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define MEM_SIZE 0x10000
#define LOAD_ADDR 0x1000
#define PORT 0x3f8
#define MAX_VCPUS 256

static atomic_int stop;
static pthread_barrier_t start;

struct vcpu {
    int fd, index;
    struct kvm_run *run;
    unsigned long exits, checksum, nvcsw;
    double wall, user, sys, oncpu, runqueue;
};

static double tv(struct timeval t)
{
    return t.tv_sec + t.tv_usec / 1e6;
}

static void schedstat(double *oncpu, double *runqueue)
{
    unsigned long long run_ns, wait_ns;
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    if (!f || fscanf(f, "%llu %llu", &run_ns, &wait_ns) != 2)
        die("/proc/thread-self/schedstat");
    fclose(f);
    *oncpu = run_ns / 1e9;
    *runqueue = wait_ns / 1e9;
}

static void *drive(void *arg)
{
    struct vcpu *v = arg;
    struct rusage r0, r1;
    double c0, q0, c1, q1;
    pthread_barrier_wait(&start);
    getrusage(RUSAGE_THREAD, &r0);
    schedstat(&c0, &q0);
    double t = now();
    unsigned long exits = 0, checksum = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (v->run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "vCPU %d: unexpected exit %u\n", v->index, v->run->exit_reason);
            exit(1);
        }
        unsigned char *data = (unsigned char *)v->run + v->run->io.data_offset;
        checksum += v->run->io.port + data[0];
        exits++;
    }
    v->wall = now() - t;
    schedstat(&c1, &q1);
    getrusage(RUSAGE_THREAD, &r1);
    v->exits = exits;
    v->checksum = checksum;
    v->user = tv(r1.ru_utime) - tv(r0.ru_utime);
    v->sys = tv(r1.ru_stime) - tv(r0.ru_stime);
    v->nvcsw = r1.ru_nvcsw - r0.ru_nvcsw;
    v->oncpu = c1 - c0;
    v->runqueue = q1 - q0;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f)
        die(argv[1]);
    unsigned char code[4096];
    size_t len = fread(code, 1, sizeof code, f);
    fclose(f);
    int n = atoi(argv[2]);
    double seconds = atof(argv[3]);
    if (n < 1 || n > MAX_VCPUS)
        return 2;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
        die("KVM_SET_TSS_ADDR");
    void *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy((char *)mem + LOAD_ADDR, code, len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (unsigned long)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    size_t run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);

    static struct vcpu vcpus[MAX_VCPUS];
    pthread_t threads[MAX_VCPUS];
    pthread_barrier_init(&start, NULL, n + 1);
    for (int i = 0; i < n; i++) {
        struct vcpu *v = &vcpus[i];
        v->index = i;
        v->fd = ioctl(vm, KVM_CREATE_VCPU, i);
        if (v->fd < 0)
            die("KVM_CREATE_VCPU");
        v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED)
            die("mmap kvm_run");
        struct kvm_sregs sregs;
        if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
            die("KVM_GET_SREGS");
        struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
        for (int s = 0; s < 6; s++)
            segs[s]->base = segs[s]->selector = 0;
        if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
            die("KVM_SET_SREGS");
        struct kvm_regs regs;
        memset(&regs, 0, sizeof regs);
        regs.rip = LOAD_ADDR;
        regs.rflags = 2;
        regs.rax = i + 1;
        regs.rdx = PORT + i;
        if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
            die("KVM_SET_REGS");
        if (pthread_create(&threads[i], NULL, drive, v))
            die("pthread_create");
    }
    pthread_barrier_wait(&start);
    struct timespec d = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&d, NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    for (int i = 0; i < n; i++) {
        struct vcpu *v = &vcpus[i];
        printf("%lu %.6f %.6f %.6f %.6f %.6f %lu %lu\n", v->exits, v->wall, v->user, v->sys,
               v->oncpu, v->runqueue, v->nvcsw, v->checksum);
        munmap(v->run, run_size);
        close(v->fd);
    }
    close(vm);
    munmap(mem, MEM_SIZE);
    return 0;
}
