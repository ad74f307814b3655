// fuzz/sta_fuzz.cpp: the Secure Ticket Authority request parser (xmlservice/sta_codec.hpp) and
// its renderers on arbitrary bytes.
//
// Built as sta_fuzz (libFuzzer) and sta_fuzz_replay (ctest, over fuzz/corpus/sta/): see
// fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation):
// - parse_request never throws or crashes; an error has a message;
// - what parses renders back (render_request) to a request that parses to the same kind with as
//   many TicketData values, and the replies that would carry its strings (render of ResponseData,
//   ResponseTicket) are produced without a crash.
#include "xmlservice/sta_codec.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <variant>

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace sta = xmlservice::sta;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const sta::ParseResult result = sta::parse_request(body);
  if (!result) {
    const sta::ParseError& e = result.error();
    check(!e.message.empty());
    check(!to_string(e.code).empty());
    return 0;
  }
  const sta::Request& request = result->request;
  const auto again = sta::parse_request(sta::render_request(request));
  check(again.has_value() && again->request.index() == request.index());
  if (const auto* ticket = std::get_if<sta::TicketRequest>(&request)) {
    check(std::get<sta::TicketRequest>(again->request).ticket_data.size() == ticket->ticket_data.size());
    check(!sta::render(sta::DataResponse{ticket->ticket_data}).empty());
  } else {
    const auto& data_request = std::get<sta::DataRequest>(request);
    check(!data_request.ticket.empty());
    check(!sta::render(sta::TicketResponse{data_request.authority_id, data_request.ticket}).empty());
  }
  return 0;
}
