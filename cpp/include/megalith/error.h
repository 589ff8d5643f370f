// Error type and checking macros shared by every torch-free C++ source.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace megalith {

// Every failure in the compiled core is reported by throwing this type; the binding layer turns it into a
// Python ValueError so callers see a message naming the argument. Nothing here calls exit() or abort().
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& out, const T& first, const Rest&... rest) {
  out << first;
  append(out, rest...);
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream out;
  detail::append(out, args...);
  throw Error(out.str());
}

}  // namespace megalith

// MEGALITH_CHECK(cond, "x must be positive, got ", x): throws megalith::Error with the message when cond is false.
#define MEGALITH_CHECK(cond, ...)        \
  do {                                   \
    if (!(cond)) ::megalith::fail(__VA_ARGS__); \
  } while (0)
