// Python bindings of the dataset index builders (megalith.kernels._C.data).
#include <cstdint>
#include <limits>

#include "common.h"
#include "megalith/data.h"

namespace megalith::bindings {

namespace {

template <typename DocT>
py::array sample_index_for(const py::array& sizes, const py::array& document_index, int32_t seq_length,
                           int32_t extra_token, int64_t num_samples, bool use_int64) {
  const auto* sizes_ptr = static_cast<const int32_t*>(sizes.data());
  const auto* docs_ptr = static_cast<const DocT*>(document_index.data());
  const int64_t num_sizes = sizes.shape(0);
  const int64_t num_docs = document_index.shape(0);
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(num_samples + 1), 2};
  if (use_int64) {
    py::array_t<int64_t> out(shape);
    int64_t* out_ptr = out.mutable_data();
    py::gil_scoped_release release;
    data::build_sample_index<DocT, int64_t>(sizes_ptr, num_sizes, docs_ptr, num_docs, seq_length, extra_token,
                                            num_samples, out_ptr);
    return std::move(out);
  }
  py::array_t<int32_t> out(shape);
  int32_t* out_ptr = out.mutable_data();
  py::gil_scoped_release release;
  data::build_sample_index<DocT, int32_t>(sizes_ptr, num_sizes, docs_ptr, num_docs, seq_length, extra_token,
                                          num_samples, out_ptr);
  return std::move(out);
}

py::array build_sample_index(const py::array& sizes, const py::array& document_index, int32_t seq_length,
                             int64_t num_epochs, int64_t tokens_per_epoch, bool drop_last_partial,
                             bool add_extra_token) {
  check_vector<int32_t>(sizes, "sizes");
  const bool docs_int64 = document_index.dtype().is(py::dtype::of<int64_t>());
  if (docs_int64) {
    check_vector<int64_t>(document_index, "document_index");
  } else {
    check_vector<int32_t>(document_index, "document_index");
  }
  const int32_t extra = add_extra_token ? 1 : 0;
  const int64_t num_samples = data::count_samples(num_epochs, tokens_per_epoch, seq_length, extra,
                                                  drop_last_partial);
  // Same width rule as Megatron-LM: int32 rows unless a position or an offset could exceed int32.
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  const bool use_int64 = document_index.shape(0) > int32_max;
  return docs_int64 ? sample_index_for<int64_t>(sizes, document_index, seq_length, extra, num_samples, use_int64)
                    : sample_index_for<int32_t>(sizes, document_index, seq_length, extra, num_samples, use_int64);
}

py::tuple build_blending_index(const py::array& weights, int64_t size) {
  check_vector<double>(weights, "weights");
  if (size < 0) fail("size must be non-negative, got ", size);
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  const auto* weights_ptr = static_cast<const double*>(weights.data());
  const int64_t num_datasets = weights.shape(0);
  int16_t* index_ptr = dataset_index.mutable_data();
  int64_t* sample_ptr = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    data::build_blending_index(weights_ptr, num_datasets, size, index_ptr, sample_ptr);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

py::tuple build_exhaustive_blending_index(const py::array& sizes) {
  check_vector<int64_t>(sizes, "sizes");
  const auto* sizes_ptr = static_cast<const int64_t*>(sizes.data());
  const int64_t num_datasets = sizes.shape(0);
  int64_t total = 0;
  for (int64_t k = 0; k < num_datasets; ++k) {
    if (sizes_ptr[k] < 0) fail("sizes[", k, "] must be non-negative, got ", sizes_ptr[k]);
    total += sizes_ptr[k];
  }
  py::array_t<int16_t> dataset_index(total);
  py::array_t<int64_t> dataset_sample_index(total);
  int16_t* index_ptr = dataset_index.mutable_data();
  int64_t* sample_ptr = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    data::build_exhaustive_blending_index(sizes_ptr, num_datasets, index_ptr, sample_ptr);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

void bind_data(py::module_& m) {
  m.def("count_samples", &data::count_samples, py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("seq_length"), py::arg("extra_token"), py::arg("drop_last_partial"),
        "Number of samples E epochs give at seq_length tokens per sample.");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial") = true, py::arg("add_extra_token") = true,
        "Start (document position, offset) of every sample; shape [num_samples + 1, 2].");
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], dataset_sample_index int64[size]) for a weighted blend.");
  m.def("build_exhaustive_blending_index", &build_exhaustive_blending_index, py::arg("sizes"),
        "Blend that uses every sample of every dataset exactly once.");
}

}  // namespace megalith::bindings
