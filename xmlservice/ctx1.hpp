// xmlservice/ctx1.hpp: the "ctx1" password obfuscation of NFuse `<Password encoding="ctx1">`.
//
// ctx1 is a reversible XOR chain over the UTF-16LE bytes of the password, each result byte
// written as two letters 'A'..'P' (high nibble first); every UTF-16 code unit becomes 4 letters.
// It offers no secrecy at all: anyone who sees the request has the password (put TLS in front).
// Algorithm and vectors: docs/nfuse.md ("Passwords").
#pragma once

#include "common/error.hpp"

#include <string>
#include <string_view>

namespace xmlservice::ctx1 {

// The ctx1 form of `plain` (UTF-8). Fails (errc::invalid_argument) when `plain` is not valid
// UTF-8. The empty password encodes as the empty string.
common::Result<std::string> encode(std::string_view plain);

// The UTF-8 password that `encoded` stands for. ASCII whitespace anywhere is ignored (XML
// formatting). Fails (errc::invalid_argument, the message never contains the input) when any
// other character is outside 'A'..'P', when the letter count is not a multiple of 4, or when
// the bytes are not UTF-16LE text free of NUL and unpaired surrogates. The NFuse service answers
// such a password with `failed-credentials`.
common::Result<std::string> decode(std::string_view encoded);

}  // namespace xmlservice::ctx1
