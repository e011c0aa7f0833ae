// A small work-claiming thread pool for the q4 CPU kernels.
//
// Why not an OpenMP parallel-for: an OpenMP region ends in a barrier that every team thread must reach, so a
// call lasts until the slowest thread has been scheduled at least once. On a machine whose cores are shared
// with other work (other pipeline stages' thread pools, other processes) a decode GEMV of ~1 ms then waits
// for a scheduler time slice on most calls: measured on a 2-core machine under load, 2-thread OpenMP calls
// took ~20 ms median against 1.5 ms on one thread. Here the caller claims chunks itself and waits only for
// chunks some thread has actually started; a worker that wakes after every chunk is claimed does nothing.
//
// Protocol. `next` packs (generation << 32 | next unclaimed chunk). A chunk is claimed by a CAS that checks the
// generation, so a late worker can never claim a chunk of a job that has finished (the caller bumps the
// generation on every job, and a finished job has every chunk claimed). `done` counts finished chunks; the
// caller returns when done == chunks, which covers every chunk a worker claimed, so the job's function and
// context stay alive while any worker runs them. Workers spin briefly for the next job (back-to-back decode
// matmuls arrive within microseconds), then sleep on a condition variable.
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OE_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define OE_PAUSE() asm volatile("yield")
#else
#define OE_PAUSE() ((void)0)
#endif

#include "common/cpu_features.h"
#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {

constexpr int kWorkerSpins = 4000;  // roughly 50-100 us of polling before a worker sleeps
constexpr int kCallerSpinsBeforeYield = 2000;

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t chunks, int threads, ChunkFn fn, void* ctx) {
    if (chunks <= 0) return;
    if (threads <= 1 || chunks == 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);  // one job at a time; concurrent callers queue here
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      try {
        while (static_cast<int>(workers_.size()) < threads - 1) {
          const int index = static_cast<int>(workers_.size());
          workers_.emplace_back([this, index] { worker(index); });
        }
      } catch (const std::exception&) {
        // no more threads available: run with the workers there are (the caller alone, at worst)
      }
      gen = ++gen_counter_;
      fn_ = fn;
      ctx_ = ctx;
      chunks_ = chunks;
      wanted_ = threads - 1;
      done_.store(0, std::memory_order_relaxed);
      next_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_relaxed);
      gen_.store(gen, std::memory_order_release);
      if (sleepers_ > 0) cv_.notify_all();
    }
    work(gen, fn, ctx, chunks);
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < chunks) {
      if (++spins < kCallerSpinsBeforeYield) {
        OE_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  void work(uint32_t gen, ChunkFn fn, void* ctx, int64_t chunks) {
    uint64_t c = next_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(c >> 32) != gen || static_cast<int64_t>(c & 0xffffffffu) >= chunks) return;
      if (next_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn(ctx, static_cast<int64_t>(c & 0xffffffffu));
        done_.fetch_add(1, std::memory_order_release);
        c = next_.load(std::memory_order_acquire);
      }
    }
  }

  void worker(int index) {  // index: this worker's rank (0-based); it joins jobs that want > index workers
    uint32_t seen = 0;
    for (;;) {
      // poll for a new job, then sleep
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen && spins < kWorkerSpins) {
        OE_PAUSE();
        ++spins;
      }
      ChunkFn fn;
      void* ctx;
      int64_t chunks;
      uint32_t gen;
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (gen_.load(std::memory_order_relaxed) == seen && !stop_) {
          ++sleepers_;
          cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_relaxed) != seen; });
          --sleepers_;
        }
        if (stop_) return;
        gen = gen_.load(std::memory_order_relaxed);
        seen = gen;
        if (index >= wanted_) continue;  // fewer threads requested for this job
        fn = fn_;
        ctx = ctx_;
        chunks = chunks_;
      }
      work(gen, fn, ctx, chunks);
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  int sleepers_ = 0;
  uint32_t gen_counter_ = 0;
  std::atomic<uint32_t> gen_{0};
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t chunks_ = 0;
  int wanted_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: worker threads must not be joined during static teardown
  return *p;
}

}  // namespace

void parallel_chunks(int64_t chunks, ChunkFn fn, void* ctx) { pool().run(chunks, num_threads(), fn, ctx); }

}  // namespace q4
}  // namespace oe
