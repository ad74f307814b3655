#include "identity/builtin_directory.hpp"

#include "common/model_json.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace identity {

namespace detail {
// The users' names, UPNs and SIDs in lower case ("name:alice", "upn:alice@demo.test",
// "sid:s-1-5-...") -> the stored name: case-insensitive look-ups without reading every user.
struct NameIndex {
  std::unordered_map<std::string, std::string> stored;
};

// Every group's members, for resolving a user's groups without reading every group.
struct GroupIndex {
  struct Group {
    std::string name, domain, sid;  // domain as stored: empty means the site's default_domain
  };
  struct Membership {
    std::size_t group;   // into groups
    std::string domain;  // the member's `DOMAIN\` qualifier, empty when none
  };
  std::vector<Group> groups;
  // By the member's name, UPN or SID: "name:alice" -> (group, "DEMO").
  std::unordered_map<std::string, std::vector<Membership>> members;
};

}  // namespace detail

namespace {

using common::errc;
using common::Error;
using common::SysTime;
using common::model::Kind;
using common::model::Object;
using common::model::Value;
using detail::SiteSettings;
using storage::Transaction;

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::chrono::seconds secs(std::int64_t n) { return std::chrono::seconds(n); }

std::string qualify(const std::string& domain, const std::string& name) {
  return domain.empty() ? name : domain + "\\" + name;
}

// The site settings object, or the defaults when the database has none yet.
Result<SiteSettings> read_settings(Transaction& tx) {
  auto site = tx.get(Kind::site, "site");
  Object obj;
  if (site) {
    obj = std::move(*site);
  } else if (site.error().code == errc::not_found) {
    obj = common::model::make_default(Kind::site, "site");
  } else {
    return site.error();
  }
  SiteSettings s;
  s.default_domain = obj.text("default_domain");
  s.lockout_threshold = obj.integer("lockout_threshold", 5);
  s.lockout_window_seconds = obj.integer("lockout_window_seconds", 900);
  s.lockout_duration_seconds = obj.integer("lockout_duration_seconds", 1800);
  s.credential_cache_seconds = obj.integer("credential_cache_seconds", 60);
  return s;
}

std::string effective_domain(const Object& obj, const SiteSettings& settings) {
  std::string domain = obj.text("domain");
  return domain.empty() ? settings.default_domain : domain;
}

// Reads the index of the users' names, UPNs and SIDs.
Result<detail::NameIndex> read_name_index(Transaction& tx) {
  auto all = tx.list(Kind::user, {});
  if (!all) return all.error();
  detail::NameIndex index;
  index.stored.reserve(all->size() * 2);
  for (const auto& u : *all) {
    index.stored.emplace("name:" + lower(u.name), u.name);
    if (const auto upn = u.text("upn"); !upn.empty()) index.stored.emplace("upn:" + lower(upn), u.name);
    if (const auto sid = u.text("sid"); !sid.empty()) index.stored.emplace("sid:" + lower(sid), u.name);
  }
  return index;
}

// Reads the group membership index.
Result<detail::GroupIndex> read_group_index(Transaction& tx) {
  auto all = tx.list(Kind::group, {});
  if (!all) return all.error();
  detail::GroupIndex index;
  index.groups.reserve(all->size());
  for (std::size_t i = 0; i < all->size(); ++i) {
    const Object& g = (*all)[i];
    index.groups.push_back({g.name, g.text("domain"), g.text("sid")});
    for (const auto& entry : g.list("members")) {
      const std::string_view m = trim(entry);
      if (m.empty()) continue;
      if (is_sid(m)) {
        index.members["sid:" + lower(m)].push_back({i, {}});
      } else if (auto slash = m.find('\\'); slash != std::string_view::npos) {
        index.members["name:" + lower(m.substr(slash + 1))].push_back({i, std::string(m.substr(0, slash))});
      } else if (m.find('@') != std::string_view::npos) {
        index.members["upn:" + lower(m)].push_back({i, {}});
      } else {
        index.members["name:" + lower(m)].push_back({i, {}});
      }
    }
  }
  return index;
}

// Finds a user by a case-insensitive key of the name index ("name:alice"): the stored row, or
// nullopt (not in the index, or deleted since it was read).
Result<std::optional<Object>> get_indexed(Transaction& tx, const detail::NameIndex& index, const std::string& key) {
  auto it = index.stored.find(key);
  if (it == index.stored.end()) return std::optional<Object>{};
  auto user = tx.get(Kind::user, it->second);
  if (user) return std::optional<Object>(std::move(*user));
  if (user.error().code == errc::not_found) return std::optional<Object>{};
  return user.error();
}

// The user `name` designates, or nullopt. `allow_sid`: a bare `S-1-...` name is matched
// against the users' SIDs (pass-through only). An exact name (or UPN) is found by its key; any
// other spelling through `names` (the name index, read on first need: see BuiltinDirectory).
Result<std::optional<Object>> find_user(Transaction& tx, const AccountName& name, const SiteSettings& settings,
                                        bool allow_sid,
                                        const std::function<Result<std::shared_ptr<const detail::NameIndex>>()>& names) {
  if (name.name.empty()) return std::optional<Object>{};
  const auto indexed = [&](const std::string& key) -> Result<std::optional<Object>> {
    auto index = names();
    if (!index) return index.error();
    return get_indexed(tx, **index, key);
  };

  if (allow_sid && name.domain.empty() && is_sid(name.name)) return indexed("sid:" + lower(name.name));

  if (name.upn) {
    storage::Query exact;
    exact.equals = {{"upn", name.name}};
    exact.limit = 1;
    auto hit = tx.list(Kind::user, exact);
    if (!hit) return hit.error();
    if (!hit->empty()) return std::optional<Object>(std::move(hit->front()));
    return indexed("upn:" + lower(name.name));
  }

  std::optional<Object> found;
  if (auto exact = tx.get(Kind::user, name.name)) {
    found = std::move(*exact);
  } else if (exact.error().code != errc::not_found) {
    return exact.error();
  } else {
    auto any = indexed("name:" + lower(name.name));
    if (!any) return any.error();
    found = std::move(*any);
  }
  if (found && !name.domain.empty() && !iequals(name.domain, effective_domain(*found, settings))) found.reset();
  return found;
}

// What the directory reads of a user row, without the fields it never looks at (and without
// empty or false ones): what the row cache keeps.
Object slim(const Object& user) {
  static constexpr std::string_view kKept[] = {"domain",   "upn",         "sid",        "display_name",
                                               "email",    "password_hash", "disabled", "expired",
                                               "must_change_password", "locked_out", "locked_out_until"};
  Object out;
  out.kind = user.kind;
  out.name = user.name;
  out.id = user.id;
  for (const auto field : kKept) {
    auto it = user.fields.find(std::string(field));
    if (it == user.fields.end()) continue;
    const Value& v = it->second;
    if (std::holds_alternative<std::monostate>(v)) continue;
    if (const auto* b = std::get_if<bool>(&v); b && !*b) continue;
    if (const auto* t = std::get_if<std::string>(&v); t && t->empty()) continue;
    out.fields.emplace(it->first, v);
  }
  return out;
}

enum class LockState { none, active, lapsed };

LockState lock_state(const Object& user, SysTime now) {
  if (!user.flag("locked_out")) return LockState::none;
  const std::string until = user.text("locked_out_until");
  if (until.empty()) return LockState::active;  // until an admin clears it
  SysTime end;
  if (!common::parse_time(until, end)) return LockState::active;  // unreadable: stay safe
  return end > now ? LockState::active : LockState::lapsed;
}

// Drops failure times at or before now - window (times are oldest first).
void prune(std::vector<SysTime>& times, SysTime now, std::int64_t window_seconds) {
  const SysTime oldest = now - secs(window_seconds);
  times.erase(times.begin(), std::find_if(times.begin(), times.end(), [&](SysTime t) { return t > oldest; }));
}

// Estimated heap use of one unknown name's entry: its key, the hash-map node and the times.
constexpr std::size_t kUnknownEntryOverhead = 96;
std::size_t unknown_cost(const std::string& key, std::size_t times_capacity) {
  return kUnknownEntryOverhead + key.size() + times_capacity * sizeof(SysTime);
}
// The cost of a new entry: a digest key ("?" + 64 hex digits) and room for one time.
constexpr std::size_t kNewUnknownEntry = kUnknownEntryOverhead + 65 + sizeof(SysTime);

// The key of an unknown name: a digest, so the bookkeeping never holds what a client sent.
std::string unknown_key(const AccountName& name) {
  return "?" + common::crypto::sha256_hex(lower(name.domain) + "\\" + lower(name.name));
}

AuthOutcome outcome(AuthResult result) {
  AuthOutcome out;
  out.result = result;
  return out;
}

Status audit(Transaction& tx, std::string_view action, const Object& before, const Object& after) {
  storage::AuditEntry entry;
  entry.actor = "broker";
  entry.action = std::string(action);
  entry.kind = "user";
  entry.object = after.name;
  entry.before = common::model::to_json_text(before);
  entry.after = common::model::to_json_text(after);
  return tx.append_audit(entry);
}

}  // namespace

