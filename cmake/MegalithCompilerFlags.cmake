# Compiler flags for Megalith's C++ and CUDA targets.
#
# megalith_default_build_type()
#   Makes Release the default when neither the user nor scikit-build-core chose a build type.
#
# megalith_target_flags(<target>)
#   C++17, -O3 in Release, warnings on, position-independent code (the objects end up in a Python module).
#   Example:  add_library(megalith_cpu STATIC ...)  megalith_target_flags(megalith_cpu)

function(megalith_default_build_type)
  if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
    set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
  endif()
endfunction()

function(megalith_target_flags target)
  target_compile_features(${target} PUBLIC cxx_std_17)
  set_target_properties(${target} PROPERTIES
    CXX_EXTENSIONS OFF
    POSITION_INDEPENDENT_CODE ON
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CONFIG:Release>>:-O3>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<CONFIG:Release>>:-O3>)
endfunction()
