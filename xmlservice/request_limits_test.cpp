#include "xmlservice/request_limits.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace xmlservice;

namespace {

Credentials password_creds(std::string user, std::string domain = "DEMO", std::string password = "pw") {
  Credentials c;
  c.user_name = std::move(user);
  c.domain = Domain{std::move(domain), DomainType::nt};
  c.password = Password{PasswordEncoding::cleartext, {}, std::move(password)};
  return c;
}

}  // namespace

TEST_CASE("fields within their limits pass") {
  RequestAppData r;
  r.credentials = password_creds(std::string(kMaxUserNameBytes, 'u'), std::string(kMaxDomainBytes, 'd'),
                                 std::string(kMaxPasswordBytes, 'p'));
  r.client_name = std::string(kMaxClientNameBytes, 'c');
  r.device_id = std::string(kMaxDeviceIdBytes, 'i');
  r.client_address = Address{AddressType::dot, std::string(kMaxAddressBytes, '1')};
  r.app_names = {std::string(kMaxNameBytes, 'a')};
  CHECK_FALSE(check_limits(r).has_value());
  CHECK_FALSE(check_limits(RequestCapabilities{}).has_value());
}

TEST_CASE("an over-long credential field is failed-credentials") {
  RequestValidateCredentials r;
  r.credentials = password_creds(std::string(900 * 1024, 'u'));
  auto v = check_limits(r);
  REQUIRE(v.has_value());
  CHECK(v->error == ErrorId::failed_credentials);
  CHECK(v->field == "UserName");
  CHECK(v->bytes == 900 * 1024);
  CHECK(v->limit == kMaxUserNameBytes);

  r.credentials = password_creds("alice", std::string(kMaxDomainBytes + 1, 'd'));
  CHECK(check_limits(r)->field == "Domain");
  r.credentials = password_creds("alice", "DEMO", std::string(kMaxPasswordBytes + 1, 'p'));
  CHECK(check_limits(r)->field == "Password");

  Credentials passthrough;
  passthrough.ids = {{IdType::sid, "S-1-5-21-1"}, {IdType::sam, std::string(kMaxIdBytes + 1, 'x')}};
  r.credentials = passthrough;
  CHECK(check_limits(r)->field == "ID");
  CHECK(check_limits(r)->error == ErrorId::failed_credentials);
}

TEST_CASE("other over-long fields are unspecified; credentials are checked first") {
  RequestAddress a;
  a.credentials = password_creds("alice");
  a.name = {LaunchNameKind::app, "Notepad", {}};
  a.client_name = std::string(kMaxClientNameBytes + 1, 'c');
  auto v = check_limits(a);
  REQUIRE(v.has_value());
  CHECK(v->error == ErrorId::unspecified);
  CHECK(v->field == "ClientName");

  a.client_name = "WI_1";
  a.client_address = Address{AddressType::dot, std::string(kMaxAddressBytes + 1, '1')};
  CHECK(check_limits(a)->field == "ClientAddress");
  a.client_address.reset();
  a.name.value = std::string(kMaxNameBytes + 1, 'n');
  CHECK(check_limits(a)->field == "Name");
  a.name.value = "Notepad";
  a.session_settings = {{"Other", std::string(10000, 'v')}};  // not kept: not limited
  CHECK_FALSE(check_limits(a).has_value());
  a.session_settings = {{"credentialtype", std::string(kMaxNameBytes + 1, 'v')}};
  CHECK(check_limits(a)->field == "SessionSettings/CredentialType");

  a.credentials = password_creds(std::string(kMaxUserNameBytes + 1, 'u'));
  CHECK(check_limits(a)->error == ErrorId::failed_credentials);

  RequestTicket t;
  t.ticket_tag = std::string(kMaxNameBytes + 1, 't');
  CHECK(check_limits(t)->field == "TicketTag");
  RequestLogoffUserSessions l;
  l.device_id = std::string(kMaxDeviceIdBytes + 1, 'd');
  CHECK(check_limits(l)->field == "DeviceId");
}

TEST_CASE("DesiredIconData: at most kMaxDesiredIconData entries, counted in entries") {
  RequestAppData r;
  r.desired_icon_data.assign(kMaxDesiredIconData, IconSpec{256, 32, IconFormat::png});
  CHECK_FALSE(check_limits(r).has_value());
  r.desired_icon_data.push_back(IconSpec{});
  auto v = check_limits(r);
  REQUIRE(v.has_value());
  CHECK(v->error == ErrorId::unspecified);
  CHECK(v->field == "DesiredIconData");
  CHECK(v->bytes == kMaxDesiredIconData + 1);
  CHECK(v->limit == kMaxDesiredIconData);
  CHECK(v->unit == "entries");
  // Credentials are still checked first.
  r.credentials = password_creds(std::string(kMaxUserNameBytes + 1, 'u'));
  CHECK(check_limits(r)->field == "UserName");
}
