// fastcl._C: the data movement of the cross-rank gather, as torch ops (namespace `fastcl`).
//
// Declared here once; CPU kernels here, CUDA kernels in cuda/segments.cu (built when torch has CUDA and nvcc is
// found). fastcl/_extension.py adds the fake (shape) functions and the autograd formulas, and falls back to the same
// math in plain PyTorch when this library is not built. Collectives are not here: they go through
// torch.distributed.
#include <Python.h>

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "segments.h"

// `import fastcl._C` loads this library (and so runs the registrations below); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastcl gather ops (torch.ops.fastcl)", -1, nullptr};
  return PyModule_Create(&module);
}

namespace fastcl {
namespace {

at::Tensor row_map_cpu(RowMap map, const at::Tensor& input, c10::IntArrayRef counts, int64_t arg, const char* op) {
  TORCH_CHECK(input.device().is_cpu(), op, ": expected a CPU tensor, got one on ", input.device());
  const Plan p = plan(map, input, counts, arg, op);
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::empty(output_shape(in, p.out_rows), in.options());
  const int64_t row_bytes = in.size(0) > 0 ? in.numel() / in.size(0) * in.element_size()
                                           : (out.size(0) > 0 ? out.numel() / out.size(0) * out.element_size() : 0);
  if (p.out_rows == 0 || row_bytes == 0) {
    return out;
  }
  const char* src = static_cast<const char*>(in.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* offsets = p.offsets.data();
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / row_bytes);  // ~64 KiB per task
  at::parallel_for(0, p.out_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = source_row(map, offsets, p.n_segments, p.param, row);
      if (s < 0) {
        std::memset(dst + row * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(dst + row * row_bytes, src + s * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor compact_segments_cpu(const at::Tensor& padded, c10::IntArrayRef counts) {
  return row_map_cpu(RowMap::kCompact, padded, counts, 0, "fastcl::compact_segments");
}

at::Tensor pad_segments_cpu(const at::Tensor& rows, c10::IntArrayRef counts, int64_t padded_rows) {
  return row_map_cpu(RowMap::kPad, rows, counts, padded_rows, "fastcl::pad_segments");
}

at::Tensor repeat_segments_cpu(const at::Tensor& values, c10::IntArrayRef counts, int64_t repeats) {
  return row_map_cpu(RowMap::kRepeat, values, counts, repeats, "fastcl::repeat_segments");
}

}  // namespace

TORCH_LIBRARY(fastcl, m) {
  m.set_python_module("fastcl._extension");  // where the fake functions and autograd formulas live
  // padded [W * M, ...] (segment r in rows r*M .. r*M + counts[r]) -> [sum(counts), ...]
  m.def("compact_segments(Tensor padded, SymInt[] counts) -> Tensor");
  // rows [sum(counts), ...] -> [W * padded_rows, ...], each segment zero-padded to padded_rows rows
  m.def("pad_segments(Tensor rows, SymInt[] counts, SymInt padded_rows) -> Tensor");
  // values [sum(counts), ...] -> [repeats * sum(counts), ...]: each segment's rows repeated `repeats` times in a row
  m.def("repeat_segments(Tensor values, SymInt[] counts, int repeats) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastcl, CPU, m) {
  m.impl("compact_segments", &compact_segments_cpu);
  m.impl("pad_segments", &pad_segments_cpu);
  m.impl("repeat_segments", &repeat_segments_cpu);
}

}  // namespace fastcl
