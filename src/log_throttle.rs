//! Rate-limited logging for events a stranger can cause at will (failed handshakes, malformed
//! frames, refused connections): one line per event is what an operator needs, 32,000 lines a
//! second is a way to fill a disk.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one throttle lets through per window, at most.
pub const LINES_PER_WINDOW_MAX: u32 = 10;

/// Length of a throttle's window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Lets [`LINES_PER_WINDOW_MAX`] lines through per [`WINDOW`]; counts the rest.
#[derive(Debug)]
pub struct LogThrottle {
    window: Mutex<Window>,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LogThrottle {
    /// A throttle with an empty window.
    pub const fn new() -> LogThrottle {
        LogThrottle {
            window: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the last
    /// one (log it with the line); `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if w.started.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < LINES_PER_WINDOW_MAX {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_window_are_counted_not_logged() {
        let t = LogThrottle::new();
        for _ in 0..LINES_PER_WINDOW_MAX {
            assert_eq!(t.allow(), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(t.allow(), None);
        }
        // The next window reports what was held back.
        t.window.lock().unwrap().started = Some(Instant::now() - WINDOW);
        assert_eq!(t.allow(), Some(5));
    }
}
