/* The C baseline for bench/bench_run.py: the same guest and the same work as the
 * Python side, through the raw KVM API.
 *   baseline exits GUEST.bin N   -> run N IO exits, print exits/second
 *   baseline io-cpu GUEST.bin N  -> run N IO exits (bench/exit_loop.S), print the user CPU
 *                                   time per exit (getrusage, microseconds), exits, checksum
 *   baseline mmio-cpu GUEST.bin N -> the same for N MMIO write exits (bench/mmio_loop.S)
 *   baseline cycle GUEST.bin M   -> M times: VM + memory + vCPU + run to HLT + close;
 *                                   print microseconds per cycle
 *   baseline slots GUEST.bin N [BLOCK] -> add N one-page memory slots to one VM (mmap +
 *                                   KVM_SET_USER_MEMORY_REGION each); print microseconds
 *                                   per add over the first and the last BLOCK (default: a
 *                                   tenth): CPU time, wall time, the mmap alone and the
 *                                   ioctl alone (wall)
 */
#include <fcntl.h>
#include <linux/kvm.h>
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

struct vm {
    int vm, vcpu;
    void *mem;
    struct kvm_run *run;
    size_t run_size;
};

static void vm_open(int kvm, struct vm *v, const unsigned char *code, size_t len, unsigned count)
{
    v->vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(v->vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
        die("KVM_SET_TSS_ADDR");
    v->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy((char *)v->mem + LOAD_ADDR, code, len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (unsigned long)v->mem,
    };
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        die("KVM_CREATE_VCPU");
    v->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(v->vcpu, KVM_GET_SREGS, &sregs);
    sregs.cs.base = 0; sregs.cs.selector = 0;
    sregs.ds.base = 0; sregs.ds.selector = 0;
    sregs.es.base = 0; sregs.es.selector = 0;
    sregs.fs.base = 0; sregs.fs.selector = 0;
    sregs.gs.base = 0; sregs.gs.selector = 0;
    sregs.ss.base = 0; sregs.ss.selector = 0;
    ioctl(v->vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = LOAD_ADDR;
    regs.rflags = 2;
    regs.rcx = count;
    ioctl(v->vcpu, KVM_SET_REGS, &regs);
}

static void vm_close(struct vm *v)
{
    munmap(v->run, v->run_size);
    close(v->vcpu);
    close(v->vm);
    munmap(v->mem, MEM_SIZE);
}

/* Run to HLT; count IO exits, reading each one's port and data as the Python side does. */
static unsigned long run_to_hlt(struct vm *v, unsigned long *checksum)
{
    unsigned long exits = 0;
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (v->run->exit_reason == KVM_EXIT_IO) {
            unsigned char *data = (unsigned char *)v->run + v->run->io.data_offset;
            *checksum += v->run->io.port + data[0];
            exits++;
            continue;
        }
        if (v->run->exit_reason != KVM_EXIT_HLT) {
            fprintf(stderr, "unexpected exit %u\n", v->run->exit_reason);
            exit(1);
        }
        return exits;
    }
}

/* Run to HLT; count MMIO exits, reading each one's address and first data byte. */
static unsigned long run_mmio_to_hlt(struct vm *v, unsigned long *checksum)
{
    unsigned long exits = 0;
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (v->run->exit_reason == KVM_EXIT_MMIO) {
            *checksum += v->run->mmio.phys_addr + v->run->mmio.data[0];
            exits++;
            continue;
        }
        if (v->run->exit_reason != KVM_EXIT_HLT) {
            fprintf(stderr, "unexpected exit %u\n", v->run->exit_reason);
            exit(1);
        }
        return exits;
    }
}

static double user_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
}

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && !strcmp(argv[1], "slots")))
        return 2;
    FILE *f = fopen(argv[2], "rb");
    unsigned char code[4096];
    size_t len = fread(code, 1, sizeof code, f);
    fclose(f);
    unsigned long n = strtoul(argv[3], NULL, 0), checksum = 0;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    struct vm v;
    if (!strcmp(argv[1], "slots")) {
        /* Over the first and the last `block` adds: microseconds per add in this process's
         * CPU time (user + system), in wall time, and the wall time of the mmap and of the
         * ioctl alone (each call timed on its own), to see which of the two grows. */
        unsigned long block = argc > 4 ? strtoul(argv[4], NULL, 0) : n / 10;
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0)
            die("KVM_CREATE_VM");
        double mark[2][2] = {{0}}, sum[2][2] = {{0}};   /* [first/last][cpu/wall] */
        for (unsigned long i = 0; i < n; i++) {
            int side = i >= n - block;
            if (i == 0 || i == n - block) {
                mark[side][0] = cpu_seconds();
                mark[side][1] = now();
            }
            double t0 = now();
            void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (mem == MAP_FAILED)
                die("mmap");
            double t1 = now();
            struct kvm_userspace_memory_region region = {
                .slot = i, .guest_phys_addr = i * 4096, .memory_size = 4096,
                .userspace_addr = (unsigned long)mem,
            };
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
                die("KVM_SET_USER_MEMORY_REGION");
            double t2 = now();
            if (i < block || side) {
                sum[side][0] += t1 - t0;
                sum[side][1] += t2 - t1;
            }
            if (i + 1 == block || i + 1 == n) {
                mark[side][0] = cpu_seconds() - mark[side][0];
                mark[side][1] = now() - mark[side][1];
            }
        }
        /* cpu first, cpu last, wall first, wall last, mmap first, mmap last, ioctl first,
         * ioctl last: microseconds per add */
        printf("%.2f %.2f %.2f %.2f %.2f %.2f %.2f %.2f\n", mark[0][0] / block * 1e6,
               mark[1][0] / block * 1e6, mark[0][1] / block * 1e6, mark[1][1] / block * 1e6,
               sum[0][0] / block * 1e6, sum[1][0] / block * 1e6, sum[0][1] / block * 1e6,
               sum[1][1] / block * 1e6);
        close(vm);
        return 0;
    }
    if (!strcmp(argv[1], "io-cpu") || !strcmp(argv[1], "mmio-cpu")) {
        vm_open(kvm, &v, code, len, n);
        double t = user_seconds();
        unsigned long exits = argv[1][0] == 'i' ? run_to_hlt(&v, &checksum)
                                                : run_mmio_to_hlt(&v, &checksum);
        t = user_seconds() - t;
        vm_close(&v);
        printf("%.4f %lu %lu\n", t / exits * 1e6, exits, checksum);
        return 0;
    }
    if (!strcmp(argv[1], "exits")) {
        vm_open(kvm, &v, code, len, n);
        double t = now();
        unsigned long exits = run_to_hlt(&v, &checksum);
        t = now() - t;
        vm_close(&v);
        printf("%.1f %lu %lu\n", exits / t, exits, checksum);
    } else {
        double t = now();
        for (unsigned long i = 0; i < n; i++) {
            vm_open(kvm, &v, code, len, 1);
            run_to_hlt(&v, &checksum);
            vm_close(&v);
        }
        t = now() - t;
        printf("%.1f %lu\n", t / n * 1e6, checksum);
    }
    return 0;
}
