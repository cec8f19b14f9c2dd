/* Allocates and touches one large block, then reports where its pages are: the node of
 * every page (move_pages in query mode) and the huge pages of its mapping
 * (/proc/self/smaps). Prints "bytes=N pages=P nodes=n0:c0,n1:c1 huge_kb=H". */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "spawn")) { /* runs itself twice: a tree of three */
        for (int i = 0; i < 2; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                execl("/proc/self/exe", argv[0], "4", (char *)NULL);
                _exit(127);
            }
            int st;
            if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) return 1;
        }
        return 0;
    }
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    size_t n = mib << 20;
    char *p = malloc(n);
    if (!p) return 1;
    memset(p, 1, n);
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = n / page;
    void **addrs = calloc(pages, sizeof *addrs);
    int *status = calloc(pages, sizeof *status);
    for (size_t i = 0; i < pages; i++) addrs[i] = p + i * page;
    if (syscall(SYS_move_pages, 0, pages, addrs, NULL, status, 0) != 0) {
        perror("move_pages");
        return 1;
    }
    int counts[64] = {0}, other = 0;
    for (size_t i = 0; i < pages; i++) {
        if (status[i] >= 0 && status[i] < 64) counts[status[i]]++;
        else other++;
    }
    /* The smaps entry of the mapping holding p. */
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0;
    long huge_kb = 0;
    while (f && fgets(line, sizeof line, f)) {
        uintptr_t lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
            continue;
        }
        long kb;
        if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) huge_kb += kb;
    }
    printf("bytes=%zu pages=%zu nodes=", n, pages);
    for (int i = 0; i < 64; i++)
        if (counts[i]) printf("%d:%d,", i, counts[i]);
    printf("other:%d huge_kb=%ld\n", other, huge_kb);
    free(p);
    return 0;
}
