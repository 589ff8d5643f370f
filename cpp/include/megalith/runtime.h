// Torch-free queries about the CUDA runtime that the compiled module was linked with (statically).
#pragma once

#include <string>

namespace megalith::runtime {

// Number of CUDA devices usable by this process; 0 when there is no driver or no device, in which case
// `reason` (if given) receives the runtime's explanation.
int cuda_device_count(std::string* reason);

// Version of the CUDA runtime compiled in, as major * 1000 + minor * 10 (e.g. 13000 for CUDA 13.0).
int cuda_runtime_version();

// Version of the installed driver in the same encoding, or 0 when no driver is present.
int cuda_driver_version();

}  // namespace megalith::runtime
