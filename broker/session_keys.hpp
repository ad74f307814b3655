// broker/session_keys.hpp: how stored sessions are named. docs/cbp.md says a session key is unique
// on its machine, not site-wide: agents choose keys such as "rdp-3" for sessions the broker did
// not broker. So the broker finds a session by (machine, key):
// - a session the broker brokered is stored under its key ("S" + 20 hex digits, made by the
//   launcher, unique site-wide);
// - a session the agent reports that the broker did not broker is stored under its key when no
//   other session has that name, else as "<machine>/<key>"; either way its session_key field
//   holds the agent's key, so two machines reporting the same key keep two records.
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"
#include "storage/repository.hpp"

#include <string>

namespace broker {

// The name for a new record of session `key` that `machine` reports (and the broker did not
// broker): the key when no session has that name, else "<machine>/<key>".
common::Result<std::string> reported_session_name(storage::Transaction& tx, const std::string& machine,
                                                  const std::string& key);

// The key the machine's agent knows the stored session by (what commands to it carry).
std::string agent_session_key(const common::model::Object& session);

// The session `key` of `machine`, in any state; errc::not_found when the machine has none.
common::Result<common::model::Object> find_session(storage::Transaction& tx, const std::string& machine,
                                                   const std::string& key);

}  // namespace broker
