// Python bindings of the NCCL library and communicator (megalith.kernels._C.nccl); see megalith.kernels.nccl.
// Buffers and streams cross as integers (device pointer, CUDA stream handle), dtypes and reductions as codes.
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "megalith/comm.h"
#ifdef MEGALITH_WITH_CUDA
#include "megalith/communicator.h"
#endif

namespace megalith::bindings {

namespace {

namespace comm = megalith::comm;

py::dict info_dict(const comm::LibraryInfo& info) {
  const comm::Version v = comm::parse_version(info.version_code);
  py::dict out;
  out["path"] = info.path;
  out["source"] = info.source;
  out["version"] = py::make_tuple(v.major, v.minor, v.patch);
  out["registration"] = info.registration;
  return out;
}

py::dict codes(const char* (*name_of)(int), int count) {
  py::dict out;
  for (int code = 0; code < count; ++code) out[name_of(code)] = code;
  return out;
}

// NcclTimeoutError is both an NcclError and a TimeoutError, which py::register_exception cannot express.
void register_exceptions(py::module_& m) {
  py::register_exception<comm::LibraryError>(m, "NcclLibraryError", PyExc_RuntimeError);
  auto& nccl_error = py::register_exception<comm::NcclError>(m, "NcclError", PyExc_RuntimeError);
  // Owned for the life of the process (never decref'ed), so no destructor runs after the interpreter ends.
  static PyObject* timeout_error = nullptr;
  timeout_error = PyErr_NewException("megalith.kernels._C.nccl.NcclTimeoutError",
                                     py::make_tuple(nccl_error, py::handle(PyExc_TimeoutError)).ptr(), nullptr);
  if (timeout_error == nullptr) throw py::error_already_set();
  m.attr("NcclTimeoutError") = py::handle(timeout_error);
  // Translators registered later are tried first, so this one sees NcclTimeout before NcclError's does.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const comm::NcclTimeout& e) {
      PyErr_SetString(timeout_error, e.what());
    }
  });
}

#ifdef MEGALITH_WITH_CUDA
// The last reference to a communicator may be dropped with the GIL held; closing waits on the GPU and on the
// other ranks, which must not stall every Python thread.
struct ReleaseGilDeleter {
  void operator()(comm::Communicator* c) const {
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release release;
      delete c;
    } else {
      delete c;
    }
  }
};

void bind_communicator(py::module_& m) {
  using C = comm::Communicator;
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<C, std::shared_ptr<C>>(m, "Communicator", "NCCL communicator on raw device pointers and streams.")
      .def(py::init([](const py::bytes& unique_id, int rank, int size, int device, double timeout) {
             std::string id = unique_id;
             py::gil_scoped_release release;
             return std::shared_ptr<C>(new C(id, rank, size, device, timeout), ReleaseGilDeleter{});
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"), py::arg("timeout"))
      .def_property_readonly("rank", &C::rank)
      .def_property_readonly("size", &C::size)
      .def_property_readonly("device", &C::device)
      .def_property_readonly("timeout", &C::timeout)
      .def_property_readonly("closed", &C::closed)
      .def_property_readonly("failure", &C::failure)
      .def("all_reduce", &C::all_reduce, py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"),
           py::arg("op"), py::arg("stream"), Release())
      .def("reduce_scatter", &C::reduce_scatter, py::arg("send"), py::arg("recv"), py::arg("recv_count"),
           py::arg("dtype"), py::arg("op"), py::arg("stream"), Release())
      .def("all_gather", &C::all_gather, py::arg("send"), py::arg("recv"), py::arg("send_count"), py::arg("dtype"),
           py::arg("stream"), Release())
      .def("broadcast", &C::broadcast, py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"),
           py::arg("root"), py::arg("stream"), Release())
      .def("send", &C::send, py::arg("buffer"), py::arg("count"), py::arg("dtype"), py::arg("peer"),
           py::arg("stream"), Release())
      .def("recv", &C::recv, py::arg("buffer"), py::arg("count"), py::arg("dtype"), py::arg("peer"),
           py::arg("stream"), Release())
      .def("register_buffer", &C::register_buffer, py::arg("buffer"), py::arg("nbytes"), Release())
      .def("deregister_buffer", &C::deregister_buffer, py::arg("handle"), Release())
      .def("watch", &C::watch, py::arg("stream"), Release())
      .def("synchronize", &C::synchronize, Release())
      .def("check", &C::check, Release())
      .def("abort", &C::abort, py::arg("reason"), Release())
      .def("close", &C::close, Release());
  m.def("group_start", &comm::group_start, Release());
  m.def("group_end", &comm::group_end, Release());
  m.def("mem_alloc", &comm::mem_alloc, py::arg("nbytes"), py::arg("device"), Release());
  m.def("mem_free", &comm::mem_free, py::arg("ptr"), py::arg("device"), Release());
}
#endif

}  // namespace

void bind_comm(py::module_& m) {
  register_exceptions(m);
  m.attr("LIBRARY_NAME") = comm::kLibraryName;
  m.attr("LIBRARY_ENV") = comm::kLibraryEnv;
  const comm::Version minimum = comm::parse_version(comm::kMinVersionCode);
  m.attr("MIN_VERSION") = py::make_tuple(minimum.major, minimum.minor, minimum.patch);
  m.attr("DTYPES") = codes(&comm::dtype_name, comm::abi::kNumDataTypes);
  m.attr("OPS") = codes(&comm::op_name, comm::abi::kNumRedOps);
  m.def(
      "load",
      [](const std::string& explicit_path, const std::vector<std::string>& wheel_dirs) {
        comm::LibraryInfo info;
        {
          py::gil_scoped_release release;
          info = comm::load_library(explicit_path, wheel_dirs);
        }
        return info_dict(info);
      },
      py::arg("explicit_path"), py::arg("wheel_dirs"),
      "Loads libnccl (explicit path, else the wheel directories, else the system path) once per process.");
  m.def("is_loaded", &comm::library_loaded);
  m.def("library_info", []() { return info_dict(comm::library_info()); });
  m.def(
      "parse_version",
      [](int code) {
        const comm::Version v = comm::parse_version(code);
        return py::make_tuple(v.major, v.minor, v.patch);
      },
      py::arg("code"));
  m.def("check_version", &comm::check_version, py::arg("code"), py::arg("path"));
  m.def("unique_id", []() {
    std::string id;
    {
      py::gil_scoped_release release;
      id = comm::unique_id();
    }
    return py::bytes(id);
  });
  m.def("error_string", [](int code) { return std::string(comm::api().get_error_string(code)); }, py::arg("code"));
#ifdef MEGALITH_WITH_CUDA
  m.attr("HAS_COMMUNICATOR") = true;
  bind_communicator(m);
#else
  m.attr("HAS_COMMUNICATOR") = false;
#endif
}

}  // namespace megalith::bindings
