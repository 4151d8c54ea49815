# Builds and runs a consumer project: cmake -DMODE=find_package|add_subdirectory
#   -DSOURCE=<bnrelu source> -DWORK=<scratch dir> -P run.cmake
# find_package installs bnrelu into WORK/prefix first, as a user would; with -DWITH_ONNX=ON it
# builds the ONNX component too and a second consumer finds it with COMPONENTS onnx.
file(REMOVE_RECURSE ${WORK})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/bnrelu-build -G Ninja -DBNRELU_BUILD_TESTS=OFF
      -DBNRELU_BUILD_BENCHMARKS=OFF -DBNRELU_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX=${WORK}/prefix
      -DBNRELU_WITH_ONNX=${WITH_ONNX})
  run(${CMAKE_COMMAND} --install ${WORK}/bnrelu-build)
  run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer/find_package -B ${WORK}/build -G Ninja
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${WORK}/prefix -DWITH_ONNX=${WITH_ONNX})
else()
  run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer/add_subdirectory -B ${WORK}/build -G Ninja
      -DCMAKE_BUILD_TYPE=Release -DBNRELU_SOURCE_DIR=${SOURCE})
endif()
run(${CMAKE_COMMAND} --build ${WORK}/build)
run(${WORK}/build/consumer)
if(MODE STREQUAL "find_package" AND WITH_ONNX)
  run(${WORK}/build/consumer_onnx ${WORK}/model.onnx)
endif()