BuiltinDirectory::BuiltinDirectory(storage::Repository& repository, common::Clock& clock,
                                   BuiltinDirectoryOptions options)
    : repository_(repository),
      clock_(clock),
      options_(std::move(options)),
      dummy_hash_(common::crypto::hash_password(common::crypto::random_hex(16), options_.dummy_hash_iterations)),
      cache_key_(common::crypto::random_hex(32)) {
  if (!options_.verify_password) options_.verify_password = &common::crypto::verify_password;
}

// One check between its look-up and its hash.
struct BuiltinDirectory::Attempt {
  AccountName name;
  SiteSettings settings;
  std::optional<Object> user;  // nullopt: no such user
  std::string unknown;         // the unknown name's key (no user)
  std::string password;
  std::string encoded;  // the hash the password is checked against: the user's, or the dummy
  bool dummy = true;    // checked against the dummy hash: fails whatever the result
  std::string mac;      // the success cache's key; empty when the cache is off
  bool cached = false;  // a cached success: no hash needed
};

std::optional<Result<AuthOutcome>> BuiltinDirectory::prepare(const Credentials& credentials, Attempt& a) {
  a.name = parse_account_name(credentials.user_name, credentials.domain);
  a.password = credentials.password;
  a.encoded = dummy_hash_;
  auto found = find(a.name, false);
  if (!found) return Result<AuthOutcome>(found.error());
  a.settings = std::move(found->settings);
  a.user = std::move(found->user);

  if (!a.user) {  // 1. unknown: locked-out names answer at once, the others after the dummy hash
    a.unknown = unknown_key(a.name);
    if (unknown_locked(a.unknown)) return Result<AuthOutcome>(outcome(AuthResult::account_locked_out));
    return std::nullopt;
  }

  const Object& user = *a.user;
  if (!user.flag("disabled")) {  // 2. locked out
    switch (lock_state(user, clock_.monotonic_now())) {
      case LockState::active: forget(user.name); return Result<AuthOutcome>(outcome(AuthResult::account_locked_out));
      case LockState::lapsed:
        if (auto st = unlock(user); !st) return Result<AuthOutcome>(st.error());
        break;
      case LockState::none: break;
    }
  }

  // 3. The password: no hash or no password means no way in, but the check takes as long.
  const std::string hash = user.text("password_hash");
  if (a.password.empty() || !common::crypto::is_password_hash(hash)) return std::nullopt;
  a.encoded = hash;
  a.dummy = false;
  if (a.settings.credential_cache_seconds > 0) {
    std::string input = user.name;
    input += '\0';
    input += hash;
    input += '\0';
    input += a.password;
    a.mac = common::crypto::hmac_sha256_hex(cache_key_, input);
    std::lock_guard lock(mutex_);
    if (auto it = cache_.find(a.mac); it != cache_.end()) {
      if (it->second.expires > clock_.monotonic_now()) {
        a.cached = true;
      } else {
        cache_.erase(it);
      }
    }
  }
  if (a.cached) return conclude(a, true);
  return std::nullopt;
}

