// C++ edge cases: thread_local destructors that free, new/delete of large arrays,
// std::bad_alloc, nothrow new, aligned new, containers crossing the threshold.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#define CHECK(c)                                                              \
    do {                                                                      \
        if (!(c)) {                                                           \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,       \
                         __LINE__, #c);                                       \
            std::exit(1);                                                     \
        }                                                                     \
    } while (0)

struct Holder {
    std::vector<char> big;
    std::string small;
    Holder() : big(5u << 20, 'b'), small(100, 's') {}
    ~Holder() {
        CHECK(big[12345] == 'b' && small[50] == 's');
        // A destructor that allocates and frees again.
        std::vector<int> tmp(1 << 20, 3);
        CHECK(tmp[777] == 3);
    }
};
thread_local Holder holder;

struct alignas(4096) Page {
    char bytes[4096];
};

int main() {
    std::vector<std::thread> ts;
    for (int i = 0; i < 4; i++)
        ts.emplace_back([] {
            CHECK(holder.big.size() == (5u << 20));
            for (int j = 0; j < 200; j++) {
                std::vector<double> v;
                for (int k = 0; k < 300000; k++) v.push_back(k);  // grows past 2 MiB
                CHECK(v[299999] == 299999.0);
                auto *a = new char[3u << 20];
                a[0] = 1;
                delete[] a;
            }
        });
    for (auto &t : ts) t.join();
    bool threw = false;
    try {
        static char *volatile sink;
        volatile size_t n = size_t(1) << 62;
        sink = new char[n];
        sink[0] = 0;
    } catch (const std::bad_alloc &) {
        threw = true;
    }
    CHECK(threw);
    volatile size_t huge_n = size_t(1) << 62;
    char *volatile none = new (std::nothrow) char[huge_n];
    CHECK(none == nullptr);
    auto *pages = new Page[700];  // 2.7 MiB, aligned new
    CHECK(reinterpret_cast<uintptr_t>(pages) % 4096 == 0);
    pages[699].bytes[0] = 1;
    delete[] pages;
    auto *one = new Page;
    CHECK(reinterpret_cast<uintptr_t>(one) % 4096 == 0);
    delete one;
    std::printf("ok cxx\n");
    return 0;
}
