//! Telling a crash loop from one failure: a unit that failed, or that systemd restarted more
//! than `max_restarts` times within `window`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::UnitState;

pub struct CrashLoop {
    window: Duration,
    max_restarts: u32,
    seen: VecDeque<(Instant, u32)>,
}

impl CrashLoop {
    pub fn new(window: Duration, max_restarts: u32) -> CrashLoop {
        CrashLoop { window, max_restarts, seen: VecDeque::new() }
    }

    /// Feeds a state; returns a reason when the unit is failing.
    pub fn observe(&mut self, state: &UnitState, now: Instant) -> Option<String> {
        if state.is_failed() {
            return Some(format!("{} is {} ({})", state.name, state.active_state, state.sub_state));
        }
        if let Some(n) = state.n_restarts {
            self.seen.push_back((now, n));
            while self.seen.front().is_some_and(|(t, _)| now.duration_since(*t) > self.window) {
                self.seen.pop_front();
            }
            let first = self.seen.front().map(|(_, n)| *n).unwrap_or(n);
            if n.saturating_sub(first) >= self.max_restarts {
                return Some(format!("{} restarted {} times within {:?}", state.name, n - first, self.window));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(active: &str, n: u32) -> UnitState {
        UnitState {
            name: "x.service".into(),
            load_state: "loaded".into(),
            active_state: crate::ActiveState::parse(active),
            sub_state: "running".into(),
            unit_file_state: "enabled".into(),
            n_restarts: Some(n),
            since_us: 0,
        }
    }

    #[test]
    fn failure_and_restart_bursts() {
        let t0 = Instant::now();
        let mut c = CrashLoop::new(Duration::from_secs(10), 3);
        assert!(c.observe(&state("active", 0), t0).is_none());
        assert!(c.observe(&state("activating", 2), t0 + Duration::from_secs(1)).is_none());
        assert!(c.observe(&state("activating", 3), t0 + Duration::from_secs(2)).is_some());
        let mut slow = CrashLoop::new(Duration::from_secs(10), 3);
        for (i, n) in [0u32, 1, 2, 3, 4].iter().enumerate() {
            assert!(
                slow.observe(&state("active", *n), t0 + Duration::from_secs(20 * i as u64)).is_none(),
                "restarts far apart"
            );
        }
        assert!(CrashLoop::new(Duration::from_secs(1), 9).observe(&state("failed", 0), t0).is_some());
    }

    #[test]
    fn unit_names() {
        assert!(crate::valid_unit_name("debfleet-agent.service") && crate::valid_unit_name("getty@tty1.service"));
        for bad in ["", "x", ".service", "a b.service", "x.service;rm", "../x.service"] {
            assert!(!crate::valid_unit_name(bad), "{bad:?}");
        }
    }
}
