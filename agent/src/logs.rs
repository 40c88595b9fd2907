//! The agent's own log events, forwarded to the `logs` topic: a tracing layer hands lines to a
//! bounded queue without blocking; the batcher applies the rate limit and cuts batches.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debfleet_protocol::cfg::LogsCfg;
use debfleet_protocol::limits::{MAX_LOG_BATCH_BYTES, MAX_LOG_LINE_CHARS};
use debfleet_protocol::{time, LogBatch, LogLine, CONTRACT_VERSION};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

const QUEUE: usize = 1024;

/// Settings the layer reads on every event; the agent changes them when `cfg` changes.
pub struct LogGate {
    enabled: AtomicBool,
    /// 1 = error ... 5 = trace.
    level: AtomicU8,
    overflow: AtomicU64,
}

impl LogGate {
    pub fn apply(&self, cfg: &LogsCfg) {
        self.enabled.store(cfg.enabled, Ordering::Relaxed);
        self.level.store(level_rank_str(&cfg.level), Ordering::Relaxed);
    }
}

fn level_rank(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

fn level_rank_str(s: &str) -> u8 {
    match s {
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        _ => 5,
    }
}

pub struct ForwardLayer {
    gate: Arc<LogGate>,
    tx: SyncSender<LogLine>,
}

/// Creates the layer to install and the receiving end for the batcher.
pub fn forwarding(cfg: &LogsCfg) -> (ForwardLayer, Arc<LogGate>, Receiver<LogLine>) {
    let gate =
        Arc::new(LogGate { enabled: AtomicBool::new(false), level: AtomicU8::new(3), overflow: AtomicU64::new(0) });
    gate.apply(cfg);
    let (tx, rx) = sync_channel(QUEUE);
    (ForwardLayer { gate: gate.clone(), tx }, gate, rx)
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
            // Debug of fmt::Arguments has no quotes; keep others' fields as key=value after it.
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for ForwardLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // The MQTT client's own chatter is about the very connection the logs travel on.
        if !self.gate.enabled.load(Ordering::Relaxed)
            || level_rank(meta.level()) > self.gate.level.load(Ordering::Relaxed)
            || meta.target().starts_with("rumqttc")
        {
            return;
        }
        let mut v = MessageVisitor(String::new());
        event.record(&mut v);
        let mut msg = v.0;
        if msg.len() > MAX_LOG_LINE_CHARS {
            let cut = (0..=MAX_LOG_LINE_CHARS).rev().find(|&i| msg.is_char_boundary(i)).unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
        let line = LogLine {
            ts: time::now(),
            level: meta.level().as_str().to_ascii_lowercase(),
            target: meta.target().to_owned(),
            msg,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.gate.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Rate limit and batching, fed from the queue.
pub struct Batcher {
    rx: Receiver<LogLine>,
    gate: Arc<LogGate>,
    window_start: Instant,
    window_count: u32,
    dropped: u64,
    last_flush: Instant,
}

impl Batcher {
    pub fn new(rx: Receiver<LogLine>, gate: Arc<LogGate>, now: Instant) -> Batcher {
        Batcher { rx, gate, window_start: now, window_count: 0, dropped: 0, last_flush: now }
    }

    /// Drains queued lines into batches when the batch interval has passed. Lines beyond the
    /// per-minute limit are counted as dropped and reported with the next batch.
    pub fn flush(&mut self, now: Instant, cfg: &LogsCfg) -> Vec<LogBatch> {
        if now.duration_since(self.last_flush) < Duration::from_secs(cfg.batch_s.into()) {
            return Vec::new();
        }
        self.last_flush = now;
        let mut lines = VecDeque::new();
        while let Ok(line) = self.rx.try_recv() {
            if now.duration_since(self.window_start) >= Duration::from_secs(60) {
                self.window_start = now;
                self.window_count = 0;
            }
            if cfg.enabled && self.window_count < cfg.max_lines_per_min {
                self.window_count += 1;
                lines.push_back(line);
            } else if cfg.enabled {
                self.dropped += 1;
            }
        }
        self.dropped += self.gate.overflow.swap(0, Ordering::Relaxed);
        if !cfg.enabled || (lines.is_empty() && self.dropped == 0) {
            return Vec::new();
        }
        let mut batches = Vec::new();
        let mut current = Vec::new();
        let mut size = 128;
        for line in lines {
            let line_size = 64 + line.msg.len() + line.target.len() + line.ts.len();
            if size + line_size > MAX_LOG_BATCH_BYTES && !current.is_empty() {
                batches.push(std::mem::take(&mut current));
                size = 128;
            }
            size += line_size;
            current.push(line);
        }
        batches.push(current);
        let dropped = std::mem::take(&mut self.dropped);
        let n = batches.len();
        batches
            .into_iter()
            .enumerate()
            .map(|(i, lines)| LogBatch {
                v: CONTRACT_VERSION,
                ts: time::now(),
                lines,
                dropped: if i + 1 == n { dropped } else { 0 },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn cfg(max: u32) -> LogsCfg {
        LogsCfg { enabled: true, level: "info".into(), batch_s: 1, max_lines_per_min: max }
    }

    #[test]
    fn level_gate_rate_limit_and_dropped_count() {
        let (layer, gate, rx) = forwarding(&cfg(3));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden at info");
            for i in 0..5 {
                tracing::info!(n = i, "line {i}");
            }
            tracing::warn!(target: "rumqttc::state", "not forwarded");
        });
        let t0 = Instant::now();
        let mut b = Batcher::new(rx, gate.clone(), t0);
        assert!(b.flush(t0, &cfg(3)).is_empty(), "batch interval not reached");
        let batches = b.flush(t0 + Duration::from_secs(1), &cfg(3));
        assert_eq!(batches.len(), 1);
        let msgs: Vec<&str> = batches[0].lines.iter().map(|l| l.msg.as_str()).collect();
        assert_eq!(msgs, ["line 0 n=0", "line 1 n=1", "line 2 n=2"]);
        assert_eq!(batches[0].dropped, 2);
        assert_eq!(batches[0].lines[0].level, "info");
    }

    #[test]
    fn disabled_forwards_nothing() {
        let mut c = cfg(100);
        c.enabled = false;
        let (layer, gate, rx) = forwarding(&c);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || tracing::error!("x"));
        let t0 = Instant::now();
        assert!(Batcher::new(rx, gate, t0).flush(t0 + Duration::from_secs(5), &c).is_empty());
    }

    #[test]
    fn large_volumes_split_into_bounded_batches() {
        let (layer, gate, rx) = forwarding(&cfg(100_000));
        let long = "x".repeat(900);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for _ in 0..100 {
                tracing::info!("{long}");
            }
        });
        let t0 = Instant::now();
        let batches = Batcher::new(rx, gate, t0).flush(t0 + Duration::from_secs(1), &cfg(100_000));
        assert!(batches.len() > 1);
        for b in &batches {
            assert!(serde_json::to_vec(b).unwrap().len() <= MAX_LOG_BATCH_BYTES);
        }
        assert_eq!(batches.iter().map(|b| b.lines.len()).sum::<usize>(), 100);
    }
}
