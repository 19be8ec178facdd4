/* The C baseline for bench/bench_dirty.py: a fully dirty memory slot through the raw KVM API.
 *   dirty_baseline GIB REPS
 * Maps GIB GiB (MAP_NORESERVE, never touched) as one slot logging dirty pages, with
 * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and KVM_DIRTY_LOG_INITIALLY_SET, so every page starts
 * dirty. REPS times: turn logging off and on (every page dirty again), then time
 *   get:   KVM_GET_DIRTY_LOG into a buffer allocated once, plus a popcount of it
 *   runs:  a scan of that bitmap for runs of consecutive dirty pages
 *   clear: KVM_CLEAR_DIRTY_LOG of the whole slot with that bitmap
 * and print one line per rep: get_us runs_us clear_us dirty_pages runs run_pages popcount_us
 * (get_us includes popcount_us, the popcount alone).
 *   dirty_baseline ring GUEST.bin N REPS
 * A dirty ring of 65536 entries; GUEST.bin (tests/guests/dirty_pages.S, 32-bit protected
 * mode) writes N pages of a 256 MiB slot. REPS times: run it, then time harvesting the
 * ring (copy out slot and offset of each published entry, mark it for reset), then
 * KVM_RESET_DIRTY_RINGS. One line per rep: harvest_us entries.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define RING_ENTRIES 65536
#define LIST_ADDR 0x2000
#define LOGGED 0x10000000ULL

static int ring_main(const char *guest, unsigned n, int reps)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    struct kvm_enable_cap cap = {.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                                 .args = {RING_ENTRIES * sizeof(struct kvm_dirty_gfn)}};
    if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0) {
        cap.cap = KVM_CAP_DIRTY_LOG_RING;
        if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)
            die("KVM_ENABLE_CAP dirty ring");
    }
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
        die("KVM_SET_TSS_ADDR");
    size_t low = 0x100000, size = 256 << 20;
    char *mem = mmap(NULL, low, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *logged = mmap(NULL, size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    FILE *f = fopen(guest, "rb");
    if (!f)
        die(guest);
    fread(mem + 0x1000, 1, 0x1000, f);
    fclose(f);
    uint32_t *list = (uint32_t *)(mem + LIST_ADDR);
    list[0] = n;
    for (unsigned i = 0; i < n; i++)
        list[1 + i] = LOGGED + (uint64_t)i * 4096;
    struct kvm_userspace_memory_region r0 = {.slot = 0, .memory_size = low,
                                             .userspace_addr = (unsigned long)mem};
    struct kvm_userspace_memory_region r1 = {.slot = 1, .flags = KVM_MEM_LOG_DIRTY_PAGES,
                                             .guest_phys_addr = LOGGED, .memory_size = size,
                                             .userspace_addr = (unsigned long)logged};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r0) < 0 ||
        ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r1) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_dirty_gfn *ring = mmap(NULL, RING_ENTRIES * sizeof(*ring), PROT_READ | PROT_WRITE,
                                      MAP_SHARED, vcpu, KVM_DIRTY_LOG_PAGE_OFFSET * 4096);
    if (run == MAP_FAILED || ring == MAP_FAILED)
        die("mmap vcpu");
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11,
                               .present = 1, .db = 1, .s = 1, .g = 1};
    struct kvm_segment data = code;
    data.selector = 0x18, data.type = 3;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.cr0 |= 1;
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = {.rip = 0x1000, .rflags = 2, .rsp = 0x8000};
    ioctl(vcpu, KVM_SET_REGS, &regs);
    uint32_t *slots = malloc(RING_ENTRIES * 4);
    uint64_t *offsets = malloc(RING_ENTRIES * 8);
    uint64_t next = 0;
    for (int rep = 0; rep < reps; rep++) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO)
            die("KVM_RUN (expected the guest's IO exit)");
        double t0 = now();
        unsigned count = 0;
        for (;;) {
            struct kvm_dirty_gfn *e = &ring[next % RING_ENTRIES];
            if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
                break;
            slots[count] = e->slot;
            offsets[count] = e->offset;
            count++;
            __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
            next++;
        }
        double t1 = now();
        if (ioctl(vm, KVM_RESET_DIRTY_RINGS, 0) < 0)
            die("KVM_RESET_DIRTY_RINGS");
        uint64_t sum = 0;
        for (unsigned i = 0; i < count; i++)
            sum += offsets[i] + slots[i];
        printf("%.1f %u %llu\n", (t1 - t0) * 1e6, count, (unsigned long long)sum);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "ring"))
        return ring_main(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc != 3) {
        fprintf(stderr, "usage: %s GIB REPS\n", argv[0]);
        return 2;
    }
    uint64_t size = strtoull(argv[1], NULL, 0) << 30;
    int reps = atoi(argv[2]);
    uint64_t pages = size / 4096, words = (pages + 63) / 64;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    struct kvm_enable_cap cap = {
        .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        .args = {KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET},
    };
    if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)
        die("KVM_ENABLE_CAP");
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = KVM_MEM_LOG_DIRTY_PAGES, .guest_phys_addr = 1ULL << 32,
        .memory_size = size, .userspace_addr = (unsigned long)mem,
    };
    uint64_t *bitmap = malloc(words * 8);
    for (int rep = 0; rep < reps; rep++) {
        region.flags = 0;
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0 && rep)
            die("KVM_SET_USER_MEMORY_REGION");
        region.flags = KVM_MEM_LOG_DIRTY_PAGES;
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
            die("KVM_SET_USER_MEMORY_REGION");

        double t0 = now();
        struct kvm_dirty_log log = {.slot = 0, .dirty_bitmap = bitmap};
        if (ioctl(vm, KVM_GET_DIRTY_LOG, &log) < 0)
            die("KVM_GET_DIRTY_LOG");
        double tp = now();
        uint64_t dirty = 0;
        for (uint64_t i = 0; i < words; i++)
            dirty += __builtin_popcountll(bitmap[i]);
        double t1 = now();

        /* Runs: whole words of 0 or ~0 skip bit work, mixed words go bit run by bit run. */
        uint64_t runs = 0, run_pages = 0, start = 0;
        int open_run = 0;
        for (uint64_t i = 0; i < words; i++) {
            uint64_t w = bitmap[i];
            if (w == 0) {
                if (open_run) {
                    runs++, run_pages += i * 64 - start, open_run = 0;
                }
                continue;
            }
            if (w == ~0ULL) {
                if (!open_run)
                    start = i * 64, open_run = 1;
                continue;
            }
            for (unsigned bit = 0; bit < 64;) {
                int set = (w >> bit) & 1;
                if (set && !open_run)
                    start = i * 64 + bit, open_run = 1;
                else if (!set && open_run)
                    runs++, run_pages += i * 64 + bit - start, open_run = 0;
                uint64_t rest = set ? ~(w >> bit) : (w >> bit);
                bit += rest ? __builtin_ctzll(rest) : 64 - bit;
            }
        }
        if (open_run)
            runs++, run_pages += pages - start;
        double t2 = now();

        struct kvm_clear_dirty_log clear = {
            .slot = 0, .num_pages = pages, .first_page = 0, .dirty_bitmap = bitmap,
        };
        if (ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear) < 0)
            die("KVM_CLEAR_DIRTY_LOG");
        double t3 = now();
        printf("%.1f %.1f %.1f %llu %llu %llu %.1f\n", (t1 - t0) * 1e6, (t2 - t1) * 1e6,
               (t3 - t2) * 1e6, (unsigned long long)dirty, (unsigned long long)runs,
               (unsigned long long)run_pages, (t1 - tp) * 1e6);
    }
    return 0;
}
