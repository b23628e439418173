// Memory of margin_lse_keep's kept dots (B × N·K), recycled from one training step to the next.
//
// Why. The kept tile is a fresh tensor every forward, freed after the backward. At B = 64, C = 10K
// it is 2.56 MB, and together with the 2.56 MB weight gradient of the same step it is enough for
// glibc to trim its heap when both are freed (its trim threshold is twice its mmap threshold, which
// grows to the largest freed block, 2.56 MB here) — so every step takes one page fault per 4 KiB
// page of both on first touch: 600–1500 faults per step measured, ~0.5–1 ms of a 3 ms step.
// Recycling the kept tile's block keeps it mapped; the weight gradient alone then stays below the
// trim threshold.
//
// What is held. Between steps, at most one freed kept block (the largest one freed so far, never
// more than the keep budget it was made under: the Python side keeps dots only within its
// budget); `set_keep_budget` releases it (marginops::keep_pool_held_bytes). A forward takes the
// held block when it is large enough, else allocates a new one; a block freed while another is
// held keeps the larger of the two and frees the other. Thread-safe: a tile may be freed on any
// thread.
//
// A second pool, KeepPool::grads(), recycles the backward's weight gradient the same way when it
// is at most `limit` bytes (the keep budget, set from Python): whether glibc serves that gradient
// from its heap or from fresh pages otherwise varies from process to process (0 or 150–350 faults
// per step measured at B = 64, C = 10K, bf16, with the one-op loss), and with it the step time.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "scratch.h"  // os_alloc / os_free: held memory comes from the OS, not malloc's heap

namespace marginops {
namespace cpu {

class KeepPool {
 public:
  static KeepPool& instance() {
    static KeepPool* pool = new KeepPool();  // never destroyed: tiles may be freed at exit
    return *pool;
  }
  static KeepPool& grads() {
    static KeepPool* pool = new KeepPool();
    return *pool;
  }

  // The largest block this pool serves (grads(): the keep budget); larger ones are plain tensors.
  int64_t limit() const { return limit_.load(); }
  void set_limit(int64_t bytes) { limit_.store(bytes); }

  // An uninitialised rows × cols tensor whose memory comes back to the pool when it is freed.
  at::Tensor empty(int64_t rows, int64_t cols, const at::TensorOptions& opt) {
    const int64_t need = rows * cols * static_cast<int64_t>(c10::elementSize(
                                            opt.dtype().toScalarType()));
    if (need == 0) return at::empty({rows, cols}, opt);
    void* p = nullptr;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ && held_bytes_ >= need) {
        p = held_;
        bytes = held_bytes_;
        held_ = nullptr;
        held_bytes_ = 0;
      }
    }
    if (!p) {
      bytes = (need + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
      p = os_alloc(bytes);
      TORCH_CHECK(p, "marginops: could not allocate ", bytes, " bytes");
    }
    // A resizable storage (CPU allocator for a resize) whose block comes back here when freed:
    // a recycled weight gradient is the user's w.grad, an ordinary tensor in every way.
    c10::DataPtr data(p, new Block{this, p, bytes}, &Block::free, at::Device(at::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), need, std::move(data),
                         at::getCPUAllocator(), /*resizable=*/true);
    return at::empty({0}, opt).set_(storage, 0, {rows, cols}, {cols, 1});
  }

  // Frees the held block (set_keep_budget: the memory goes back at once).
  void release() {
    void* p;
    int64_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      p = held_;
      bytes = held_bytes_;
      held_ = nullptr;
      held_bytes_ = 0;
    }
    os_free(p, bytes);
  }

  int64_t held_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_bytes_;
  }

 private:
  struct Block {  // what a tensor's DataPtr carries back to its pool
    KeepPool* pool;
    void* p;
    int64_t bytes;
    static void free(void* ctx) {
      auto* b = static_cast<Block*>(ctx);
      b->pool->give_back(b->p, b->bytes);
      delete b;
    }
  };

  void give_back(void* p, int64_t bytes) {
    void* drop = p;
    int64_t drop_bytes = bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > held_bytes_) {  // keep the larger block
        drop = held_;
        drop_bytes = held_bytes_;
        held_ = p;
        held_bytes_ = bytes;
      }
    }
    os_free(drop, drop_bytes);
  }

  std::mutex mu_;
  void* held_ = nullptr;
  int64_t held_bytes_ = 0;
  std::atomic<int64_t> limit_{0};
};

}  // namespace cpu
}  // namespace marginops
