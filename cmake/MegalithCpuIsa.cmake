# Instruction-set variants of the CPU kernels.
#
# megalith_cpu_isa_variants(<target> <source>...)
#   Compiles the kernel sources once per instruction-set level and adds the objects to <target>:
#     level 0 "base"    always (the compiler's default target, e.g. SSE2 on x86-64);
#     level 1 "avx2"    x86-64 with GCC or Clang: AVX2 + FMA + F16C;
#     level 2 "avx512"  x86-64 with GCC or Clang: AVX-512 F/BW/VL/DQ.
#   Each copy is compiled with -DMEGALITH_CPU_ISA_LEVEL=<level>; cpp/kernels/cpu/cpu_common.h turns that into
#   a namespace (megalith::kernels::cpu::avx2, ...) and a `#pragma GCC target` (or clang attribute) over the
#   kernel code only, after the standard headers, so inline library code shared between the copies stays
#   baseline code. No global -m flags are used. <target> gets MEGALITH_CPU_HAS_AVX2 / MEGALITH_CPU_HAS_AVX512
#   for the levels it holds; cpp/kernels/cpu/dispatch.cpp picks the best one the running CPU supports.
#   Every copy also gets -fopenmp-simd when the compiler has it (honours `#pragma omp simd`, links nothing),
#   and -fno-trapping-math -fno-math-errno: the kernels read neither floating-point exception flags nor errno,
#   and without them GCC will not turn the selects of a branch-free exp into vector blends below AVX-512.
#   After <target> is built, cmake/check_isa_objects.py disassembles the avx2/avx512 objects (when CMake found
#   objdump and Python) and fails the build if shared code in them was compiled with AVX instructions.
#   Example:  megalith_cpu_isa_variants(megalith_cpu cpp/kernels/cpu/norms.cpp cpp/kernels/cpu/softmax.cpp)

include(CheckCXXCompilerFlag)

function(megalith_cpu_isa_variants target)
  set(levels 0)
  set(x86 OFF)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    list(LENGTH CMAKE_OSX_ARCHITECTURES num_osx_archs)
    if(num_osx_archs LESS_EQUAL 1)  # a universal macOS build also compiles for arm64, where these do not exist
      set(x86 ON)
      list(APPEND levels 1 2)
    endif()
  endif()
  check_cxx_compiler_flag(-fopenmp-simd MEGALITH_HAS_OPENMP_SIMD)
  set(names base avx2 avx512)
  foreach(level IN LISTS levels)
    list(GET names ${level} name)
    set(objects ${target}_${name})
    add_library(${objects} OBJECT ${ARGN})
    megalith_target_flags(${objects})
    target_include_directories(${objects} PRIVATE $<TARGET_PROPERTY:${target},INCLUDE_DIRECTORIES>)
    target_compile_definitions(${objects} PRIVATE MEGALITH_CPU_ISA_LEVEL=${level})
    if(MEGALITH_HAS_OPENMP_SIMD)
      target_compile_options(${objects} PRIVATE -fopenmp-simd)
    endif()
    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
      target_compile_options(${objects} PRIVATE -fno-trapping-math -fno-math-errno)
    endif()
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${objects}>)
  endforeach()
  if(x86)
    target_compile_definitions(${target} PRIVATE MEGALITH_CPU_HAS_AVX2=1 MEGALITH_CPU_HAS_AVX512=1)
    if(CMAKE_OBJDUMP AND Python_EXECUTABLE)
      add_custom_command(TARGET ${target} POST_BUILD
        COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/check_isa_objects.py" "${CMAKE_OBJDUMP}"
                "$<TARGET_OBJECTS:${target}_avx2>" "$<TARGET_OBJECTS:${target}_avx512>"
        COMMENT "Checking that the AVX kernel objects share no AVX code"
        COMMAND_EXPAND_LISTS VERBATIM)
    endif()
  endif()
endfunction()
