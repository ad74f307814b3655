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