bool BuiltinDirectory::verify(const Attempt& a) const {
  const bool matched = options_.verify_password(a.password, a.encoded);
  return matched && !a.dummy;
}

Result<AuthOutcome> BuiltinDirectory::conclude(Attempt& a, bool matched) {
  if (!a.user) {
    record_unknown_failure(a.unknown, a.settings);
    return outcome(AuthResult::failed_credentials);
  }
  const Object& user = *a.user;
  if (!matched || a.dummy) {  // 3. wrong password
    if (auto st = record_failure(user, a.settings); !st) return st.error();
    return outcome(AuthResult::failed_credentials);
  }
  if (!a.cached && !a.mac.empty()) {
    const SysTime now = clock_.monotonic_now();
    std::lock_guard lock(mutex_);
    if (cache_.size() >= next_sweep_) {
      std::erase_if(cache_, [&](const auto& item) { return item.second.expires <= now; });
      next_sweep_ = std::max<std::size_t>(1024, 2 * cache_.size());
    }
    cache_[a.mac] = CacheEntry{lower(user.name), now + secs(a.settings.credential_cache_seconds)};
  }
  clear_failures(lower(user.name));

  if (user.flag("disabled")) {  // 4.
    forget(user.name);
    return outcome(AuthResult::account_disabled);
  }
  if (user.flag("expired")) return with_identity(AuthResult::expired_credentials, user, a.settings);  // 5.
  if (user.flag("must_change_password"))                                                              // 6.
    return with_identity(AuthResult::must_change_credentials, user, a.settings);
  return with_identity(AuthResult::ok, user, a.settings);  // 7.
}

