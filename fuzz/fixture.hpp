// fuzz/fixture.hpp: the state a stateful fuzz target (admin_fuzz, cbp_handshake_fuzz) keeps
// between inputs.
#pragma once

#include <cstdlib>
#include <memory>

namespace fuzz {

// The fixture T for this input: built (default-constructed) at the first call and built anew
// every `rebuild_every` calls, so that what the inputs stored does not pile up. It is destroyed
// at exit before OpenSSL's own clean-up (registered after it: T uses OpenSSL when built), so that
// T's threads end while OpenSSL can still free their per-thread state (else LeakSanitizer reports
// it). Not thread-safe (libFuzzer calls the target from one thread).
template <class T>
T& fixture(int rebuild_every) {
  static std::unique_ptr<T> instance;
  static int calls = 0;
  if (!instance || ++calls % rebuild_every == 0) {
    const bool first = !instance;
    instance.reset();
    instance = std::make_unique<T>();
    if (first) std::atexit([] { instance.reset(); });
  }
  return *instance;
}

}  // namespace fuzz
