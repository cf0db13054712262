//! The binaries' memory allocator: mimalloc, tuned for a small box.
//!
//! Why not glibc's malloc: a push hands every record from the thread that checks it
//! to the thread that holds the transaction, so most blocks are freed by a thread
//! other than the one that made them, and glibc locks the making thread's arena for
//! each such free (perf of `bench apply`: `_int_free` and lock wake-ups on both
//! threads). mimalloc frees into the owning page without a lock. Measured in
//! BENCHMARKS.md ("An allocator for blocks that cross threads").
//!
//! The tuning keeps a clinic's resident memory where glibc's was: mimalloc's
//! defaults commit its arena up front and give freed pages back to the kernel a
//! second later, which held a clinic pushing 100,000 records at 54 MiB resident
//! instead of 25. [`tune`] makes both off by default before the program allocates in
//! earnest (mimalloc's `MIMALLOC_*` variables still override it).
//!
//! The binaries (`src/main.rs`, `src/bin/clinicsync-bench.rs`) install it with
//! [`install_allocator!`](crate::install_allocator), which also runs [`tune`] before
//! the program's first allocation; the library and its tests run on the system
//! allocator.

use std::os::raw::{c_int, c_long};

pub use mimalloc::MiMalloc;

/// Makes mimalloc the program's allocator and runs [`tune`] from the program's
/// constructors (`.init_array`), which the dynamic loader runs ahead of `main` and
/// of the runtime's first allocation: mimalloc lays out its first arena then, so
/// a [`tune`] called from `main` comes too late (a clinic's push measured at 39.6
/// MiB resident instead of 27.4). Used once, at the top of a binary's `main.rs`.
#[macro_export]
macro_rules! install_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::allocator::MiMalloc = $crate::allocator::MiMalloc;

        #[cfg(target_os = "linux")]
        #[used]
        #[link_section = ".init_array"]
        static TUNE_ALLOCATOR: extern "C" fn() = {
            extern "C" fn tune() {
                $crate::allocator::tune();
            }
            tune
        };
    };
}

/// mimalloc's option numbers (`mi_option_e` in `include/mimalloc.h` of mimalloc
/// 3.x, which libmimalloc-sys builds by default): the bindings name only the 2.x
/// ones. [`MIMALLOC_VERSION_LINE`] pins the major version they are read from.
const ARENA_EAGER_COMMIT: c_int = 4;
const PURGE_DELAY: c_int = 15;

/// How long freed pages wait before they go back to the kernel, in ms (mimalloc
/// 3's default is 1,000; 2.x's was 10). Measured side by side (BENCHMARKS.md): 0
/// costs the hub's apply a sixth of its rate in `madvise` calls; 10 keeps nearly
/// all of it and a clinic's resident memory flat.
const PURGE_DELAY_MS: c_long = 10;

/// The mimalloc line (`mi_version() / 100`) whose option numbers are above.
pub const MIMALLOC_VERSION_LINE: c_int = 3;

/// Sets mimalloc's defaults for this process: arenas committed as they are used,
/// not up front, and freed pages given back to the kernel after
/// [`PURGE_DELAY_MS`], not a second. They are defaults, not settings: mimalloc's
/// own variables (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`) still
/// override them, as mimalloc documents, for whoever measures another choice.
/// Call before starting threads. Does nothing when the linked mimalloc is not of
/// [`MIMALLOC_VERSION_LINE`] (its option numbers may mean other options there).
pub fn tune() {
    // SAFETY: mi_version reads a constant; mi_option_set_default writes one entry
    // of mimalloc's option table unless the environment set it, by a number
    // checked against the version above (not thread safe: called before any
    // thread is started).
    unsafe {
        if libmimalloc_sys::mi_version() / 10_000 != MIMALLOC_VERSION_LINE {
            return;
        }
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, PURGE_DELAY_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_name_the_options_tune_means() {
        // A crate update to another mimalloc line must be read again, not skipped
        // silently by `tune`.
        // SAFETY: reads a constant and mimalloc's option table.
        let version = unsafe { libmimalloc_sys::mi_version() };
        assert_eq!(
            version / 10_000,
            MIMALLOC_VERSION_LINE,
            "mimalloc {version}"
        );
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        // Their defaults in mimalloc 3.x's `src/options.c`: eager commit "2" (on where
        // the OS overcommits), purge delay 1,000 ms. Another option under either
        // number would not start at both.
        assert_eq!((get(ARENA_EAGER_COMMIT), get(PURGE_DELAY)), (2, 1000));
        tune();
        assert_eq!(
            (get(ARENA_EAGER_COMMIT), get(PURGE_DELAY)),
            (0, PURGE_DELAY_MS)
        );
    }
}
