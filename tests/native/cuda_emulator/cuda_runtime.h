// A CPU emulation of the part of CUDA that csrc/cuda/*.cu use, so their kernels run (slowly, on
// small shapes) on a machine without a GPU: every thread of a block is a std::thread, blocks run one
// after another, `__syncthreads` is a barrier over the block, a warp shuffle is a write and a read
// through a per-warp buffer between two barriers over the warp. Threads that return early leave the
// barriers (as exited threads do on a GPU). The sources are compiled as C++ with this directory first
// on the include path; cuda_emulation.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)`
// into `::emu::Launch(grid, block, smem, stream).run(kernel, args)` first.
//
// What this checks: indexing, the split of a row into head / 16-byte packs / tail, the reductions,
// races between threads of a block (they run concurrently here), early exits. What it cannot: the
// GPU memory model, coalescing, speed, and the fast-math intrinsics' precision (`__expf` is expf).
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static is that block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorMisalignedAddress = 74 };

namespace emu {
inline std::atomic<int> last_error{0};  // a cudaError_t, set by any thread
inline void check_aligned(const void* address) {
  if (reinterpret_cast<uintptr_t>(address) % 16) last_error = 74;  // cudaErrorMisalignedAddress (below)
}
}  // namespace emu

// 16-byte vector types whose loads and stores check their address, as the GPU does: a whole-vector
// copy checks both ends, reading or writing a component checks the vector it belongs to.
namespace emu {
template <typename T, int I>
struct Lane {
  T value;
  operator T() const {
    check_aligned(reinterpret_cast<const char*>(this) - I * sizeof(T));
    return value;
  }
  Lane& operator=(T v) {
    check_aligned(reinterpret_cast<const char*>(this) - I * sizeof(T));
    value = v;
    return *this;
  }
};
template <typename Self>
struct Vec16 {
  Vec16() = default;
  Vec16(const Vec16& o) { check_aligned(&o), std::memcpy(static_cast<void*>(this), &o, 16); }
  Vec16& operator=(const Vec16& o) {
    check_aligned(this), check_aligned(&o), std::memcpy(static_cast<void*>(this), &o, 16);
    return *this;
  }
};
}  // namespace emu

struct alignas(16) float4 : emu::Vec16<float4> {
  emu::Lane<float, 0> x;
  emu::Lane<float, 1> y;
  emu::Lane<float, 2> z;
  emu::Lane<float, 3> w;
};
struct alignas(16) double2 : emu::Vec16<double2> {
  emu::Lane<double, 0> x;
  emu::Lane<double, 1> y;
};
static_assert(sizeof(float4) == 16 && sizeof(double2) == 16, "the emulated vectors keep CUDA's layout");
inline float4 make_float4(float x, float y, float z, float w) {
  float4 r;
  r.x = x, r.y = y, r.z = z, r.w = w;
  return r;
}
inline double2 make_double2(double x, double y) {
  double2 r;
  r.x = x, r.y = y;
  return r;
}
inline float __expf(float x) { return expf(x); }
// Rounded products: the emulator's host build is compiled with -ffp-contract=off, so a plain product is.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;

struct Warp {
  std::barrier<> sync;
  uint64_t slots[kWarpSize] = {};  // one shuffled value per lane (at most 8 bytes)
  explicit Warp(int lanes) : sync(lanes) {}
};

struct Block {
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(unsigned threads) : sync(threads) {
    for (unsigned first = 0; first < threads; first += kWarpSize)
      warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min(32u, threads - first))));
  }
};

inline Block* current_block = nullptr;  // the block now running (one at a time)

inline Warp& my_warp() { return *current_block->warps[threadIdx.x / kWarpSize]; }

struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, size_t /*shared bytes*/ = 0, cudaStream_t /*stream*/ = nullptr)
      : grid(g), block(b) {}

  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.x == 0 || block.x > kMaxThreadsPerBlock ||
        block.y != 1 || block.z != 1) {
      last_error = cudaErrorInvalidConfiguration;  // (the kernels here launch 1-D grids of 1-D blocks)
      return;
    }
    gridDim = grid;
    blockDim = block;
    for (unsigned b = 0; b < grid.x; ++b) {
      Block state(block.x);
      current_block = &state;
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, b, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(b);
          kernel(Params(args)...);  // each thread its own copy of the by-value parameters
          state.warps[t / kWarpSize]->sync.arrive_and_drop();
          state.sync.arrive_and_drop();
        });
      }
      for (auto& th : threads) th.join();
      current_block = nullptr;
    }
  }
};

}  // namespace emu

inline void __syncthreads() { emu::current_block->sync.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  if (mask != 0xffffffffu) throw std::logic_error("the emulator supports full-warp shuffles only");
  emu::Warp& warp = emu::my_warp();
  const int lane = static_cast<int>(threadIdx.x) % emu::kWarpSize;
  std::memcpy(&warp.slots[lane], &value, sizeof(T));
  warp.sync.arrive_and_wait();
  T other;
  std::memcpy(&other, &warp.slots[lane ^ lane_mask], sizeof(T));
  warp.sync.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return other;
}

inline cudaError_t cudaGetLastError() {
  return static_cast<cudaError_t>(emu::last_error.exchange(cudaSuccess));
}
