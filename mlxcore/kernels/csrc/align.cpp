// 64-byte aligned array data for MLX's CPU allocator.
//
// MLX's CPU allocator takes `std::malloc(size + 8)`, writes the size in the first 8 bytes and
// hands out the memory after them. glibc's malloc returns 16-byte aligned memory (an mmap'ed
// large block sits 16 bytes into its page), so every array's data starts 8 bytes past a 16-byte
// boundary. Vector loads and stores then straddle cache lines: MKL's sgemm writing a
// [2048, 6400] float32 output runs 25% slower into such memory (65 against 52 ms here, the same
// with PyTorch given an output at that offset), and a `tiny` training step 4% slower.
//
// `align_allocations()` points libmlx's own `malloc` and `free` (its GOT entries, nobody
// else's, and the copy of `free` its allocator's buffer cache keeps) at the pair below. Blocks of
// ALIGN_FROM bytes or more that MLX's array allocator asks for come from posix_memalign with the
// pointer placed 8 bytes before a 64-byte boundary, so the data after MLX's 8-byte header is
// 64-byte aligned. A header in front of the block marks it as ours; `aligned_free` gives
// anything else (memory allocated before the switch, or by other code) to glibc's free
// unchanged. Only ELF relocations of the exact symbols `malloc` / `free` in a loaded `libmlx.so`
// are touched; where they are not found, or the allocator's call cannot be recognised, nothing
// changes (MLXFLOW_ALIGN=off skips it; mlxcore/kernels/_build.py).
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/memory.h"

