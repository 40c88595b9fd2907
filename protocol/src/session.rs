//! Remote sessions (`shell`, `forward`): the frames both ends exchange on a session's topics and
//! the keys that seal them.
//!
//! A session is an operation: the console opens it with a command carrying a fresh X25519
//! public key; the device answers in the operation's running record with its own, and both
//! derive one ChaCha20-Poly1305 key per direction (HKDF-SHA256 over the shared secret, bound to
//! the session id and both public keys). Every frame is sealed with its sequence number as the
//! nonce, so a client that can write the session's topics but did not open it (it lacks the
//! console's private key) can neither inject input nor read the output, and a frame cannot be
//! replayed or reordered without being noticed.
//!
//! On the wire a frame is `seq` (8 bytes, big-endian) then the sealed body (kind byte and
//! fields, big-endian) and its 16-byte tag. Data flows under a window: a sender keeps at most
//! [`WINDOW`] data bytes unacknowledged; the receiver acknowledges what it has consumed
//! (written to the terminal, the socket) with [`Frame::Ack`].

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, PublicKey, UnparsedPublicKey, X25519};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::SystemRandom;

/// Data bytes per frame at most (well under any broker's message cap).
pub const CHUNK: usize = 16 * 1024;
/// Data bytes a sender may have sent and not yet seen acknowledged.
pub const WINDOW: u64 = 256 * 1024;
/// The console sends a [`Frame::Ping`] when it has sent nothing for this long...
pub const KEEPALIVE_MS: u64 = 5_000;
/// ...and the device ends a session whose console has sent nothing for this long (the console
/// was killed, or lost its connection: sessions never outlive the console's connection).
pub const PEER_TIMEOUT_MS: u64 = 20_000;
/// Connections one forward session carries at once.
pub const MAX_STREAMS: usize = 16;
/// A frame on the wire: sequence number, kind, the largest body, the tag.
pub const MAX_FRAME_BYTES: usize = 8 + 1 + 4 + CHUNK + 16;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Console to device (`.../in`).
    In,
    /// Device to console (`.../out`).
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// How a session's program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes of a stream: the terminal (stream 0) or one forwarded connection.
    Data { stream: u32, bytes: Vec<u8> },
    /// All data bytes the sender of this frame has consumed so far from the other side.
    Ack { consumed: u64 },
    /// The console's terminal changed size.
    Resize { cols: u16, rows: u16 },
    /// A new forwarded connection (console to device).
    Open { stream: u32 },
    /// A stream ended (its connection closed, or could not be made: `error`).
    Eof { stream: u32, error: Option<String> },
    /// The console is still there (sent when it has nothing else to send).
    Ping,
    /// The shell ended (device to console); the last frame of a shell session.
    Exit(ExitStatus),
    /// Either side ends the session, saying why.
    Close { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not a session frame: {0}")]
    Malformed(&'static str),
    #[error("the frame is not sealed with this session's key (another client wrote it, or it was altered)")]
    Forged,
    #[error("frame {0} came again")]
    Duplicate(u64),
    #[error("frames {expected}..{got} never arrived")]
    Gap { expected: u64, got: u64 },
    #[error("the key exchange failed: {0}")]
    Key(&'static str),
}

const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_RESIZE: u8 = 3;
const KIND_OPEN: u8 = 4;
const KIND_EOF: u8 = 5;
const KIND_PING: u8 = 6;
const KIND_EXIT_CODE: u8 = 7;
const KIND_EXIT_SIGNAL: u8 = 8;
const KIND_CLOSE: u8 = 9;

impl Frame {
    /// The body as it is sealed (kind byte and fields).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        match self {
            Frame::Data { stream, bytes } => {
                b.push(KIND_DATA);
                b.extend_from_slice(&stream.to_be_bytes());
                b.extend_from_slice(bytes);
            }
            Frame::Ack { consumed } => {
                b.push(KIND_ACK);
                b.extend_from_slice(&consumed.to_be_bytes());
            }
            Frame::Resize { cols, rows } => {
                b.push(KIND_RESIZE);
                b.extend_from_slice(&cols.to_be_bytes());
                b.extend_from_slice(&rows.to_be_bytes());
            }
            Frame::Open { stream } => {
                b.push(KIND_OPEN);
                b.extend_from_slice(&stream.to_be_bytes());
            }
            Frame::Eof { stream, error } => {
                b.push(KIND_EOF);
                b.extend_from_slice(&stream.to_be_bytes());
                if let Some(e) = error {
                    b.extend_from_slice(cut(e).as_bytes());
                }
            }
            Frame::Ping => b.push(KIND_PING),
            Frame::Exit(ExitStatus::Code(c)) => {
                b.push(KIND_EXIT_CODE);
                b.extend_from_slice(&c.to_be_bytes());
            }
            Frame::Exit(ExitStatus::Signal(s)) => {
                b.push(KIND_EXIT_SIGNAL);
                b.extend_from_slice(&s.to_be_bytes());
            }
            Frame::Close { reason } => {
                b.push(KIND_CLOSE);
                b.extend_from_slice(cut(reason).as_bytes());
            }
        }
        b
    }

    /// A body once opened: total over any bytes (a frame or an error, never a panic).
    pub fn decode(b: &[u8]) -> Result<Frame, SessionError> {
        let (&kind, rest) = b.split_first().ok_or(SessionError::Malformed("empty"))?;
        let u32_at = |r: &[u8]| r.get(..4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
        let exact =
            |r: &[u8], n: usize| if r.len() == n { Ok(()) } else { Err(SessionError::Malformed("wrong length")) };
        let text = |r: &[u8]| String::from_utf8(r.to_vec()).map_err(|_| SessionError::Malformed("text is not UTF-8"));
        Ok(match kind {
            KIND_DATA => {
                let stream = u32_at(rest).ok_or(SessionError::Malformed("short data"))?;
                if rest.len() - 4 > CHUNK {
                    return Err(SessionError::Malformed("data chunk over the limit"));
                }
                Frame::Data { stream, bytes: rest[4..].to_vec() }
            }
            KIND_ACK => {
                exact(rest, 8)?;
                let mut n = [0u8; 8];
                n.copy_from_slice(rest);
                Frame::Ack { consumed: u64::from_be_bytes(n) }
            }
            KIND_RESIZE => {
                exact(rest, 4)?;
                Frame::Resize {
                    cols: u16::from_be_bytes([rest[0], rest[1]]),
                    rows: u16::from_be_bytes([rest[2], rest[3]]),
                }
            }
            KIND_OPEN => {
                exact(rest, 4)?;
                Frame::Open { stream: u32_at(rest).unwrap_or(0) }
            }
            KIND_EOF => {
                let stream = u32_at(rest).ok_or(SessionError::Malformed("short eof"))?;
                let error = if rest.len() > 4 { Some(text(&rest[4..])?) } else { None };
                Frame::Eof { stream, error }
            }
            KIND_PING => {
                exact(rest, 0)?;
                Frame::Ping
            }
            KIND_EXIT_CODE | KIND_EXIT_SIGNAL => {
                exact(rest, 4)?;
                let n = u32_at(rest).unwrap_or(0) as i32;
                Frame::Exit(if kind == KIND_EXIT_CODE { ExitStatus::Code(n) } else { ExitStatus::Signal(n) })
            }
            KIND_CLOSE => Frame::Close { reason: text(rest)? },
            _ => return Err(SessionError::Malformed("unknown kind")),
        })
    }
}

/// Reasons and errors travel cut to a line's worth.
fn cut(s: &str) -> &str {
    match s.char_indices().nth(512) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// One side's fresh key pair for a session: the console makes one per session it opens, the
/// device one per session it accepts. Used once.
pub struct KeyPair {
    private: EphemeralPrivateKey,
    public: [u8; 32],
}

impl KeyPair {
    pub fn generate() -> Result<KeyPair, SessionError> {
        let rng = SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| SessionError::Key("no randomness"))?;
        let public: PublicKey = private.compute_public_key().map_err(|_| SessionError::Key("public key"))?;
        let mut p = [0u8; 32];
        p.copy_from_slice(public.as_ref());
        Ok(KeyPair { private, public: p })
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The session's sealing state for this side (`console`: the side that opened it), from
    /// the other side's public key.
    pub fn agree(self, peer: &[u8; 32], session: &str, console: bool) -> Result<Sealer, SessionError> {
        let (console_pub, device_pub) = if console { (self.public, *peer) } else { (*peer, self.public) };
        let keys = agree_ephemeral(self.private, &UnparsedPublicKey::new(&X25519, peer), |shared| {
            let prk = Salt::new(HKDF_SHA256, b"debfleet session v1").extract(shared);
            let key = |dir: Direction| -> Option<LessSafeKey> {
                let info = [session.as_bytes(), &console_pub[..], &device_pub[..], dir.as_str().as_bytes()];
                let okm = prk.expand(&info, &CHACHA20_POLY1305).ok()?;
                Some(LessSafeKey::new(UnboundKey::from(okm)))
            };
            Some((key(Direction::In)?, key(Direction::Out)?))
        })
        .map_err(|_| SessionError::Key("the peer's public key is not usable"))?
        .ok_or(SessionError::Key("key derivation"))?;
        let (k_in, k_out) = keys;
        let (send, recv, send_dir, recv_dir) = if console {
            (k_in, k_out, Direction::In, Direction::Out)
        } else {
            (k_out, k_in, Direction::Out, Direction::In)
        };
        Ok(Sealer { send, recv, send_dir, recv_dir, next_send: 0, next_recv: 0 })
    }
}

/// Seals what one side sends and opens what it receives, in order.
pub struct Sealer {
    send: LessSafeKey,
    recv: LessSafeKey,
    send_dir: Direction,
    recv_dir: Direction,
    next_send: u64,
    next_recv: u64,
}

fn nonce(dir: Direction, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = match dir {
        Direction::In => b'i',
        Direction::Out => b'o',
    };
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Sealer {
    pub fn seal(&mut self, frame: &Frame) -> Vec<u8> {
        let seq = self.next_send;
        self.next_send += 1;
        let mut body = frame.encode();
        // Sealing fails only for bodies of gigabytes; ours are bounded by CHUNK.
        let tag = self.send.seal_in_place_separate_tag(nonce(self.send_dir, seq), Aad::empty(), &mut body);
        let mut out = Vec::with_capacity(8 + body.len() + 16);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&body);
        if let Ok(tag) = tag {
            out.extend_from_slice(tag.as_ref());
        }
        out
    }

    /// The next frame from the other side. A forged or altered frame, or a duplicate, leaves the
    /// state as it was (the caller ignores it); a gap means frames were lost and the session
    /// cannot go on.
    pub fn open(&mut self, msg: &[u8]) -> Result<Frame, SessionError> {
        if msg.len() < 8 + 1 + 16 || msg.len() > MAX_FRAME_BYTES {
            return Err(SessionError::Malformed("wrong size"));
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&msg[..8]);
        let seq = u64::from_be_bytes(s);
        let mut body = msg[8..].to_vec();
        let plain = self
            .recv
            .open_in_place(nonce(self.recv_dir, seq), Aad::empty(), &mut body)
            .map_err(|_| SessionError::Forged)?;
        if seq < self.next_recv {
            return Err(SessionError::Duplicate(seq));
        }
        if seq > self.next_recv {
            return Err(SessionError::Gap { expected: self.next_recv, got: seq });
        }
        let frame = Frame::decode(plain)?;
        self.next_recv += 1;
        Ok(frame)
    }
}

/// One side's flow control: what it may send, and what it owes the other side an
/// acknowledgement for. Both ends keep one, so they cannot disagree on what counts.
#[derive(Debug, Default, Clone)]
pub struct Window {
    /// Data bytes this side sent, and the other side has acknowledged.
    sent: u64,
    acked: u64,
    /// Data bytes received, written out (to the terminal, a socket, the screen), and
    /// acknowledged.
    taken: u64,
    consumed: u64,
    told: u64,
}

impl Window {
    /// Whether another chunk may go out now.
    pub fn room(&self) -> bool {
        self.sent - self.acked < WINDOW
    }

    pub fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    /// The other side's [`Frame::Ack`]; an error when it acknowledges more than was sent.
    pub fn acked(&mut self, consumed: u64) -> Result<(), &'static str> {
        if consumed > self.sent {
            return Err("the other side acknowledged more than was sent");
        }
        self.acked = self.acked.max(consumed);
        Ok(())
    }

    /// Data arrived; an error when the other side sent past its window.
    pub fn taken(&mut self, n: usize) -> Result<(), &'static str> {
        self.taken += n as u64;
        if self.taken - self.consumed > WINDOW + CHUNK as u64 {
            return Err("the other side sent past its window");
        }
        Ok(())
    }

    /// `n` received bytes were written out: the acknowledgement to send now, once a quarter of
    /// the window waits for one.
    pub fn consumed(&mut self, n: usize) -> Option<Frame> {
        self.consumed = (self.consumed + n as u64).min(self.taken);
        (self.consumed - self.told >= WINDOW / 4).then(|| self.ack()).flatten()
    }

    /// The acknowledgement of everything written out so far, if any is owed (on a tick, or
    /// before the last frame).
    pub fn ack(&mut self) -> Option<Frame> {
        (self.consumed > self.told).then(|| {
            self.told = self.consumed;
            Frame::Ack { consumed: self.consumed }
        })
    }

    /// Data bytes sent and received so far.
    pub fn bytes_out(&self) -> u64 {
        self.sent
    }

    pub fn bytes_in(&self) -> u64 {
        self.taken
    }
}

