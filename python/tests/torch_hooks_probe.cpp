// For test_torch_hooks.TestRealTorch: tensor.record_stream's path into the allocator
// (c10::cuda::CUDACachingAllocator::recordStream -> the current allocator's
// recordStream -> its record-stream hook), without a CUDA tensor, which needs a GPU.
#include <cstdio>
#include <exception>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

extern "C" __attribute__((visibility("default"))) int probe_record_stream(void* ptr, void* stream,
                                                                          char* err,
                                                                          size_t cap) noexcept {
  try {
    c10::DataPtr data(ptr, c10::Device(c10::DeviceType::CUDA, 0));
    // An external stream's handle is its id: reading it back needs no GPU.
    c10::cuda::CUDACachingAllocator::recordStream(
        data, c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(stream), 0));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, cap, "%s", e.what());
    return 1;
  }
}
