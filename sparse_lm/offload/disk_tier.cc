// The disk tier of the sparse FFN (sparse_lm.offload.disk, disk_cache, disk_decode): O_DIRECT reads of neuron
// bundles through io_uring, the two storage tiers under a RAM budget (the segmented neuron cache: a resident hot
// region plus an LRU region per neuron, with read-ahead of guessed neurons; the naive loader: whole layers pinned or
// read on demand), and the exact FFN of the predicted neurons from wherever their rows are resident, as XLA FFI
// handlers (one call per layer and token, no Python on the way; a Python callback cost ~160 us a call here).
//
// A bundle is one neuron's rows back to back in float32: gate (gated FFNs only), up, down; a layer's bundles are
// contiguous, layers `layer_stride` apart from `data_offset`. A neuron is read as the smallest run of whole O_DIRECT
// blocks around it (its "window"), so bundles need no padding on disk.
// The FFN arithmetic is that of kernels_pallas/cpu/quant_predict_cpu.cc's fused call (same parts, same row groups,
// same helpers from cpu_common.h), so a decode through either tier gives the in-RAM engine's outputs bit for bit.
// Legend: L layers, F d_ff, D d_model, K capacity.
#include <fcntl.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace sparse_lm_cpu;

constexpr int64_t kPartsPerThread = 4;  // as the fused int4 call: the same parts give the same sums

// The file layout, as sparse_lm.offload.disk writes it (all byte counts).
struct Geometry {
  int64_t n_layers, d_ff, d_model, rows, neuron_bytes, layer_stride, data_offset, align, window_bytes;
  int64_t Offset(int64_t layer, int64_t neuron) const {
    return data_offset + layer * layer_stride + neuron * neuron_bytes;
  }
};

std::string Errno(const std::string& what, int error) { return what + ": " + std::strerror(error); }

// Page-aligned anonymous memory (mmap): every O_DIRECT destination is block aligned.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { Release(); }
  std::string Allocate(int64_t bytes) {
    Release();
    if (bytes == 0) return "";
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Errno("mmap of " + std::to_string(bytes) + " bytes", errno);
    // 2 MiB pages where the kernel has them (advice, not required): the FFN gathers bundles all over the region,
    // each crossing 4 KiB pages (as the in-RAM engine's weights, backed by huge pages in the benchmark)
    madvise(p, bytes, MADV_HUGEPAGE);
    std::memset(p, 0, bytes);  // faulted in now, not inside a decode step
    data_ = static_cast<char*>(p);
    bytes_ = bytes;
    return "";
  }
  char* data() const { return data_; }
  int64_t bytes() const { return bytes_; }

 private:
  void Release() {
    if (data_ != nullptr) munmap(data_, bytes_);
    data_ = nullptr;
    bytes_ = 0;
  }
  char* data_ = nullptr;
  int64_t bytes_ = 0;
};

