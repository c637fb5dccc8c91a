/* warm_memory: touches MIB MiB of fresh memory once, then frees it.
 *   usage: warm_memory [MIB=2048] [KIND=anon]
 * KIND hugetlb touches huge pages of the pool (/proc/sys/vm/nr_hugepages):
 * freshly reserved ones are as cold as any, and MIB should be the pool's free
 * pages, so the runs after get warm ones whichever they are given.
 * Not a reference: a warm-up.  The VMs we measure on back their memory lazily,
 * so the first touch of a page after boot costs 2-3x a later one (0.45-1.0
 * GB/s against 1.4-1.9 here).  Touching as much memory as the timed runs will
 * use, once, before anything is timed, makes both the references and the
 * migrations see memory the host already backs.  The rate it prints says
 * whether the memory was cold (well under 1 GB/s) or already warm.
 * Prints {"touch_gbps": ..., "mib": MIB, "memory": KIND}. */
#include "common.h"

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 2048;
    enum mem_kind kind = argc > 2 ? kind_of(argv[2]) : KIND_ANON;
    if (!mib || (mib * MIB) % kind_page(kind)) {
        fprintf(stderr, "usage: warm_memory [MIB, whole pages of KIND] [KIND]\n");
        return 2;
    }
    size_t len = mib * MIB;
    char *p = kind_map(kind, len);
    double t0 = now_s();
    for (size_t off = 0; off < len; off += PAGE)
        memset(p + off, (int)(off / PAGE) | 1, PAGE);  /* whole pages, as a placement writes them */
    double dt = now_s() - t0;
    munmap(p, len);
    printf("{\"touch_gbps\": %.3f, \"mib\": %zu, \"seconds\": %.3f, \"memory\": \"%s\"}\n", len / dt / 1e9, mib, dt,
           kind_name(kind));
    return 0;
}
