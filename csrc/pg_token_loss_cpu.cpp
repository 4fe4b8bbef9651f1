// CPU PPO/GRPO token pass: tokens in parallel, each one pg_token_element (math in pg_token_loss.h).
#include <ATen/Parallel.h>

#include "pg_token_loss.h"

namespace alignfast {

template <typename T>
void pg_token_loss_cpu(const PgTokenParams<T>& p) {
  // ~20 ns per token (two exp-type calls): grains of 16k tokens amortise the thread handoff.
  at::parallel_for(0, p.rows * p.steps, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pg_token_element(p, i);
  });
}

template void pg_token_loss_cpu<float>(const PgTokenParams<float>&);
template void pg_token_loss_cpu<double>(const PgTokenParams<double>&);

}  // namespace alignfast
