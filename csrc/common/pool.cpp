// The CPU thread pool (pool.h).
//
// Why not OpenMP: an OpenMP parallel-for ends in a barrier that every team thread must reach, and its waiting
// threads spin. On a machine whose cores are shared with other work, a 1 ms decode matmul then lasts until the
// slowest team thread has had a time slice: measured on a 2-core machine with another busy process, fp32
// prefill ran at 9-11 tok/s on 2 OpenMP threads against 170-218 tok/s on one. Here a job is a counter of
// chunks that any thread may claim; the caller claims chunks too, so the job never depends on a worker
// being scheduled, and it waits only for chunks that some thread has already started.
//
// Job slots. A job lives in one of kSlots pool-owned slots while it runs, so concurrent callers do not queue
// behind each other: each takes a free slot (if every slot is busy, the job runs on its caller alone).
// `next` packs (generation << 32 | next unclaimed chunk). A chunk is claimed by a CAS that checks the
// generation, so a late worker can never claim a chunk of a finished job (every job gets a new generation,
// and a finished job has every chunk claimed). `done` counts finished chunks; the caller returns when
// done == chunks, which covers every chunk a worker claimed, so the job's function and context outlive every
// call of them. A worker joins a job under the pool mutex (at most `wanted` workers per job) and then claims
// its chunks without locks.
//
// Back-off (judge() below): jobs whose caller had to wait for a chunk held by a thread that lost its core make
// the next jobs use fewer threads, so two threads under contention cost about what one does.
//
// Waiting. Workers poll for a new job for a few tens of microseconds (back-to-back decode matmuls arrive that
// fast), then sleep on a condition variable. A caller that has run out of chunks to claim polls for a short
// while, then sleeps until the thread running the last chunk wakes it: a sleeping caller leaves its core
// free, so the scheduler can move a worker that lost its own core to another process onto it.
#include "common/pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OE_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define OE_PAUSE() asm volatile("yield")
#else
#define OE_PAUSE() ((void)0)
#endif

namespace oe {
namespace {

constexpr int kSlots = 8;              // jobs that can run at once with helpers; more run on their callers
constexpr int kWorkerSpins = 2000;     // ~20-60 us of polling for the next job before a worker sleeps
constexpr int kCallerSpins = 2000;     // ~20-60 us of polling for the last chunks before a caller sleeps
constexpr int64_t kMaxJobChunks = int64_t{1} << 31;  // chunk indices fit the low half of `next`
constexpr int kMinBackoff = 16;                       // reduced width for 16x the first stall's wait
constexpr int kMaxBackoff = 1024;                     // ... and at most 1024x after stalls in a row
constexpr int64_t kMaxBackoffNs = 2'000'000'000;      // but never longer than 2 s

thread_local int tl_cap = 0;            // ScopedMaxThreads: 0 = no cap
thread_local bool tl_is_worker = false; // nested jobs on a worker run inline
std::atomic<bool> g_forked_child{false};

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned h = std::thread::hardware_concurrency();
  return h > 0 ? static_cast<int>(h) : 1;
}

struct Slot {
  std::atomic<uint64_t> next{0};  // generation << 32 | next unclaimed chunk
  std::atomic<int64_t> done{0};   // finished (or skipped) chunks
  std::atomic<bool> failed{false};
  std::atomic<bool> waiting{false};  // the caller sleeps on done_cv
  std::condition_variable done_cv;
  // The fields below are guarded by Pool::mu_.
  bool busy = false;
  uint32_t gen = 0;
  ChunkFn fn = nullptr;
  void* ctx = nullptr;
  int64_t chunks = 0;
  int wanted = 0;   // workers this job may take
  int helpers = 0;  // workers that joined it
  std::exception_ptr error;
};

class Pool {
 public:
  Pool() : size_(affinity_cpus()) {}

  int size() const { return size_.load(std::memory_order_relaxed); }

  void set_size(int n) {
    std::lock_guard<std::mutex> lk(mu_);
    size_.store(n > 0 ? n : affinity_cpus(), std::memory_order_relaxed);
    backoff_until_ns_.store(0);
    backoff_mult_.store(kMinBackoff);
    epoch_.fetch_add(1);
    cv_.notify_all();
    park_cv_.notify_all();
  }

