//! A spare `String` kept per thread between requests, so that the request path reuses one
//! allocation instead of making one per request.

use std::cell::Cell;
use std::thread::LocalKey;

/// A per-thread spare `String`: [`take`](Self::take) it for a request, [`give_back`] its
/// allocation when the request is done.
///
/// It is taken out for the request's whole duration (a request may resume on another thread),
/// so requests in flight on one thread at once each have their own: one that finds none gets a
/// new `String`, as without the spare. Strings longer than [`SpareString::KEEP_AT_MOST`] are not
/// kept, so one huge identifier never pins a huge buffer to a thread.
///
/// Each use declares its own `thread_local!` cell, so two spares never hand each other's
/// buffer out:
///
/// ```
/// use std::cell::Cell;
///
/// use ratelimit_adapter::SpareString;
///
/// thread_local! {
///     static CELL: Cell<String> = const { Cell::new(String::new()) };
/// }
/// static SPARE: SpareString = SpareString::new(&CELL);
///
/// let mut buffer = SPARE.take();
/// buffer.push_str("203.0.113.9");
/// SPARE.give_back(buffer);
/// assert!(SPARE.take().is_empty());
/// ```
///
/// [`give_back`]: Self::give_back
#[derive(Debug)]
pub struct SpareString {
    cell: &'static LocalKey<Cell<String>>,
}

impl SpareString {
    /// Strings whose capacity is above this are dropped rather than kept (an identifier or a
    /// bucket key is at most a few hundred bytes).
    pub const KEEP_AT_MOST: usize = 1024;

    /// A spare held in `cell`.
    pub const fn new(cell: &'static LocalKey<Cell<String>>) -> Self {
        Self { cell }
    }

    /// The thread's spare, emptied (a new `String` when another request has it).
    ///
    /// Inlined, so that a caller's `static` spare reaches its thread-local cell directly rather
    /// than through `LocalKey`'s accessor pointer.
    #[inline]
    pub fn take(&self) -> String {
        let mut buffer = self.cell.with(Cell::take);
        buffer.clear();
        buffer
    }

    /// Keeps `buffer`'s allocation for the thread's next request, unless it is too large.
    #[inline]
    pub fn give_back(&self, buffer: String) {
        if buffer.capacity() <= Self::KEEP_AT_MOST {
            self.cell.with(|cell| cell.set(buffer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static CELL: Cell<String> = const { Cell::new(String::new()) };
    }
    static SPARE: SpareString = SpareString::new(&CELL);

    #[test]
    fn a_buffer_given_back_is_reused_empty() {
        let mut buffer = SPARE.take();
        buffer.push_str("rate_limit:ip:203.0.113.9:GET /x");
        let pointer = buffer.as_ptr();
        SPARE.give_back(buffer);
        let again = SPARE.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), pointer);
    }

    #[test]
    fn a_huge_buffer_is_not_kept() {
        // An attacker's 64 KiB identifier must not stay allocated per thread.
        let mut huge = SPARE.take();
        huge.push_str(&"a".repeat(64 * 1024));
        SPARE.give_back(huge);
        assert!(SPARE.take().capacity() <= SpareString::KEEP_AT_MOST);
    }

    #[test]
    fn a_request_that_finds_the_spare_taken_gets_its_own() {
        let mut first = SPARE.take();
        first.push_str("first");
        let second = SPARE.take();
        assert!(second.is_empty());
        assert_eq!(first, "first");
    }
}
