//! The on-disk outbox for telemetry and logs: what is produced while the link is down (or over
//! its budget) waits here, bounded in bytes, and drains at a bounded rate once it can go.
//! Segment files of appended records; beyond the bound the oldest segment goes, and its
//! messages are counted as dropped. A record is `len u32 | fnv32 | class u8 | topic_len u16 |
//! topic | payload` (little-endian); a torn or damaged tail (power cut) ends the segment.
//! A segment is deleted once drained; after a crash the one being drained is sent again from
//! its start (telemetry and logs carry their own times, so a repeat is harmless).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use debfleet_protocol::TrafficClass;

const HEADER: usize = 4 + 4 + 1 + 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    pub class: TrafficClass,
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
    count: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The oldest segment's records not sent yet, once it is being drained.
    reading: Option<VecDeque<Spooled>>,
    /// Messages dropped over the bound since the start.
    pub dropped: u64,
}

fn fnv32(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in *p {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn class_byte(c: TrafficClass) -> u8 {
    TrafficClass::ALL.iter().position(|x| *x == c).unwrap_or(0) as u8
}

fn encode(rec: &Spooled) -> Vec<u8> {
    let class = [class_byte(rec.class)];
    let tlen = (rec.topic.len().min(u16::MAX as usize) as u16).to_le_bytes();
    let topic = &rec.topic.as_bytes()[..rec.topic.len().min(u16::MAX as usize)];
    let body_len = (1 + 2 + topic.len() + rec.payload.len()) as u32;
    let sum = fnv32(&[&class, &tlen, topic, &rec.payload]);
    let mut out = Vec::with_capacity(HEADER + topic.len() + rec.payload.len());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&class);
    out.extend_from_slice(&tlen);
    out.extend_from_slice(topic);
    out.extend_from_slice(&rec.payload);
    out
}

/// The records of a segment, up to the first torn or damaged one.
fn decode_all(bytes: &[u8]) -> VecDeque<Spooled> {
    let mut out = VecDeque::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let body = at + 8;
        if len < 3 || bytes.len() - body < len {
            break;
        }
        let b = &bytes[body..body + len];
        let tlen = u16::from_le_bytes([b[1], b[2]]) as usize;
        if 3 + tlen > len || fnv32(&[&b[..1], &b[1..3], &b[3..3 + tlen], &b[3 + tlen..]]) != sum {
            break;
        }
        let (Some(class), Ok(topic)) =
            (TrafficClass::ALL.get(b[0] as usize), String::from_utf8(b[3..3 + tlen].to_vec()))
        else {
            break;
        };
        out.push_back(Spooled { class: *class, topic, payload: b[3 + tlen..].to_vec() });
        at = body + len;
    }
    out
}

