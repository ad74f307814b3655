# Shared build helpers: warnings, module libraries, unit tests.

function(openbroker_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
                                           -Wno-missing-field-initializers)
  if(OPENBROKER_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

# openbroker_module(NAME SOURCES ... DEPS ... [PCH header ...])
# Builds the library broker_<NAME>; headers are included repo-relative ("storage/repository.hpp").
function(openbroker_module name)
  cmake_parse_arguments(M "" "" "SOURCES;DEPS;PCH" ${ARGN})
  add_library(broker_${name} STATIC ${M_SOURCES})
  target_include_directories(broker_${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/generated)
  target_link_libraries(broker_${name} PUBLIC ${M_DEPS})
  openbroker_warnings(broker_${name})
  if(M_PCH)
    target_precompile_headers(broker_${name} PRIVATE ${M_PCH})
  endif()
endfunction()

# openbroker_test(NAME SOURCES ... DEPS ...): one doctest binary registered with ctest.
function(openbroker_test name)
  cmake_parse_arguments(T "" "" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_DEPS} openbroker_doctest_main)
  openbroker_warnings(${name})
  add_test(NAME ${name} COMMAND ${name})
  if(T_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${T_LABELS}")
  endif()
endfunction()

# Applies OPENBROKER_SANITIZE and, for OPENBROKER_FUZZ, libFuzzer's coverage instrumentation to
# every target defined after it (call before add_subdirectory of the modules).
function(openbroker_sanitizers)
  if(OPENBROKER_SANITIZE AND OPENBROKER_FUZZ)
    message(FATAL_ERROR "OPENBROKER_SANITIZE and OPENBROKER_FUZZ are separate builds (the fuzz build has ASan+UBSan)")
  endif()
  if(OPENBROKER_SANITIZE STREQUAL "address,undefined" OR OPENBROKER_SANITIZE STREQUAL "undefined,address")
    # -fno-sanitize-recover: a UBSan report ends the test like an ASan report does.
    set(flags -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  elseif(OPENBROKER_SANITIZE STREQUAL "address")
    set(flags -fsanitize=address -fno-omit-frame-pointer)
  elseif(OPENBROKER_SANITIZE STREQUAL "thread")
    set(flags -fsanitize=thread)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # gcc 12 warns that TSan does not model std::atomic_thread_fence (Asio uses it); the warning
      # would break -Werror builds, and the fences are not where our data is shared.
      list(APPEND flags -Wno-tsan)
    endif()
  elseif(OPENBROKER_SANITIZE)
    message(FATAL_ERROR "OPENBROKER_SANITIZE must be address,undefined | address | thread (got '${OPENBROKER_SANITIZE}')")
  elseif(OPENBROKER_FUZZ)
    # The fuzz build (fuzz/CMakeLists.txt): every library carries libFuzzer's coverage and
    # ASan+UBSan; the fuzz targets add -fsanitize=fuzzer when they link. UBSan's `function` check
    # is left out: with coverage it makes clang 14 fail on coroutines ("Cannot represent a
    # difference across sections"), and it only checks calls through mistyped function pointers.
    add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize=function -fno-sanitize-recover=all
                        -fno-omit-frame-pointer)
    add_link_options(-fsanitize=address,undefined)
    return()
  else()
    return()
  endif()
  add_link_options(${flags})
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # gcc's maybe-uninitialized analysis is unreliable on instrumented code (gcc's manual says so
    # for -fsanitize): std::variant temporaries of the tests trip it. The normal build keeps it.
    list(APPEND flags -Wno-maybe-uninitialized)
  endif()
  add_compile_options(${flags})
  message(STATUS "openbroker: sanitizers ${OPENBROKER_SANITIZE}")
endfunction()
