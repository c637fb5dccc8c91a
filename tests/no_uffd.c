/* Runs a command on a kernel that lacks something, the way a container or an
 * older kernel does, with a seccomp filter:
 *   no_uffd COMMAND [ARGS...]: the userfaultfd syscall and the
 *     USERFAULTFD_IOC_NEW ioctl of /dev/userfaultfd fail with EPERM (Docker's
 *     default profile);
 *   no_uffd --old-kernel COMMAND [ARGS...]: the PAGEMAP_SCAN ioctl fails with
 *     ENOTTY, as on every kernel before 6.7 (/proc/PID/pagemap had no ioctl). */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../native/kernel.h"

int main(int argc, char **argv)
{
    int old_kernel = argc > 1 && strcmp(argv[1], "--old-kernel") == 0;
    struct sock_filter forbid_uffd[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 4, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 2),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, USERFAULTFD_IOC_NEW, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    };
    struct sock_filter no_pagemap_scan[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 2),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)PAGEMAP_SCAN, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOTTY),
    };
    struct sock_fprog prog = { .len = sizeof forbid_uffd / sizeof forbid_uffd[0], .filter = forbid_uffd };
    if (old_kernel)
        prog = (struct sock_fprog){ .len = sizeof no_pagemap_scan / sizeof no_pagemap_scan[0],
                                    .filter = no_pagemap_scan };
    argv += 1 + old_kernel;
    if (!argv[0]) {
        fprintf(stderr, "usage: no_uffd [--old-kernel] COMMAND [ARGS...]\n");
        return 2;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return 2;
    }
    execvp(argv[0], argv);
    perror("execvp");
    return 127;
}
