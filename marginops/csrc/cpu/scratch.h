// Per-thread scratch memory for the CPU kernels' chunk buffers (Workspace in tiles.h), kept from
// one call to the next.
//
// Why. A call's chunk buffers are a few MB per thread (B = 64, C = 10K, D = 128, bf16: ~3.5 MB
// per thread per pass). Allocated and freed on every pass, glibc serves them from memory it has
// just handed back to the kernel (heap trimming, mmap for blocks above its threshold; the
// OpenMP worker's own arena trims too), so every pass takes a fresh page fault per 4 KiB page it
// touches: measured 600–1500 faults per forward+backward there, ~0.5–1 ms of a 3 ms step, more
// than the op's GEMMs. Keeping one block per thread removes them.
//
// What is held. At most kScratchCap bytes per thread that ran a chunk loop (the calling thread and
// ATen's intra-op workers), grown to the largest request up to the cap and freed when the thread
// exits. It does not grow with C: a request is the chunk buffers, sized by pick_chunk's tile
// budget. A request above the cap, or made while this thread's block is already lent out (a nested
// call), gets a fresh tensor of its own, as before.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MO_HAVE_MMAP 1
#else
#define MO_HAVE_MMAP 0
#endif

namespace marginops {
namespace cpu {

constexpr int64_t kScratchCap = int64_t(32) << 20;  // bytes per thread
constexpr int64_t kScratchAlign = 64;               // bytes: one cache line, one AVX-512 vector

// Memory held from one call to the next (this block, keep_pool.h's) is mapped from the OS
// directly, not taken from malloc's heap: it is never trimmed away and faulted in again, and
// where it lands does not move the heap's free top, whose trimming decides whether other code's
// per-step blocks (the weight gradient, ATen's outputs) are faulted in afresh. Page-aligned
// (mmap), or kScratchAlign-aligned where there is no mmap.
inline void* os_alloc(int64_t bytes) {
#if MO_HAVE_MMAP
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
#else
  return std::aligned_alloc(kScratchAlign, static_cast<size_t>(bytes));
#endif
}

inline void os_free(void* p, int64_t bytes) {
  if (!p) return;
#if MO_HAVE_MMAP
  munmap(p, static_cast<size_t>(bytes));
#else
  (void)bytes;
  std::free(p);
#endif
}

struct ScratchBlock {
  void* p = nullptr;
  int64_t bytes = 0;
  bool lent = false;
  ~ScratchBlock() { os_free(p, bytes); }
};

inline ScratchBlock& thread_scratch() {
  thread_local ScratchBlock block;
  return block;
}

// `bytes` of 64-byte-aligned memory for the lifetime of the lease: this thread's block when it is
// free and the request is within the cap, else a tensor the lease owns.
class ScratchLease {
 public:
  explicit ScratchLease(int64_t bytes) {
    bytes = (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    ScratchBlock& b = thread_scratch();
    if (!b.lent && bytes <= kScratchCap) {
      if (b.bytes < bytes) {
        os_free(b.p, b.bytes);
        b.p = os_alloc(bytes);
        b.bytes = b.p ? bytes : 0;
      }
      if (b.p) {
        b.lent = true;
        block_ = &b;
        base_ = static_cast<char*>(b.p);
        return;
      }
    }
    owned_ = at::empty({bytes + kScratchAlign}, at::kByte);
    const auto addr = reinterpret_cast<uintptr_t>(owned_.data_ptr());
    base_ = reinterpret_cast<char*>((addr + kScratchAlign - 1) / kScratchAlign * kScratchAlign);
  }
  ~ScratchLease() {
    if (block_) block_->lent = false;
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  char* base() const { return base_; }

 private:
  ScratchBlock* block_ = nullptr;
  at::Tensor owned_;
  char* base_ = nullptr;
};

// Lays out buffers one after another in a lease, each starting on a 64-byte boundary:
// first the sizes (add), then the tensors (take, in the same order).
class ScratchLayout {
 public:
  void add(int64_t numel, at::ScalarType dtype) {
    total_ += align(numel * static_cast<int64_t>(c10::elementSize(dtype)));
  }
  int64_t bytes() const { return total_; }
  at::Tensor take(char* base, at::IntArrayRef sizes, const at::TensorOptions& opt) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    at::Tensor t = at::from_blob(base + used_, sizes, opt);
    used_ += align(numel * static_cast<int64_t>(c10::elementSize(opt.dtype().toScalarType())));
    return t;
  }

 private:
  static int64_t align(int64_t n) { return (n + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }
  int64_t total_ = 0, used_ = 0;
};

}  // namespace cpu
}  // namespace marginops
