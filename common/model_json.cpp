#include "common/model_json.hpp"

#include <boost/json.hpp>

namespace common::model {

namespace json = boost::json;

json::object to_json(const Object& obj) {
  json::object out;
  const auto& ks = spec(obj.kind);
  out["id"] = obj.id;
  out["name"] = obj.name;
  out["owner"] = obj.owner;
  out["config_owned"] = obj.owned_by_config();
  if (!obj.created_at.empty()) out["created_at"] = obj.created_at;
  if (!obj.updated_at.empty()) out["updated_at"] = obj.updated_at;
  for (const auto& f : ks.fields) {
    if (f.secret) continue;
    auto it = obj.fields.find(f.name);
    const Value v = it == obj.fields.end() ? f.default_value : it->second;
    json::value& slot = out[f.name];
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, std::monostate>) {
            slot = nullptr;
          } else if constexpr (std::is_same_v<T, TextList>) {
            json::array a;
            for (const auto& s : x) a.emplace_back(s);
            slot = std::move(a);
          } else {
            slot = x;
          }
        },
        v);
  }
  return out;
}

std::string to_json_text(const Object& obj) { return json::serialize(to_json(obj)); }

Status merge_json(const json::object& in, Object& obj, bool allow_state) {
  const auto& ks = spec(obj.kind);
  for (const auto& [key_sv, value] : in) {
    const std::string key(key_sv);
    if (key == "id" || key == "owner" || key == "config_owned" || key == "created_at" || key == "updated_at")
      continue;
    if (key == "name") {
      if (!value.is_string()) return make_error(errc::invalid_argument, "must be a string", key);
      if (ks.auto_name) continue;
      obj.name = std::string(value.get_string());
      continue;
    }
    const FieldSpec* f = ks.field(key);
    if (!f) return make_error(errc::invalid_argument, "is not a field of " + std::string(ks.name), key);
    if (f->secret) return make_error(errc::invalid_argument, "cannot be set here", key);
    if (f->state && !allow_state)
      return make_error(errc::invalid_argument, "is maintained by the broker and cannot be set", key);
    if (value.is_null()) {
      if (f->required) return make_error(errc::invalid_argument, "is required", key);
      obj.fields[key] = std::monostate{};
      continue;
    }
    switch (f->type) {
      case FieldType::text:
      case FieldType::timestamp:
        if (!value.is_string()) return make_error(errc::invalid_argument, "must be a string", key);
        obj.fields[key] = std::string(value.get_string());
        break;
      case FieldType::integer:
        if (value.is_int64())
          obj.fields[key] = value.get_int64();
        else if (value.is_uint64() && value.get_uint64() <= static_cast<std::uint64_t>(INT64_MAX))
          obj.fields[key] = static_cast<std::int64_t>(value.get_uint64());
        else
          return make_error(errc::invalid_argument, "must be an integer", key);
        break;
      case FieldType::boolean:
        if (!value.is_bool()) return make_error(errc::invalid_argument, "must be true or false", key);
        obj.fields[key] = value.get_bool();
        break;
      case FieldType::text_list: {
        if (!value.is_array()) return make_error(errc::invalid_argument, "must be a list of strings", key);
        TextList list;
        for (const auto& e : value.get_array()) {
          if (!e.is_string()) return make_error(errc::invalid_argument, "must be a list of strings", key);
          list.emplace_back(e.get_string());
        }
        obj.fields[key] = std::move(list);
        break;
      }
    }
  }
  return {};
}

}  // namespace common::model