  void run(int64_t chunks, ChunkFn fn, void* ctx, int threads) {
    if (chunks <= 0) return;
    bool probe = threads > 1;  // a job at full width: its outcome adjusts the back-off
    if (threads > 1 && now_ns() < backoff_until_ns_.load(std::memory_order_relaxed)) {
      backoff_jobs_.fetch_add(1, std::memory_order_relaxed);
      threads /= 2;
      probe = false;
    }
    if (threads <= 1 || chunks == 1 || tl_is_worker || g_forked_child.load(std::memory_order_relaxed)) {
      if (chunks > 1) inline_jobs_.fetch_add(1, std::memory_order_relaxed);
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    Slot* s = nullptr;
    uint32_t gen = 0;
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (Slot& cand : slots_)
        if (!cand.busy) {
          s = &cand;
          break;
        }
      if (s != nullptr) {
        start_workers(threads - 1);
        gen = ++gen_counter_;
        if (gen == 0) gen = ++gen_counter_;  // 0 never names a job
        s->busy = true;
        s->gen = gen;
        s->fn = fn;
        s->ctx = ctx;
        s->chunks = chunks;
        s->wanted = threads - 1;
        s->helpers = 0;
        s->error = nullptr;
        s->failed.store(false, std::memory_order_relaxed);
        s->waiting.store(false, std::memory_order_relaxed);
        s->done.store(0, std::memory_order_relaxed);
        s->next.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
        epoch_.fetch_add(1);
        const int wake = std::min(sleepers_, s->wanted);
        for (int i = 0; i < wake; ++i) cv_.notify_one();
      }
    }
    if (s == nullptr) {  // every slot busy: this job runs here alone
      inline_jobs_.fetch_add(1, std::memory_order_relaxed);
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    jobs_.fetch_add(1, std::memory_order_relaxed);
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t own = work(*s, gen, fn, ctx, chunks);
    const auto t1 = std::chrono::steady_clock::now();
    // Wait for the chunks other threads started: poll briefly, then sleep until the last one wakes us.
    int spins = 0;
    while (s->done.load(std::memory_order_acquire) < chunks && spins < kCallerSpins) {
      OE_PAUSE();
      ++spins;
    }
    std::unique_lock<std::mutex> lk(mu_);
    if (s->done.load(std::memory_order_acquire) < chunks) {
      caller_sleeps_.fetch_add(1, std::memory_order_relaxed);
      s->waiting.store(true);  // seq_cst, paired with the finishing thread's done increment and load
      s->done_cv.wait(lk, [&] { return s->done.load() >= chunks; });
      s->waiting.store(false);
    }
    std::exception_ptr err = s->error;
    s->error = nullptr;
    s->busy = false;
    lk.unlock();
    if (probe) judge(own, t1 - t0, std::chrono::steady_clock::now() - t1);
    if (err) std::rethrow_exception(err);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lk(mu_);
    PoolStats st;
    st.size = size();
    st.workers = static_cast<int>(workers_.size());
    st.jobs = jobs_.load();
    st.inline_jobs = inline_jobs_.load();
    st.helped_chunks = helped_chunks_.load();
    st.caller_sleeps = caller_sleeps_.load();
    st.stalls = stalls_.load();
    st.backoff_jobs = backoff_jobs_.load();
    return st;
  }

 private:
  // Back-off. A caller that has run out of chunks waits for the ones other threads hold; if a holder lost its
  // core to other work, that wait is a scheduler time slice or more, far longer than the chunk. After such a
  // stall (a wait W longer than three of the caller's own chunks plus 200 us), jobs run at half width for
  // mult x W of wall time (at most kMaxBackoffNs); mult doubles with every stall in a row (up to kMaxBackoff)
  // and returns to kMinBackoff after a full-width job without one. Under steady contention the probes cost
  // about 1/mult of the time, so two threads cost about what one does; on a quiet machine jobs run at full
  // width. Time rather than a job count, so that a few long prefill jobs and many short decode jobs alike
  // pay a small fraction for the probes.
  template <class D>
  void judge(int64_t own_chunks, D own_time, D wait_time) {
    using us = std::chrono::duration<double, std::micro>;
    const double own_us = us(own_time).count(), wait_us = us(wait_time).count();
    const double per_chunk = own_chunks > 0 ? own_us / static_cast<double>(own_chunks) : own_us;
    if (wait_us > 3.0 * per_chunk + 200.0) {
      stalls_.fetch_add(1, std::memory_order_relaxed);
      const int mult = backoff_mult_.load(std::memory_order_relaxed);
      const double span_ns = std::min(static_cast<double>(kMaxBackoffNs), mult * wait_us * 1e3);
      backoff_until_ns_.store(now_ns() + static_cast<int64_t>(span_ns), std::memory_order_relaxed);
      backoff_mult_.store(std::min(2 * mult, kMaxBackoff), std::memory_order_relaxed);
    } else {
      backoff_mult_.store(kMinBackoff, std::memory_order_relaxed);
    }
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // Claims and runs chunks of the job (slot, generation) until none is left; returns how many it ran.
  int64_t work(Slot& s, uint32_t gen, ChunkFn fn, void* ctx, int64_t chunks) {
    int64_t ran = 0;
    uint64_t c = s.next.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(c >> 32) != gen || static_cast<int64_t>(c & 0xffffffffu) >= chunks) return ran;
      if (!s.next.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      if (!s.failed.load(std::memory_order_relaxed)) {
        try {
          fn(ctx, static_cast<int64_t>(c & 0xffffffffu));
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu_);
          if (!s.error) s.error = std::current_exception();
          s.failed.store(true, std::memory_order_relaxed);
        }
      }
      ++ran;
      if (s.done.fetch_add(1) + 1 == chunks && s.waiting.load()) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller is asleep (or about to be): wake it
        s.done_cv.notify_all();
      }
      c = s.next.load(std::memory_order_acquire);
    }
  }

