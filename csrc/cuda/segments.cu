// CUDA kernels of the fastcl gather ops (declared in ../ops.cpp). Only c10/ATen core headers and the CUDA
// runtime: the file compiles against the headers of any torch wheel (CPU builds included), which is how CI
// checks it with nvcc on a machine without a GPU (csrc/check_cuda_build.py). The c10/cuda headers are not
// complete in CPU wheels (no cuda_cmake_macros.h), so the device guard and the current stream come from the
// device-generic c10 interfaces, which dispatch to CUDA's implementations at run time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../segments.h"

namespace fastcl {
namespace {

// One thread per output word: every output row is a copy of one input row (source_row) or zeros.
template <typename Word>
__global__ void row_map_kernel(Word* __restrict__ out, const Word* __restrict__ in, const int64_t* __restrict__ offsets,
                               int64_t n_segments, int64_t param, RowMap map, int64_t out_rows, int64_t row_words) {
  const int64_t total = out_rows * row_words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / row_words;
    const int64_t word = idx - row * row_words;
    const int64_t s = source_row(map, offsets, n_segments, param, row);
    out[idx] = s < 0 ? Word{} : in[s * row_words + word];
  }
}

template <typename Word>
void launch(const at::Tensor& out, const at::Tensor& in, const int64_t* offsets, const Plan& p, int64_t row_bytes,
            RowMap map, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total = p.out_rows * row_words;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535LL * 8);
  row_map_kernel<Word><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<Word*>(out.mutable_data_ptr()), static_cast<const Word*>(in.const_data_ptr()), offsets,
      p.n_segments, p.param, map, p.out_rows, row_words);
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "fastcl: CUDA kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor row_map_cuda(RowMap map, const at::Tensor& input, c10::IntArrayRef counts, int64_t arg, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA tensor, got one on ", input.device());
  const Plan p = plan(map, input, counts, arg, op);
  const c10::DeviceGuard guard(input.device());
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::empty(output_shape(in, p.out_rows), in.options());
  const int64_t row_bytes = in.size(0) > 0 ? in.numel() / in.size(0) * in.element_size()
                                           : (out.size(0) > 0 ? out.numel() / out.size(0) * out.element_size() : 0);
  if (p.out_rows == 0 || row_bytes == 0) {
    return out;
  }
  // The W + 1 offsets travel to the device with the launch (a few bytes per rank).
  at::Tensor host_offsets = at::empty({p.n_segments + 1}, at::TensorOptions().dtype(at::kLong));
  std::copy(p.offsets.begin(), p.offsets.end(), host_offsets.mutable_data_ptr<int64_t>());
  const at::Tensor offsets = host_offsets.to(input.device());
  const c10::Stream current = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(input.device());
  const auto stream = static_cast<cudaStream_t>(current.native_handle());

  // Widest word that divides the row and keeps both base pointers aligned.
  const auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(in.const_data_ptr()) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(out.const_data_ptr()) % bytes == 0;
  };
  const int64_t* d_offsets = offsets.const_data_ptr<int64_t>();
  if (aligned(16)) {
    launch<uint4>(out, in, d_offsets, p, row_bytes, map, stream);
  } else if (aligned(8)) {
    launch<uint2>(out, in, d_offsets, p, row_bytes, map, stream);
  } else if (aligned(4)) {
    launch<uint32_t>(out, in, d_offsets, p, row_bytes, map, stream);
  } else if (aligned(2)) {
    launch<uint16_t>(out, in, d_offsets, p, row_bytes, map, stream);
  } else {
    launch<uint8_t>(out, in, d_offsets, p, row_bytes, map, stream);
  }
  return out;
}

at::Tensor compact_segments_cuda(const at::Tensor& padded, c10::IntArrayRef counts) {
  return row_map_cuda(RowMap::kCompact, padded, counts, 0, "fastcl::compact_segments");
}

at::Tensor pad_segments_cuda(const at::Tensor& rows, c10::IntArrayRef counts, int64_t padded_rows) {
  return row_map_cuda(RowMap::kPad, rows, counts, padded_rows, "fastcl::pad_segments");
}

at::Tensor repeat_segments_cuda(const at::Tensor& values, c10::IntArrayRef counts, int64_t repeats) {
  return row_map_cuda(RowMap::kRepeat, values, counts, repeats, "fastcl::repeat_segments");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcl, CUDA, m) {
  m.impl("compact_segments", &compact_segments_cuda);
  m.impl("pad_segments", &pad_segments_cuda);
  m.impl("repeat_segments", &repeat_segments_cuda);
}

}  // namespace fastcl
