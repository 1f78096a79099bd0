// libcuda.cpp: the CUDA driver's virtual memory management for the shim (soname libcuda.so.1).
//
// Only the calls hmmgpu makes for a lazy device arena, with the driver's checks where they are
// cheap: a mapping must lie in a reservation, be granule-aligned, match its allocation's size and
// get read/write access.  Address space comes from the shim's device heap (cupy/_emu.py, through
// callbacks), and the parts not mapped stay inaccessible even while the device works, so a
// kernel that touches an uncommitted frame crashes as it would fault on a GPU.
#include <cstdint>
#include <cstddef>
#include <map>
#include <mutex>
typedef unsigned long long u64;
typedef u64 (*reserve_fn)(u64 size);
typedef void (*range_fn)(u64 ptr, u64 size);
static reserve_fn emu_reserve;
static range_fn emu_map, emu_unmap, emu_free;
static std::mutex mu;
static std::map<u64, u64> reservations, mappings, handles;   // start -> size; handle -> size
static u64 next_handle = 1;
static const u64 GRANULE = 2 << 20;

struct Loc { int type, id; };
struct Prop { int type, handle_types; Loc location; void* win32; unsigned char flags[8]; };
struct Access { Loc location; int flags; };

extern "C" {
void emu_vmm_hooks(reserve_fn r, range_fn m, range_fn u, range_fn f) { emu_reserve = r, emu_map = m, emu_unmap = u, emu_free = f; }
int cuDeviceGet(int* dev, int ordinal) { if (ordinal != 0) return 101; *dev = 0; return 0; }
int cuDeviceGetAttribute(int* v, int attr, int dev) { *v = attr == 102 ? 1 : 0; return 0; }
int cuMemGetAllocationGranularity(size_t* g, const Prop* p, int opt) {
    if (p->type != 1 || p->location.type != 1 || p->location.id != 0) return 1;
    *g = GRANULE; return 0;
}
int cuMemAddressReserve(u64* ptr, size_t size, size_t align, u64 addr, u64 flags) {
    if (size == 0 || size % GRANULE || addr || flags) return 1;
    std::lock_guard<std::mutex> l(mu);
    *ptr = emu_reserve(size); reservations[*ptr] = size; return 0;
}
int cuMemAddressFree(u64 ptr, size_t size) {
    std::lock_guard<std::mutex> l(mu);
    auto it = reservations.find(ptr);
    if (it == reservations.end() || it->second != size) return 1;
    for (auto& m : mappings) if (m.first >= ptr && m.first < ptr + size) return 1;   // unmap first
    reservations.erase(it); emu_free(ptr, size); return 0;
}
int cuMemCreate(u64* h, size_t size, const Prop* p, u64 flags) {
    if (size == 0 || size % GRANULE || p->type != 1 || p->location.type != 1) return 1;
    std::lock_guard<std::mutex> l(mu);
    *h = next_handle++; handles[*h] = size; return 0;
}
int cuMemRelease(u64 h) { std::lock_guard<std::mutex> l(mu); return handles.erase(h) ? 0 : 1; }
int cuMemMap(u64 ptr, size_t size, size_t offset, u64 h, u64 flags) {
    std::lock_guard<std::mutex> l(mu);
    auto hs = handles.find(h);
    if (hs == handles.end() || hs->second != size || offset || flags || ptr % GRANULE) return 1;
    bool inside = false;
    for (auto& r : reservations) inside |= ptr >= r.first && ptr + size <= r.first + r.second;
    if (!inside) return 1;
    for (auto& m : mappings) if (ptr < m.first + m.second && m.first < ptr + size) return 1;
    mappings[ptr] = size; return 0;
}
int cuMemSetAccess(u64 ptr, size_t size, const Access* a, size_t count) {
    std::lock_guard<std::mutex> l(mu);
    auto m = mappings.find(ptr);
    if (m == mappings.end() || m->second != size || count != 1 || a->flags != 3 || a->location.type != 1) return 1;
    emu_map(ptr, size); return 0;
}
int cuMemUnmap(u64 ptr, size_t size) {
    std::lock_guard<std::mutex> l(mu);
    auto m = mappings.find(ptr);
    if (m == mappings.end() || m->second != size) return 1;
    mappings.erase(m); emu_unmap(ptr, size); return 0;
}
}
