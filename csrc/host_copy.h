// Bulk host copies (see host_copy.cpp). `runs` is `count` triples (destination address, source address,
// bytes); runs of at least `stream_min_bytes` use non-temporal stores. Runs must not overlap.
#pragma once

#include <cstdint>

namespace prism {

void copy_runs(const int64_t* runs, int64_t count, int64_t stream_min_bytes);

}  // namespace prism
