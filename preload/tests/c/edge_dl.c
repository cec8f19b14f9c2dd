/* A library that allocates when loaded, when called and when unloaded (edge.c dlopen). */
#include <stdlib.h>
#include <string.h>

static char *held_small, *held_large;

__attribute__((constructor)) static void load(void) {
    held_small = malloc(77);
    held_large = malloc(3u << 20);
    memset(held_large, 1, 3u << 20);
}

__attribute__((destructor)) static void unload(void) {
    free(held_small);
    free(held_large);
}

char *edge_dl_make(size_t n) {
    char *s = malloc(n);
    if (s) memset(s, 'x', n - 1), s[n - 1] = 0;
    return s;
}
