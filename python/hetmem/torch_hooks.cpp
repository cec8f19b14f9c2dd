// hetmem's hooks in PyTorch's C++ CUDAPluggableAllocator: record_stream, empty_cache and
// the graph-pool hooks, which torch.cuda.memory.CUDAPluggableAllocator (Python) never sets.
//
// Built at first use against the installed PyTorch by hetmem/_torch_hooks.py (plain c++
// with torch's and CUDA's include paths, linked to torch's libc10, libc10_cuda and
// libtorch_cuda) and loaded with ctypes into the process that imported torch. It calls
// hetmem through function pointers the Python side passes, so it does not depend on
// where libhetmem.so lives. Checked against PyTorch 2.11's
// torch/csrc/cuda/CUDAPluggableAllocator.h.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>

#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

namespace {

using Pluggable = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;
using MallocFn = void*(size_t, int, cudaStream_t);

// The entry points of libhetmem.so this piece calls (include/hetmem.h); laid out as
// hetmem/_torch_hooks.py's _Fns.
struct Fns {
  uint32_t size;     // sizeof(Fns) on the caller's side
  uint32_t version;  // kVersion
  int32_t foreign_pointer;  // HETMEM_ERR_FOREIGN_POINTER
  void* alloc_fn;    // the malloc PyTorch's allocator was made with, to recognise it
  int (*record_stream)(void* ptr, void* stream);
  int (*empty_cache)();
  int (*begin_allocate_to_pool)(int device, uint64_t pool_a, uint64_t pool_b);
  int (*end_allocate_to_pool)(int device, uint64_t pool_a, uint64_t pool_b);
  int (*release_pool)(int device, uint64_t pool_a, uint64_t pool_b);
  const char* (*last_error)();
};

constexpr uint32_t kVersion = 1;

// The allocator's protected alloc_fn_, read through a derived class's member pointer
// (the class has no getter): to check that the allocator is hetmem's.
struct Peek : Pluggable {
  static const std::function<MallocFn>& alloc_fn(const Pluggable& p) {
    return p.*(&Peek::alloc_fn_);
  }
};

// hetmem's message for a failed call (the thread's last error), else `what`.
std::string message(const Fns& f, const char* what) {
  const char* m = f.last_error();
  return (m != nullptr && *m != '\0') ? std::string(m) : std::string(what);
}

// PyTorch turns a std::exception escaping a hook into a Python RuntimeError.
void check(const Fns& f, int rc, const char* what) {
  if (rc != 0) {
    throw std::runtime_error(message(f, what));
  }
}

void write_error(char* buf, size_t cap, const std::string& m) {
  if (buf != nullptr && cap > 0) {
    std::snprintf(buf, cap, "%s", m.c_str());
  }
}

}  // namespace

// Sets the hooks of PyTorch's current CUDA allocator, which must be the
// CUDAPluggableAllocator made with `fns->alloc_fn`, to hetmem's entry points. Returns 0;
// or 1 (it is another allocator: nothing set), 2 (`fns` is of another layout), 3 (a C++
// exception), with a message in err[0..cap]. Call it right after
// torch.cuda.memory.change_current_allocator, before any CUDA work: the hooks are
// plain members that PyTorch reads without a lock.
extern "C" __attribute__((visibility("default"))) int hetmem_torch_hooks_install(
    const Fns* fns, char* err, size_t cap) noexcept {
  try {
    if (fns == nullptr || fns->size != sizeof(Fns) || fns->version != kVersion) {
      write_error(err, cap, "hetmem torch hooks: the caller's table of entry points has another layout "
                            "(a stale build in the cache?)");
      return 2;
    }
    const Fns f = *fns;
    c10::cuda::CUDACachingAllocator::CUDAAllocator* current =
        c10::cuda::CUDACachingAllocator::get();
    auto* p = dynamic_cast<Pluggable*>(current);
    if (p == nullptr) {
      write_error(err, cap,
                  std::string("PyTorch's current CUDA allocator is \"") +
                      (current != nullptr ? current->name() : std::string("none")) +
                      "\", not a CUDAPluggableAllocator: call "
                      "torch.cuda.memory.change_current_allocator first");
      return 1;
    }
    // PyTorch stores the function pointer it was given (torch._C._cuda_customAllocator);
    // a std::function of another type cannot be compared, and is taken on trust.
    if (auto* target = Peek::alloc_fn(*p).target<MallocFn*>()) {
      if (reinterpret_cast<void*>(*target) != f.alloc_fn) {
        write_error(err, cap,
                    "PyTorch's current CUDAPluggableAllocator is not hetmem's (its malloc is "
                    "another function): hooks not set");
        return 1;
      }
    }

    // PyTorch hands every tensor's pointer to the hook, hetmem's or not (from_blob,
    // DLPack, hetmem.torch.offload's weights); its own allocator ignores memory it did
    // not allocate, and so does this: no allocator can reuse it.
    p->set_record_stream_fn([f](void* ptr, cudaStream_t stream) {
      int rc = f.record_stream(ptr, reinterpret_cast<void*>(stream));
      if (rc != f.foreign_pointer) {
        check(f, rc, "hetmem_torch_record_stream failed");
      }
    });
    // emptyCache(mempool_id) calls this hook for every pool id; hetmem has one pool per
    // device, and gives back what it caches there.
    p->set_reset_fn([f]() { check(f, f.empty_cache(), "hetmem_torch_empty_cache failed"); });
    // hetmem decides which allocations belong to a capture without PyTorch's filter (it
    // refuses captures for now).
    p->set_begin_allocate_to_pool(
        [f](int device, c10::cuda::MempoolId_t pool, std::function<bool(cudaStream_t)>) {
          check(f, f.begin_allocate_to_pool(device, pool.first, pool.second),
                "CUDA graph capture with hetmem's allocator is not supported yet");
        });
    p->set_end_allocate_to_pool_fn([f](int device, c10::cuda::MempoolId_t pool) {
      check(f, f.end_allocate_to_pool(device, pool.first, pool.second),
            "hetmem_torch_end_allocate_to_pool failed");
    });
    // PyTorch releases pools from destructors (~MemPool, ~CUDAGraph), where an exception
    // would terminate the process: say it on stderr instead.
    p->set_release_pool([f](int device, c10::cuda::MempoolId_t pool) noexcept {
      if (f.release_pool(device, pool.first, pool.second) != 0) {
        const char* m = f.last_error();
        std::fprintf(stderr, "hetmem: %s\n", (m != nullptr && *m != '\0') ? m : "release_pool failed");
      }
    });
    return 0;
  } catch (const std::exception& e) {
    write_error(err, cap, std::string("hetmem torch hooks: ") + e.what());
    return 3;
  } catch (...) {
    write_error(err, cap, "hetmem torch hooks: an unknown C++ exception");
    return 3;
  }
}
