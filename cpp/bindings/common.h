// Helpers shared by the binding files: strict numpy argument checks with messages naming the argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "megalith/error.h"

namespace megalith::bindings {

namespace py = pybind11;

// Checks that `array` (the argument called `name`) is a 1-D C-contiguous array of exactly dtype T.
template <typename T>
void check_vector(const py::array& array, const char* name) {
  if (!array.dtype().is(py::dtype::of<T>())) {
    fail(name, " must have dtype ", std::string(py::str(py::dtype::of<T>())), ", got ",
         std::string(py::str(array.dtype())));
  }
  if (array.ndim() != 1) fail(name, " must be 1-D, got ", array.ndim(), " dimensions");
  if (!(array.flags() & py::array::c_style)) fail(name, " must be C-contiguous");
}

void bind_comm(py::module_& m);
void bind_data(py::module_& m);
void bind_kernels(py::module_& m);

}  // namespace megalith::bindings
