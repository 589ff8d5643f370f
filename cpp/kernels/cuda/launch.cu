// Device selection and the error path shared by every CUDA launcher.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace megalith::kernels::cuda {

void throw_cuda_error(cudaError_t status, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(status) + " (" + what + " at " + file +
                           ":" + std::to_string(line) + ")");
}

void set_device(int device) { MEGALITH_CUDA_CHECK(cudaSetDevice(device)); }

}  // namespace megalith::kernels::cuda