// Batched reads of block-aligned ranges: an io_uring of `depth` entries kept full while ranges remain (measured
// here: 96k reads/s of 7 KiB at 64 in flight against 83k for 16 pread threads, at half the system time); plain
// pread one range at a time where io_uring is unavailable.
class Reader {
 public:
  Reader(int fd, int64_t depth) : fd_(fd), depth_(std::max<int64_t>(1, depth)) {
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    // completions are reaped when the reader next enters the kernel, not by interrupting the thread computing
    p.flags = IORING_SETUP_COOP_TASKRUN;
    int ring = static_cast<int>(syscall(__NR_io_uring_setup, static_cast<unsigned>(depth_), &p));
    if (ring < 0) {  // an older kernel
      std::memset(&p, 0, sizeof p);
      ring = static_cast<int>(syscall(__NR_io_uring_setup, static_cast<unsigned>(depth_), &p));
    }
    if (ring < 0) return;
    sq_bytes_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_bytes_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    sqe_bytes_ = p.sq_entries * sizeof(io_uring_sqe);
    void* sq = mmap(nullptr, sq_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    void* cq = mmap(nullptr, cq_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    void* sqes = mmap(nullptr, sqe_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
      close(ring);
      return;
    }
    ring_ = ring;
    depth_ = std::min<int64_t>(depth_, p.sq_entries);
    sq_ = static_cast<char*>(sq);
    cq_ = static_cast<char*>(cq);
    sqes_ = static_cast<io_uring_sqe*>(sqes);
    sq_head_ = reinterpret_cast<unsigned*>(sq_ + p.sq_off.head);
    sq_tail_ = reinterpret_cast<unsigned*>(sq_ + p.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq_ + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq_ + p.sq_off.array);
    cq_head_ = reinterpret_cast<unsigned*>(cq_ + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq_ + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq_ + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq_ + p.cq_off.cqes);
    // the file registered once: no per-read file lookup (plain fd reads if refused)
    fixed_file_ = syscall(__NR_io_uring_register, ring_, IORING_REGISTER_FILES, &fd_, 1) == 0;
  }

  // Registers destination regions once (pinned for the ring's life): reads into them skip pinning their pages
  // per read. Plain reads where refused (memlock limits) or for other destinations.
  void RegisterBuffers(const std::vector<std::pair<char*, int64_t>>& regions) {
    if (ring_ < 0 || regions.empty()) return;
    std::vector<iovec> iov;
    for (const auto& [base, bytes] : regions)
      if (bytes > 0) iov.push_back({base, static_cast<size_t>(bytes)});
    if (!iov.empty() && syscall(__NR_io_uring_register, ring_, IORING_REGISTER_BUFFERS, iov.data(),
                                static_cast<unsigned>(iov.size())) == 0)
      buffers_ = regions;
  }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  ~Reader() {
    if (ring_ < 0) return;
    munmap(sq_, sq_bytes_);
    munmap(cq_, cq_bytes_);
    munmap(sqes_, sqe_bytes_);
    close(ring_);
  }
  bool uses_io_uring() const { return ring_ >= 0; }
  bool registered() const { return !buffers_.empty(); }
  int64_t depth() const { return ring_ >= 0 ? depth_ : 1; }

  // Reads n ranges (offset, length, destination; all block aligned) and waits for them; "" or the first error.
  std::string Read(const int64_t* offsets, const int64_t* lengths, char* const* dests, int64_t n) {
    if (ring_ < 0) return ReadSync(offsets, lengths, dests, n);
    Submit(offsets, lengths, dests, n);
    return Drain();
  }

  // Queues n ranges and starts as many as the depth allows, without waiting (with io_uring; else reads them now).
  // The destinations must stay valid, and unread, until Drain returns.
  void Submit(const int64_t* offsets, const int64_t* lengths, char* const* dests, int64_t n) {
    if (ring_ < 0) {
      if (const std::string e = ReadSync(offsets, lengths, dests, n); error_.empty()) error_ = e;
      return;
    }
    for (int64_t i = 0; i < n; ++i) queue_.push_back({offsets[i], lengths[i], dests[i]});
    Pump(false);
  }

  // Waits until every submitted range is read; "" or the first error since the last Drain.
  std::string Drain() {
    while (ring_ >= 0 && (next_ < queue_.size() || in_flight_ > 0)) Pump(true);
    queue_.clear();
    next_ = 0;
    std::string error;
    error.swap(error_);
    return error;
  }

 private:
  struct Range {
    int64_t offset, length;
    char* dest;
  };

  // Fills the ring up to the depth, enters the kernel once (waiting for one completion if `wait`), reaps.
  void Pump(bool wait) {
    unsigned tail = *sq_tail_;
    while (in_flight_ < depth_ && next_ < queue_.size()) {
      const Range& r = queue_[next_];
      const unsigned slot = tail & sq_mask_;
      io_uring_sqe* sqe = &sqes_[slot];
      std::memset(sqe, 0, sizeof *sqe);
      sqe->opcode = IORING_OP_READ;
      for (size_t b = 0; b < buffers_.size(); ++b)
        if (r.dest >= buffers_[b].first && r.dest + r.length <= buffers_[b].first + buffers_[b].second) {
          sqe->opcode = IORING_OP_READ_FIXED;
          sqe->buf_index = static_cast<uint16_t>(b);
          break;
        }
      sqe->fd = fixed_file_ ? 0 : fd_;
      if (fixed_file_) sqe->flags |= IOSQE_FIXED_FILE;
      sqe->addr = reinterpret_cast<uint64_t>(r.dest);
      sqe->len = static_cast<uint32_t>(r.length);
      sqe->off = static_cast<uint64_t>(r.offset);
      sqe->user_data = static_cast<uint64_t>(next_);
      sq_array_[slot] = slot;
      ++tail;
      ++next_;
      ++in_flight_;
    }
    __atomic_store_n(sq_tail_, tail, __ATOMIC_RELEASE);
    const unsigned pending = tail - __atomic_load_n(sq_head_, __ATOMIC_ACQUIRE);
    if (pending > 0 || wait) {
      const long ret = syscall(__NR_io_uring_enter, ring_, pending, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0,
                               nullptr, 0);
      if (ret < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY && error_.empty())
        error_ = Errno("io_uring_enter", errno);
      if (ret < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {  // nothing will complete: give up
        in_flight_ = 0;
        next_ = queue_.size();
      }
    }
    unsigned head = *cq_head_;
    while (head != __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE)) {
      const io_uring_cqe& cqe = cqes_[head & cq_mask_];
      const Range& r = queue_[cqe.user_data];
      if (error_.empty() && cqe.res != r.length)
        error_ = cqe.res < 0 ? Errno("O_DIRECT read at offset " + std::to_string(r.offset), -cqe.res)
                             : "short O_DIRECT read at offset " + std::to_string(r.offset) + ": " +
                                   std::to_string(cqe.res) + " of " + std::to_string(r.length) + " bytes";
      ++head;
      --in_flight_;
    }
    __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  }

  std::string ReadSync(const int64_t* offsets, const int64_t* lengths, char* const* dests, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      int64_t done = 0;
      while (done < lengths[i]) {
        const ssize_t got = pread(fd_, dests[i] + done, lengths[i] - done, offsets[i] + done);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return Errno("O_DIRECT pread at offset " + std::to_string(offsets[i]), errno);
        if (got == 0) return "short O_DIRECT read at offset " + std::to_string(offsets[i]);
        done += got;
      }
    }
    return "";
  }

  int fd_;
  int64_t depth_;
  int ring_ = -1;
  char *sq_ = nullptr, *cq_ = nullptr;
  size_t sq_bytes_ = 0, cq_bytes_ = 0, sqe_bytes_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
  unsigned *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_array_ = nullptr, *cq_head_ = nullptr, *cq_tail_ = nullptr;
  unsigned sq_mask_ = 0, cq_mask_ = 0;
  bool fixed_file_ = false;
  std::vector<std::pair<char*, int64_t>> buffers_;  // registered destination regions, by buffer index
  std::vector<Range> queue_;  // submitted since the last Drain, in order; next_ = the first not yet in the ring
  size_t next_ = 0;
  int64_t in_flight_ = 0;
  std::string error_;
};

// Counters since the last reset; `accesses` = hits + misses (neurons asked for).
struct Stats {
  int64_t accesses = 0, hits = 0, misses = 0, bytes_read = 0, reads = 0;
  int64_t read_ns = 0, ffn_ns = 0, calls = 0;  // waiting for reads; the FFN arithmetic; FFI calls
  int64_t prefetch_reads = 0, prefetch_used = 0;  // neurons read ahead; of those, found by a later call
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Where a layer's predicted neurons' bundles are: resolved in place (resident ones) or read from disk first.
class Tier {
 public:
  Tier(int fd, const Geometry& g, int64_t depth) : fd_(fd), g_(g), reader_(fd, depth) {}
  Tier(const Tier&) = delete;
  Tier& operator=(const Tier&) = delete;
  virtual ~Tier() { close(fd_); }
  // bundles[k] = the resident bundle of neuron idx[k] of `layer` (k < n), reading what is not resident.
  virtual std::string Resolve(int64_t layer, const int32_t* idx, int64_t n, const float** bundles) = 0;
  // Starts reading neurons idx of `layer` that are not resident, without waiting (a guess; default: none)
  virtual void Prefetch(int64_t /*layer*/, const int32_t* /*idx*/, int64_t /*n*/) {}
  virtual void Reset() { stats_ = Stats(); }
  virtual int64_t ResidentBytes() const = 0;
  const Geometry& geometry() const { return g_; }
  const Stats& stats() const { return stats_; }
  Reader& reader() { return reader_; }
  Stats& mutable_stats() { return stats_; }

