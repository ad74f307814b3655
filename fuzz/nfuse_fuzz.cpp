// fuzz/nfuse_fuzz.cpp: the NFuse request parser (and the renderer) on arbitrary bytes; ctx1 has
// its own target (ctx1_fuzz.cpp).
//
// Built two ways (fuzz/CMakeLists.txt):
// * nfuse_fuzz (clang, -DOPENBROKER_FUZZ=ON): a libFuzzer target, run as
//     nfuse_fuzz -max_total_time=60 -max_len=65536 fuzz/corpus/nfuse
// * nfuse_fuzz_replay (any compiler, with replay_main.cpp): a plain program that feeds
//   each file given on the command line, or each file of a directory, to the same entry point;
//   ctest runs it over the seed corpus.
//
// The contracts checked (std::abort on violation):
// - parse_request never throws or crashes; an error always has a message, a label render()
//   writes back unchanged, and a response element exactly when it is answered in-band;
// - whatever strings a request carried, render() of a reply holding them is well-formed XML in
//   the request's encoding, and reading it back yields the same strings.
#include "xmlservice/detail/xml_text.hpp"
#include "xmlservice/nfuse_codec.hpp"

#include <pugixml.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

// Every string of the request a reply could plausibly echo (never the password).
std::vector<std::string> strings_of(const xmlservice::NFuseRequest& request) {
  std::vector<std::string> out;
  std::visit(
      [&out](const auto& r) {
        using R = std::decay_t<decltype(r)>;
        if constexpr (requires { r.credentials; }) {
          if (r.credentials) {
            out.push_back(r.credentials->user_name);
            if (r.credentials->domain) out.push_back(r.credentials->domain->name);
            for (const auto& id : r.credentials->ids) out.push_back(id.value);
          }
        }
        if constexpr (requires { r.client_name; }) out.push_back(r.client_name);
        if constexpr (std::is_same_v<R, xmlservice::RequestAppData>) {
          for (const auto& name : r.app_names) out.push_back(name);
          if (r.scope) out.push_back(r.scope->folder);
        }
        if constexpr (std::is_same_v<R, xmlservice::RequestAddress>) out.push_back(r.name.value);
      },
      request);
  return out;
}

// Renders the strings as server names and reads them back with pugixml, in the charset the
// label stands for.
void check_render_round_trip(const std::vector<std::string>& strings, const std::string& label) {
  xmlservice::ResponseServerData reply;
  for (const auto& s : strings) reply.servers.push_back({s});
  const std::string xml = xmlservice::render(reply, label);
  const auto charset = xmlservice::detail::charset_for_label(label);
  check(charset.has_value());
  const pugi::xml_encoding encoding =
      charset == xmlservice::detail::Charset::latin1 ? pugi::encoding_latin1 : pugi::encoding_utf8;
  pugi::xml_document doc;
  check(static_cast<bool>(doc.load_buffer(xml.data(), xml.size(), pugi::parse_default | pugi::parse_ws_pcdata, encoding)));
  std::size_t i = 0;
  for (pugi::xml_node server : doc.document_element().child("ResponseServerData").children("ServerData")) {
    check(i < strings.size());
    check(strings[i] == server.child("ServerName").text().get());
    ++i;
  }
  check(i == strings.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const xmlservice::ParseResult result = xmlservice::parse_request(body);
  if (result) {
    check_render_round_trip(strings_of(result->request), result->encoding_label);
    const std::string reply =
        xmlservice::render(xmlservice::error_response(result->request, xmlservice::ErrorId::unspecified), result->encoding_label);
    check(reply.find(std::string(xmlservice::response_name(result->request))) != std::string::npos);
  } else {
    const xmlservice::ParseError& e = result.error();
    check(!e.message.empty());
    check(xmlservice::answered_in_band(e.code) == !e.response_element.empty());
    const std::string reply =
        xmlservice::render(xmlservice::ResponseError{e.response_element, xmlservice::ErrorId::unspecified}, e.encoding_label);
    check(reply.find("encoding=\"" + e.encoding_label + "\"") != std::string::npos);
    if (xmlservice::answered_in_band(e.code)) check(reply.find("<" + e.response_element + ">") != std::string::npos);
  }
  return 0;
}
