// Compiled only for wheels linked against an older glibc (FASTCLIP_GLIBC_STUBS in
// CMakeLists.txt). The libstdc++.a of the build machine (GCC 12 on glibc 2.36) refers to
// two glibc symbols that glibc 2.28 does not have; left undefined, the module would fail
// to load there ("undefined symbol"). Both are defined here with hidden visibility, so
// they bind inside _C only and never interpose on the process's glibc.
//
// No glibc header that declares either symbol is included here (<sys/single_threaded.h>,
// <stdlib.h>): the declarations below are the only ones this file sees.
#include <cstddef>
#include <cstdint>

extern "C" {

int getentropy(void* buffer, std::size_t length);  // glibc 2.25

// glibc >= 2.32 sets this to 1 while the process has one thread, and libstdc++ then skips
// atomic instructions in reference counts. 0 means "may be multi-threaded": the atomic
// path, always correct.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// glibc >= 2.36. Referenced by std::random_device's source table (libstdc++'s random.o,
// which every static link of std::string's COW instantiation pulls in); fastclip never
// constructs a random_device. Should it be called, it returns kernel randomness.
__attribute__((visibility("hidden"))) std::uint32_t arc4random(void) {
  std::uint32_t value;
  if (getentropy(&value, sizeof value) != 0) __builtin_abort();
  return value;
}

}  // extern "C"