 protected:
  std::string TimedRead(const int64_t* offsets, const int64_t* lengths, char* const* dests, int64_t n) {
    const int64_t start = NowNs();
    std::string e = reader_.Read(offsets, lengths, dests, n);
    stats_.read_ns += NowNs() - start;
    return e;
  }
  std::string TimedDrain() {
    const int64_t start = NowNs();
    std::string e = reader_.Drain();
    stats_.read_ns += NowNs() - start;
    return e;
  }

  // Reads `n` whole layers' regions [layer] into dests, in chunks of `chunk` bytes
  std::string ReadLayers(const int64_t* layers, char* const* dests, int64_t n, int64_t chunk) {
    std::vector<int64_t> offsets, lengths;
    std::vector<char*> to;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t at = 0; at < g_.layer_stride; at += chunk) {
        offsets.push_back(g_.data_offset + layers[i] * g_.layer_stride + at);
        lengths.push_back(std::min(chunk, g_.layer_stride - at));
        to.push_back(dests[i] + at);
      }
    stats_.reads += static_cast<int64_t>(offsets.size());
    stats_.bytes_read += n * g_.layer_stride;
    return TimedRead(offsets.data(), lengths.data(), to.data(), static_cast<int64_t>(offsets.size()));
  }

  int fd_;
  Geometry g_;
  Reader reader_;
  Stats stats_;
};

// The segmented neuron cache: hot neurons (chosen by the caller, loaded once, never evicted) in a compact region of
// whole bundles; every other neuron through an LRU region of `lru_slots` windows, least recently used evicted first.
// Within one call, neurons are looked up in the order given (ascending), hits touched and misses placed in that order.
class NeuronCache : public Tier {
 public:
  NeuronCache(int fd, const Geometry& g, int64_t depth, int64_t chunk, const int64_t* hot_keys, int64_t n_hot,
              int64_t lru_slots, std::string* error)
      : Tier(fd, g, depth), hot_(g.n_layers * g.d_ff, nullptr), lru_slot_(g.n_layers * g.d_ff, -1),
        lru_slots_(lru_slots) {
    if (!(*error = hot_arena_.Allocate(n_hot * g.neuron_bytes)).empty()) return;
    if (!(*error = lru_arena_.Allocate(lru_slots * g.window_bytes)).empty()) return;
    *error = LoadHot(hot_keys, n_hot, chunk);
    reader_.RegisterBuffers({{lru_arena_.data(), lru_arena_.bytes()}});
    n_hot_ = n_hot;
    owner_.assign(lru_slots, -1);
    prev_.resize(lru_slots);
    next_.resize(lru_slots);
    prefetched_.assign(lru_slots, 0);
    in_flight_.assign(lru_slots, 0);
    ResetList();
    Tier::Reset();
  }
  ~NeuronCache() override { reader_.Drain(); }  // (no slot is reused after this)  // no read may land in the arenas once they are freed

