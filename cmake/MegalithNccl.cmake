# NCCL for Megalith's communicator. The build needs no NCCL: libnccl.so.2 is opened with dlopen at run time and
# the few types and functions used are declared in cpp/include/megalith/nccl_abi.h. This file only adds an
# optional compile-time check of those declarations against a real nccl.h.
#
# megalith_nccl_abi_check(<target> <check_source>)
#   Compiles <check_source> (static_asserts, no code) against the first nccl.h found, in this order:
#     1. MEGALITH_NCCL_INCLUDE_DIR (cache variable) when set;
#     2. the CUDA toolkit's include directories and the usual system ones;
#     3. the nvidia-nccl-cu13 / nvidia-nccl-cu12 wheel of the Python that runs the build.
#   and makes <target> depend on it, so a drift in nccl_abi.h fails the build. Needs CUDA headers (nccl.h
#   includes cuda_runtime.h), so it is for CUDA builds; without an nccl.h it says so and does nothing.
#   Example:  megalith_nccl_abi_check(megalith_comm_cuda "${CMAKE_CURRENT_SOURCE_DIR}/cpp/comm/check/nccl_abi_check.cpp")

set(MEGALITH_NCCL_INCLUDE_DIR "" CACHE PATH "Directory of an nccl.h to check megalith/nccl_abi.h against (optional)")

function(megalith_nccl_abi_check target check_source)
  set(include_dir "${MEGALITH_NCCL_INCLUDE_DIR}")
  if(NOT include_dir)
    find_path(MEGALITH_SYSTEM_NCCL_INCLUDE nccl.h PATHS ${CUDAToolkit_INCLUDE_DIRS} /usr/include /usr/local/include)
    if(MEGALITH_SYSTEM_NCCL_INCLUDE)
      set(include_dir "${MEGALITH_SYSTEM_NCCL_INCLUDE}")
    endif()
  endif()
  if(NOT include_dir AND Python_EXECUTABLE)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/nccl_wheel_include.py"
      OUTPUT_VARIABLE wheel_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE status ERROR_QUIET)
    if(status EQUAL 0 AND wheel_dir)
      set(include_dir "${wheel_dir}")
    endif()
  endif()
  if(NOT include_dir)
    message(STATUS "Megalith: no nccl.h found; megalith/nccl_abi.h is not cross-checked (the build does not need it)")
    return()
  endif()
  message(STATUS "Megalith: checking megalith/nccl_abi.h against ${include_dir}/nccl.h")
  add_library(megalith_nccl_abi_check OBJECT "${check_source}")
  target_include_directories(megalith_nccl_abi_check PRIVATE "${include_dir}" "${PROJECT_SOURCE_DIR}/cpp/include")
  target_link_libraries(megalith_nccl_abi_check PRIVATE CUDA::cudart_static)  # for cuda_runtime.h
  megalith_target_flags(megalith_nccl_abi_check)
  add_dependencies(${target} megalith_nccl_abi_check)
endfunction()
