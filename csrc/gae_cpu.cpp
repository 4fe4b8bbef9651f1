// CPU GAE reverse scan: rows in parallel, one sequential backward scan per row (see gae.h).
#include <ATen/Parallel.h>

#include "gae.h"

namespace alignfast {

template <typename T>
void gae_scan_cpu(const GaeParams<T>& p) {
  const T gamma = static_cast<T>(p.gamma), gl = static_cast<T>(p.gamma * p.lam);
  at::parallel_for(0, p.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = b * p.steps;
      T next_v = 0, next_a = 0;
      for (int64_t t = p.steps - 1; t >= 0; --t) {
        const int64_t i = off + t;
        if (!p.valid[i]) {
          p.advantages[i] = 0;
          p.returns[i] = 0;
          continue;
        }
        const T v = p.values[i];
        const T a = p.rewards[i] + gamma * next_v - v + gl * next_a;
        p.advantages[i] = a;
        p.returns[i] = a + v;
        next_v = v;
        next_a = a;
      }
    }
  });
}

template void gae_scan_cpu<float>(const GaeParams<float>&);
template void gae_scan_cpu<double>(const GaeParams<double>&);

}  // namespace alignfast