  // Looks the neurons up, queues the misses' reads behind any read-ahead still in flight, then waits for both: a
  // read-ahead hit's window is complete when the FFN reads it, and the device never idles between the two batches.
  std::string Resolve(int64_t layer, const int32_t* idx, int64_t n, const float** bundles) override {
    const int64_t base = layer * g_.d_ff;
    misses_.clear();
    int64_t lru_hits = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t key = base + idx[k];
      if (hot_[key] != nullptr) {
        bundles[k] = hot_[key];
      } else if (const int32_t slot = lru_slot_[key]; slot >= 0) {
        Touch(slot);
        stats_.prefetch_used += prefetched_[slot];
        prefetched_[slot] = 0;
        bundles[k] = reinterpret_cast<const float*>(lru_arena_.data() + slot * g_.window_bytes + Phase(key));
        ++lru_hits;
      } else {
        misses_.push_back(k);
      }
    }
    const int64_t misses = static_cast<int64_t>(misses_.size());
    stats_.accesses += n;
    stats_.hits += n - misses;
    stats_.misses += misses;
    if (misses == 0) return Settle();
    // the misses' slots come from the LRU end, while this call's hits and misses move to the other end: more
    // would recycle a slot this call still needs
    if (lru_hits + misses > lru_slots_)
      return "layer " + std::to_string(layer) + " needs " + std::to_string(lru_hits + misses) +
             " LRU slots in one call but the region has " + std::to_string(lru_slots_);
    offsets_.resize(misses);
    lengths_.resize(misses);
    dests_.resize(misses);
    for (int64_t j = 0; j < misses; ++j) {
      const int64_t k = misses_[j], key = base + idx[k];
      if (in_flight_[tail_]) {  // only with a small region: the slot's read-ahead must land before it is reused
        if (std::string e = Settle(); !e.empty()) return e;
      }
      bundles[k] = Place(key, j);
    }
    stats_.reads += misses;
    for (int64_t j = 0; j < misses; ++j) stats_.bytes_read += lengths_[j];
    reader_.Submit(offsets_.data(), lengths_.data(), dests_.data(), misses);
    return Settle();
  }

  // Read-ahead into LRU slots (they become the most recently used): at most half the region per call, so the next
  // call's own misses never need a slot still owned by this batch. Completed by the next Resolve.
  void Prefetch(int64_t layer, const int32_t* idx, int64_t n) override {
    const int64_t base = layer * g_.d_ff, limit = lru_slots_ / 2;
    int64_t m = 0;
    offsets_.resize(std::min(n, limit));
    lengths_.resize(offsets_.size());
    dests_.resize(offsets_.size());
    for (int64_t k = 0; k < n && m < limit; ++k) {
      const int64_t key = base + idx[k];
      if (hot_[key] != nullptr || lru_slot_[key] >= 0) continue;
      if (in_flight_[tail_]) break;  // the region is too small for this much read-ahead
      Place(key, m);
      const int32_t slot = lru_slot_[key];
      prefetched_[slot] = in_flight_[slot] = 1;
      flying_.push_back(slot);
      ++m;
    }
    stats_.reads += m;
    stats_.prefetch_reads += m;
    for (int64_t j = 0; j < m; ++j) stats_.bytes_read += lengths_[j];
    reader_.Submit(offsets_.data(), lengths_.data(), dests_.data(), m);
  }

  void Reset() override {  // the LRU region emptied; the hot region stays
    Settle();
    std::fill(prefetched_.begin(), prefetched_.end(), 0);
    for (int64_t s = 0; s < lru_slots_; ++s)
      if (owner_[s] >= 0) lru_slot_[owner_[s]] = -1;
    std::fill(owner_.begin(), owner_.end(), -1);
    ResetList();
    Tier::Reset();
  }

  int64_t ResidentBytes() const override { return n_hot_ * g_.neuron_bytes + lru_slots_ * g_.window_bytes; }

