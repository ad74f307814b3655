// broker/session_keys.cpp: see session_keys.hpp.
#include "broker/session_keys.hpp"

namespace broker {

using common::errc;
using common::model::Kind;

namespace {

std::string qualified(const std::string& machine, const std::string& key) { return machine + "/" + key; }

}  // namespace

common::Result<std::string> reported_session_name(storage::Transaction& tx, const std::string& machine,
                                                  const std::string& key) {
  auto taken = tx.get(Kind::session, key);
  if (!taken && taken.error().code == errc::not_found) return key;
  if (!taken) return taken.error();
  return qualified(machine, key);
}

std::string agent_session_key(const common::model::Object& session) {
  const auto key = session.text("session_key");
  return key.empty() ? session.name : key;
}

common::Result<common::model::Object> find_session(storage::Transaction& tx, const std::string& machine,
                                                   const std::string& key) {
  auto bare = tx.get(Kind::session, key);
  if (bare && bare->text("machine") == machine) return bare;
  if (!bare && bare.error().code != errc::not_found) return bare.error();
  auto named = tx.get(Kind::session, qualified(machine, key));
  if (!named && named.error().code == errc::not_found)
    return common::make_error(errc::not_found, "machine '" + machine + "' has no session '" + key + "'");
  return named;
}

}  // namespace broker
