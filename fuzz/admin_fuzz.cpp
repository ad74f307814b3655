// fuzz/admin_fuzz.cpp: the admin API (admin::AdminApi::handle) on arbitrary requests: its
// routes, query strings and JSON bodies, down to the site objects in an in-memory database.
//
// The input is one request: its first line "METHOD TARGET" (target as sent, with its query
// string), the rest the body. The request carries a valid bearer token and Content-Type
// application/json. The broker side is real: SQLite in memory holding a multi-session catalog
// "hosts" with the machine DEMO\rds-1 and its sessions s-1, s-2, DEMO\odd+key and ended; the
// engine, the site objects and a launcher whose agent answers every command at once.
//
// Built as admin_fuzz (libFuzzer) and admin_fuzz_replay (ctest, over fuzz/corpus/admin/): see
// fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation): every request is answered exactly once, with
// a status in 200..599 other than 500 (500 is the reply to an exception: parsers never throw on
// input); a JSON reply (Content-Type application/json) is valid JSON.
#include "admin/admin_api.hpp"
#include "broker/engine.hpp"
#include "broker/launcher.hpp"
#include "broker/site_objects.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/model.hpp"
#include "common/work_queue.hpp"
#include "fuzz/fixture.hpp"
#include "net/http.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <string>
#include <string_view>

namespace {

using common::model::Kind;
using common::model::Object;

constexpr const char* kToken = "fuzz-token";
// The site is built anew after this many requests, so that what they created does not pile up.
constexpr int kRequestsPerSite = 2000;

void check(bool ok) {
  if (!ok) std::abort();
}

class InstantAgents final : public broker::AgentChannel {
 public:
  void prepare_session(const std::string&, const broker::PrepareSession&, std::chrono::milliseconds,
                       Done done) override {
    done(true, {});
  }
  void logoff_session(const std::string&, const std::string&, std::chrono::milliseconds, Done done) override {
    done(true, {});
  }
  void disconnect_session(const std::string&, const std::string&, std::chrono::milliseconds, Done done) override {
    done(false, "no such session");
  }
  void send_message(const std::string&, const std::string&, const std::string&, const std::string&,
                    std::chrono::milliseconds, Done done) override {
    done(true, {});
  }
};

struct Site {
  std::unique_ptr<storage::Repository> repo;
  broker::Engine engine;  // outlives the work queue: its tasks' commits reach it
  common::ManualClock clock{common::SysTime{std::chrono::hours(24 * 365 * 56)}};
  common::Metrics metrics;
  InstantAgents agents;
  common::WorkQueue work{1};
  std::unique_ptr<broker::SiteObjects> site;
  std::unique_ptr<broker::Launcher> launcher;
  std::unique_ptr<admin::AdminApi> api;

  Site() {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    check(r.has_value());
    repo = std::move(*r);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    check(engine.attach(*repo).has_value());
    launcher = std::make_unique<broker::Launcher>(*repo, engine, clock, agents, work, nullptr);
    admin::AdminOptions ao;
    ao.tokens.push_back({"fuzz", common::crypto::sha256_hex(kToken)});
    api = std::make_unique<admin::AdminApi>(*site, *repo, work, metrics, ao, common::null_logger(), launcher.get());
    api->set_engine(&engine);
    check(repo->write([](storage::Transaction& tx) -> common::Status {
                Object cat = common::model::make_default(Kind::catalog, "hosts");
                cat.fields["session_support"] = std::string("MultiSession");
                if (auto c = tx.create(cat); !c) return c.error();
                Object m = common::model::make_default(Kind::machine, "DEMO\\rds-1");
                m.fields["catalog"] = std::string("hosts");
                if (auto c = tx.create(m); !c) return c.error();
                for (const char* key : {"s-1", "s-2", "DEMO\\odd+key", "ended"}) {
                  Object s = common::model::make_default(Kind::session, key);
                  s.fields["machine"] = std::string("DEMO\\rds-1");
                  s.fields["state"] = std::string(std::string(key) == "ended" ? "LoggedOff" : "Active");
                  if (auto c = tx.create(s); !c) return c.error();
                }
                return {};
              }).has_value());
  }
  ~Site() { work.stop(); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Site& site = fuzz::fixture<Site>(kRequestsPerSite);
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto eol = input.find('\n');
  const std::string_view line = input.substr(0, eol);
  const auto space = line.find(' ');
  if (space == std::string_view::npos) return 0;
  net::HttpRequest req;  // as net::Server hands it over
  req.method = std::string(line.substr(0, space));
  req.target = std::string(line.substr(space + 1));
  const auto q = req.target.find('?');
  req.path = net::percent_decode(std::string_view(req.target).substr(0, q));
  if (q != std::string::npos) req.query = req.target.substr(q + 1);
  req.headers["Authorization"] = std::string("Bearer ") + kToken;
  req.headers["Content-Type"] = "application/json";
  if (eol != std::string_view::npos) req.body = std::string(input.substr(eol + 1));
  req.remote_address = "127.0.0.1";
  req.listener = "admin";

  auto promise = std::make_shared<std::promise<net::HttpResponse>>();
  auto future = promise->get_future();
  site.api->handle(std::move(req), [promise](net::HttpResponse r) { promise->set_value(std::move(r)); });
  const net::HttpResponse reply = future.get();  // a second answer would throw in set_value
  static const bool debug = std::getenv("OPENBROKER_FUZZ_DEBUG") != nullptr;  // for triage
  if (debug) std::fprintf(stderr, "%d %s\n%s\n", reply.status, reply.content_type.c_str(), reply.body.c_str());
  check(reply.status >= 200 && reply.status <= 599 && reply.status != 500);
  if (reply.content_type.find("application/json") != std::string::npos) {
    boost::system::error_code ec;
    (void)boost::json::parse(reply.body, ec);
    check(!ec);
  }
  return 0;
}