  // 1 hot, 2 in the LRU region, 0 not resident
  int64_t Where(int64_t layer, int64_t neuron) const {
    const int64_t key = layer * g_.d_ff + neuron;
    return hot_[key] != nullptr ? 1 : lru_slot_[key] >= 0 ? 2 : 0;
  }

  // neuron keys (layer * F + neuron) of the LRU region, most recently used first
  int64_t LruOrder(int64_t* out) const {
    int64_t n = 0;
    for (int32_t s = head_; s >= 0; s = next_[s])
      if (owner_[s] >= 0) out[n++] = owner_[s];
    return n;
  }

 private:
  // Waits for every read in flight; their slots may be reused again
  std::string Settle() {
    std::string e = TimedDrain();
    for (int32_t slot : flying_) in_flight_[slot] = 0;
    flying_.clear();
    return e;
  }

  // Gives `key` the least recently used slot (evicting its owner) and fills read j with its window; returns where
  // its bundle will be.
  const float* Place(int64_t key, int64_t j) {
    const int32_t slot = tail_;
    if (owner_[slot] >= 0) lru_slot_[owner_[slot]] = -1;  // evicted
    owner_[slot] = key;
    lru_slot_[key] = slot;
    prefetched_[slot] = 0;
    Touch(slot);
    const int64_t offset = g_.Offset(key / g_.d_ff, key % g_.d_ff);
    const int64_t start = offset - offset % g_.align;
    char* window = lru_arena_.data() + slot * g_.window_bytes;
    offsets_[j] = start;
    lengths_[j] = (offset + g_.neuron_bytes - start + g_.align - 1) / g_.align * g_.align;
    dests_[j] = window;
    return reinterpret_cast<const float*>(window + (offset - start));
  }

  int64_t Phase(int64_t key) const {
    const int64_t offset = g_.Offset(key / g_.d_ff, key % g_.d_ff);
    return offset % g_.align;
  }

  // Hot bundles copied out of their layers' regions, read a few layers at a time through one staging buffer
  std::string LoadHot(const int64_t* keys, int64_t n, int64_t chunk) {
    if (n == 0) return "";
    std::vector<std::vector<int64_t>> per_layer(g_.n_layers);
    for (int64_t i = 0; i < n; ++i) {
      if (keys[i] < 0 || keys[i] >= g_.n_layers * g_.d_ff) return "hot neuron key " + std::to_string(keys[i]) +
                                                                   " out of range";
      if (hot_[keys[i]] != nullptr) return "hot neuron key " + std::to_string(keys[i]) + " given twice";
      hot_[keys[i]] = reinterpret_cast<const float*>(1);  // placeholder until its place is known
      per_layer[keys[i] / g_.d_ff].push_back(keys[i] % g_.d_ff);
    }
    Arena staging;
    if (std::string e = staging.Allocate(g_.layer_stride); !e.empty()) return e;
    char* dest = staging.data();
    int64_t placed = 0;
    for (int64_t layer = 0; layer < g_.n_layers; ++layer) {
      if (per_layer[layer].empty()) continue;
      if (std::string e = ReadLayers(&layer, &dest, 1, chunk); !e.empty()) return e;
      for (int64_t neuron : per_layer[layer]) {
        char* to = hot_arena_.data() + placed++ * g_.neuron_bytes;
        std::memcpy(to, dest + neuron * g_.neuron_bytes, g_.neuron_bytes);
        hot_[layer * g_.d_ff + neuron] = reinterpret_cast<const float*>(to);
      }
    }
    return "";
  }

  void ResetList() {  // slot 0 least recently used, then 1, ...: free slots are taken in order
    for (int64_t s = 0; s < lru_slots_; ++s) {
      next_[s] = static_cast<int32_t>(s - 1);  // towards the least recently used end
      prev_[s] = s + 1 < lru_slots_ ? static_cast<int32_t>(s + 1) : -1;
    }
    head_ = lru_slots_ > 0 ? static_cast<int32_t>(lru_slots_ - 1) : -1;
    tail_ = lru_slots_ > 0 ? 0 : -1;
  }

  // moves a slot to the most recently used end
  void Touch(int32_t s) {
    if (s == head_) return;
    const int32_t p = prev_[s], nx = next_[s];  // p is nearer the head (more recent), nx nearer the tail
    if (p >= 0) next_[p] = nx;
    if (nx >= 0) prev_[nx] = p;
    if (s == tail_) tail_ = p;
    prev_[s] = -1;
    next_[s] = head_;
    prev_[head_] = s;
    head_ = s;
  }

