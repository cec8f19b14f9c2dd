/* measure OUT PRELOAD PROG ARGS...: runs PROG (with LD_PRELOAD=PRELOAD unless PRELOAD is
 * "-"), waits for it with wait4 and writes "status wall_s user_s sys_s maxrss_kb" to OUT.
 * A small launcher, so that the peak RSS the kernel reports for PROG (which starts from
 * the image that exec replaced) is this program's, not the benchmark's. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0) return 3;
    if (pid == 0) {
        if (argv[2][0] != '-' || argv[2][1]) setenv("LD_PRELOAD", argv[2], 1);
        else unsetenv("LD_PRELOAD");
        execvp(argv[3], argv + 3);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) != pid) return 4;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 5;
    fprintf(f, "%d %.6f %.6f %.6f %ld\n", status,
            (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
            ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
            ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, ru.ru_maxrss);
    fclose(f);
    return 0;
}