Result<AuthOutcome> BuiltinDirectory::authenticate(const Credentials& credentials) {
  Attempt attempt;
  if (auto done = prepare(credentials, attempt)) return std::move(*done);
  return conclude(attempt, verify(attempt));
}

void BuiltinDirectory::authenticate_async(const Credentials& credentials, AuthCallback done) {
  auto attempt = std::make_shared<Attempt>();
  if (auto finished = prepare(credentials, *attempt)) return done(std::move(*finished));
  if (!options_.password_checks) return done(conclude(*attempt, verify(*attempt)));
  auto shared_done = std::make_shared<AuthCallback>(std::move(done));
  options_.password_checks->submit(
      [this, attempt, shared_done] {
        bool matched = false;
        try {
          matched = verify(*attempt);
        } catch (const std::exception& e) {
          return (*shared_done)(Error(errc::internal, std::string("password check failed: ") + e.what()));
        }
        auto finish = [this, attempt, shared_done, matched] {
          Result<AuthOutcome> result = Error(errc::internal, "password check failed");
          try {
            result = conclude(*attempt, matched);
          } catch (const std::exception& e) {
            result = Error(errc::internal, std::string("password check failed: ") + e.what());
          }
          (*shared_done)(std::move(result));
        };
        if (!options_.resume) return finish();
        if (!options_.resume(finish)) (*shared_done)(Error(errc::unavailable, "shutting down"));
      },
      [shared_done](PasswordCheckPool::Refusal why) {
        (*shared_done)(Error(errc::unavailable,
                             "too many password checks at once (" + std::string(PasswordCheckPool::to_string(why)) + ")"));
      });
}

Result<AuthOutcome> BuiltinDirectory::lookup(std::string_view user_name, std::string_view domain) {
  const AccountName name = parse_account_name(user_name, domain);
  auto found = find(name, true);
  if (!found) return found.error();
  const SiteSettings& settings = found->settings;
  std::optional<Object>& user = found->user;
  if (!user) return Error(errc::not_found, "no such user");

  if (user->flag("disabled")) return outcome(AuthResult::account_disabled);
  switch (lock_state(*user, clock_.monotonic_now())) {
    case LockState::active: return outcome(AuthResult::account_locked_out);
    case LockState::lapsed:
      if (auto st = unlock(*user); !st) return st.error();
      break;
    case LockState::none: break;
  }
  if (user->flag("expired")) return with_identity(AuthResult::expired_credentials, *user, settings);
  if (user->flag("must_change_password")) return with_identity(AuthResult::must_change_credentials, *user, settings);
  return with_identity(AuthResult::ok, *user, settings);
}

void BuiltinDirectory::forget(std::string_view user_name) {
  if (auto slash = user_name.rfind('\\'); slash != std::string_view::npos) user_name.remove_prefix(slash + 1);
  const std::string key = lower(user_name);
  std::lock_guard lock(mutex_);
  std::erase_if(cache_, [&](const auto& item) { return item.second.user_key == key; });
}