  Arena hot_arena_, lru_arena_;
  std::vector<const float*> hot_;   // [L * F]: the hot bundle or nullptr
  std::vector<int32_t> lru_slot_;   // [L * F]: the LRU slot or -1
  std::vector<int64_t> owner_;      // [slots]: neuron key or -1 (free)
  std::vector<int64_t> prefetched_;  // [slots]: 1 while read ahead and not yet used
  std::vector<uint8_t> in_flight_;   // [slots]: 1 while a read-ahead into it may still be landing
  std::vector<int32_t> flying_;      // the slots flagged in in_flight_
  std::vector<int32_t> prev_, next_;
  int32_t head_ = -1, tail_ = -1;
  int64_t n_hot_ = 0, lru_slots_ = 0;
  std::vector<int64_t> misses_, offsets_, lengths_;
  std::vector<char*> dests_;
};

// The naive baseline: the pinned layers resident whole (loaded once); any other layer read whole from disk into one
// layer buffer each time it is used (on demand, no prefetch).
class NaiveLayers : public Tier {
 public:
  NaiveLayers(int fd, const Geometry& g, int64_t depth, int64_t chunk, const uint8_t* pinned, std::string* error)
      : Tier(fd, g, depth), chunk_(chunk), place_(g.n_layers, -1) {
    int64_t n_pinned = 0;
    for (int64_t l = 0; l < g.n_layers; ++l)
      if (pinned[l]) place_[l] = n_pinned++;
    n_pinned_ = n_pinned;
    if (!(*error = pinned_.Allocate(n_pinned * g.layer_stride)).empty()) return;
    if (n_pinned < g.n_layers && !(*error = stream_.Allocate(g.layer_stride)).empty()) return;
    reader_.RegisterBuffers({{stream_.data(), stream_.bytes()}});
    for (int64_t l = 0; l < g.n_layers; ++l) {
      if (place_[l] < 0) continue;
      char* dest = pinned_.data() + place_[l] * g.layer_stride;
      if (!(*error = ReadLayers(&l, &dest, 1, chunk)).empty()) return;
    }
    Tier::Reset();
  }

  std::string Resolve(int64_t layer, const int32_t* idx, int64_t n, const float** bundles) override {
    char* base = place_[layer] >= 0 ? pinned_.data() + place_[layer] * g_.layer_stride : stream_.data();
    stats_.accesses += n;
    if (place_[layer] >= 0) {
      stats_.hits += n;
    } else {
      stats_.misses += n;
      if (std::string e = ReadLayers(&layer, &base, 1, chunk_); !e.empty()) return e;
    }
    for (int64_t k = 0; k < n; ++k) bundles[k] = reinterpret_cast<const float*>(base + idx[k] * g_.neuron_bytes);
    return "";
  }

  int64_t ResidentBytes() const override { return pinned_.bytes() + stream_.bytes(); }
  int64_t pinned_layers() const { return n_pinned_; }

 private:
  int64_t chunk_;
  std::vector<int64_t> place_;  // [L]: index among the pinned layers, or -1
  int64_t n_pinned_ = 0;
  Arena pinned_, stream_;
};

// out = sum over the predicted neurons of act(gate . x, up . x) * down, exactly as QuantSparseFfnImpl computes it
// (parts of the index list, three passes per part with rows in groups of four, parts summed in order; the gate
// threshold, -inf for none, decides which up rows are read, as there).
void BundleFfn(ffi::ThreadPool& pool, int64_t threads, const float* xs, const float* const* bundles, int64_t n,
               int64_t d_model, int64_t activation, float gate_threshold, bool gated, float* out) {
  const int64_t up_at = gated ? d_model : 0, down_at = up_at + d_model;
  const float gate_floor = ReluGateFloor(gate_threshold);  // gated bundles are ReGLU or dReLU (int4 predictors)
  std::fill(out, out + d_model, 0.f);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kPartsPerThread * threads, n / 16));
  std::vector<float> partial(static_cast<size_t>((parts - 1) * d_model), 0.f);  // part 0 accumulates into out
  auto dots = [&](const std::vector<const float*>& rows, int64_t at, float* result) {
    const int64_t m = static_cast<int64_t>(rows.size());
    int64_t j = 0;
    for (; j + 3 < m; j += 4) {
      if (j + 7 < m)
        for (int64_t i = j + 4; i < j + 8; ++i) PrefetchHead(rows[i] + at, d_model);
      DotPair2(rows[j] + at, rows[j + 1] + at, rows[j + 2] + at, rows[j + 3] + at, xs, d_model, result + j);
    }
    for (; j < m; ++j) result[j] = Dot(rows[j] + at, xs, d_model);
  };
  ParallelFor(pool, threads, n == 0 ? 0 : parts, [&](int64_t part) {
    const int64_t begin = part * n / parts, end = (part + 1) * n / parts;
    std::vector<const float*> passed;  // bundles whose activated gate passed (all of them when ungated)
    std::vector<float> gates;
    if (gated) {
      std::vector<const float*> all(bundles + begin, bundles + end);
      std::vector<float> g(end - begin);
      dots(all, 0, g.data());
      for (int64_t k = 0; k < end - begin; ++k)
        if (g[k] > gate_floor) {
          passed.push_back(all[k]);
          gates.push_back(g[k]);
        }
    } else {
      passed.assign(bundles + begin, bundles + end);
      gates.assign(passed.size(), 0.f);
    }
    std::vector<float> ups(passed.size());
    dots(passed, up_at, ups.data());
    std::vector<float> coef;
    std::vector<const float*> rows;
    for (size_t j = 0; j < passed.size(); ++j) {
      const float a = Pair(activation, gates[j], ups[j], gate_threshold);
      if (a != 0.f) {
        coef.push_back(a);
        rows.push_back(passed[j] + down_at);
      }
    }
    float* acc = part == 0 ? out : partial.data() + (part - 1) * d_model;
    const int64_t kept = static_cast<int64_t>(coef.size());
    int64_t j = 0;
    for (; j + 3 < kept; j += 4) {
      if (j + 7 < kept)
        for (int64_t i = j + 4; i < j + 8; ++i) PrefetchHead(rows[i], d_model);
      Axpy4(coef.data() + j, rows.data() + j, acc, d_model);
    }
    for (; j < kept; ++j) Axpy(coef[j], rows[j], acc, d_model);
  });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t i = 0; i < d_model; ++i) out[i] += partial[(part - 1) * d_model + i];
}

