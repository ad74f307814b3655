// common/model_json.hpp: site objects <-> JSON (the admin API's wire form and the audit log's
// before/after images). Secret fields are never written.
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"

#include <boost/json/fwd.hpp>

#include <string>

namespace common::model {

// {"id":..,"name":..,"owner":..,"config_owned":bool,"created_at":..,"updated_at":..,<fields>}
boost::json::object to_json(const Object& obj);
std::string to_json_text(const Object& obj);

// Merges the members of `in` into `obj`. Unknown members, wrong types, state fields (unless
// allow_state) and secret fields are errors naming the member. "id", "owner", "config_owned",
// "created_at" and "updated_at" are ignored (read-only). "name" sets the name.
Status merge_json(const boost::json::object& in, Object& obj, bool allow_state = false);

}  // namespace common::model
