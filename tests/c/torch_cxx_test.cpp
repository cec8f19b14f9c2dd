// hetmem_torch_malloc_cxx as PyTorch's CUDAPluggableAllocator calls it: through a
// std::function, from C++ that catches what it throws. Run by tests/it/capi.rs on the
// fake CUDA driver. Prints "torch_cxx: N checks, 0 failed" at the end.
#include "hetmem.h"

#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>

static int checks = 0, failed = 0;

static void check(bool ok, const char* what) {
    ++checks;
    if (!ok) ++failed;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

int main() {
    std::function<void*(size_t, int, void*)> alloc = [](size_t n, int device, void* stream) {
        return hetmem_torch_malloc_cxx(static_cast<ssize_t>(n), device, stream);
    };
    std::function<void(void*, size_t, int, void*)> release = [](void* p, size_t n, int device,
                                                                void* stream) {
        hetmem_torch_free(p, static_cast<ssize_t>(n), device, stream);
    };

    void* p = alloc(1 << 20, 0, nullptr);
    check(p != nullptr, "1 MiB comes back");
    release(p, 1 << 20, 0, nullptr);
    check(alloc(0, 0, nullptr) == nullptr, "size 0 is NULL, no exception");

    bool thrown = false;
    try {
        alloc(size_t(1) << 50, 0, nullptr);
    } catch (const std::runtime_error& e) {
        thrown = true;
        std::printf("caught: %s\n", e.what());
        check(std::strncmp(e.what(), "hetmem_torch_malloc: ", 21) == 0, "the message is hetmem's");
        check(std::strstr(e.what(), "out of memory") != nullptr, "it says out of memory");
    }
    check(thrown, "out of memory throws std::runtime_error");

    thrown = false;
    try {
        alloc(4096, 99, nullptr);
    } catch (const std::exception& e) {
        thrown = true;
        check(std::strstr(e.what(), "device") != nullptr, "an unknown device says so");
    }
    check(thrown, "an unknown device throws");

    // The allocator still works after the throws, and nothing leaked into it.
    void* q = alloc(1 << 20, 0, nullptr);
    check(q != nullptr, "1 MiB after the failures");
    release(q, 1 << 20, 0, nullptr);
    check(hetmem_torch_empty_cache() == HETMEM_OK, "empty_cache");

    std::printf("torch_cxx: %d checks, %d failed\n", checks, failed);
    return failed == 0 ? 0 : 1;
}
