// tests/integration/support.hpp: what the integration tests share to drive the real daemon as an
// admin (the REST API), poll for states, and run reference agents (tools/vda-agent) against it.
#pragma once

#include "cbp/messages.hpp"
#include "net/http.hpp"
#include "net/http_client.hpp"
#include "tests/integration/daemon.hpp"
#include "tools/vda-agent/agent.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace itest::support {

namespace json = boost::json;
using vda::Millis;

inline constexpr Millis kWait{20000};  // upper bound for anything to happen

// A JSON member as text: strings as they are, numbers and booleans spelled out, null or missing
// as "".
inline std::string text(const json::object& o, const std::string& field) {
  const auto* v = o.if_contains(field);
  if (!v || v->is_null()) return {};
  if (v->is_string()) return std::string(v->get_string());
  if (v->is_bool()) return v->get_bool() ? "true" : "false";
  return json::serialize(*v);
}

// The admin REST API, with the test token.
class Api {
 public:
  explicit Api(const Daemon& d) : http_(d.admin_url()) {}

  net::ClientResponse call(const std::string& method, const std::string& target, const std::string& body = {}) {
    std::vector<std::pair<std::string, std::string>> h{{"Authorization", std::string("Bearer ") + itest::kToken}};
    if (!body.empty()) h.emplace_back("Content-Type", "application/json");
    auto r = http_.request(method, target, body, h);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
    return *r;
  }

  // GET of one object or page; nullopt unless 200.
  std::optional<json::object> get(const std::string& target) {
    auto r = call("GET", target);
    if (r.status != 200) return std::nullopt;
    auto v = json::parse(r.body);
    REQUIRE(v.is_object());
    return v.as_object();
  }

  std::optional<json::object> machine(const std::string& name) {
    return get("/api/v1/machines/" + net::percent_encode(name));
  }
  std::optional<json::object> session(const std::string& key) {
    return get("/api/v1/sessions/" + net::percent_encode(key));
  }
  std::string session_field(const std::string& key, const std::string& field) {
    auto s = session(key);
    return s ? text(*s, field) : std::string("<gone>");
  }
  std::string machine_field(const std::string& name, const std::string& field) {
    auto m = machine(name);
    return m ? text(*m, field) : std::string("<no machine>");
  }
  // The `total` of a list.
  std::int64_t total(const std::string& target) {
    auto page = get(target);
    REQUIRE_MESSAGE(page.has_value(), target);
    return page->at("total").as_int64();
  }

  // POST /api/v1/sessions/{name}/{command} (logoff, disconnect, message).
  net::ClientResponse action(const std::string& session, const std::string& command, const std::string& body = {}) {
    return call("POST", "/api/v1/sessions/" + net::percent_encode(session) + "/" + command, body);
  }
  // The items of GET /api/v1/audit?<query> (newest first).
  json::array audit(const std::string& query) {
    auto page = get("/api/v1/audit?" + query);
    REQUIRE_MESSAGE(page.has_value(), query);
    return page->at("items").as_array();
  }

  // POST /api/v1/machines/{name}/secret: the new secret, shown once.
  std::string new_secret(const std::string& machine) {
    auto r = call("POST", "/api/v1/machines/" + net::percent_encode(machine) + "/secret");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto secret = text(json::parse(r.body).as_object(), "secret");
    REQUIRE(secret.size() == 64);
    return secret;
  }

 private:
  net::HttpClient http_;
};

// Calls `probe` until it returns `want` or `timeout` passes; returns the last result.
template <class T>
T poll(const std::function<T()>& probe, const T& want, Millis timeout = kWait) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  T got = probe();
  while (got != want && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    got = probe();
  }
  return got;
}

// Polls the machine until `field` is `value`; returns the last value seen.
inline std::string await_machine(Api& api, const std::string& machine, const std::string& field, const std::string& value,
                          Millis timeout = kWait) {
  return poll<std::string>([&] { return api.machine_field(machine, field); }, value, timeout);
}

// Polls the session until `field` is `value` ("<gone>": until the session no longer exists).
inline std::string await_session(Api& api, const std::string& key, const std::string& field, const std::string& value) {
  return poll<std::string>([&] { return api.session_field(key, field); }, value);
}

inline std::string url(const Daemon& d) { return "ws://127.0.0.1:" + std::to_string(d.agent_port()) + "/cbp"; }

inline vda::FleetOptions fleet_options(const Daemon& d) {
  vda::FleetOptions o;
  o.broker_url = url(d);
  o.threads = 1;
  o.client_connect_delay = std::nullopt;  // no brokered launches here
  return o;
}

inline vda::MachineConfig machine_config(const std::string& name, const std::string& catalog, int n,
                                  cbp::SessionSupport support = cbp::SessionSupport::single_session) {
  vda::MachineConfig c;
  c.name = name;
  c.catalog = catalog;
  c.session_support = support;
  c.address = "10.99.0." + std::to_string(n) + ":1494";
  c.os = support == cbp::SessionSupport::single_session ? "Windows 11 Enterprise 23H2" : "Windows Server 2022";
  return c;
}

inline vda::MachineConfig with_secret(vda::MachineConfig c, std::string secret) {
  c.secret = std::move(secret);
  return c;
}

inline bool registered(const vda::Machine& m, Millis timeout = kWait) {
  return m.wait_for([](const vda::MachineStatus& s) { return s.state == vda::State::registered; }, timeout);
}

inline std::string names(const std::vector<cbp::Reason>& reasons) {
  std::string out;
  for (auto r : reasons) out += (out.empty() ? "" : ",") + std::string(cbp::to_string(r));
  return out.empty() ? "(none)" : out;
}

// Why a machine is in the state it is, for failure messages.
inline std::string describe(const vda::Machine& m) {
  const auto s = m.status();
  return s.name + ": state " + std::string(vda::to_string(s.state)) + ", rejections " + names(s.rejections) +
         ", errors " + names(s.errors) + ", registrations " + std::to_string(s.registrations) + ", last close '" +
         s.last_close + "'";
}

}  // namespace itest::support
