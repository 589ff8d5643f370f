// The megalith.kernels._C extension module: build information and the submodules of each component.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"
#include "megalith/runtime.h"

namespace py = pybind11;

namespace {

std::vector<std::string> split_archs(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  for (char c : text) {
    if (c == ';' || c == ',') {
      if (!current.empty()) out.push_back(current);
      current.clear();
    } else {
      current.push_back(c);
    }
  }
  if (!current.empty()) out.push_back(current);
  return out;
}

py::dict build_info() {
  py::dict info;
  info["version"] = MEGALITH_VERSION;
  info["compiler"] = MEGALITH_CXX_COMPILER;
  info["build_type"] = MEGALITH_BUILD_TYPE;
  info["cxx_standard"] = 17;
#ifdef MEGALITH_WITH_CUDA
  info["cuda"] = true;
  info["cuda_compiler"] = MEGALITH_CUDA_COMPILER;
  info["cuda_archs"] = split_archs(MEGALITH_CUDA_ARCHS);
  const int runtime = megalith::runtime::cuda_runtime_version();
  info["cuda_runtime"] = std::to_string(runtime / 1000) + "." + std::to_string((runtime % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_compiler"] = py::none();
  info["cuda_archs"] = std::vector<std::string>{};
  info["cuda_runtime"] = py::none();
#endif
  return info;
}

py::tuple cuda_device_count() {
#ifdef MEGALITH_WITH_CUDA
  std::string reason;
  const int count = megalith::runtime::cuda_device_count(&reason);
  return py::make_tuple(count, reason);
#else
  return py::make_tuple(0, std::string("megalith-kernels was built without CUDA"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Megalith's compiled core: fused kernels, dataset index builders, communicators (torch-free).";
  m.def("build_info", &build_info, "Version, compiler and CUDA configuration of this build.");
  m.def("cuda_device_count", &cuda_device_count,
        "(number of usable CUDA devices, reason when zero) as seen by the statically linked runtime.");
  py::module_ data = m.def_submodule("data", "Dataset index builders.");
  megalith::bindings::bind_data(data);
  py::module_ kernels = m.def_submodule("kernels", "Fused kernels (torch-free; see megalith.kernels.ops).");
  megalith::bindings::bind_kernels(kernels);
  py::module_ nccl =
      m.def_submodule("nccl", "NCCL loaded at run time, and its communicator (see megalith.kernels.nccl).");
  megalith::bindings::bind_comm(nccl);
}
