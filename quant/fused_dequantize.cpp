// Fused CPU dequantization of one packed QuantizedTensor (quant/uniform.py) into a float32 tensor.
//
// Why: the torch-op path unpacks the codes (a widening copy and a shift-add per code in a byte), converts
// them to floats, and applies the per-group affine in one or two more passes: 5-10 small ops per chunk, on
// every layer's keys and values at every decode step. Here every output element is written once:
// out = float(code) * scale + zero, reading the packed byte and the group's fp16 parameters directly.
//
// The result is bit-identical to the torch path: a code (< 256, 8 bits) times an fp16 scale (11 significant
// bits) is exact in float32, so the one rounding left is the addition, whichever order or fusion is used.
// quant/fused.py checks that on every process's first use before it trusts this kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float half_to_float(const at::Half h) { return static_cast<float>(h); }

// Every byte's codes as floats, one table per width: unpacking is then one table row copied per byte
// (the shift-and-mask per code does not vectorise across the codes of a byte).
template <int BITS>
struct CodeTable {
  static constexpr int per_byte = 8 / BITS;
  float row[256][per_byte];
  CodeTable() {
    for (int byte = 0; byte < 256; ++byte)
      for (int i = 0; i < per_byte; ++i) row[byte][i] = static_cast<float>((byte >> (BITS * i)) & ((1 << BITS) - 1));
  }
};

// codes of one row (last dimension) into `out`: out[j] = code j as a float (BITS of 1 adds nothing new:
// it is the high-bit plane of 3-bit codes, see unpack_row3).
template <int BITS>
inline void unpack_row(const uint8_t* packed, int64_t length, float* out) {
  static const CodeTable<BITS> table;
  constexpr int per_byte = CodeTable<BITS>::per_byte;
  const int64_t whole = length / per_byte;
  for (int64_t k = 0; k < whole; ++k) std::memcpy(out + k * per_byte, table.row[packed[k]], sizeof(table.row[0]));
  for (int64_t j = whole * per_byte; j < length; ++j) out[j] = table.row[packed[whole]][j - whole * per_byte];
}

// 3 bits: the low two bits as a 2-bit plane of ceil(n/4) bytes, then the high bit as a 1-bit plane.
inline void unpack_row3(const uint8_t* packed, int64_t length, float* out, float* high) {
  unpack_row<2>(packed, length, out);
  unpack_row<1>(packed + (length + 3) / 4, length, high);
  for (int64_t j = 0; j < length; ++j) out[j] += 4.0f * high[j];
}

inline void unpack_any(int bits, const uint8_t* packed, int64_t length, float* out, float* scratch) {
  switch (bits) {
    case 2: unpack_row<2>(packed, length, out); break;
    case 3: unpack_row3(packed, length, out, scratch); break;
    case 4: unpack_row<4>(packed, length, out); break;
    default: for (int64_t j = 0; j < length; ++j) out[j] = static_cast<float>(packed[j]); break;
  }
}

}  // namespace

// data: uint8 [B, H, T, P] (last dim contiguous); scale/zero: fp16 [B, H, G, D] (axis 2, groups of tokens)
// or [B, H, T, G] (axis 3, groups of channels); zero may be empty (symmetric: zero = scale * -half);
// out: float32 [B, H, T_out, D], any strides with a contiguous last dimension; rows: empty (token t goes to
// out's token t, T_out == T) or int64 [T], where each token goes (a chunk of equal bits scattered back into
// token order in one call: MixedPrecisionLayer's in-order read).
void dequantize_into(const torch::Tensor& data, const torch::Tensor& scale, const torch::Tensor& zero,
                     int64_t bits, int64_t axis, int64_t group_size, double half, torch::Tensor& out,
                     const torch::Tensor& rows) {
  TORCH_CHECK(data.dim() == 4 && out.dim() == 4, "4-d tensors only");
  TORCH_CHECK(data.scalar_type() == at::kByte && out.scalar_type() == at::kFloat, "uint8 codes, float32 out");
  TORCH_CHECK(scale.scalar_type() == at::kHalf, "fp16 scale");
  TORCH_CHECK(data.stride(3) == 1 && out.stride(3) == 1 && scale.stride(3) == 1, "contiguous last dims");
  const bool symmetric = zero.numel() == 0;
  TORCH_CHECK(symmetric || (zero.scalar_type() == at::kHalf && zero.strides() == scale.strides()),
              "zero laid out like scale");
  const int64_t B = out.size(0), H = out.size(1), T = data.size(2), D = out.size(3);
  const bool mapped = rows.numel() > 0;
  TORCH_CHECK(data.size(0) == B && data.size(1) == H, "codes and out differ in batch or heads");
  TORCH_CHECK(mapped ? (rows.numel() == T && rows.scalar_type() == at::kLong && rows.is_contiguous())
                     : out.size(2) == T, "rows: one int64 destination per token");
  const int64_t* to = mapped ? rows.data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; mapped && t < T; ++t) TORCH_CHECK(0 <= to[t] && to[t] < out.size(2), "rows out of range");
  const uint8_t* d = data.data_ptr<uint8_t>();
  const at::Half* s = scale.data_ptr<at::Half>();
  const at::Half* z = symmetric ? nullptr : zero.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  const auto ds = data.strides();
  const auto ss = scale.strides();
  const auto os = out.strides();
  const float minus_half = static_cast<float>(-half);
  const int b = static_cast<int>(bits);
  if (axis == 2) {  // keys: one (scale, zero) per channel and group of tokens; converted once per group
    const int64_t G = (T + group_size - 1) / group_size;
    at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> codes(D), scratch(D), sc(D), ze(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bi = r / (H * G), hi = (r / G) % H, gi = r % G;
        const int64_t p = bi * ss[0] + hi * ss[1] + gi * ss[2];
        for (int64_t j = 0; j < D; ++j) {
          sc[j] = half_to_float(s[p + j]);
          ze[j] = symmetric ? sc[j] * minus_half : half_to_float(z[p + j]);
        }
        const int64_t t1 = std::min(T, (gi + 1) * group_size);
        for (int64_t t = gi * group_size; t < t1; ++t) {
          unpack_any(b, d + bi * ds[0] + hi * ds[1] + t * ds[2], D, codes.data(), scratch.data());
          float* row = o + bi * os[0] + hi * os[1] + (mapped ? to[t] : t) * os[2];
          for (int64_t j = 0; j < D; ++j) row[j] = codes[j] * sc[j] + ze[j];
        }
      }
    });
    return;
  }
  // values: one (scale, zero) per group of channels of each token
  at::parallel_for(0, B * H * T, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> codes(D), scratch(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / (H * T), hi = (r / T) % H, t = r % T;
      unpack_any(b, d + bi * ds[0] + hi * ds[1] + t * ds[2], D, codes.data(), scratch.data());
      float* row = o + bi * os[0] + hi * os[1] + (mapped ? to[t] : t) * os[2];
      const int64_t p = bi * ss[0] + hi * ss[1] + t * ss[2];
      for (int64_t g0 = 0, gi = 0; g0 < D; g0 += group_size, ++gi) {
        const float sc = half_to_float(s[p + gi]);
        const float ze = symmetric ? sc * minus_half : half_to_float(z[p + gi]);
        const int64_t g1 = std::min(D, g0 + group_size);
        for (int64_t j = g0; j < g1; ++j) row[j] = codes[j] * sc + ze;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_into", &dequantize_into, "packed codes -> float32, one pass (quant/fused.py)");
}
