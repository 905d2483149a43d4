// Stand-in for {fmt}'s <fmt/format.h>, which MLX-CUDA's public headers include but its wheel
// does not ship. Those headers use fmt::format only for error messages ("{}" placeholders):
// this replaces each "{}" in turn by the next argument as an ostream prints it.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace fmt {

template <typename... Args>
std::string format(std::string_view pattern, const Args&... args) {
  std::ostringstream os;
  std::string_view rest = pattern;
  auto put = [&](const auto& arg) {
    auto at = rest.find("{}");
    if (at == std::string_view::npos) return;
    os << rest.substr(0, at) << arg;
    rest = rest.substr(at + 2);
  };
  (put(args), ...);
  os << rest;
  return os.str();
}

}  // namespace fmt
