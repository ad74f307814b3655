// net/asio_impl.cpp: the compiled parts of Asio, Asio.SSL and Beast, built once for the module
// (BOOST_ASIO_SEPARATE_COMPILATION / BOOST_BEAST_SEPARATE_COMPILATION, set in CMakeLists.txt)
// instead of in every translation unit that includes them.
#include <boost/asio/impl/src.hpp>
#include <boost/asio/ssl/impl/src.hpp>
#include <boost/beast/src.hpp>
