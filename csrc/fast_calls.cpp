// The eager fast path's C++ half (pyramid_ext/functional.py, `_fast_pool`).
//
// Calling a custom op from Python converts every argument against the schema:
// each element of a SymInt[] is checked for a SymInt (an isinstance per
// element), and the call is boxed. For a pyramid of small maps that cost more
// than the kernel. A `_PoolCall` holds one call's constants (windows,
// level_bins, mode, the levels' views), built once per (shape, bins, ...) by
// the Python layer, which has checked them; calling it passes only x and calls
// the op through the dispatcher with its typed signature. The dispatcher still
// runs every key (autograd, Python modes such as a TorchDispatchMode, vmap,
// profiling), so the op is the same op; only the Python-side argument
// conversion is skipped. Never used under torch.compile or export (the
// Python layer takes the op's ordinary path there).
#include <torch/extension.h>

#include <tuple>
#include <utility>
#include <vector>

namespace pyramid_ext {
namespace {

using PoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                   at::IntArrayRef, int64_t, bool);
using UpsampleSig = at::Tensor(const std::optional<at::Tensor>&, at::TensorList, c10::SymIntArrayRef, bool, bool,
                               bool);

struct LevelView {
  std::vector<int64_t> size, stride;
  int64_t offset;
};

class PoolCall {
 public:
  PoolCall(std::vector<int64_t> h_bounds, std::vector<int64_t> w_bounds, std::vector<int64_t> level_bins,
           int64_t mode, bool channels_last_levels, bool unbatched,
           std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>> views)
      : h_bounds_(std::move(h_bounds)),
        w_bounds_(std::move(w_bounds)),
        level_bins_(std::move(level_bins)),
        mode_(mode),
        channels_last_levels_(channels_last_levels),
        unbatched_(unbatched) {
    for (auto& [size, stride, offset] : views) views_.push_back({std::move(size), std::move(stride), offset});
  }

  // (values, indices) as the op returns them; values[0] for an unbatched x.
  std::tuple<at::Tensor, at::Tensor> packed(const at::Tensor& x) const {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::multi_pool2d", "").typed<PoolSig>();
    pybind11::gil_scoped_release no_gil;
    return op.call(unbatched_ ? x.unsqueeze(0) : x, c10::fromIntArrayRefSlow(h_bounds_),
                   c10::fromIntArrayRefSlow(w_bounds_), level_bins_, mode_, channels_last_levels_);
  }

  at::Tensor spp(const at::Tensor& x) const {
    at::Tensor values = std::get<0>(packed(x));
    return unbatched_ ? values.select(0, 0) : values;
  }

  std::vector<at::Tensor> levels(const at::Tensor& x) const { return views(std::get<0>(packed(x))); }

  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> levels_with_indices(const at::Tensor& x) const {
    auto [values, indices] = packed(x);
    return {views(values), views(indices)};
  }

 private:
  std::vector<at::Tensor> views(const at::Tensor& packed) const {
    std::vector<at::Tensor> out;
    out.reserve(views_.size());
    for (const LevelView& v : views_) out.push_back(packed.as_strided(v.size, v.stride, v.offset));
    return out;
  }

  std::vector<int64_t> h_bounds_, w_bounds_, level_bins_;
  int64_t mode_;
  bool channels_last_levels_, unbatched_;
  std::vector<LevelView> views_;
};

at::Tensor upsample_concat(const std::optional<at::Tensor>& x, const std::vector<at::Tensor>& branches,
                           int64_t height, int64_t width, bool align_corners, bool x_first, bool channels_last) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::upsample_concat", "").typed<UpsampleSig>();
  pybind11::gil_scoped_release no_gil;
  const c10::SymInt size[2] = {c10::SymInt(height), c10::SymInt(width)};
  return op.call(x, branches, size, align_corners, x_first, channels_last);
}

}  // namespace

void register_fast_calls(pybind11::module_& m) {
  pybind11::class_<PoolCall>(m, "_PoolCall",
                             "The eager fast path's multi_pool2d call with its constants (pyramid_ext.functional).")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, bool, bool,
                          std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>>>())
      .def("packed", &PoolCall::packed)
      .def("spp", &PoolCall::spp)
      .def("levels", &PoolCall::levels)
      .def("levels_with_indices", &PoolCall::levels_with_indices);
  m.def("_upsample_concat", &upsample_concat,
        "The eager fast path's upsample_concat call (arguments checked by pyramid_ext.functional).");
}

}  // namespace pyramid_ext
