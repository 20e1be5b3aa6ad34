// Row bookkeeping shared by the CPU (ops.cpp) and CUDA (cuda/segments.cu) implementations of the gather ops.
//
// A gathered batch is made of W segments, one per rank, of counts[r] rows each (rows are whatever trails dim 0).
// offsets[r] = counts[0] + ... + counts[r-1] (W + 1 entries). The three ops are all "row maps": every output row
// is a copy of one input row, or zeros, and source_row() says which:
//
//   compact  padded [W * M, ...] -> rows [N, ...]          out row j of segment r <- padded row r * M + (j - offsets[r])
//   pad      rows [N, ...] -> padded [W * M, ...]          out row r * M + i      <- rows row offsets[r] + i (i < counts[r]), else 0
//   repeat   values [N, ...] -> [V * N, ...]               segment r of V * counts[r] rows holds the segment's values V times
//
// where N = sum(counts), M = the padded rows per segment (>= max(counts)) and V = repeats. The index math below is
// plain C++ so both compilers use the same code; the host-side checks (plan()) raise c10::Error with the shapes.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define FASTCL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTCL_HOST_DEVICE inline
#endif

namespace fastcl {

enum class RowMap : int32_t { kCompact = 0, kPad = 1, kRepeat = 2 };

// The segment r holding row `row` when segment r spans [scale * offsets[r], scale * offsets[r + 1]).
// offsets has n_segments + 1 ascending entries and row < scale * offsets[n_segments]; empty segments are skipped.
FASTCL_HOST_DEVICE int64_t find_segment(const int64_t* offsets, int64_t n_segments, int64_t scale, int64_t row) {
  int64_t lo = 0, hi = n_segments;  // scale * offsets[lo] <= row < scale * offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (scale * offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The input row copied to output row `row`, or -1 for a row of zeros (padding). `param` is M for kCompact and
// kPad, V for kRepeat.
FASTCL_HOST_DEVICE int64_t source_row(RowMap map, const int64_t* offsets, int64_t n_segments, int64_t param, int64_t row) {
  if (map == RowMap::kCompact) {
    const int64_t r = find_segment(offsets, n_segments, 1, row);
    return r * param + (row - offsets[r]);
  }
  if (map == RowMap::kPad) {
    const int64_t r = row / param;
    const int64_t i = row - r * param;
    return i < offsets[r + 1] - offsets[r] ? offsets[r] + i : -1;
  }
  const int64_t r = find_segment(offsets, n_segments, param, row);
  const int64_t local = row - param * offsets[r];
  return offsets[r] + local % (offsets[r + 1] - offsets[r]);
}

// Host side: checked shapes, offsets and the output row count of one call.
struct Plan {
  std::vector<int64_t> offsets;  // W + 1 entries
  int64_t n_segments;
  int64_t param;
  int64_t out_rows;
};

inline Plan plan(RowMap map, const at::Tensor& input, c10::IntArrayRef counts, int64_t arg, const char* op) {
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension, got shape ", input.sizes());
  TORCH_CHECK(!counts.empty(), op, ": counts must name at least one segment");
  Plan p;
  p.n_segments = static_cast<int64_t>(counts.size());
  p.offsets.assign(counts.size() + 1, 0);
  int64_t max_count = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    TORCH_CHECK(counts[r] >= 0, op, ": counts must be >= 0, got ", counts);
    p.offsets[r + 1] = p.offsets[r] + counts[r];
    max_count = std::max(max_count, counts[r]);
  }
  const int64_t total = p.offsets.back();
  const int64_t rows = input.size(0);
  if (map == RowMap::kCompact) {
    TORCH_CHECK(rows % p.n_segments == 0, op, ": padded input rows (", rows, ") must be a multiple of the ",
                p.n_segments, " segments");
    p.param = rows / p.n_segments;
    TORCH_CHECK(max_count <= p.param, op, ": counts ", counts, " exceed the ", p.param, " padded rows per segment");
    p.out_rows = total;
  } else if (map == RowMap::kPad) {
    TORCH_CHECK(rows == total, op, ": input has ", rows, " rows but counts ", counts, " sum to ", total);
    TORCH_CHECK(arg >= max_count, op, ": padded_rows (", arg, ") must be >= max(counts) = ", max_count);
    p.param = arg;
    p.out_rows = p.n_segments * arg;
  } else {
    TORCH_CHECK(rows == total, op, ": input has ", rows, " rows but counts ", counts, " sum to ", total);
    TORCH_CHECK(arg >= 1, op, ": repeats must be >= 1, got ", arg);
    p.param = arg;
    p.out_rows = arg * total;
  }
  return p;
}

inline std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_rows) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[0] = out_rows;
  return shape;
}

}  // namespace fastcl