// One token of one layer: the first `capacity` neurons (ascending) scoring above `threshold`, made resident by the
// tier, then their FFN output.
ffi::Error DiskTierFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scores,
                           int64_t tier, int64_t layer, float threshold, int64_t capacity, int64_t activation,
                           float gate_threshold, int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  Tier* t = reinterpret_cast<Tier*>(tier);
  const Geometry& g = t->geometry();
  if (x.element_count() != static_cast<size_t>(g.d_model) || scores.element_count() != static_cast<size_t>(g.d_ff))
    return ffi::Error::InvalidArgument("x must be [1, D] and scores [1, F] of the tier's geometry");
  if (layer < 0 || layer >= g.n_layers) return ffi::Error::InvalidArgument("layer out of range");
  const float* s = scores.typed_data();
  std::vector<int32_t> idx;
  idx.reserve(capacity);
  for (int64_t f = 0; f < g.d_ff && static_cast<int64_t>(idx.size()) < capacity; ++f)
    if (s[f] > threshold) idx.push_back(static_cast<int32_t>(f));
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<const float*> bundles(n);
  if (std::string e = t->Resolve(layer, idx.data(), n, bundles.data()); !e.empty())
    return ffi::Error::Internal("disk tier: " + e);
  const int64_t start = NowNs();
  BundleFfn(pool, threads, x.typed_data(), bundles.data(), n, g.d_model, activation, gate_threshold, g.rows == 3,
            y->typed_data());
  Stats& stats = t->mutable_stats();
  stats.ffn_ns += NowNs() - start;
  ++stats.calls;
  return ffi::Error::Success();
}

// After layer l's block: the guessed neurons of layer `layer` = l + 1 (scores of its predictor on the residual that
// leaves layer l, before l + 1's attention) start reading; y is the residual passed through, so that the next
// layer's attention, which reads y, runs while the reads are in flight, never before they are issued.
ffi::Error DiskTierPrefetchImpl(ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> scores, int64_t tier, int64_t layer,
                                float threshold, int64_t capacity, ffi::ResultBuffer<ffi::F32> y) {
  Tier* t = reinterpret_cast<Tier*>(tier);
  const Geometry& g = t->geometry();
  if (h.element_count() != static_cast<size_t>(g.d_model) || scores.element_count() != static_cast<size_t>(g.d_ff))
    return ffi::Error::InvalidArgument("h must be [1, D] and scores [1, F] of the tier's geometry");
  if (layer < 0 || layer >= g.n_layers) return ffi::Error::InvalidArgument("layer out of range");
  const float* s = scores.typed_data();
  std::vector<int32_t> idx;
  for (int64_t f = 0; f < g.d_ff && static_cast<int64_t>(idx.size()) < capacity; ++f)
    if (s[f] > threshold) idx.push_back(static_cast<int32_t>(f));
  t->Prefetch(layer, idx.data(), static_cast<int64_t>(idx.size()));
  std::copy(h.typed_data(), h.typed_data() + g.d_model, y->typed_data());
  return ffi::Error::Success();
}

void CopyError(const std::string& message, char* error, int64_t error_bytes) {
  if (error_bytes <= 0) return;
  const size_t n = std::min<size_t>(message.size(), static_cast<size_t>(error_bytes - 1));
  std::memcpy(error, message.data(), n);
  error[n] = '\0';
}

Geometry ToGeometry(const int64_t* v) { return {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]}; }

int OpenDirect(const char* path, char* error, int64_t error_bytes) {
  const int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) CopyError(Errno(std::string("open(O_DIRECT) ") + path, errno), error, error_bytes);
  return fd;
}

