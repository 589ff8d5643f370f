# CUDA discovery and architecture flags for Megalith.
#
# megalith_configure_cuda()
#   Reads the cache option MEGALITH_CUDA (AUTO, ON or OFF; AUTO by default):
#     AUTO  build the CUDA kernels when a CUDA compiler is found, otherwise build CPU-only;
#     ON    build them or stop with an error saying why (CI uses this so a CUDA compile error fails);
#     OFF   never build them.
#   Sets MEGALITH_WITH_CUDA (ON/OFF) in the caller's scope and enables the CUDA language when ON.
#   Example:  megalith_configure_cuda()  if(MEGALITH_WITH_CUDA) add_library(megalith_cuda ...) endif()
#
# megalith_cuda_arch_flags(<out_var>)
#   Turns MEGALITH_CUDA_ARCHS (default "80;90a": Ampere and Hopper with its arch-specific instructions) into
#   nvcc -gencode flags: SASS for every listed arch plus PTX for the newest, so later GPUs can JIT it.
#   Example:  MEGALITH_CUDA_ARCHS="80;90a" gives
#     -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
#     -gencode=arch=compute_90a,code=compute_90a

set(MEGALITH_CUDA "AUTO" CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
set_property(CACHE MEGALITH_CUDA PROPERTY STRINGS AUTO ON OFF)
set(MEGALITH_CUDA_ARCHS "80;90a" CACHE STRING "CUDA architectures to build SASS for (e.g. 80;90a)")

macro(megalith_configure_cuda)
  string(TOUPPER "${MEGALITH_CUDA}" _megalith_cuda_mode)
  if(NOT _megalith_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "MEGALITH_CUDA must be AUTO, ON or OFF, got '${MEGALITH_CUDA}'")
  endif()
  set(MEGALITH_WITH_CUDA OFF)
  if(NOT _megalith_cuda_mode STREQUAL "OFF")
    include(CheckLanguage)
    if(NOT CMAKE_CUDA_COMPILER AND EXISTS "/usr/local/cuda/bin/nvcc")
      # Toolkits installed in the default place are often not on PATH inside build isolation.
      set(CMAKE_CUDA_COMPILER "/usr/local/cuda/bin/nvcc")
    endif()
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(MEGALITH_WITH_CUDA ON)
    elseif(_megalith_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR
        "MEGALITH_CUDA=ON but no CUDA compiler was found. Install the CUDA toolkit (nvcc) and put it on "
        "PATH or set CMAKE_CUDA_COMPILER, or build with MEGALITH_CUDA=AUTO/OFF for a CPU-only module.")
    else()
      message(STATUS "Megalith: no CUDA compiler found, building CPU kernels only")
    endif()
  endif()
  if(MEGALITH_WITH_CUDA)
    # Architectures are passed as explicit -gencode flags (see megalith_cuda_arch_flags).
    set(CMAKE_CUDA_ARCHITECTURES OFF)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    message(STATUS "Megalith: CUDA ${CMAKE_CUDA_COMPILER_VERSION} kernels for ${MEGALITH_CUDA_ARCHS}")
  endif()
endmacro()

function(megalith_cuda_arch_flags out_var)
  set(flags "")
  set(newest "")
  foreach(arch IN LISTS MEGALITH_CUDA_ARCHS)
    if(NOT arch MATCHES "^[0-9]+[af]?$")
      message(FATAL_ERROR "MEGALITH_CUDA_ARCHS entries look like 80 or 90a, got '${arch}'")
    endif()
    list(APPEND flags "-gencode=arch=compute_${arch},code=sm_${arch}")
    set(newest "${arch}")
  endforeach()
  list(APPEND flags "-gencode=arch=compute_${newest},code=compute_${newest}")
  set(${out_var} "${flags}" PARENT_SCOPE)
endfunction()
