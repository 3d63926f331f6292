// The argument checks of upsample_concat and upsample_concat_out, shared by
// the CPU kernels (csrc/cpu/upsample_concat.cpp) and the CUDA launchers
// (csrc/cuda/upsample_concat.cu, also in the emulated build): one rule and
// one message for each error on every device, each naming the argument
// (x, branches[k], out, size). Host code only. The device of out is the
// caller's check.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pyramid_ext {

// One source of out's channels: x (copied) or a branch (interpolated).
struct ConcatPart {
  at::Tensor t;
  int64_t channel_offset;  // first channel of out it writes
  bool interpolate;        // a branch; x is copied
  std::string name;        // "x" or "branches[k]", for messages
};

// x and the branches in concatenation order (x first or last), with their
// channel offsets in out. Reads only size(1) of each defined 4-D input.
inline std::vector<ConcatPart> concat_parts(const std::optional<at::Tensor>& x, at::TensorList branches,
                                            bool x_first) {
  std::vector<ConcatPart> parts;
  const bool has_x = x.has_value() && x->defined();
  if (has_x && x_first) parts.push_back({*x, 0, false, "x"});
  for (size_t k = 0; k < branches.size(); ++k) {
    parts.push_back({branches[k], 0, true, "branches[" + std::to_string(k) + "]"});
  }
  if (has_x && !x_first) parts.push_back({*x, 0, false, "x"});
  return parts;
}

inline void check_concat_input(const char* op, const ConcatPart& p) {
  TORCH_CHECK(p.t.defined(), op, ": ", p.name, " is undefined");
  TORCH_CHECK(p.t.dim() == 4, op, ": ", p.name, " must be 4-D (N, C, H, W), got ", p.t.dim(), "-D");
}

inline bool is_pyramid_float(at::ScalarType st) {
  return st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// The out upsample_concat allocates: sizes (N, C_x + sum C_k, size[0],
// size[1]) and options (dtype, device) from x, or without x from branches[0].
struct ConcatOut {
  std::vector<int64_t> sizes;
  at::TensorOptions options;
};

// upsample_concat(x, branches, size, ...): checks what allocating out needs
// (the rest is checked against out by check_upsample_concat_parts).
inline ConcatOut upsample_concat_out_like(const char* op, const std::vector<ConcatPart>& parts,
                                          c10::IntArrayRef size) {
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, op, ": size must be two positive ints, got ", size);
  TORCH_CHECK(!parts.empty(), op, ": needs x or at least one branch");
  int64_t channels = 0;
  const ConcatPart* ref = &parts.front();
  for (const ConcatPart& p : parts) {
    check_concat_input(op, p);
    channels += p.t.size(1);
    if (!p.interpolate) ref = &p;
  }
  TORCH_CHECK(is_pyramid_float(ref->t.scalar_type()), op, ": ", ref->name,
              " must be float64, float32, float16 or bfloat16, got ", ref->t.scalar_type());
  return {{ref->t.size(0), channels, size[0], size[1]}, ref->t.options()};
}

// Checks the parts against out and sets their channel offsets. out: 4-D,
// float64/32/16/bf16, channels = the inputs' channels, no element stored
// twice. Every input: out's dtype, device and batch size; x out's height and
// width; branches a non-zero height and width. An input may share out's
// storage only where their memory provably does not overlap
// (at::get_overlap_status is No; TooHard, e.g. a non-dense slice in the same
// storage, counts as overlap): the kernels read inputs while writing out.
inline void check_upsample_concat_parts(const char* op, std::vector<ConcatPart>& parts, const at::Tensor& out) {
  TORCH_CHECK(!parts.empty(), op, ": needs x or at least one branch");
  TORCH_CHECK(out.defined() && out.dim() == 4, op, ": out must be 4-D (N, C, H, W), got ",
              out.defined() ? out.dim() : 0, "-D");
  TORCH_CHECK(is_pyramid_float(out.scalar_type()), op, ": out must be float64, float32, float16 or bfloat16, got ",
              out.scalar_type());
  int64_t channels = 0;
  for (ConcatPart& p : parts) {
    check_concat_input(op, p);
    const at::Tensor& t = p.t;
    TORCH_CHECK(t.device() == out.device(), op, ": ", p.name, " is on ", t.device(), " but out is on ",
                out.device());
    TORCH_CHECK(t.scalar_type() == out.scalar_type(), op, ": ", p.name, " has dtype ", t.scalar_type(),
                " but out has ", out.scalar_type(), " (all tensors must share one dtype)");
    TORCH_CHECK(t.size(0) == out.size(0), op, ": ", p.name, " has batch size ", t.size(0), " but out has ",
                out.size(0));
    if (!p.interpolate) {
      TORCH_CHECK(t.size(2) == out.size(2) && t.size(3) == out.size(3), op,
                  ": x must have out's height and width: x has spatial size (", t.size(2), ", ", t.size(3),
                  ") but the output has (", out.size(2), ", ", out.size(3), ")");
    } else {
      TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0, op, ": ", p.name,
                  " must have non-zero height and width, got ", t.sizes());
    }
    TORCH_CHECK(!t.is_alias_of(out) || at::get_overlap_status(out, t) == at::MemOverlapStatus::No, op,
                ": out must not overlap the inputs, but ", p.name,
                " shares out's storage and overlaps it (or may: not provably disjoint)");
    p.channel_offset = channels;
    channels += t.size(1);
  }
  TORCH_CHECK(channels == out.size(1), op, ": the inputs have ", channels, " channels in all but out has ",
              out.size(1));
  TORCH_CHECK(out.numel() == 0 || at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not overlap itself (some of its elements share one memory location)");
}

}  // namespace pyramid_ext