std::size_t BuiltinDirectory::cached_entries() const {
  std::lock_guard lock(mutex_);
  return cache_.size();
}

std::size_t BuiltinDirectory::unknown_entries() const {
  std::lock_guard lock(mutex_);
  std::size_t n = unknown_locks_.size();
  for (const auto& [key, times] : failures_) n += key.starts_with('?') ? 1 : 0;
  return n;
}

std::size_t BuiltinDirectory::unknown_bytes() const {
  std::lock_guard lock(mutex_);
  return unknown_bytes_;
}

bool BuiltinDirectory::unknown_locked(const std::string& key) {
  std::lock_guard lock(mutex_);
  auto it = unknown_locks_.find(key);
  if (it == unknown_locks_.end()) return false;
  if (it->second > clock_.monotonic_now()) return true;
  unknown_bytes_ -= unknown_cost(it->first, 1);
  unknown_locks_.erase(it);
  return false;
}

void BuiltinDirectory::make_room_locked(SysTime now, const Settings& settings) {
  const auto entries = [&] {
    std::size_t n = unknown_locks_.size();
    for (const auto& item : failures_) n += item.first.starts_with('?') ? 1 : 0;
    return n;
  };
  const auto full = [&](std::size_t n) {
    return n + 1 > options_.max_unknown_names || unknown_bytes_ + kNewUnknownEntry > options_.max_unknown_bytes;
  };
  if (!full(entries())) return;
  // Forget what no longer matters; if that is not enough, forget the unknown names.
  const SysTime oldest = now - secs(settings.lockout_window_seconds);
  std::erase_if(failures_, [&](const auto& item) {
    if (!item.second.empty() && item.second.back() > oldest) return false;
    if (item.first.starts_with('?')) unknown_bytes_ -= unknown_cost(item.first, item.second.capacity());
    return true;
  });
  std::erase_if(unknown_locks_, [&](const auto& item) {
    if (item.second > now) return false;
    unknown_bytes_ -= unknown_cost(item.first, 1);
    return true;
  });
  if (full(entries())) {
    std::erase_if(failures_, [](const auto& item) { return item.first.starts_with('?'); });
    unknown_locks_.clear();
    unknown_bytes_ = 0;
  }
}

void BuiltinDirectory::record_unknown_failure(const std::string& key, const Settings& settings) {
  if (settings.lockout_threshold <= 0) return;
  const SysTime now = clock_.monotonic_now();
  std::lock_guard lock(mutex_);
  auto it = failures_.find(key);
  if (it == failures_.end()) {
    make_room_locked(now, settings);
    it = failures_.emplace(key, std::vector<SysTime>{}).first;
    unknown_bytes_ += unknown_cost(it->first, 0);
  }
  auto& times = it->second;
  const std::size_t before = times.capacity();
  prune(times, now, settings.lockout_window_seconds);
  times.push_back(now);
  unknown_bytes_ += (times.capacity() - before) * sizeof(SysTime);
  if (static_cast<std::int64_t>(times.size()) >= settings.lockout_threshold) {
    unknown_bytes_ -= unknown_cost(it->first, times.capacity());
    failures_.erase(it);
    const SysTime until =
        settings.lockout_duration_seconds > 0 ? now + secs(settings.lockout_duration_seconds) : SysTime::max();
    if (auto [lock_it, added] = unknown_locks_.insert_or_assign(key, until); added)
      unknown_bytes_ += unknown_cost(lock_it->first, 1);
  }
}

Status BuiltinDirectory::record_failure(const Object& user, const Settings& settings) {
  if (settings.lockout_threshold <= 0) return {};
  const SysTime now = clock_.monotonic_now();
  const std::string key = lower(user.name);
  {
    std::lock_guard lock(mutex_);
    auto& times = failures_[key];
    prune(times, now, settings.lockout_window_seconds);
    times.push_back(now);
    if (static_cast<std::int64_t>(times.size()) < settings.lockout_threshold) return {};
    failures_.erase(key);
  }

  forget(user.name);
  return repository_.write([&](Transaction& tx) -> Status {
    auto current = tx.get(Kind::user, user.name);
    if (!current) {
      if (current.error().code == errc::not_found) return {};  // deleted meanwhile
      return current.error();
    }
    if (current->flag("locked_out")) return {};  // already locked: never extend a lock-out
    Object locked = *current;
    locked.fields["locked_out"] = true;
    locked.fields["locked_out_until"] = settings.lockout_duration_seconds > 0
                                            ? Value(common::format_time(now + secs(settings.lockout_duration_seconds)))
                                            : Value();
    auto updated = tx.update(user.name, locked);
    if (!updated) return updated.error();
    return audit(tx, "lock-out", *current, *updated);
  });
}

