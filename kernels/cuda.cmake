# Decide whether to build the CUDA path: RENDERFS_CUDA=AUTO (when nvcc is
# found), ON (required) or OFF. Sets RENDERFS_HAVE_CUDA. Included by the
# top-level build and by kernels/ built on its own.
set(RENDERFS_CUDA AUTO CACHE STRING "build CUDA kernels: AUTO, ON or OFF")
set_property(CACHE RENDERFS_CUDA PROPERTY STRINGS AUTO ON OFF)
set(RENDERFS_HAVE_CUDA OFF)
# Sanitizer builds instrument C only; nvcc objects would not link with them,
# and the CPU path is what they check.
if(RENDERFS_SANITIZE)
  message(STATUS "renderfs: sanitizer build, CUDA path not built")
elseif(NOT RENDERFS_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(RENDERFS_HAVE_CUDA ON)
  elseif(RENDERFS_CUDA STREQUAL "ON")
    message(FATAL_ERROR "RENDERFS_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
message(STATUS "renderfs: CUDA kernels ${RENDERFS_HAVE_CUDA}")