/// Where a forward may connect: `HOST:PORT`, a host name or an IP address (IPv6 in brackets).
pub fn valid_forward_target(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'));
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str) -> (Sealer, Sealer) {
        let c = KeyPair::generate().unwrap();
        let d = KeyPair::generate().unwrap();
        let (cp, dp) = (c.public(), d.public());
        (c.agree(&dp, id, true).unwrap(), d.agree(&cp, id, false).unwrap())
    }

    #[test]
    fn frames_round_trip_both_ways() {
        let (mut console, mut device) = pair("s-1");
        let frames = [
            Frame::Data { stream: 0, bytes: b"ls\r".to_vec() },
            Frame::Resize { cols: 120, rows: 40 },
            Frame::Ack { consumed: 1 << 40 },
            Frame::Open { stream: 7 },
            Frame::Eof { stream: 7, error: Some("connection refused".into()) },
            Frame::Eof { stream: 3, error: None },
            Frame::Ping,
            Frame::Close { reason: "bye".into() },
            Frame::Data { stream: 1, bytes: vec![0xff; CHUNK] },
        ];
        for f in &frames {
            assert_eq!(&device.open(&console.seal(f)).unwrap(), f);
        }
        for f in [Frame::Exit(ExitStatus::Code(3)), Frame::Exit(ExitStatus::Signal(9)), frames[0].clone()] {
            assert_eq!(console.open(&device.seal(&f)).unwrap(), f);
        }
    }

    #[test]
    fn foreign_altered_replayed_and_lost_frames_are_told_apart() {
        let (mut console, mut device) = pair("s-1");
        // Another client, with its own keys for the same session id, cannot write input.
        let (mut eve, _) = pair("s-1");
        let forged = eve.seal(&Frame::Data { stream: 0, bytes: b"rm -rf /\r".to_vec() });
        assert_eq!(device.open(&forged), Err(SessionError::Forged));
        // The device's own output, sent back on the input topic, does not open either.
        let mut other_device = pair("s-1").1;
        assert_eq!(device.open(&other_device.seal(&Frame::Ping)), Err(SessionError::Forged));
        let first = console.seal(&Frame::Data { stream: 0, bytes: b"a".to_vec() });
        let mut altered = first.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(device.open(&altered), Err(SessionError::Forged));
        let mut renumbered = first.clone();
        renumbered[7] = 5;
        assert_eq!(device.open(&renumbered), Err(SessionError::Forged));
        // None of that moved the state: the genuine frame still opens, once.
        assert!(device.open(&first).is_ok());
        assert_eq!(device.open(&first), Err(SessionError::Duplicate(0)));
        let _lost = console.seal(&Frame::Ping);
        let third = console.seal(&Frame::Ping);
        assert_eq!(device.open(&third), Err(SessionError::Gap { expected: 1, got: 2 }));
        // Keys are per session id.
        let (mut c2, _) = pair("s-2");
        assert_eq!(device.open(&c2.seal(&Frame::Ping)), Err(SessionError::Forged));
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let (_, mut device) = pair("s");
        for junk in [&b""[..], &[0u8; 10][..], &[0xffu8; 40][..], &vec![0u8; MAX_FRAME_BYTES + 1][..]] {
            assert!(device.open(junk).is_err());
        }
        for body in [&[][..], &[KIND_ACK, 1][..], &[99][..], &[KIND_CLOSE, 0xff][..], &[KIND_DATA, 0][..]] {
            assert!(Frame::decode(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn windows_bound_both_ways_and_acknowledge_by_quarters() {
        let (mut a, mut b) = (Window::default(), Window::default());
        let mut chunks = 0;
        while a.room() {
            a.sent(CHUNK);
            b.taken(CHUNK).unwrap();
            chunks += 1;
        }
        assert_eq!(chunks as u64 * CHUNK as u64, WINDOW);
        // What b writes out is acknowledged every quarter window, and opens a's window again.
        let mut acks = Vec::new();
        for _ in 0..chunks {
            acks.extend(b.consumed(CHUNK));
        }
        assert_eq!(acks.len(), 4);
        for f in acks {
            let Frame::Ack { consumed } = f else { panic!("{f:?}") };
            a.acked(consumed).unwrap();
        }
        assert!(a.room());
        assert_eq!(b.ack(), None);
        // Nothing can be acknowledged that was not sent, nor sent far past the window.
        assert!(a.acked(WINDOW + 1).is_err());
        let mut c = Window::default();
        assert!(c.taken(WINDOW as usize + CHUNK + 1).is_err());
        // Consuming more than arrived (a byte of its own, such as ^D) is not acknowledged.
        let mut d = Window::default();
        d.taken(10).unwrap();
        assert_eq!(d.consumed(11), None);
        assert_eq!(d.ack(), Some(Frame::Ack { consumed: 10 }));
    }

    #[test]
    fn forward_targets() {
        for ok in ["127.0.0.1:80", "localhost:8080", "[::1]:22", "kiosk.local:443"] {
            assert!(valid_forward_target(ok), "{ok}");
        }
        for bad in ["127.0.0.1", ":80", "host:0", "host:99999", "a b:80", "-oProxy:1/", "host:80/x"] {
            assert!(!valid_forward_target(bad), "{bad}");
        }
    }
}