void BuiltinDirectory::clear_failures(const std::string& key) {
  std::lock_guard lock(mutex_);
  failures_.erase(key);
}

Status BuiltinDirectory::unlock(const Object& user) {
  return repository_.write([&](Transaction& tx) -> Status {
    auto current = tx.get(Kind::user, user.name);
    if (!current) {
      if (current.error().code == errc::not_found) return {};
      return current.error();
    }
    // Only the lock-out that was read: an admin (or another attempt) may have changed it since.
    if (!current->flag("locked_out") || current->text("locked_out_until") != user.text("locked_out_until")) return {};
    Object unlocked = *current;
    unlocked.fields["locked_out"] = false;
    unlocked.fields["locked_out_until"] = Value();
    auto updated = tx.update(user.name, unlocked);
    if (!updated) return updated.error();
    return audit(tx, "unlock", *current, *updated);
  });
}

Result<UserIdentity> BuiltinDirectory::resolve(const Object& user, const Settings& settings) {
  auto index = group_index();
  if (!index) return index.error();
  const detail::GroupIndex& groups = **index;
  const auto group_domain = [&](const detail::GroupIndex::Group& g) {
    return g.domain.empty() ? settings.default_domain : g.domain;
  };
  const auto& members = groups.members;

  UserIdentity id;
  id.user_name = user.name;
  id.domain = effective_domain(user, settings);
  id.qualified_name = qualify(id.domain, id.user_name);
  id.upn = user.text("upn");
  id.sid = user.text("sid");
  id.display_name = user.text("display_name");
  id.email = user.text("email");

  // Breadth-first from the user through the groups that contain it; each group is entered once,
  // so a cycle ends.
  struct Member {
    std::string name, domain, upn, sid;
  };
  std::vector<bool> entered(groups.groups.size(), false);
  std::vector<std::size_t> found;
  std::deque<Member> pending{Member{id.user_name, id.domain, id.upn, id.sid}};
  while (!pending.empty()) {
    const Member m = std::move(pending.front());
    pending.pop_front();
    const auto enter = [&](const std::string& key) {
      auto it = members.find(key);
      if (it == members.end()) return;
      for (const auto& ref : it->second) {
        if (entered[ref.group] || (!ref.domain.empty() && !iequals(ref.domain, m.domain))) continue;
        entered[ref.group] = true;
        found.push_back(ref.group);
        const auto& g = groups.groups[ref.group];
        pending.push_back(Member{g.name, group_domain(g), {}, g.sid});
      }
    };
    enter("name:" + lower(m.name));
    if (!m.upn.empty()) enter("upn:" + lower(m.upn));
    if (!m.sid.empty()) enter("sid:" + lower(m.sid));
  }

  std::vector<std::pair<std::string, std::string>> named;  // canonical name, SID
  named.reserve(found.size());
  for (std::size_t i : found) named.emplace_back(qualify(group_domain(groups.groups[i]), groups.groups[i].name), groups.groups[i].sid);
  std::sort(named.begin(), named.end(), [](const auto& a, const auto& b) { return lower(a.first) < lower(b.first); });
  for (auto& [name, sid] : named) {
    if (!id.groups.empty() && iequals(id.groups.back(), name)) continue;
    id.groups.push_back(std::move(name));
    if (!sid.empty()) id.group_sids.push_back(std::move(sid));
  }
  return id;
}

bool BuiltinDirectory::fresh(SysTime read_at) const {
  if (options_.index_ttl <= std::chrono::seconds::zero()) return false;
  const SysTime now = clock_.monotonic_now();
  return now >= read_at && now - read_at < options_.index_ttl;  // a clock set back: read again
}

bool BuiltinDirectory::current(const Stamp& stamp, std::optional<std::uint64_t> count) const {
  return count ? stamp.count == count : fresh(stamp.read_at);
}

