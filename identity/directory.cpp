#include "identity/directory.hpp"

namespace identity {
namespace {

char fold(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The part after the last backslash ("Finance" of "DEMO\Finance").
std::string_view bare(std::string_view qualified) {
  auto slash = qualified.rfind('\\');
  return slash == std::string_view::npos ? qualified : qualified.substr(slash + 1);
}

}  // namespace

std::string_view to_string(AuthResult result) {
  switch (result) {
    case AuthResult::ok: return "ok";
    case AuthResult::failed_credentials: return "failed_credentials";
    case AuthResult::account_disabled: return "account_disabled";
    case AuthResult::account_locked_out: return "account_locked_out";
    case AuthResult::must_change_credentials: return "must_change_credentials";
    case AuthResult::expired_credentials: return "expired_credentials";
  }
  return "?";
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (fold(a[i]) != fold(b[i])) return false;
  return true;
}

bool is_sid(std::string_view text) { return text.size() > 4 && iequals(text.substr(0, 4), "S-1-"); }

AccountName parse_account_name(std::string_view user_name, std::string_view domain) {
  AccountName out;
  if (auto slash = user_name.find('\\'); slash != std::string_view::npos) {
    out.domain = std::string(user_name.substr(0, slash));
    out.name = std::string(user_name.substr(slash + 1));
  } else if (user_name.find('@') != std::string_view::npos) {
    out.name = std::string(user_name);
    out.upn = true;
  } else {
    out.name = std::string(user_name);
    out.domain = std::string(domain);
  }
  return out;
}

bool names_user(const UserIdentity& user, std::string_view principal) {
  principal = trim(principal);
  if (principal.empty()) return false;
  if (is_sid(principal)) {
    if (iequals(principal, user.sid)) return true;
    for (const auto& sid : user.group_sids)
      if (iequals(principal, sid)) return true;
    return false;
  }
  if (auto slash = principal.find('\\'); slash != std::string_view::npos) {
    if (iequals(principal.substr(0, slash), user.domain) && iequals(principal.substr(slash + 1), user.user_name))
      return true;
    // A group without a domain has no qualified form and so never matches here.
    for (const auto& group : user.groups)
      if (group.find('\\') != std::string::npos && iequals(principal, group)) return true;
    return false;
  }
  if (principal.find('@') != std::string_view::npos) return !user.upn.empty() && iequals(principal, user.upn);
  if (iequals(principal, user.user_name)) return true;
  for (const auto& group : user.groups)
    if (iequals(principal, bare(group))) return true;
  return false;
}

bool names_any(const UserIdentity& user, const std::vector<std::string>& principals) {
  for (const auto& p : principals)
    if (names_user(user, p)) return true;
  return false;
}

}  // namespace identity
