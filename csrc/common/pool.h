// The one CPU thread pool every kernel family runs its parallel loops on (q4, dense GEMV, attention, RVQ,
// the q4 repack). No OpenMP: the pool's size is our own setting, not OMP_NUM_THREADS.
//
//   parallel_chunks(chunks, fn, ctx, 0)        runs fn(ctx, c) for every c in [0, chunks), then returns
//   parallel_for(chunks, [&](int64_t c) {..})  the same with a lambda
//
// Contract:
// - The caller claims chunks itself, beside any idle pool workers; it returns once every chunk has finished
//   and waits only for chunks some thread has actually started. A job whose helpers never get a core is run
//   by its caller alone (one-thread speed, not a stall).
// - Several callers (e.g. an audio encoder on one Python thread while the backbone decodes on another) run
//   their jobs at the same time: a second job is never queued behind the first; it runs on its own caller's
//   thread and on whatever workers are idle.
// - A job whose caller waited long for a chunk held by a thread that lost its core (another process took
//   it) makes the next jobs run on fewer threads for a while (back-off; a size change resets it).
// - No spin barrier: waiting workers poll for a few microseconds, then sleep; a caller whose last chunks run
//   elsewhere polls briefly, then sleeps until they finish (freeing its core for the thread it waits on).
// - An exception thrown by fn is caught wherever it happens; the remaining chunks are skipped (claimed, not
//   run) and the first exception is rethrown in the caller once no thread is inside fn any more.
// - fn must not assume which thread runs a chunk: per-thread scratch is thread_local.
#pragma once
#include <cstdint>

namespace oe {

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// Threads a job started on this thread may use, the caller included: the pool size (set_num_threads; by
// default the CPUs this process may run on), lowered by any ScopedMaxThreads active on this thread.
int num_threads();
// Pool size, n >= 1; n <= 0 restores the default (the CPUs in this process's affinity mask).
void set_num_threads(int n);
// The default pool size: CPUs in this process's affinity mask (sched_getaffinity), at least 1.
int default_num_threads();

// max_threads > 0 caps this one job (the caller included); 0 = num_threads(). (No default argument: the q4
// drivers' three-argument q4::parallel_chunks, kept as their name for this, must not be ambiguous with it.)
void parallel_chunks(int64_t chunks, ChunkFn fn, void* ctx, int max_threads);

template <class F>
void parallel_for(int64_t chunks, const F& f, int max_threads = 0) {
  parallel_chunks(
      chunks, [](void* c, int64_t i) { (*static_cast<const F*>(c))(i); }, const_cast<F*>(&f), max_threads);
}

// Caps the jobs this thread starts while the object lives (nested scopes take the smaller cap; 0 = no cap).
// Per calling thread, so it never changes what a concurrent caller gets. Example: a 0.2 MB decode GEMV runs
// on its caller alone, since handing it to other threads costs more than it saves.
class ScopedMaxThreads {
 public:
  explicit ScopedMaxThreads(int n);
  ~ScopedMaxThreads();
  ScopedMaxThreads(const ScopedMaxThreads&) = delete;
  ScopedMaxThreads& operator=(const ScopedMaxThreads&) = delete;

 private:
  int saved_;
};

// Counters for tests and `omni-edge info`.
struct PoolStats {
  int size;              // num_threads() without a scope cap
  int workers;           // worker threads started so far (at most size - 1 take part in jobs)
  int64_t jobs;          // jobs posted to the workers
  int64_t inline_jobs;   // multi-chunk jobs run on the caller alone (one thread, or every job slot busy)
  int64_t helped_chunks; // chunks run by workers rather than callers
  int64_t caller_sleeps; // times a caller slept waiting for chunks running elsewhere
  int64_t stalls;        // jobs whose caller waited far longer than a chunk for another thread (lost its core)
  int64_t backoff_jobs;  // jobs run at half width after a stall (see pool.cpp, back-off)
};
PoolStats pool_stats();

}  // namespace oe
