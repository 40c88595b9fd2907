//! Human output: aligned tables, relative times, a spinner while a person waits.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use debfleet_protocol::time::{now_unix_ms, parse_unix_ms};
use serde_json::Value;

/// Renders rows under a header with every column padded to its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// "3m ago" style age of an RFC 3339 timestamp.
pub fn ago(ts: &str) -> String {
    let Some(t) = parse_unix_ms(ts) else {
        return ts.to_owned();
    };
    let secs = (now_unix_ms() - t).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// "90 s", "15 min", "1 h" style length of a span of seconds.
pub fn duration_words(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 if secs.is_multiple_of(60) => format!("{} min", secs / 60),
        120..=7199 => format!("{:.1} min", secs as f64 / 60.0),
        _ if secs.is_multiple_of(3600) => format!("{} h", secs / 3600),
        _ => format!("{:.1} h", secs as f64 / 3600.0),
    }
}

/// Flattens a JSON object into `dotted.key = value` lines (values as JSON), sorted.
pub fn flatten(v: &Value) -> Vec<(String, String)> {
    debfleet_protocol::cfg::leaves(v).into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

/// A spinner on stderr while the console waits, shown only to a person at a terminal.
pub struct Spinner {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    pub fn start(message: String) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::io::stderr().is_terminal().then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    eprint!("\r{} {message}", frames[i % frames.len()]);
                    let _ = std::io::stderr().flush();
                    i += 1;
                    std::thread::sleep(Duration::from_millis(80));
                }
                eprint!("\r\x1b[2K");
            })
        });
        Spinner { stop, handle }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = table(&["ID", "STATUS"], &[vec!["lab-10".into(), "online".into()], vec!["a".into(), "lost".into()]]);
        assert_eq!(t, "ID      STATUS\nlab-10  online\na       lost\n");
    }

    #[test]
    fn flattens_nested_objects() {
        let v = serde_json::json!({"b": {"c": 1, "a": [1]}, "a": "x"});
        assert_eq!(
            flatten(&v),
            vec![("a".into(), "\"x\"".into()), ("b.a".into(), "[1]".into()), ("b.c".into(), "1".into())]
        );
    }
}
