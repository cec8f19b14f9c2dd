// A C++ library standing in for PyTorch's libtorch_cuda.so: it links libstdc++, and
// Python loads it (and so its libstdc++) with RTLD_LOCAL, as ctypes and the import of
// torch._C do. It calls the allocator through a std::function and catches what it throws.
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <sys/types.h>

extern "C" int shim_alloc(void* (*fn)(ssize_t, int, void*)) {
    std::function<void*(size_t, int, void*)> alloc = [fn](size_t n, int d, void* s) {
        return fn(static_cast<ssize_t>(n), d, s);
    };
    try {
        void* p = alloc(size_t(1) << 50, 0, nullptr);
        std::printf("returned %p\n", p);
        return p == nullptr ? 1 : 2;
    } catch (const std::runtime_error& e) {
        std::printf("caught: %s\n", e.what());
        return 0;
    }
}