Result<BuiltinDirectory::Found> BuiltinDirectory::find(const AccountName& name, bool allow_sid) {
  // The counts before the read: a change committed meanwhile makes the entry stale at once.
  const auto users = repository_.change_count(Kind::user);
  const auto site = repository_.change_count(Kind::site);
  const bool cacheable = users && site;
  std::string key;
  if (cacheable) {
    key.reserve(name.name.size() + name.domain.size() + 4);
    key += allow_sid ? 's' : '-';
    key += name.upn ? 'u' : '-';
    key += lower(name.domain);
    key += '\\';
    key += name.name;
    std::lock_guard lock(index_mutex_);
    if (rows_users_ != users || rows_site_ != site) {
      rows_.clear();
      settings_.reset();
      rows_users_ = users;
      rows_site_ = site;
    }
    if (settings_)
      if (auto it = rows_.find(key); it != rows_.end()) return Found{*settings_, it->second};
  }
  Found found;
  auto read = repository_.read([&](Transaction& tx) -> Status {
    auto st = read_settings(tx);
    if (!st) return st.error();
    found.settings = std::move(*st);
    auto u = find_user(tx, name, found.settings, allow_sid, [&] { return name_index(tx); });
    if (!u) return u.error();
    if (*u) found.user = slim(**u);
    return {};
  });
  if (!read) return read.error();
  if (cacheable) {
    std::lock_guard lock(index_mutex_);
    if (rows_users_ == users && rows_site_ == site) {
      if (rows_.size() >= options_.max_cached_users) rows_.clear();
      settings_ = found.settings;
      rows_.emplace(std::move(key), found.user);
    }
  }
  return found;
}

Result<std::shared_ptr<const detail::NameIndex>> BuiltinDirectory::name_index(Transaction& tx) {
  const auto count = repository_.change_count(Kind::user);
  {
    std::lock_guard lock(index_mutex_);
    if (names_ && current(names_stamp_, count)) return names_;
  }
  // Inside the caller's read transaction, which holds the database: look-ups that need the
  // index meanwhile wait for the connection, then find it current.
  const SysTime now = clock_.monotonic_now();
  auto read = read_name_index(tx);
  if (!read) return read.error();
  auto index = std::make_shared<const detail::NameIndex>(std::move(*read));
  std::lock_guard lock(index_mutex_);
  names_ = index;
  names_stamp_ = {count, now};
  ++index_reads_;
  return index;
}

Result<std::shared_ptr<const detail::GroupIndex>> BuiltinDirectory::group_index() {
  const auto count = repository_.change_count(Kind::group);
  {
    std::lock_guard lock(index_mutex_);
    if (groups_ && current(groups_stamp_, count)) return groups_;
  }
  std::shared_ptr<const detail::GroupIndex> index;
  auto read = repository_.read([&](Transaction& tx) -> Status {
    {  // another call may have read it while this one waited for the database
      std::lock_guard lock(index_mutex_);
      if (groups_ && current(groups_stamp_, count)) {
        index = groups_;
        return {};
      }
    }
    const SysTime now = clock_.monotonic_now();
    auto built = read_group_index(tx);
    if (!built) return built.error();
    index = std::make_shared<const detail::GroupIndex>(std::move(*built));
    std::lock_guard lock(index_mutex_);
    groups_ = index;
    groups_stamp_ = {count, now};
    ++index_reads_;
    return {};
  });
  if (!read) return read.error();
  return index;
}

void BuiltinDirectory::invalidate_indexes() {
  std::lock_guard lock(index_mutex_);
  names_.reset();
  groups_.reset();
  rows_.clear();
  settings_.reset();
}

std::size_t BuiltinDirectory::cached_users() const {
  std::lock_guard lock(index_mutex_);
  return rows_.size();
}

std::uint64_t BuiltinDirectory::index_reads() const {
  std::lock_guard lock(index_mutex_);
  return index_reads_;
}

Result<AuthOutcome> BuiltinDirectory::with_identity(AuthResult result, const Object& user, const Settings& settings) {
  auto id = resolve(user, settings);
  if (!id) return id.error();
  AuthOutcome out;
  out.result = result;
  out.identity = std::move(*id);
  return out;
}

}  // namespace identity
