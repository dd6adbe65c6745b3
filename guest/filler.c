/* virtsave test guest payload: fill N MiB with non-zero data, then print
 * "tick N" on the console once a second, forever.  N comes from argv[1] or the
 * kernel command line (virtsave.fill=N).  A restored guest continues its tick
 * count; a rebooted one would start again at 1. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long fill_from_cmdline(void) {
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strstr(buf, "virtsave.fill=");
    return p ? strtol(p + strlen("virtsave.fill="), NULL, 10) : 0;
}

int main(int argc, char **argv) {
    long mib = argc > 1 ? strtol(argv[1], NULL, 10) : fill_from_cmdline();
    size_t bytes = (size_t)(mib > 0 ? mib : 0) << 20;
    uint64_t *mem = bytes ? malloc(bytes) : NULL;
    if (bytes && !mem) { printf("fill: cannot allocate %ld MiB\n", mib); bytes = 0; }
    /* Distinct non-zero words: QEMU cannot send these pages as zero pages. */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < bytes / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; mem[i] = x | 1; }
    printf("filled %ld MiB\n", bytes >> 20);
    fflush(stdout);
    for (unsigned long tick = 1;; tick++) {
        printf("tick %lu\n", tick);
        fflush(stdout);
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
}
