// xmlservice/default_icon.hpp: the icon sent for resources that have none of their own: a
// stylised monitor (desktops) or window (applications), drawn at the requested size.
#pragma once

#include "xmlservice/nfuse_types.hpp"

#include <string>

namespace xmlservice {

// Base64 of the icon in the requested form: `raw` is a Windows .ico file holding one 32-bit
// image (clients decode it whatever bpp they asked for), `png` a PNG file. Sizes are clamped to
// 16..256. Deterministic; cached by the caller if it cares.
std::string default_icon_base64(const IconSpec& spec, bool desktop);

// The sizes and formats we can serve (for IconInfo).
std::vector<IconSpec> default_icon_specs();

}  // namespace xmlservice