impl Spool {
    /// Opens the outbox in `dir`, counting what an earlier run left in it.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        seqs.sort_unstable();
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = dir.join(format!("{seq:010}.seg"));
            let bytes = fs::read(&path)?;
            let count = decode_all(&bytes).len() as u64;
            segments.push_back(Segment { seq, bytes: bytes.len() as u64, count });
        }
        let mut s = Spool {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4096, 256 * 1024),
            segments,
            reading: None,
            dropped: 0,
        };
        s.enforce_bound();
        Ok(s)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:010}.seg"))
    }

    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
        self.enforce_bound();
    }

    /// Messages waiting, and their bytes on disk.
    pub fn len(&self) -> (u64, u64) {
        let consumed = match (&self.reading, self.segments.front()) {
            (Some(r), Some(front)) => front.count - r.len() as u64,
            _ => 0,
        };
        let count: u64 = self.segments.iter().map(|s| s.count).sum();
        (count - consumed, self.segments.iter().map(|s| s.bytes).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }

    /// Appends a message. Over the bound the oldest segments are dropped (counted); a message
    /// larger than the whole bound is dropped itself.
    pub fn push(&mut self, rec: &Spooled) -> io::Result<()> {
        let bytes = encode(rec);
        if bytes.len() as u64 > self.max_bytes {
            self.dropped += 1;
            return Ok(());
        }
        // The segment being drained is never appended to: what it holds is read already.
        let reuse = match self.segments.back() {
            Some(last) => {
                last.bytes + bytes.len() as u64 <= self.segment_bytes
                    && !(self.reading.is_some() && self.segments.len() == 1)
            }
            None => false,
        };
        if !reuse {
            let seq = self.segments.back().map_or(1, |s| s.seq + 1);
            self.segments.push_back(Segment { seq, bytes: 0, count: 0 });
        }
        let last = self.segments.back_mut().expect("a segment");
        let path = self.dir.join(format!("{:010}.seg", last.seq));
        let mut f = OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(&bytes)?;
        last.bytes += bytes.len() as u64;
        last.count += 1;
        self.enforce_bound();
        Ok(())
    }

    fn enforce_bound(&mut self) {
        while self.segments.iter().map(|s| s.bytes).sum::<u64>() > self.max_bytes && !self.segments.is_empty() {
            let oldest = self.segments.pop_front().expect("not empty");
            let lost = match self.reading.take() {
                Some(r) => r.len() as u64,
                None => oldest.count,
            };
            self.dropped += lost;
            let _ = fs::remove_file(self.path(oldest.seq));
        }
    }

    /// Takes up to `n` of the oldest messages, in order, stopping at the first whose class
    /// `may_go` refuses (it stays first in line).
    pub fn pop_while(&mut self, n: usize, may_go: impl Fn(TrafficClass) -> bool) -> Vec<Spooled> {
        let mut out = Vec::new();
        while out.len() < n {
            let Some(front) = self.segments.front() else { break };
            if self.reading.is_none() {
                let mut bytes = Vec::new();
                let read = File::open(self.path(front.seq)).and_then(|mut f| f.read_to_end(&mut bytes));
                if let Err(e) = read {
                    tracing::warn!("outbox segment {}: {e}; skipped", front.seq);
                }
                self.reading = Some(decode_all(&bytes));
            }
            let reading = self.reading.as_mut().expect("set above");
            match reading.front() {
                Some(r) if !may_go(r.class) => break,
                Some(_) => out.push(reading.pop_front().expect("front exists")),
                None => {
                    self.reading = None;
                    let done = self.segments.pop_front().expect("front exists");
                    let _ = fs::remove_file(self.path(done.seq));
                }
            }
        }
        // A drained segment goes at once, so the count and the disk agree.
        if self.reading.as_ref().is_some_and(|r| r.is_empty()) {
            self.reading = None;
            if let Some(done) = self.segments.pop_front() {
                let _ = fs::remove_file(self.path(done.seq));
            }
        }
        out
    }

    #[cfg(test)]
    pub fn pop(&mut self, n: usize) -> Vec<Spooled> {
        self.pop_while(n, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> Spooled {
        Spooled {
            class: if i.is_multiple_of(2) { TrafficClass::Telemetry } else { TrafficClass::Logs },
            topic: format!("debfleet/device/d/t{i}"),
            payload: format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(100)).into_bytes(),
        }
    }

    #[test]
    fn keeps_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        for i in 0..200 {
            s.push(&rec(i)).unwrap();
        }
        assert_eq!(s.len().0, 200);
        let first: Vec<Spooled> = s.pop(50);
        assert_eq!(first, (0..50).map(rec).collect::<Vec<_>>());
        assert_eq!(s.len().0, 150);
        // A restart re-reads what was left, from the start of the segment being drained.
        drop(s);
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        let rest = s.pop(1000);
        assert!((150..=200).contains(&rest.len()), "{}", rest.len());
        assert_eq!(rest.last().unwrap(), &rec(199));
        assert!(s.is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "drained segments are deleted");
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 16 * 1024).unwrap();
        for i in 0..1000 {
            s.push(&rec(i)).unwrap();
        }
        let (count, bytes) = s.len();
        assert!(bytes <= 16 * 1024, "{bytes}");
        assert_eq!(count + s.dropped, 1000);
        let all = s.pop(2000);
        assert_eq!(all.last().unwrap(), &rec(999), "the newest are kept");
        let n = |r: &Spooled| r.topic.rsplit('t').next().unwrap().parse::<usize>().unwrap();
        assert!(all.windows(2).all(|w| n(&w[0]) + 1 == n(&w[1])), "in order, without gaps after the dropped");
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        for i in 0..3 {
            s.push(&rec(i)).unwrap();
        }
        let seg = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut bytes = fs::read(&seg).unwrap();
        let one = encode(&rec(0)).len();
        bytes.truncate(2 * one + 10);
        fs::write(&seg, &bytes).unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        assert_eq!(s.pop(10), vec![rec(0), rec(1)]);
        // A flipped byte inside a record: that record and what follows are not delivered.
        let mut s2 = Spool::open(&dir.path().join("b"), 64 * 1024).unwrap();
        for i in 0..3 {
            s2.push(&rec(i)).unwrap();
        }
        let seg = dir.path().join("b").join("0000000001.seg");
        let mut bytes = fs::read(&seg).unwrap();
        bytes[one + 20] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let mut s2 = Spool::open(&dir.path().join("b"), 64 * 1024).unwrap();
        assert_eq!(s2.pop(10), vec![rec(0)]);
        assert!(s.is_empty() && s2.is_empty());
    }

    #[test]
    fn a_refused_class_stays_first_in_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        for i in 0..4 {
            s.push(&rec(i)).unwrap();
        }
        assert_eq!(s.pop_while(10, |c| c == TrafficClass::Telemetry), vec![rec(0)]);
        assert_eq!(s.pop(10), vec![rec(1), rec(2), rec(3)]);
    }
}
