//! Signed-in sessions (random tokens in an HttpOnly cookie, each with its own CSRF token) and
//! the limit on failed sign-ins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use debfleet_protocol::Role;

/// A session lasts this long without use.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// Failed sign-ins allowed per address within [`WINDOW`]; then 429 until it has passed.
pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// Every form carries it; a POST without it (or with another) is refused.
    pub csrf: String,
}

/// 32 random bytes, hex.
pub fn token() -> String {
    let mut b = [0u8; 32];
    // getrandom fails only without a kernel source of randomness; nothing here works then.
    getrandom::getrandom(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, (Session, Instant)>>,
}

impl Sessions {
    /// A new session; its cookie value.
    pub fn open(&self, user: &str, role: Role) -> String {
        let id = token();
        let s = Session { user: user.to_owned(), role, csrf: token() };
        if let Ok(mut m) = self.live.lock() {
            let now = Instant::now();
            m.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
            m.insert(id.clone(), (s, now));
        }
        id
    }

    /// The session of this cookie value, if it is live (its use keeps it so).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut m = self.live.lock().ok()?;
        let now = Instant::now();
        match m.get_mut(id) {
            Some((s, used)) if now.duration_since(*used) < IDLE => {
                *used = now;
                Some(s.clone())
            }
            Some(_) => {
                m.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(id);
        }
    }
}

/// Failed sign-ins per address.
#[derive(Default)]
pub struct Limiter {
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

impl Limiter {
    /// Whether this address may try again now; when not, how long until it may.
    pub fn allowed(&self, ip: IpAddr) -> Result<(), Duration> {
        let Ok(mut m) = self.failures.lock() else { return Ok(()) };
        let now = Instant::now();
        let list = m.entry(ip).or_default();
        list.retain(|t| now.duration_since(*t) < WINDOW);
        match list.first() {
            Some(first) if list.len() >= MAX_FAILURES => Err(WINDOW.saturating_sub(now.duration_since(*first))),
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: IpAddr) {
        if let Ok(mut m) = self.failures.lock() {
            m.entry(ip).or_default().push(Instant::now());
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&ip);
        }
    }
}

/// Constant-time comparison of two tokens.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_resolve_and_close() {
        let s = Sessions::default();
        let id = s.open("ana", Role::Operator);
        let got = s.get(&id).unwrap();
        assert_eq!((got.user.as_str(), got.role), ("ana", Role::Operator));
        assert_eq!(got.csrf.len(), 64);
        assert_ne!(got.csrf, id);
        assert!(s.get("nope").is_none());
        s.close(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn an_address_is_held_back_after_its_failures() {
        let l = Limiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(l.allowed(ip).is_ok());
            l.failed(ip);
        }
        assert!(l.allowed(ip).unwrap_err() > Duration::from_secs(290));
        assert!(l.allowed("127.0.0.2".parse().unwrap()).is_ok());
        l.succeeded(ip);
        assert!(l.allowed(ip).is_ok());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