namespace mlxk {
namespace {

constexpr size_t ALIGN = 64;
constexpr size_t ALIGN_FROM = 4096;  // smaller blocks stay glibc's (malloc's 16-byte guarantee)
constexpr size_t HEADER = ALIGN - 8;  // the returned pointer is HEADER bytes into the block
constexpr uint64_t MAGIC = 0x6d6c78666c6f7721ULL;

// Only MLX's array allocator gets aligned blocks: the malloc call in its `CommonAllocator::malloc`,
// found by one allocation made through it while `calibrating` (its return address). libmlx's
// other malloc calls (fmt's buffers, GGUF conversion) keep glibc's blocks and their 16-byte
// alignment, which compiled code may rely on.
std::atomic<void*> allocator_site{nullptr};
std::atomic<bool> calibrating{false};
constexpr size_t CALIBRATION_SIZE = (3 << 20) + 12345;  // a size no other call asks for

bool is_ours(void* q) {
  if ((reinterpret_cast<uintptr_t>(q) & (ALIGN - 1)) != HEADER) return false;  // glibc: 16-aligned
  return reinterpret_cast<uint64_t*>(static_cast<char*>(q) - HEADER)[1] == MAGIC;
}

void* aligned_malloc(size_t n) {
  void* site = __builtin_return_address(0);
  if (calibrating.load(std::memory_order_relaxed) && n >= CALIBRATION_SIZE && n < CALIBRATION_SIZE + 65536)
    allocator_site.store(site);
  else if (n < ALIGN_FROM || site != allocator_site.load(std::memory_order_relaxed))
    return std::malloc(n);
  void* p = nullptr;
  if (posix_memalign(&p, ALIGN, n + ALIGN) != 0) return nullptr;
  auto* h = static_cast<uint64_t*>(p);
  h[0] = n;
  h[1] = MAGIC;
  return static_cast<char*>(p) + HEADER;
}

void aligned_free(void* q) {
  if (q == nullptr) return;
  if (!is_ours(q)) return std::free(q);
  auto* p = static_cast<char*>(q) - HEADER;
  reinterpret_cast<uint64_t*>(p)[1] = 0;
  std::free(p);
}

struct Patch {
  bool free_patched = false;
  int mallocs = 0;
};

// Writes `fn` into a GOT slot. Slots in the RELRO range ([relro0, relro1): read-only after
// relocation) get their page opened for the write and closed again; others are writable already
// (and share their page with .data, which must stay writable).
bool write_slot(uintptr_t slot, void* fn, uintptr_t relro0, uintptr_t relro1) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  auto* start = reinterpret_cast<void*>(slot & ~(page - 1));
  const bool relro = slot >= relro0 && slot < relro1;
  if (relro && mprotect(start, page, PROT_READ | PROT_WRITE) != 0) return false;
  __atomic_store_n(reinterpret_cast<void**>(slot), fn, __ATOMIC_SEQ_CST);
  if (relro) mprotect(start, page, PROT_READ);
  return true;
}

bool is_slot_type(uint32_t type) {
#if defined(__x86_64__)
  return type == R_X86_64_JUMP_SLOT || type == R_X86_64_GLOB_DAT;
#elif defined(__aarch64__)
  return type == R_AARCH64_JUMP_SLOT || type == R_AARCH64_GLOB_DAT;
#else
  (void)type;
  return false;
#endif
}

int patch_object(dl_phdr_info* info, size_t, void* data) {
  auto* result = static_cast<Patch*>(data);
  std::string name = info->dlpi_name ? info->dlpi_name : "";
  auto slash = name.rfind('/');
  if (name.substr(slash == std::string::npos ? 0 : slash + 1) != "libmlx.so") return 0;
  const ElfW(Addr) base = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  uintptr_t relro0 = 0, relro1 = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(base + ph.p_vaddr);
    if (ph.p_type == PT_GNU_RELRO) {
      // the loader rounds the read-only range down to whole pages
      const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
      relro0 = (base + ph.p_vaddr) & ~(page - 1);
      relro1 = (base + ph.p_vaddr + ph.p_memsz) & ~(page - 1);
    }
  }
  if (dyn == nullptr) return 0;
  // glibc relocates these addresses in place on x86-64 and aarch64; be safe either way
  auto addr = [base](ElfW(Addr) a) { return a < base ? a + base : a; };
  const ElfW(Sym)* symtab = nullptr;
  const char* strtab = nullptr;
  const ElfW(Rela)* tables[2] = {nullptr, nullptr};
  size_t sizes[2] = {0, 0};
  bool plt_is_rela = true;
  for (auto* d = dyn; d->d_tag != DT_NULL; ++d) {
    switch (d->d_tag) {
      case DT_SYMTAB: symtab = reinterpret_cast<const ElfW(Sym)*>(addr(d->d_un.d_ptr)); break;
      case DT_STRTAB: strtab = reinterpret_cast<const char*>(addr(d->d_un.d_ptr)); break;
      case DT_RELA: tables[0] = reinterpret_cast<const ElfW(Rela)*>(addr(d->d_un.d_ptr)); break;
      case DT_RELASZ: sizes[0] = d->d_un.d_val; break;
      case DT_JMPREL: tables[1] = reinterpret_cast<const ElfW(Rela)*>(addr(d->d_un.d_ptr)); break;
      case DT_PLTRELSZ: sizes[1] = d->d_un.d_val; break;
      case DT_PLTREL: plt_is_rela = d->d_un.d_val == DT_RELA; break;
    }
  }
  if (symtab == nullptr || strtab == nullptr || !plt_is_rela) return 1;
  auto slots = [&](const char* want) {
    std::vector<uintptr_t> out;
    for (int t = 0; t < 2; ++t) {
      if (tables[t] == nullptr) continue;
      for (size_t k = 0; k < sizes[t] / sizeof(ElfW(Rela)); ++k) {
        const auto& r = tables[t][k];
        const auto sym = ELF64_R_SYM(r.r_info);
        if (sym != 0 && is_slot_type(ELF64_R_TYPE(r.r_info)) && std::strcmp(strtab + symtab[sym].st_name, want) == 0)
          out.push_back(base + r.r_offset);
      }
    }
    return out;
  };
  auto frees = slots("free"), mallocs = slots("malloc");
  if (frees.empty() || mallocs.empty()) return 1;
  // free first: from then on both kinds of block are freed correctly, whichever malloc made them;
  // malloc only if every free slot took the new function
  void* glibc_free = *reinterpret_cast<void**>(frees[0]);
  for (auto slot : frees)
    if (!write_slot(slot, reinterpret_cast<void*>(&aligned_free), relro0, relro1)) return 1;
  // libmlx also keeps `free` where it was copied before this ran: its allocator's buffer cache
  // holds it in a std::function made when the allocator was (a static object). Replace every copy
  // in its writable data. `aligned_free` frees anything `free` frees, so a word that only happens
  // to equal free's address would still mean the same.
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_W)) continue;
    uintptr_t a = (base + ph.p_vaddr + 7) & ~uintptr_t(7), e = base + ph.p_vaddr + ph.p_memsz;
    for (; a + 8 <= e; a += 8)
      if (*reinterpret_cast<void**>(a) == glibc_free &&
          !write_slot(a, reinterpret_cast<void*>(&aligned_free), relro0, relro1))
        return 1;
  }
  result->free_patched = true;
  for (auto slot : mallocs)
    if (write_slot(slot, reinterpret_cast<void*>(&aligned_malloc), relro0, relro1)) ++result->mallocs;
  return 1;
}

}  // namespace

int align_allocations() {
  static int patched = [] {
    Patch result;
    dl_iterate_phdr(&patch_object, &result);
    if (!result.free_patched || result.mallocs == 0) return 0;
    // one allocation through MLX's allocator tells its malloc call apart (an empty cache first,
    // so that the allocation reaches malloc)
    mx::clear_cache();
    calibrating.store(true);
    {
      auto data = mx::allocator::malloc(CALIBRATION_SIZE);  // freed again at the end of the scope
      calibrating.store(false);
    }
    return allocator_site.load() != nullptr ? result.mallocs : 0;
  }();
  return patched;
}

}  // namespace mlxk