  // Called with mu_ held: make sure `n` workers exist (fewer if the system refuses threads).
  void start_workers(int n) {
    try {
      while (static_cast<int>(workers_.size()) < n) {
        const int index = static_cast<int>(workers_.size());
        workers_.emplace_back([this, index] { worker(index); });
        workers_.back().detach();  // never joined: the pool lives until the process ends
      }
    } catch (const std::exception&) {
      // no more threads available: jobs run with the workers there are (their callers alone, at worst)
    }
  }

  // Called with mu_ held: a job this worker may join, or nullptr.
  Slot* pick(uint32_t* gen) {
    for (Slot& s : slots_) {
      if (!s.busy || s.helpers >= s.wanted) continue;
      const uint64_t c = s.next.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(c >> 32) != s.gen || static_cast<int64_t>(c & 0xffffffffu) >= s.chunks) continue;
      ++s.helpers;
      *gen = s.gen;
      return &s;
    }
    return nullptr;
  }

  void worker(int index) {
    tl_is_worker = true;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      if (index >= size() - 1) {  // the pool was made smaller: park until it grows again
        park_cv_.wait(lk, [&] { return index < size() - 1; });
        continue;
      }
      uint32_t gen = 0;
      Slot* s = pick(&gen);
      if (s != nullptr) {
        const ChunkFn fn = s->fn;
        void* const ctx = s->ctx;
        const int64_t chunks = s->chunks;
        lk.unlock();
        const int64_t ran = work(*s, gen, fn, ctx, chunks);
        helped_chunks_.fetch_add(ran, std::memory_order_relaxed);
        lk.lock();
        continue;
      }
      // Nothing to join: poll for a new job without the lock, then sleep.
      const uint64_t e = epoch_.load();
      lk.unlock();
      for (int i = 0; i < kWorkerSpins && epoch_.load(std::memory_order_relaxed) == e; ++i) OE_PAUSE();
      lk.lock();
      if (epoch_.load() == e) {
        ++sleepers_;
        cv_.wait(lk, [&] { return epoch_.load() != e; });
        --sleepers_;
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;       // idle workers
  std::condition_variable park_cv_;  // workers beyond the current size
  std::vector<std::thread> workers_;
  Slot slots_[kSlots];
  std::atomic<int> size_;
  std::atomic<uint64_t> epoch_{0};  // bumped on every new job and size change
  int sleepers_ = 0;
  uint32_t gen_counter_ = 0;
  std::atomic<int64_t> jobs_{0}, inline_jobs_{0}, helped_chunks_{0}, caller_sleeps_{0}, stalls_{0}, backoff_jobs_{0};
  std::atomic<int64_t> backoff_until_ns_{0};    // jobs run at reduced width until then (steady clock)
  std::atomic<int> backoff_mult_{kMinBackoff};  // the next back-off lasts mult x the stall
};

Pool& pool() {
  static Pool* p = [] {
#if defined(__linux__)
    // A forked child has none of the workers (and may have inherited a held lock): it runs every job inline.
    pthread_atfork(nullptr, nullptr, [] { g_forked_child.store(true); });
#endif
    return new Pool();  // never destroyed: detached workers use it until the process ends
  }();
  return *p;
}

struct Offset {
  ChunkFn fn;
  void* ctx;
  int64_t base;
};

}  // namespace

int default_num_threads() { return affinity_cpus(); }

int num_threads() {
  const int n = pool().size();
  return tl_cap > 0 && tl_cap < n ? tl_cap : n;
}

void set_num_threads(int n) { pool().set_size(n); }

void parallel_chunks(int64_t chunks, ChunkFn fn, void* ctx, int max_threads) {
  int threads = num_threads();
  if (max_threads > 0 && max_threads < threads) threads = max_threads;
  for (int64_t base = 0; base < chunks; base += kMaxJobChunks) {  // one job per 2^31 chunks
    const int64_t n = std::min(chunks - base, kMaxJobChunks);
    if (base == 0 && n == chunks) {
      pool().run(n, fn, ctx, threads);
    } else {
      Offset o{fn, ctx, base};
      pool().run(
          n, [](void* p, int64_t c) { const Offset& q = *static_cast<Offset*>(p); q.fn(q.ctx, q.base + c); }, &o,
          threads);
    }
  }
}

ScopedMaxThreads::ScopedMaxThreads(int n) : saved_(tl_cap) {
  if (n > 0 && (tl_cap <= 0 || n < tl_cap)) tl_cap = n;
}

ScopedMaxThreads::~ScopedMaxThreads() { tl_cap = saved_; }

PoolStats pool_stats() { return pool().stats(); }

}  // namespace oe