template <class T>
void* Finish(T* tier, const std::string& message, char* error, int64_t error_bytes) {
  if (message.empty()) return tier;
  delete tier;
  CopyError(message, error, error_bytes);
  return nullptr;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiskTierFfn, DiskTierFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [1, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // int4 scores [1, F]
                                  .Attr<int64_t>("tier")         // the Tier* of sparse_lm.offload.disk_cache
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("threshold")
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("gate_threshold")  // -inf: none
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [1, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiskTierPrefetch, DiskTierPrefetchImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h [1, D]: the residual leaving layer - 1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // guessed int4 scores of `layer` [1, F]
                                  .Attr<int64_t>("tier")
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("threshold")
                                  .Attr<int64_t>("capacity")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // h, passed through

// The C interface for ctypes (sparse_lm.offload.disk): creation returns nullptr and writes the reason to `error`.
extern "C" {

void* dt_cache_create(const char* path, const int64_t* geometry, int64_t depth, int64_t chunk, const int64_t* hot_keys,
                      int64_t n_hot, int64_t lru_slots, char* error, int64_t error_bytes) {
  const int fd = OpenDirect(path, error, error_bytes);
  if (fd < 0) return nullptr;
  std::string message;
  auto* cache = new NeuronCache(fd, ToGeometry(geometry), depth, chunk, hot_keys, n_hot, lru_slots, &message);
  return Finish(cache, message, error, error_bytes);
}

void* dt_naive_create(const char* path, const int64_t* geometry, int64_t depth, int64_t chunk, const uint8_t* pinned,
                      char* error, int64_t error_bytes) {
  const int fd = OpenDirect(path, error, error_bytes);
  if (fd < 0) return nullptr;
  std::string message;
  auto* naive = new NaiveLayers(fd, ToGeometry(geometry), depth, chunk, pinned, &message);
  return Finish(naive, message, error, error_bytes);
}

void dt_destroy(void* tier) { delete static_cast<Tier*>(tier); }

// Makes the n neurons of `layer` resident as a decode step would and writes their bundles' addresses; 0 or -1.
int dt_resolve(void* tier, int64_t layer, const int32_t* idx, int64_t n, const float** bundles, char* error,
               int64_t error_bytes) {
  const std::string e = static_cast<Tier*>(tier)->Resolve(layer, idx, n, bundles);
  CopyError(e, error, error_bytes);
  return e.empty() ? 0 : -1;
}

void dt_reset(void* tier) { static_cast<Tier*>(tier)->Reset(); }

// accesses, hits, misses, bytes read, reads, resident bytes, io_uring in use, queue depth, read ns, FFN ns, calls,
// prefetch reads, prefetch used, registered buffers in use
void dt_stats(void* tier, int64_t* out) {
  auto* t = static_cast<Tier*>(tier);
  const Stats& s = t->stats();
  const int64_t values[] = {s.accesses, s.hits, s.misses, s.bytes_read, s.reads, t->ResidentBytes(),
                            t->reader().uses_io_uring() ? 1 : 0, t->reader().depth(), s.read_ns, s.ffn_ns, s.calls,
                            s.prefetch_reads, s.prefetch_used, t->reader().registered() ? 1 : 0};
  std::copy(values, values + 14, out);
}

// Starts reading ahead neurons idx of `layer` (ascending) as a decode step's prefetch does.
void dt_prefetch(void* tier, int64_t layer, const int32_t* idx, int64_t n) {
  static_cast<Tier*>(tier)->Prefetch(layer, idx, n);
}

int64_t dt_where(void* tier, int64_t layer, int64_t neuron) {
  return static_cast<NeuronCache*>(tier)->Where(layer, neuron);
}

int64_t dt_lru_order(void* tier, int64_t* out) { return static_cast<NeuronCache*>(tier)->LruOrder(out); }

int64_t dt_pinned_layers(void* tier) { return static_cast<NaiveLayers*>(tier)->pinned_layers(); }

// A bare reader for measurements and tests: reads n aligned ranges of `path` with O_DIRECT at `depth` in flight.
// Returns 0 or -1 (reason in `error`); `uring` says whether io_uring was used.
int dt_read_ranges(const char* path, int64_t depth, const int64_t* offsets, const int64_t* lengths, char* const* dests,
                   int64_t n, int64_t* uring, char* error, int64_t error_bytes) {
  const int fd = OpenDirect(path, error, error_bytes);
  if (fd < 0) return -1;
  int status = 0;
  {
    Reader reader(fd, depth);
    *uring = reader.uses_io_uring() ? 1 : 0;
    const std::string e = reader.Read(offsets, lengths, dests, n);
    CopyError(e, error, error_bytes);
    status = e.empty() ? 0 : -1;
  }
  close(fd);
  return status;
}

}  // extern "C"
